"""Runs that survive a cluster: SIGTERM mid-epoch -> whole checkpoint + requeue status -> `--resume auto` ends
where an uninterrupted run ends; damaged checkpoints are skipped; a full disk keeps the previous checkpoint."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import cli_args
from safetensors.torch import load_file

from ddpo.cli import main
from ddpo.training.preemption import REQUEUE_EXIT_STATUS
from ddpo.training.run_directory import RunDirectory

TESTS = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
# 2 epochs of 8 samples, 4 optimizer steps each (minibatches of 2), 2 denoising steps, a smooth reward.
RUN = {"train.epochs": 2, "sample.num_steps": 2, "train.batch_size": 2, "train.lr": 1e-2, "log.save_every": 1,
       "log.keep_last": 0, "reward.name": '"helpers:mean_brightness"'}  # fmt: skip

# Marks each optimizer step of the run in a file and slows it, so that the test can signal mid-update.
SLOW_STEPS = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from ddpo.cli import main

    marks = Path(sys.argv[1])
    original = torch.optim.AdamW.step
    count = [0]

    def marked_step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        count[0] += 1
        with marks.open("a") as f:
            f.write(f"{count[0]}\\n")
        time.sleep(0.4)
        return result

    torch.optim.AdamW.step = marked_step
    sys.exit(main(sys.argv[2:]))
    """
)


def run_cli(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def trained_weights(run: Path, epoch: int) -> dict:
    return load_file(run / "checkpoints" / f"epoch-{epoch:04d}" / "trainable.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(autouse=True)
def one_thread():
    """Runs compared to 1e-6 use one thread, in process as in the subprocesses (OMP_NUM_THREADS=1): another
    thread count sums in another order, and Adam's first steps turn 1e-7 into lr-sized differences."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def straight_run(tiny_pipeline_dir, tmp_path_factory):
    import torch

    out = tmp_path_factory.mktemp("straight") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    result = run_cli(cli_args(tiny_pipeline_dir, out, **RUN))
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return out


def test_sigterm_mid_epoch_checkpoints_exits_for_requeue_and_resume_auto_ends_equal(tiny_pipeline_dir, straight_run, tmp_path):
    out, marks = tmp_path / "run", tmp_path / "optimizer-steps.txt"
    script = tmp_path / "train_slow_steps.py"
    script.write_text(SLOW_STEPS)
    args = cli_args(tiny_pipeline_dir, out, **RUN)
    args[args.index("--out") : args.index("--out")] = ["--resume", "auto"]  # the requeued command line
    process = subprocess.Popen([sys.executable, str(script), str(marks), *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not marks.is_file() or len(marks.read_text().split()) < 5:  # epoch 2 (steps 5-8) has taken a step
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline, "training never reached epoch 2"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    steps_taken = len(marks.read_text().split())
    assert process.returncode == REQUEUE_EXIT_STATUS, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "SIGTERM received while training" in stderr and "--resume auto" in stderr
    assert 5 <= steps_taken < 8  # stopped inside epoch 2, after the optimizer step it was taking
    run = RunDirectory(out)
    assert [epoch for epoch, _ in run.checkpoints()] == [1]
    partial = out / "checkpoints" / "epoch-0002-partial"
    assert [path for _, path in run.partial_checkpoints()] == [partial]
    assert run.checkpoint_problem(partial) is None and (partial / "checksums.json").is_file()  # whole
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]

    # The same command line, requeued: it continues inside epoch 2 and ends where the uninterrupted run ends.
    resumed = run_cli(args)
    assert resumed.exit_code == 0, resumed.output
    assert "inside epoch 2 after" in resumed.output
    assert max_difference(trained_weights(out, 2), trained_weights(straight_run, 2)) <= 1e-6
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    straight = [json.loads(line) for line in (straight_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in metrics] == [1, 2]
    assert [r["reward_mean"] for r in metrics] == pytest.approx([r["reward_mean"] for r in straight], abs=1e-6)
    assert [r["loss"] for r in metrics] == pytest.approx([r["loss"] for r in straight], abs=1e-6)
    assert not run.partial_checkpoints()  # superseded by epoch 2's whole checkpoint


# policy.sample calls: the epoch-0 grid, epoch 1's two batches, epoch 2's two batches (no grid between: the run
# has no periodic evaluation, so its grids are before and after training, `log.grid_every`)
@pytest.mark.parametrize(("signal_at_call", "kept_epoch"), [(2, 0), (4, 1)], ids=["epoch 1 (weights before training)", "epoch 2"])
def test_sigterm_while_sampling_keeps_the_last_epoch_and_resume_auto_ends_equal(tiny_pipeline_dir, straight_run, tmp_path, monkeypatch, signal_at_call, kept_epoch):
    from ddpo.policy.stable_diffusion import StableDiffusionPolicy

    original, calls = StableDiffusionPolicy.sample, []

    def signalling_sample(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == signal_at_call:  # the first batch of an epoch: the signal arrives before its second
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPolicy, "sample", signalling_sample)
    out = tmp_path / "run"
    args = cli_args(tiny_pipeline_dir, out, **RUN)
    args[args.index("--out") : args.index("--out")] = ["--resume", "auto"]
    stopped = CliRunner().invoke(main, args)
    assert stopped.exit_code == REQUEUE_EXIT_STATUS, stopped.output
    assert "SIGTERM received while sampling" in stopped.output
    assert [epoch for epoch, _ in RunDirectory(out).checkpoints()][-1:] == [kept_epoch] and not RunDirectory(out).partial_checkpoints()
    monkeypatch.setattr(StableDiffusionPolicy, "sample", original)
    # The requeued command line must be the run's own: --resume auto refuses a changed config key.
    changed = run_cli([*args, "--set", "train.lr=0.5"])
    assert changed.exit_code == 2 and "train.lr" in changed.output
    resumed = run_cli(args)
    assert resumed.exit_code == 0, resumed.output
    assert max_difference(trained_weights(out, 2), trained_weights(straight_run, 2)) <= 1e-6
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    straight = [json.loads(line) for line in (straight_run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["reward_mean"]) for r in metrics] == [(r["epoch"], pytest.approx(r["reward_mean"], abs=1e-6)) for r in straight]


def flip_bytes(path: Path, offset_fraction: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    position = int(len(data) * offset_fraction)
    data[position : position + 8] = bytes(b ^ 0xFF for b in data[position : position + 8])
    path.write_bytes(bytes(data))


def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(tiny_pipeline_dir, straight_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(straight_run, out)
    flip_bytes(out / "checkpoints" / "epoch-0002" / "trainable.safetensors")
    result = CliRunner().invoke(main, ["train", "--resume", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "checkpoint" in result.output and "epoch-0002 is damaged: trainable.safetensors does not match its checksum" in result.output
    assert "resuming" in result.output and "after epoch 1" in result.output
    assert "Traceback" not in result.output
    # Epoch 2 was trained again from epoch 1's checkpoint: the same weights as before the damage.
    assert max_difference(trained_weights(out, 2), trained_weights(straight_run, 2)) <= 1e-6
    assert (out / "checkpoints" / "epoch-0002.damaged").is_dir()  # kept for inspection, never loaded again


def test_every_checkpoint_damaged_is_one_line_error(straight_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(straight_run, out)
    for checkpoint in (out / "checkpoints").iterdir():
        flip_bytes(checkpoint / "trainer_state.pt", 0.9)
    result = CliRunner().invoke(main, ["train", "--resume", str(out), "--no-progress"])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("ddpo: error:")]
    assert len(errors) == 1 and errors[0].startswith("ddpo: error: --resume") and "no whole checkpoint" in errors[0]
    assert "Traceback" not in result.output


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(tiny_pipeline_dir, tmp_path, monkeypatch):
    import torch

    import ddpo.training.checkpoint

    original_save = torch.save

    def save_until_full(obj, path, *args, **kwargs):
        if "epoch-0002" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ddpo.training.checkpoint.torch, "save", save_until_full)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, cli_args(tiny_pipeline_dir, out, **{**RUN, "train.epochs": 2}))
    assert result.exit_code == 2, result.output
    [last] = [line for line in result.output.splitlines() if line.startswith("ddpo: error:")]
    assert last.startswith("ddpo: error: could not write checkpoint") and str(out / "checkpoints" / "epoch-0002") in last
    assert "No space left on device" in last
    run = RunDirectory(out)
    assert [epoch for epoch, _ in run.checkpoints()] == [1]
    assert not list((out / "checkpoints").glob(".epoch-*"))  # the temporary directory is gone
    assert run.checkpoint_problem(out / "checkpoints" / "epoch-0001") is None
    monkeypatch.setattr(ddpo.training.checkpoint.torch, "save", original_save)
    resumed = CliRunner().invoke(main, ["train", "--resume", str(out), "--no-progress"])  # the previous one loads
    assert resumed.exit_code == 0, resumed.output
    assert [epoch for epoch, _ in run.checkpoints()] == [1, 2]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_preempted_inside_an_epoch_resume_to_the_same_end(tiny_pipeline_dir, tmp_path):
    """Both training processes of an accelerate launch get SIGTERM (as under Slurm): they agree to stop after the
    same optimizer step, one partial checkpoint holds both processes' samples, and the requeued launch ends
    where an uninterrupted 2-process launch ends."""
    import psutil
    from test_distributed import accelerate_launch

    values = {**RUN, "sample.batch_size": 2, "train.batch_size": 2}
    script = tmp_path / "train_slow_steps.py"
    script.write_text(SLOW_STEPS)

    def launch(out: Path, marks: Path, *extra: str) -> subprocess.Popen:
        args = cli_args(tiny_pipeline_dir, out, **values)
        args[args.index("--out") : args.index("--out")] = ["--resume", "auto"]
        return subprocess.Popen([*accelerate_launch(2), str(script), str(marks), *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    straight = launch(tmp_path / "straight", tmp_path / "straight-steps.txt")
    _, stderr = straight.communicate(timeout=600)
    assert straight.returncode == 0, stderr[-3000:]

    out, marks = tmp_path / "run", tmp_path / "steps.txt"
    process = launch(out, marks)
    deadline = time.time() + 300
    while not marks.is_file() or len(marks.read_text().split()) < 2 * 3:  # both processes took epoch 2's first step (of 2)
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline, "training never reached epoch 2"
        time.sleep(0.05)
    for worker in psutil.Process(process.pid).children(recursive=True):
        if "train_slow_steps.py" in " ".join(worker.cmdline()):
            worker.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert "SIGTERM received while training" in stderr
    run = RunDirectory(out)
    assert [epoch for epoch, _ in run.partial_checkpoints()] == [2] and run.checkpoint_problem(out / "checkpoints" / "epoch-0002-partial") is None
    resumed = launch(out, tmp_path / "resumed-steps.txt")
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    assert max_difference(trained_weights(out, 2), trained_weights(tmp_path / "straight", 2)) <= 1e-6


def test_resume_auto_starts_over_a_run_killed_before_its_first_checkpoint(tiny_pipeline_dir, straight_run, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.toml").write_text("seed = 1\n")  # what SIGKILL leaves before the first checkpoint
    (out / "metrics.jsonl").write_text('{"epoch": 1, "reward_mean": 9.0}\n')
    args = cli_args(tiny_pipeline_dir, out, **RUN)
    args[args.index("--out") : args.index("--out")] = ["--resume", "auto"]
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    assert "resuming" not in result.output
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert max_difference(trained_weights(out, 2), trained_weights(straight_run, 2)) <= 1e-6
    assert "--resume auto needs --out" in run_cli(["train", "--resume", "auto", "--no-progress"]).output
