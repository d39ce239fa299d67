"""Flow-GRPO and FDFO against hand-computed values: group advantages, the SPO surrogate, FDFO's loss and gradient
for one pair; their config checks."""

from __future__ import annotations

import math

import pytest
import torch

from ddpo.algorithms import build_algorithm
from ddpo.config import ConfigError
from ddpo.training.assemble import load_config
from ddpo.core import endpoint_directions, group_normalize, pair_reward_differences, spo_loss
from ddpo.core.trajectory import StepPrediction, Trajectory


# ---- Flow-GRPO ----------------------------------------------------------------------------------------------
def test_group_advantages_match_hand_computed_values():
    rewards = torch.tensor([1.0, 3.0, 10.0, 10.0, 14.0, 0.5])
    prompts = ["a", "a", "b", "b", "b", "c"]
    # group a: mean 2, std 1 -> -1, +1; group b: mean 34/3, std sqrt(((10-34/3)^2 * 2 + (14-34/3)^2) / 3); c alone -> 0
    std_b = math.sqrt((2 * (10 - 34 / 3) ** 2 + (14 - 34 / 3) ** 2) / 3)
    expected = [-1 / (1 + 1e-4), 1 / (1 + 1e-4), (10 - 34 / 3) / (std_b + 1e-4), (10 - 34 / 3) / (std_b + 1e-4), (14 - 34 / 3) / (std_b + 1e-4), 0.0]
    algorithm = build_algorithm("flow_grpo", clip_range=1e-4, adv_clip_max=5.0)
    torch.testing.assert_close(algorithm.advantages(rewards, prompts), torch.tensor(expected), atol=1e-6, rtol=0)


def test_group_advantages_with_the_global_std():
    rewards = torch.tensor([1.0, 3.0, 10.0, 14.0])
    std = rewards.std(unbiased=False).item()  # population std of all four: sqrt(((1-7)^2 + (3-7)^2 + 3^2 + 7^2) / 4)
    assert std == pytest.approx(math.sqrt((36 + 16 + 9 + 49) / 4))
    expected = torch.tensor([-1.0, 1.0, -2.0, 2.0]) / (std + 1e-4)
    torch.testing.assert_close(group_normalize(rewards, ["a", "a", "b", "b"], global_std=True), expected, atol=1e-6, rtol=0)
    algorithm = build_algorithm("flow_grpo", clip_range=1e-4, adv_clip_max=0.3, global_std=True)
    torch.testing.assert_close(algorithm.advantages(rewards, ["a", "a", "b", "b"]), expected.clamp(-0.3, 0.3), atol=1e-6, rtol=0)


def test_flow_grpo_at_ratio_one_is_the_policy_gradient_and_the_clip_stops_it():
    algorithm = build_algorithm("flow_grpo", clip_range=1e-3, adv_clip_max=5.0)
    advantages = torch.tensor([1.5, -0.5, 2.0, -3.0])
    log_prob = torch.tensor([-1.0, -2.0, -0.5, -4.0], requires_grad=True)
    output = algorithm.loss(log_prob, log_prob.detach(), advantages)
    output.loss.backward()
    assert output.loss.item() == pytest.approx(-advantages.mean().item())
    torch.testing.assert_close(log_prob.grad, -advantages / 4)
    log_prob = torch.zeros(4, requires_grad=True)
    algorithm.loss(log_prob, torch.full((4,), -1.0), advantages).loss.backward()  # ratio e: clipped where A > 0
    assert torch.equal(log_prob.grad[advantages > 0], torch.zeros(2)) and (log_prob.grad[advantages < 0] > 0).all()


# ---- FDFO ---------------------------------------------------------------------------------------------------
def test_spo_loss_matches_its_formula_and_is_minimal_at_the_trust_region_edge():
    advantages, ratio, eps = torch.tensor([0.2, -0.2, 0.0]), torch.tensor([1.01, 0.98, 1.5]), 0.03
    expected = sum(-a * r + abs(a) / (2 * eps) * (r - 1) ** 2 for a, r in [(0.2, 1.01), (-0.2, 0.98), (0.0, 1.5)]) / 3
    assert spo_loss(advantages, ratio, eps).item() == pytest.approx(expected, rel=1e-6)
    grid = torch.linspace(0.9, 1.1, 2001)
    for sign in (1.0, -1.0):
        losses = torch.stack([spo_loss(torch.tensor([sign]), r.reshape(1), eps) for r in grid])
        assert grid[losses.argmin()].item() == pytest.approx(1 + sign * eps, abs=1e-4)


def test_pair_differences_and_endpoint_directions():
    torch.testing.assert_close(pair_reward_differences(torch.tensor([0.9, 0.5, 0.0, 1.0])), torch.tensor([0.2, -0.2, -0.5, 0.5]))
    final = torch.tensor([[1.0, 3.0], [3.0, -1.0]])
    # dx_1 = (x1 - x2) / 2 = (-1, 2), mean square 2.5 -> (-0.4, 0.8); dx_2 = -dx_1
    torch.testing.assert_close(endpoint_directions(final), torch.tensor([[-0.4, 0.8], [0.4, -0.8]]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="pairs"):
        pair_reward_differences(torch.tensor([1.0, 2.0, 3.0]))


def _pair_trajectory(final_latents: torch.Tensor, velocities: torch.Tensor) -> Trajectory:
    """A 2-sample, K-step trajectory holding only what FDFO reads: final latents and recorded velocities."""
    batch, steps = velocities.shape[:2]
    latents = torch.zeros(batch, steps + 1, *final_latents.shape[1:])
    latents[:, -1] = final_latents
    empty = torch.zeros(batch, 1, 1)
    return Trajectory(latents=latents, timesteps=torch.zeros(batch, steps), log_probs=torch.zeros(batch, steps), prompt_embeds=empty,
                      negative_embeds=empty, prompts=["p"] * batch, model_outputs=velocities)  # fmt: skip


def test_fdfo_loss_and_gradient_for_one_pair_match_hand_computed_values():
    """One pair, latents of 2 elements, 2 steps. Rewards 0.9, 0.5; final latents (1, 3), (3, -1); the recorded
    velocities v_ref and the current ones v differ by small amounts. Every number below is worked by hand from
    the paper's definitions (dR, dx / mean square, v_target = v_ref - dx, ps = -mean((v - v_target)^2),
    ps_ref = -mean(dx^2), r = exp(ps - ps_ref), loss = mean(-dR r + |dR| / (2 eps) (r - 1)^2))."""
    eps = 3e-2
    algorithm = build_algorithm("fdfo", epsilon=eps)
    trajectory = _pair_trajectory(
        final_latents=torch.tensor([[1.0, 3.0], [3.0, -1.0]]),
        velocities=torch.tensor([[[0.5, -0.5], [0.0, 1.0]], [[1.0, 0.0], [2.0, 2.0]]]),  # (pair, step, element)
    )
    algorithm.prepare(trajectory)
    advantages = algorithm.advantages(torch.tensor([0.9, 0.5]), ["p", "p"])
    v = torch.tensor([[[0.6, -0.5], [0.0, 1.0]], [[1.0, 0.2], [2.0, 2.0]]], requires_grad=True)
    prediction = StepPrediction(model_output=v, mean=v, std=torch.ones(2, 2, 1), log_prob=torch.zeros(2, 2))
    rows, columns = torch.arange(2)[:, None], torch.tensor([[0, 1], [0, 1]])
    log_prob, old_log_prob = algorithm.log_likelihoods(prediction, trajectory, rows, columns)
    output = algorithm.loss(log_prob.reshape(-1), old_log_prob.reshape(-1), advantages.repeat_interleave(2))
    output.loss.backward()

    # By hand. dR = (0.2, -0.2). dx_norm = (-0.4, 0.8) and (0.4, -0.8); ps_ref = -(0.16 + 0.64) / 2 = -0.4 for both.
    # Sample 1, step 0: v_target = (0.5 + 0.4, -0.5 - 0.8) = (0.9, -1.3); v - v_target = (-0.3, 0.8); ps = -0.365.
    # Sample 1, step 1: v = v_ref, so v - v_target = dx_norm and ps = ps_ref: ratio 1.
    # Sample 2, step 0: v_target = (1.0 - 0.4, 0.0 + 0.8) = (0.6, 0.8); v - v_target = (0.4, -0.6); ps = -0.26.
    # Sample 2, step 1: ratio 1.
    ratios = [math.exp(-0.365 + 0.4), 1.0, math.exp(-0.26 + 0.4), 1.0]
    d_r = [0.2, 0.2, -0.2, -0.2]
    loss = sum(-a * r + abs(a) / (2 * eps) * (r - 1) ** 2 for a, r in zip(d_r, ratios)) / 4
    assert output.loss.item() == pytest.approx(loss, rel=1e-5)
    torch.testing.assert_close(log_prob.detach(), torch.tensor([[-0.365, -0.4], [-0.26, -0.4]]), atol=1e-5, rtol=0)
    # d loss / d v = (1/4) (-dR + |dR| / eps (r - 1)) r * d ps / d v, with d ps / d v = -2 (v - v_target) / 2.
    grad = torch.zeros(2, 2, 2)
    for (b, k), residual in {(0, 0): (-0.3, 0.8), (0, 1): (-0.4, 0.8), (1, 0): (0.4, -0.6), (1, 1): (0.4, -0.8)}.items():
        index = 2 * b + k
        scale = 0.25 * (-d_r[index] + abs(d_r[index]) / eps * (ratios[index] - 1)) * ratios[index]
        grad[b, k] = scale * -torch.tensor(residual)
    torch.testing.assert_close(v.grad, grad, atol=1e-5, rtol=1e-4)
    # the better branch is pulled towards its own endpoint: lowering v moves x_0 along +dx
    assert (v.grad[0, 1] * torch.tensor([-0.4, 0.8])).sum() > 0
    assert output.metrics["clipfrac"].item() == pytest.approx(0.5)  # exp(0.035) - 1 and exp(0.14) - 1 exceed 0.03


def test_fdfo_refuses_samples_that_are_not_pairs_of_one_prompt():
    algorithm = build_algorithm("fdfo", epsilon=3e-2)
    with pytest.raises(ValueError, match="share a prompt"):
        algorithm.advantages(torch.tensor([1.0, 2.0]), ["a cat", "a dog"])
    trajectory = _pair_trajectory(torch.zeros(2, 2), torch.zeros(2, 1, 2))
    trajectory.model_outputs = None
    with pytest.raises(ValueError, match="churn sampler"):
        algorithm.prepare(trajectory)


def test_fdfo_kl_to_reference_is_the_mean_squared_velocity_difference():
    algorithm = build_algorithm("fdfo", epsilon=3e-2)
    v = torch.tensor([[[1.0, 2.0]], [[0.0, 0.0]]])
    reference = torch.tensor([[[0.0, 0.0]], [[1.0, -1.0]]])
    prediction = StepPrediction(model_output=v, mean=v, std=torch.ones(2, 1, 1), log_prob=torch.zeros(2, 1), reference_model_output=reference)
    torch.testing.assert_close(algorithm.kl_to_reference(prediction), torch.tensor([[2.5], [1.0]]))


# ---- config checks ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.algorithm=fdfo", "sample.samples_per_prompt=3"], "sample.samples_per_prompt=3: fdfo samples each prompt as one pair"),
        (["train.algorithm=fdfo", "sample.samples_per_prompt=2", "sample.batch_size=3", "train.batch_size=3"], "sample.batch_size=3 must be even"),
        (["train.algorithm=fdfo", "sample.samples_per_prompt=2", "sample.churn=0"], "sample.churn=0 must be > 0"),
        (["train.algorithm=flow_grpo"], "sample.samples_per_prompt=1: flow_grpo compares"),
        (["train.kl_weight=0.1", "model.use_lora=false"], "train.kl_weight=0.1 needs model.use_lora=true"),
        (["sample.noise_level=0"], "sample.noise_level=0 must be > 0"),
    ],
)
def test_configs_that_cannot_run_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(overrides=overrides)


def test_the_algorithm_samplers():
    assert build_algorithm("fdfo", epsilon=3e-2).sampler == "churn" and build_algorithm("fdfo", epsilon=3e-2).shared_initial_noise
    assert build_algorithm("flow_grpo", clip_range=1e-4, adv_clip_max=5.0).sampler == "sde"


# ---- presets ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("preset", "processes", "samples_per_epoch", "optimizer_steps", "trained_steps"),
    [("sd35_flow_grpo", 32, 1152, 2, 9), ("sd35_fdfo", 8, 864, 4, 40), ("shapes/flow_grpo", 1, 32, 2, 9), ("shapes/fdfo", 1, 32, 2, 10)],
)
def test_flow_presets_have_the_published_batch_arithmetic(preset, processes, samples_per_epoch, optimizer_steps, trained_steps):
    from ddpo.training.assemble import derived_batch_sizes

    config = load_config(preset)
    sizes = derived_batch_sizes(config, processes)
    assert (sizes.samples_per_epoch, sizes.optimizer_steps_per_epoch, sizes.num_train_timesteps) == (samples_per_epoch, optimizer_steps, trained_steps)
    if config.train.algorithm == "fdfo":
        assert config.sample.guidance_scale == 1.0 and config.sample.churn == 0.0025 and config.train.spo_epsilon == 3e-2


def test_the_shapes_flow_twin_resolves_or_says_how_to_make_it():
    from ddpo.policy import resolve_model
    from ddpo.shapes import WEIGHTS_DIR

    if (WEIGHTS_DIR / "shapes-flow" / "model_index.json").is_file():
        assert resolve_model("shapes-flow") == str(WEIGHTS_DIR / "shapes-flow")
    else:
        with pytest.raises(FileNotFoundError, match="shapes-flow.*ddpo toy pretrain"):
            resolve_model("shapes-flow")
