"""`ddpo doctor` passes on the shipped Shapes model and prints a forecast; it fails, naming the check and the
config key, on a setup whose log-prob recomputation runs in another precision; `ddpo train` stops such a run
at its first update."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import cli_args, tiny_overrides

from ddpo.cli import main

# The shipped Shapes model with its default preset (DDPO-IS, the shapes_alignment_soft reward), one small batch.
SHAPES_SMALL = ["--set", "sample.batch_size=4", "--set", "train.batch_size=2", "--set", "sample.num_steps=6", "--set", "sample.samples_per_prompt=2"]


def doctor(args: list[str]):
    return CliRunner().invoke(main, ["doctor", *args], catch_exceptions=False)


def tiny_doctor_args(model_dir, **extra) -> list[str]:
    values = {"sample.num_steps": 3, "sample.batch_size": 2, "train.batch_size": 2, **extra}
    args = ["--config", "sd_compressibility"]
    for override in tiny_overrides(model_dir, **values):
        args += ["--set", override]
    return args


@pytest.fixture
def bf16_recomputation(monkeypatch):
    """A deliberately broken setup: training recomputes log-probs under bf16 autocast while sampling ran in fp32
    (what fp16/bf16 mixed precision does on a GPU when the sampler and the recomputation differ)."""
    from ddpo.policy.stable_diffusion import StableDiffusionPolicy

    original = StableDiffusionPolicy.predict

    def predict_in_bf16(self, *args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPolicy, "predict", predict_in_bf16)


def test_doctor_passes_on_the_shipped_shapes_model_and_prints_a_forecast():
    result = doctor(SHAPES_SMALL)
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1] for line in result.output.splitlines() if line.split() and line.split()[0] in
            ("on_policy", "batch_invariance", "zero_noise_step", "precision", "reward")}  # fmt: skip
    assert rows == {"on_policy": "pass", "batch_invariance": "pass", "zero_noise_step": "pass", "precision": "skip", "reward": "pass"}
    assert "shapes_alignment_soft" in result.output
    [forecast] = [line for line in result.output.splitlines() if line.startswith("forecast:")]
    assert "s/epoch (sample" in forecast and "reward queries/hour" in forecast and "80 epochs" in forecast
    assert result.output.strip().endswith("doctor: all checks passed")


def test_cpu_bf16_autocast_is_on_policy_and_its_drift_from_fp32_is_measured():
    """model.mixed_precision=bf16 on a CPU: sampling and the update both run under bf16 autocast (the weights stay
    fp32), so the first update's ratios are exactly 1; the precision check measures how far bf16 moves the log-probs
    from fp32's instead of skipping."""
    result = doctor([*SHAPES_SMALL, "--set", "model.mixed_precision=bf16", "--json"])
    checks = {c["name"]: c for c in json.loads(result.output)["checks"]}
    assert checks["on_policy"]["status"] == "pass" and checks["on_policy"]["values"]["max_abs_ratio_minus_1"] == 0
    drift = checks["precision"]["values"]["log_prob_max_abs_difference"]
    assert checks["precision"]["status"] != "skip" and 1e-4 < drift < 1.0  # bf16 really ran, and sanely


def test_doctor_fails_on_a_recomputation_in_another_precision_naming_check_and_key(tiny_pipeline_dir, bf16_recomputation):
    result = doctor([*tiny_doctor_args(tiny_pipeline_dir), "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    assert report["ok"] is False
    checks = {c["name"]: c for c in report["checks"]}
    on_policy = checks["on_policy"]
    assert on_policy["status"] == "FAIL" and "model.mixed_precision" in on_policy["change"]
    assert on_policy["values"]["max_abs_ratio_minus_1"] > on_policy["values"]["clip_range"] == 1e-4
    assert len(on_policy["values"]["per_step_max_abs_ratio_minus_1"]) == 3  # one per denoising step
    assert checks["reward"]["status"] == "pass"  # the rest of the setup is sound
    table = doctor(tiny_doctor_args(tiny_pipeline_dir))
    assert table.exit_code == 1
    assert "on_policy" in table.output and "FAIL" in table.output and "change: model.mixed_precision" in table.output
    assert "1 check(s) failed: on_policy" in table.output


def test_doctor_passes_the_same_tiny_setup_without_the_injection(tiny_pipeline_dir):
    result = doctor([*tiny_doctor_args(tiny_pipeline_dir), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    on_policy = next(c for c in report["checks"] if c["name"] == "on_policy")
    assert on_policy["status"] == "pass" and on_policy["values"]["max_abs_ratio_minus_1"] < 1e-5
    assert report["forecast"]["seconds_per_epoch"] > 0 and report["forecast"]["reward_queries_per_hour"] > 0


def noisy_reward(images, prompts, metadata):
    import random

    return [random.random() for _ in images]


def test_doctor_fails_a_reward_that_is_not_deterministic(tiny_pipeline_dir, monkeypatch):
    import helpers

    monkeypatch.setattr(helpers, "noisy_reward", noisy_reward, raising=False)
    result = doctor(tiny_doctor_args(tiny_pipeline_dir, **{"reward.name": '"helpers:noisy_reward"'}))
    assert result.exit_code == 1, result.output
    assert "not deterministic" in result.output and "change: reward.name, reward.kwargs" in result.output


def test_train_stops_an_off_policy_run_at_its_first_update_unless_told_not_to(tiny_pipeline_dir, tmp_path, bf16_recomputation):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, cli_args(tiny_pipeline_dir, out, **{"sample.num_steps": 2, "train.epochs": 1}))
    assert result.exit_code == 2, result.output
    [error] = [line for line in result.output.splitlines() if line.startswith("ddpo: error:")]
    assert "off-policy at the first update" in error and "train.clip_range" in error and "train.on_policy_check=false" in error
    assert not out.exists()  # stopped before any weight moved: nothing written
    allowed = CliRunner().invoke(main, cli_args(tiny_pipeline_dir, out, **{"sample.num_steps": 2, "train.epochs": 1, "train.on_policy_check": "false"}))
    assert allowed.exit_code == 0, allowed.output
    first_step = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert "first_step_ratio_error" not in first_step  # not measured when the check is off


def test_train_records_the_first_step_ratio_error(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, cli_args(tiny_pipeline_dir, out, **{"sample.num_steps": 2, "train.epochs": 1}))
    assert result.exit_code == 0, result.output
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 <= record["first_step_ratio_error"] < 1e-4  # sampled and recomputed in fp32: on-policy
