"""Resume exactness beyond the plain DDPO run: a Flow-GRPO run (SDE window, KL to the reference), a run with
anchor batches, and a run that stops early on its held-out score (best.json, the monitor's state). Each is
stopped by SIGTERM inside an epoch (after a chosen optimizer step), requeued with `--resume auto`, and must end
as the same run never stopped: same final weights (1e-6), same metrics, same best.json."""

from __future__ import annotations

import json
import os
import signal

import helpers
import pytest
import torch
from click.testing import CliRunner
from helpers import cli_args
from safetensors.torch import load_file

from ddpo.cli import main
from ddpo.training.preemption import REQUEUE_EXIT_STATUS

pytestmark = pytest.mark.slow

CASES = {
    # kind of tiny pipeline, overrides, optimizer step after which SIGTERM arrives (2 steps per epoch)
    "flow_grpo": ("sd3", {"train.algorithm": '"flow_grpo"', "train.kl_weight": 0.04, "sample.num_steps": 3, "sample.sde_window": 2,
                          "sample.eval_num_steps": 3, "sample.samples_per_prompt": 2, "train.clip_range": 1e-2}, 1),  # fmt: skip
    "anchors": ("sd", {"sample.anchor_batches_per_epoch": 1, "prompts.anchor_source": '"simple_animals"', "train.anchor_kl_weight": 0.5,
                       "sample.num_steps": 2}, 3),  # fmt: skip
    # held-out scores 0.0, 0.9, 0.5, ... (epochs 0, 1, 2): best at epoch 1, patience 1 stops after epoch 2 of 4
    "early_stop": ("sd", {"train.epochs": 4, "sample.num_steps": 2, "log.eval_every": 1, "log.eval_num_prompts": 1, "log.num_eval_seeds": 1,
                          "log.heldout_reward": '"helpers:scripted_heldout"', "train.early_stop_on_heldout": "true",
                          "train.early_stop_patience": 1}, 3),  # fmt: skip
}
COMMON = {"train.epochs": 2, "train.lr": 1e-2, "reward.name": '"helpers:mean_brightness"', "log.save_every": 1, "log.keep_last": 0}


@pytest.fixture(scope="module")
def tiny_sd3_dir(tmp_path_factory):
    from ddpo.policy.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd3") / "pipeline", kind="sd3")


def train(args: list[str], signal_after_step: int | None = None):
    helpers.HELDOUT_SCHEDULE[:] = [0.0, 0.9, 0.5, 0.4, 0.3]  # evaluation k scores HELDOUT_SCHEDULE[k]
    helpers.heldout_calls[:] = []
    original, steps = torch.optim.AdamW.step, []

    def step(self, *a, **k):
        result = original(self, *a, **k)
        steps.append(1)
        if len(steps) == signal_after_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    torch.optim.AdamW.step = step
    try:
        return CliRunner().invoke(main, args, catch_exceptions=False)
    finally:
        torch.optim.AdamW.step = original


@pytest.mark.parametrize("case", list(CASES))
def test_a_run_preempted_inside_an_epoch_resumes_to_the_same_end(case, tiny_pipeline_dir, tiny_sd3_dir, tmp_path):
    kind, overrides, signal_after_step = CASES[case]
    model = tiny_sd3_dir if kind == "sd3" else tiny_pipeline_dir
    values = {**COMMON, **overrides}
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    result = train(cli_args(model, straight, **values))
    assert result.exit_code == 0, result.output
    args = cli_args(model, stopped, **values)
    args[args.index("--out") : args.index("--out")] = ["--resume", "auto"]
    first = train(args, signal_after_step)
    assert first.exit_code == REQUEUE_EXIT_STATUS, first.output
    assert "SIGTERM received while training" in first.output
    # Not reset: the held-out scorer's evaluations continue its schedule where the stopped run left it.
    resumed = CliRunner().invoke(main, args, catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    assert "inside epoch" in resumed.output

    def records(run, name):
        path = run / name
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    a, b = records(straight, "metrics.jsonl"), records(stopped, "metrics.jsonl")
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for key in ("reward_mean", "loss", "approx_kl"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], abs=1e-6), key
    last = a[-1]["epoch"]
    wa = load_file(straight / "checkpoints" / f"epoch-{last:04d}" / "trainable.safetensors")
    wb = load_file(stopped / "checkpoints" / f"epoch-{last:04d}" / "trainable.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    if case == "early_stop":
        assert last == 2 and "early stop after epoch 2" in resumed.output
        assert json.loads((stopped / "best.json").read_text())["epoch"] == 1
        assert json.loads((stopped / "best.json").read_text()) == json.loads((straight / "best.json").read_text())
        assert [(r["epoch"], r["heldout_score"]) for r in records(stopped, "monitor.jsonl")] == [(r["epoch"], r["heldout_score"]) for r in records(straight, "monitor.jsonl")]
