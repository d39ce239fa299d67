"""The Python API: `ddpo.train` runs what `ddpo train` runs; callables and lists are accepted and recorded;
bad input is refused by name; every script in examples/ runs (on the Shapes world, tiny budgets)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import cli_args, mean_brightness
from safetensors.torch import load_file

import ddpo
from ddpo.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIMING_KEYS = ("_seconds", "rss_mb")


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.endswith(TIMING_KEYS)} for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_python_train_equals_the_cli_run_with_the_same_config(tiny_pipeline_dir, tmp_path):
    cli_run = tmp_path / "cli"
    result = CliRunner().invoke(main, cli_args(tiny_pipeline_dir, cli_run, **{"reward.name": '"helpers:mean_brightness"', "train.lr": 3e-2, "train.clip_range": 1.0}), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    # The same config file, the reward given as a Python callable: recorded by its import name.
    api_run = ddpo.train(cli_run / "config.toml", reward=mean_brightness, out=tmp_path / "api")
    assert api_run.path == tmp_path / "api" and api_run.config.reward.name == "helpers:mean_brightness"
    assert (tmp_path / "api" / "config.toml").read_text() == (cli_run / "config.toml").read_text()
    assert _metrics(api_run.path) == _metrics(cli_run) == [{k: v for k, v in m.items() if not k.endswith(TIMING_KEYS)} for m in api_run.metrics]
    assert len(api_run.metrics) == 2 and api_run.metrics[0]["loss"] != 0
    for epoch in ("epoch-0001", "epoch-0002"):
        ours = load_file(str(api_run.path / "checkpoints" / epoch / "pytorch_lora_weights.safetensors"))
        theirs = load_file(str(cli_run / "checkpoints" / epoch / "pytorch_lora_weights.safetensors"))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert api_run.latest_checkpoint == api_run.path / "checkpoints" / "epoch-0002"


def _tiny(model_dir) -> dict:
    """Overrides for a run of seconds on the tiny pipeline, as Python values."""
    return {"model.pretrained": str(model_dir), "model.mixed_precision": "no", "sample.num_steps": 3, "sample.height": 32, "sample.width": 32, "sample.batch_size": 2,
            "sample.num_batches_per_epoch": 1, "train.batch_size": 2, "train.gradient_accumulation_steps": 1, "train.epochs": 1, "train.stat_min_count": 1, "log.num_eval_seeds": 1,
            "log.eval_every": 0, "log.with": [], "log.grid_prompts": ["a cat"]}  # fmt: skip


def test_lambda_reward_and_prompt_list_are_trained_on_and_recorded(tiny_pipeline_dir, tmp_path):
    seen: list[str] = []

    def reward(images, prompts, metadata):
        seen.extend(prompts)
        return [1.0 if "cat" in p else 0.0 for p in prompts]

    run = ddpo.train("sd_compressibility", reward=reward, prompts=["a cat", "a dog riding a bike"], out=tmp_path / "run", **_tiny(tiny_pipeline_dir))
    assert seen and set(seen) <= {"a cat", "a dog riding a bike"}  # only the given prompts were drawn
    assert (run.path / "prompts.txt").read_text() == "a cat\na dog riding a bike\n"
    assert run.config.prompts.source == "file" and run.config.prompts.file == str(run.path / "prompts.txt")
    assert run.config.reward.name.startswith("ddpo.api:session.reward")
    assert len(run.sample(["a cat"], n=2)) == 2


def test_prompt_function_is_seeded_per_sample(tiny_pipeline_dir, tmp_path):
    def prompts(rng):
        return rng.choice(["a cat", "a dog"]), {"k": 1}

    got = []

    def reward(images, prompts_, metadata):
        got.append((tuple(prompts_), tuple(m.get("k") for m in metadata)))
        return [0.5] * len(images)

    keys = _tiny(tiny_pipeline_dir)
    first = ddpo.train("sd_compressibility", reward=reward, prompts=prompts, out=tmp_path / "a", **keys)
    ddpo.train("sd_compressibility", reward=reward, prompts=prompts, out=tmp_path / "b", **keys)
    assert got[0] == got[1] and set(got[0][1]) == {1}  # the same draws, the metadata passed through
    assert first.config.prompts.source.startswith("python:")


def test_bad_input_is_refused_by_name(tmp_path):
    from ddpo.config import ConfigError

    with pytest.raises(ConfigError, match="train.epoch"):
        ddpo.load_config("shapes/default", train__epoch=3)
    with pytest.raises(ConfigError, match="name the section"):
        ddpo.load_config("shapes/default", epochs=3)
    with pytest.raises(ConfigError, match="reward= must be a callable"):
        ddpo.train("shapes/default", reward=3, out=tmp_path / "r")
    assert not (tmp_path / "r").exists()
    config = ddpo.load_config("shapes/default", {"train.epochs": 2}, sample__num_steps=4)
    assert (config.train.epochs, config.sample.num_steps) == (2, 4)


@pytest.mark.parametrize("script", ["custom_reward", "custom_prompts", "weighted_rewards", "resume", "evaluate_run"])
def test_example_runs(script, tmp_path, monkeypatch, capsys):
    """Each example as a user runs it (`python examples/NAME.py --quick`), in this process (imports are shared)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(sys, "argv", [script, "--quick", "--epochs", "2", "--out", str(tmp_path / "run")])
    runpy.run_path(str(EXAMPLES / f"{script}.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert (tmp_path / "run" / "checkpoints" / "epoch-0002").is_dir()
    assert f"run {tmp_path / 'run'}" in out or "resumed to epoch 2" in out or "samples:" in out
    if script == "evaluate_run":
        assert (tmp_path / "run" / "base-vs-tuned.png").is_file() and "epoch-0002:" in out


def test_ddpo_train_stays_callable_beside_its_module():
    import ddpo.training.evaluate
    import ddpo.training.loop  # the trainer's modules: importing them must not hide the API functions

    assert callable(ddpo.train) and callable(ddpo.evaluate) and ddpo.training.Trainer.__name__ == "Trainer"
    with pytest.raises(Exception, match="name the section"):
        ddpo.train("shapes/default", epochs=1)  # reaches ddpo.api.train (which refuses the key)
