"""Checkpoint bookkeeping: atomic writes, pruning, and what a crash leaves behind."""

from __future__ import annotations

import pytest

from ddpo.training.run_directory import TRAINER_STATE, RunDirectory, RunDirectoryError


def write_state(directory):
    (directory / TRAINER_STATE).write_text("state")


def test_keep_last_prunes_the_oldest_checkpoints(tmp_path):
    run = RunDirectory.create(tmp_path / "run")
    for epoch in range(1, 6):
        run.write_checkpoint(epoch, write_state, keep_last=2)
    assert [epoch for epoch, _ in run.checkpoints()] == [4, 5]
    run.write_checkpoint(6, write_state, keep_last=0)
    assert [epoch for epoch, _ in run.checkpoints()] == [4, 5, 6]


def test_a_checkpoint_that_failed_half_way_is_invisible_and_cleaned_up(tmp_path):
    run = RunDirectory.create(tmp_path / "run")
    run.write_checkpoint(1, write_state)

    def crash(directory):
        (directory / "pytorch_lora_weights.safetensors").write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run.write_checkpoint(2, crash)
    assert run.latest_checkpoint()[0] == 1
    assert list(run.checkpoints_dir.glob(".epoch-0002.tmp-*"))
    run.remove_stale_temporaries()
    assert not list(run.checkpoints_dir.glob(".epoch-*"))


def test_metrics_written_after_the_last_checkpoint_are_dropped_on_resume(tmp_path):
    run = RunDirectory.create(tmp_path / "run")
    for epoch in (1, 2, 3):
        run.append_metrics({"epoch": epoch, "reward_mean": float(epoch)})
    run.truncate_metrics(2)
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2]


def test_open_refuses_a_run_without_a_checkpoint(tmp_path):
    run = RunDirectory.create(tmp_path / "run")
    run.config_path.write_text("seed = 1\n")
    with pytest.raises(RunDirectoryError, match="no complete checkpoint"):
        RunDirectory.open(run.path)
