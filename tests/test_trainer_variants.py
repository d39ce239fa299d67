"""End to end through the trainer (the CLI, the tiny pipeline) for the variants the other e2e tests leave out:
ddpo_sf, rwr, rwr_sparse, inner_epochs > 1, timestep_fraction < 1, sample.scheduler = "ddpm". Each run is one
epoch of 4 samples and 2 denoising steps; what a user would notice is checked: how many optimizer steps the
epoch took, how many denoising steps each sample trained, that the LoRA moved, and that the run was on-policy."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from helpers import cli_args
from safetensors.torch import load_file

from ddpo.cli import main

BASE = {"sample.num_steps": 2, "sample.batch_size": 4, "sample.num_batches_per_epoch": 1, "train.batch_size": 2, "train.epochs": 1,
        "train.lr": 1e-2, "reward.name": '"helpers:mean_brightness"', "log.num_eval_seeds": 1, "log.grid_prompts": '["a cat"]'}  # fmt: skip

# (overrides, optimizer steps in the epoch, denoising steps trained per sample)
VARIANTS = {
    "ddpo_sf": ({"train.algorithm": '"ddpo_sf"'}, 1, 2),  # REINFORCE: one step per epoch, all minibatches accumulated
    "rwr": ({"train.algorithm": '"rwr"'}, 2, 2),
    "rwr_sparse": ({"train.algorithm": '"rwr_sparse"', "train.rwr_percentile": 50.0}, 2, 2),
    "inner_epochs=2": ({"train.inner_epochs": 2}, 4, 4),  # every sample trained twice
    "timestep_fraction=0.5": ({"train.timestep_fraction": 0.5}, 2, 1),  # 1 of the 2 steps
    "scheduler=ddpm": ({"sample.scheduler": '"ddpm"'}, 2, 2),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_end_to_end(tiny_pipeline_dir, tmp_path, monkeypatch, variant):
    from ddpo.policy.stable_diffusion import StableDiffusionPolicy

    overrides, expected_steps, expected_trained = VARIANTS[variant]
    optimizer_steps, trained = [], []
    original_step, original_predict = torch.optim.AdamW.step, StableDiffusionPolicy.predict

    def counted_step(self, *args, **kwargs):
        optimizer_steps.append(1)
        return original_step(self, *args, **kwargs)

    def recorded_predict(self, trajectory, step_indices, **kwargs):
        if torch.is_grad_enabled():  # the training recomputation (not the reference model)
            trained.append(len(trajectory) * step_indices.shape[-1])
        return original_predict(self, trajectory, step_indices, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted_step)
    monkeypatch.setattr(StableDiffusionPolicy, "predict", recorded_predict)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, cli_args(tiny_pipeline_dir, out, **{**BASE, **overrides}), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(optimizer_steps) == expected_steps
    assert sum(trained) == expected_trained * BASE["sample.batch_size"]
    [record] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(record["loss"]) and math.isfinite(record["reward_mean"])
    weights = load_file(out / "checkpoints" / "epoch-0001" / "trainable.safetensors")
    assert max(v.abs().max().item() for k, v in weights.items() if "lora_B" in k) > 0  # LoRA B starts at 0: it trained
    if "first_step_ratio_error" in record:  # algorithms with an importance ratio: sampled and recomputed alike
        assert record["first_step_ratio_error"] < 1e-4
