"""The update's timestep chunk is chosen from the memory it needs (`ddpo.training.memory`), and the sample grid is
sampled only on the epochs the report shows (`log.grid_every`)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from helpers import cli_args

from ddpo.algorithms import MicroBatch, build_algorithm
from ddpo.cli import main
from ddpo.policy import LoraOptions, SamplingOptions, StableDiffusionPolicy
from ddpo.policy.tiny import build_tiny_pipeline
from ddpo.training.memory import ActivationMeter, chunk_for
from ddpo.training.record import grid_epochs
from ddpo.training.run_directory import read_jsonl


def activation_bytes(algorithm, policy, batch) -> int:
    """What `ActivationMeter` counts in one micro-step's forward pass (its graph dropped, no backward)."""
    with ActivationMeter(policy.model) as meter:
        output = algorithm.micro_step(policy, batch)
    del output
    return meter.bytes


@pytest.fixture(scope="module")
def sampled():
    torch.manual_seed(0)
    policy = StableDiffusionPolicy(build_tiny_pipeline(), SamplingOptions(num_steps=6, eta=1.0, guidance_scale=5.0, height=32, width=32), LoraOptions(rank=4, alpha=4.0))
    trajectory = policy.sample(["a cat", "a dog", "an otter", "a cat"], [torch.Generator().manual_seed(i) for i in range(4)], decode=False)
    return policy, trajectory


def test_activations_grow_with_the_timesteps_of_a_call_and_leave_no_gradient(sampled):
    policy, trajectory = sampled
    algorithm = build_algorithm("ddpo_is", clip_range=1e-4, adv_clip_max=5.0, per_prompt_stat_tracking=False, buffer_size=16, min_count=2)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    one = activation_bytes(algorithm, policy, MicroBatch(trajectory, torch.zeros(4, 1, dtype=torch.long), advantages))
    three = activation_bytes(algorithm, policy, MicroBatch(trajectory, torch.arange(3).expand(4, -1), advantages))
    assert one > 1e5  # the UNet's activations for 4 samples x 2 (CFG), not the frozen weights (0.4 MB of activations at least)
    assert 2.5 * one < three < 3.5 * one
    assert all(p.grad is None for p in policy.trainable_parameters())  # measured without a backward pass


def test_the_chunk_is_the_most_timesteps_that_fit():
    assert chunk_for(per_timestep=30, budget=100, num_timesteps=20) == 3
    assert chunk_for(per_timestep=30, budget=10, num_timesteps=20) == 1  # at least one
    assert chunk_for(per_timestep=30, budget=10**9, num_timesteps=20) == 20  # at most all


def test_grids_are_sampled_with_the_evaluation_or_on_their_own_schedule():
    assert sorted(grid_epochs(80, 0, eval_every=25)) == [0, 25, 50, 75, 80]
    assert sorted(grid_epochs(4, 0, eval_every=0)) == [0, 4]  # no evaluation: before and after
    assert sorted(grid_epochs(10, 4, eval_every=25)) == [0, 4, 8, 10]


def test_a_run_keeps_the_grids_of_its_schedule_and_its_before_after_picture(tiny_pipeline_dir, tmp_path):
    result = run_cli(cli_args(tiny_pipeline_dir, tmp_path / "run", **{"train.epochs": 3, "log.grid_every": 2}))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "run" / "samples").glob("epoch-*.png")) == ["epoch-0000.png", "epoch-0002.png", "epoch-0003.png"]
    assert (tmp_path / "run" / "samples" / "before-after.png").is_file()


def run_cli(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_a_small_activation_budget_trains_one_timestep_per_call_with_the_same_loss(tiny_pipeline_dir, tmp_path):
    """A run whose budget holds one timestep per call says so, and its update has the loss of all timesteps per call."""
    small = run_cli(cli_args(tiny_pipeline_dir, tmp_path / "small", **{"train.activation_memory_mb": 0.01}))
    assert small.exit_code == 0, small.output
    assert "1 of 6 timesteps per model call" in small.output
    whole = run_cli(cli_args(tiny_pipeline_dir, tmp_path / "whole", **{"train.timestep_chunk": 6}))
    assert whole.exit_code == 0, whole.output
    a = [r for r in read_jsonl(tmp_path / "small" / "metrics.jsonl")]
    b = [r for r in read_jsonl(tmp_path / "whole" / "metrics.jsonl")]
    # The first epoch's update: the same loss from the same samples (after it, Adam's normalised steps turn float
    # rounding in near-zero gradients into different, equally valid weights, so later epochs are not compared).
    assert a[0]["reward_mean"] == b[0]["reward_mean"]
    assert abs(a[0]["loss"] - b[0]["loss"]) <= 1e-6 * max(1.0, abs(b[0]["loss"])), (a[0]["loss"], b[0]["loss"])
