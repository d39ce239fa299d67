"""End to end through the CLI on a tiny random pipeline: the run directory, the LoRA, resume, crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import cli_args
from safetensors.torch import load_file

from ddpo.cli import main
from ddpo.training.run_directory import RunDirectory

REQUIRED_METRICS = {"epoch", "samples", "reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "sample_seconds", "train_seconds"}


def run_cli(args: list[str]):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def two_epoch_run(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "two-epochs"
    result = run_cli(cli_args(tiny_pipeline_dir, out, **{"train.lr": 1e-2, "log.with": '["tensorboard"]'}))
    assert result.exit_code == 0, result.output
    return out


def test_train_writes_the_run_directory_of_the_design(two_epoch_run):
    run = two_epoch_run
    assert (run / "config.toml").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert REQUIRED_METRICS <= set(records[0])
    assert [r["samples"] for r in records] == [8, 16]
    assert all(np.isfinite(r["reward_mean"]) for r in records)
    # grids before and after training (no periodic evaluation in this run: `log.grid_every` follows it)
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["before-after.png", "epoch-0000.png", "epoch-0002.png", "grid.json"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002"]
    assert (run / "checkpoints" / "epoch-0002" / "pytorch_lora_weights.safetensors").is_file()
    assert any(name.startswith("events.out.tfevents") for _, _, files in os.walk(run / "tb") for name in files)


def test_the_resolved_config_reproduces_the_run(two_epoch_run, tiny_pipeline_dir):
    from helpers import tiny_overrides

    from ddpo.config import config_to_dict

    from ddpo.training.assemble import load_config

    config = load_config(two_epoch_run / "config.toml")
    assert config.train.lr == 1e-2 and config.sample.num_steps == 6
    # The saved config is the preset with the command line's overrides applied, every key resolved.
    requested = load_config("sd_compressibility", tiny_overrides(tiny_pipeline_dir, **{"train.lr": 1e-2, "log.with": '["tensorboard"]'}))
    assert config_to_dict(config) == config_to_dict(requested)
    assert config_to_dict(config) != config_to_dict(load_config("sd_compressibility"))  # the overrides are in it


def test_lora_loads_in_diffusers_and_changes_the_output(two_epoch_run, tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    def images(pipe):
        generator = torch.Generator().manual_seed(0)
        return pipe(["a cat"], num_inference_steps=6, guidance_scale=5.0, generator=generator, output_type="np").images

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    before = images(pipe)
    pipe.load_lora_weights(two_epoch_run / "checkpoints" / "epoch-0002")
    after = images(pipe)
    assert np.abs(after - before).max() > 1e-3


@pytest.mark.slow
def test_resume_continues_bit_for_bit(tiny_pipeline_dir, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli(cli_args(tiny_pipeline_dir, straight, **{"train.epochs": 4})).exit_code == 0
    assert run_cli(cli_args(tiny_pipeline_dir, split, **{"train.epochs": 2})).exit_code == 0
    resumed = run_cli(["train", "--resume", str(split), "--set", "train.epochs=4", "--no-progress"])
    assert resumed.exit_code == 0, resumed.output
    a = load_file(straight / "checkpoints" / "epoch-0004" / "trainable.safetensors")
    b = load_file(split / "checkpoints" / "epoch-0004" / "trainable.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 0  # it did train
    metrics = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in metrics] == [1, 2, 3, 4]


KILL_DURING_CHECKPOINT = textwrap.dedent(
    """
    import sys, time
    from ddpo.training.checkpoint import Checkpoints
    from ddpo.cli import main
    original = Checkpoints._write

    def slow_write(self, directory, epoch, state, **kwargs):
        original(self, directory, epoch, state, **kwargs)
        if epoch == 2:  # the second checkpoint is complete in its temporary directory, but not yet renamed
            (directory / "WRITING").touch()
            time.sleep(600)

    Checkpoints._write = slow_write
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tiny_pipeline_dir, tmp_path):
    script = tmp_path / "train_slow_checkpoint.py"
    script.write_text(KILL_DURING_CHECKPOINT)
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(script), *cli_args(tiny_pipeline_dir, out, **{"train.epochs": 3, "sample.num_steps": 2})],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 300
    while not list((out / "checkpoints").glob(".epoch-0002.tmp-*/WRITING")):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.time() < deadline, "training never reached the second checkpoint"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    run = RunDirectory(out)
    assert run.latest_checkpoint()[0] == 1
    # The surviving checkpoint loads, and the run resumes from it to the end.
    resumed = run_cli(["train", "--resume", str(out), "--no-progress"])
    assert resumed.exit_code == 0, resumed.output
    assert run.latest_checkpoint()[0] == 3
    assert not list((out / "checkpoints").glob(".epoch-*"))


def test_sample_command_draws_with_the_trained_lora(two_epoch_run, tiny_pipeline_dir, tmp_path):
    from PIL import Image

    base, tuned = tmp_path / "base.png", tmp_path / "tuned.png"
    common = ["sample", "--model", str(tiny_pipeline_dir), "--prompt", "a cat", "-n", "3", "--seed", "7", "--steps", "6"]
    assert run_cli([*common, "--out", str(base)]).exit_code == 0
    assert run_cli([*common, "--lora", str(two_epoch_run), "--out", str(tuned)]).exit_code == 0
    a, b = np.asarray(Image.open(base), dtype=float), np.asarray(Image.open(tuned), dtype=float)
    assert a.shape == b.shape == (32, 96, 3)  # one row of 3 images at the model's native 32 px
    assert np.abs(a - b).max() > 0


@pytest.mark.parametrize("allow", [False, True])
def test_allow_tf32_sets_torchs_tf32_flags(tiny_pipeline_dir, tmp_path, allow):
    from helpers import tiny_overrides

    from ddpo.training.assemble import load_config
    from ddpo.training.loop import Trainer

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not allow
    try:
        config = load_config("sd_compressibility", tiny_overrides(tiny_pipeline_dir, **{"model.allow_tf32": str(allow).lower()}))
        Trainer(config, tmp_path / "run", progress=False)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (allow, allow)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
