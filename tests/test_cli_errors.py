"""Bad input: one line naming the problem, a non-zero exit, and nothing half-written."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from helpers import cli_args

from ddpo.cli import main


def run(args):
    return CliRunner().invoke(main, args)


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("ddpo: error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[-1]


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("train.cfg=false", ["train.cfg=false", "sample.guidance_scale"]),
        ("train.lrr=1e-4", ["unknown config key 'train.lrr'", "did you mean 'train.lr'"]),
        ("train.epochs='ten'", ["train.epochs must be an int", "ten"]),
        ("sample.height=36", ["sample.height=36 is not a multiple of 8"]),
        ("sample.eta=0", ["sample.eta"]),
    ],
)
def test_bad_config_values_are_named_and_nothing_is_written(tiny_pipeline_dir, tmp_path, override, fragments):
    out = tmp_path / "run"
    result = run([*cli_args(tiny_pipeline_dir, out), "--set", override])
    assert_one_line_error(result, *fragments)
    assert not out.exists()


def test_missing_model_path(tmp_path):
    out = tmp_path / "run"
    result = run(cli_args(tmp_path / "no-such-model", out))
    assert_one_line_error(result, "no-such-model", "model.pretrained")
    assert not out.exists()


def test_empty_prompt_file(tiny_pipeline_dir, tmp_path):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    out = tmp_path / "run"
    result = run([*cli_args(tiny_pipeline_dir, out), "--set", 'prompts.source="file"', "--set", f'prompts.file="{empty}"'])
    assert_one_line_error(result, "prompts.txt", "contains no prompts")
    assert not out.exists()


def test_unknown_preset(tmp_path):
    result = run(["train", "--config", "sd_compresibility", "--out", str(tmp_path / "run")])
    assert_one_line_error(result, "sd_compresibility")


@pytest.mark.parametrize(
    "reward, fragments",
    [
        ("helpers:nan_reward", ["helpers:nan_reward", "non-finite", "prompt 'a "]),
        ("helpers:short_reward", ["helpers:short_reward", "returned 3 scores for 4 images"]),
        ("helpers:raising_reward", ["helpers:raising_reward", "the scorer is offline", "prompt 'a "]),
    ],
)
def test_a_misbehaving_reward_is_named_with_its_prompt_and_the_epoch_is_not_recorded(tiny_pipeline_dir, tmp_path, reward, fragments):
    out = tmp_path / "run"
    result = run([*cli_args(tiny_pipeline_dir, out, **{"sample.num_steps": 2}), "--set", f'reward.name="{reward}"'])
    assert_one_line_error(result, *fragments)
    assert not out.exists()  # a run that failed before its first checkpoint leaves nothing behind


def test_resume_of_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "something").mkdir()
    assert_one_line_error(run(["train", "--resume", str(tmp_path / "something")]), "not a ddpo run directory")
    assert_one_line_error(run(["train", "--resume", str(tmp_path / "missing")]), "no such directory")


def test_out_directory_holding_a_run_is_not_overwritten(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.toml").write_text("seed = 1\n")
    result = run(cli_args(tiny_pipeline_dir, out, **{"sample.num_steps": 2}))
    assert_one_line_error(result, "already holds a run", "--resume")
    assert (out / "config.toml").read_text() == "seed = 1\n"


def test_resume_refuses_keys_the_checkpoint_depends_on(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "run"
    assert run(cli_args(tiny_pipeline_dir, out, **{"sample.num_steps": 2, "train.epochs": 1})).exit_code == 0
    assert_one_line_error(run(["train", "--resume", str(out), "--set", "model.lora_rank=8"]), "model.lora_rank=8", "--resume can only change")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_fp16_without_a_gpu_is_refused_in_one_line(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "run"
    result = run([*cli_args(tiny_pipeline_dir, out), "--set", 'model.mixed_precision="fp16"'])
    assert_one_line_error(result, "model.mixed_precision='fp16' needs a CUDA GPU")
    assert not out.exists()


def test_a_non_finite_loss_stops_training_before_it_reaches_the_weights(tiny_pipeline_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from ddpo.algorithms.ddpo import DDPOImportanceSampling

    original = DDPOImportanceSampling.loss
    calls = []

    def loss_nan_in_epoch_two(self, log_prob, old_log_prob, advantages):
        output = original(self, log_prob, old_log_prob, advantages)
        calls.append(1)
        if len(calls) > 12:  # epoch 1 trains 8 samples x 6 steps in 2 minibatches, 12 calls; then NaN
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(DDPOImportanceSampling, "loss", loss_nan_in_epoch_two)
    out = tmp_path / "run"
    result = run(cli_args(tiny_pipeline_dir, out, **{"train.timestep_fraction": 1.0, "train.timestep_chunk": 1}))
    assert_one_line_error(result, "epoch 2", "ddpo_is loss is nan", "before it reaches the weights")
    # Epoch 1 is kept whole; epoch 2 never wrote a checkpoint or a metrics line.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    weights = load_file(out / "checkpoints" / "epoch-0001" / "trainable.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.parametrize("case", ["prompt file not UTF-8", "reward plugin that does not import", "reward server not answering"])
def test_bad_input_that_used_to_escape_as_a_traceback(tiny_pipeline_dir, tmp_path, case):
    from helpers import free_port

    out = tmp_path / "run"
    if case == "prompt file not UTF-8":
        latin1 = tmp_path / "prompts.txt"
        latin1.write_bytes("a cat\na caf\u00e9 dog\n".encode("latin-1"))
        overrides, fragments = ['prompts.source="file"', f'prompts.file="{latin1}"'], ["prompts.file", "prompts.txt", "is not UTF-8", "line 2"]
    elif case == "reward plugin that does not import":
        overrides, fragments = ['reward.name="nosuchmodule:fn"'], ["reward.name", "cannot import module 'nosuchmodule'"]
    else:
        url = f"http://127.0.0.1:{free_port()}"  # free now: nothing answers there
        overrides, fragments = [f'reward.url="{url}"'], ["reward.url", url, "not answering"]
    result = run([*cli_args(tiny_pipeline_dir, out), *(arg for o in overrides for arg in ("--set", o))])
    assert_one_line_error(result, *fragments)
    assert not out.exists()
