"""DiffusionNFT, AWM, MixGRPO and GRPO-Guard: their losses and schedules against values worked out by hand (both
signs of the advantage, the clip and the normalization on both sides), the policy pieces they use (the
velocity on the forward process, the fixed SDE window, the recorded sampling means), their config checks and
presets, and on the tiny flow policy that each moves the policy the way the reward points."""

from __future__ import annotations

import math

import pytest
import torch

from ddpo.algorithms import ALGORITHMS, build_algorithm
from ddpo.algorithms.forward_process import ForwardPrediction, ForwardProcessData
from ddpo.config import ConfigError
from ddpo.training.assemble import load_config
from ddpo.core import (
    adaptive_matching_loss,
    awm_log_likelihood,
    flow_matching_target,
    gaussian_log_prob,
    nft_implicit_velocities,
    nft_loss,
    nft_optimality,
    noised,
    normalized_log_ratio,
)
from ddpo.core.samplers import sliding_window_start
from ddpo.core.trajectory import StepPrediction


# ---- the forward process ----------------------------------------------------------------------------------
def test_noising_and_the_flow_matching_target_by_hand():
    clean, noise = torch.tensor([[1.0, 2.0]]), torch.tensor([[[3.0, -1.0], [0.0, 4.0]]])  # one sample, two levels
    sigma = torch.tensor([[0.25, 1.0]])
    # 0.75 * (1, 2) + 0.25 * (3, -1) = (1.5, 1.25); at sigma 1 the noise itself
    torch.testing.assert_close(noised(clean[:, None], noise, sigma), torch.tensor([[[1.5, 1.25], [0.0, 4.0]]]))
    torch.testing.assert_close(flow_matching_target(clean[:, None], noise), torch.tensor([[[2.0, -3.0], [-1.0, 2.0]]]))


# ---- DiffusionNFT -----------------------------------------------------------------------------------------
def test_nft_optimality_maps_clipped_advantages_onto_0_1():
    advantages = torch.tensor([-7.0, -5.0, -2.5, 0.0, 2.5, 5.0, 7.0])
    torch.testing.assert_close(nft_optimality(advantages, 5.0), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))


def test_nft_implicit_policies_by_hand():
    positive, negative = nft_implicit_velocities(torch.tensor([2.0]), torch.tensor([1.0]), beta=0.5)
    assert positive.item() == pytest.approx(0.5 * 1 + 0.5 * 2) and negative.item() == pytest.approx(1.5 * 1 - 0.5 * 2)


def test_the_adaptive_weighting_by_hand():
    velocity = torch.tensor([[[1.0, 3.0]]], requires_grad=True)
    # e = 0.5 * (1, 3) = (0.5, 1.5): mean e^2 = 1.25, mean |e| = 1.0 (no gradient through it)
    loss = adaptive_matching_loss(velocity, torch.zeros(1, 1, 2), torch.tensor([[0.5]]))
    loss.sum().backward()
    assert loss.item() == pytest.approx(1.25)
    torch.testing.assert_close(velocity.grad, torch.tensor([[[2 * 0.5 * 0.5 / 2, 2 * 1.5 * 0.5 / 2]]]))  # 2 e sigma / (n w)
    # An exact prediction: 0 / the floor 1e-5, no division by zero
    assert adaptive_matching_loss(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), torch.tensor([[0.5]])).item() == 0.0


@pytest.mark.parametrize(
    ("advantage", "expected_gradient"),
    [(5.0, 2.0), (2.5, 1.0), (0.0, 0.0), (-2.5, -1.0), (-5.0, -2.0), (-9.0, -2.0)],  # 2 (2r - 1), r clipped
)
def test_nft_loss_at_the_old_policy_pulls_towards_good_samples_and_pushes_from_bad(advantage, expected_gradient):
    """v = v_old = 1, target 0, sigma 1, beta 1: v+ = v- = 1, each adaptive loss e^2/|e| = 1, so the loss is 1 for
    every r, and its gradient r * 2 - (1 - r) * 2 = 2 (2r - 1): descent lowers v towards the target for r > 1/2."""
    velocity = torch.ones(1, 1, 1, requires_grad=True)
    r = nft_optimality(torch.tensor([advantage]), 5.0)[:, None]
    loss = nft_loss(velocity, torch.ones(1, 1, 1), torch.zeros(1, 1, 1), torch.ones(1, 1), r, beta=1.0)
    loss.sum().backward()
    assert loss.item() == pytest.approx(1.0)
    assert velocity.grad.item() == pytest.approx(expected_gradient)


def test_nft_loss_away_from_the_old_policy_and_with_a_small_beta():
    # v = 2, v_old = 1, target 0, sigma 1, beta 1: v+ = 2 (loss 4 / 2 = 2), v- = 0 (loss 0): r * 2
    for r, expected in [(1.0, 2.0), (0.5, 1.0), (0.0, 0.0)]:
        loss = nft_loss(torch.full((1, 1, 1), 2.0), torch.ones(1, 1, 1), torch.zeros(1, 1, 1), torch.ones(1, 1), torch.tensor([[r]]), beta=1.0)
        assert loss.item() == pytest.approx(expected)
    # beta 0.5, v = v_old = 1, sigma 0.5: e = 0.5, each loss 0.25 / 0.5 = 0.5, divided by beta: 1; dL/dv+- =
    # 2 e sigma / |e| = 1, times dv+-/dv = +-beta, over beta: r - (1 - r) = 0.5 at r = 0.75 (beta cancels at v_old)
    velocity = torch.ones(1, 1, 1, requires_grad=True)
    loss = nft_loss(velocity, torch.ones(1, 1, 1), torch.zeros(1, 1, 1), torch.full((1, 1), 0.5), torch.tensor([[0.75]]), beta=0.5)
    loss.sum().backward()
    assert loss.item() == pytest.approx(1.0) and velocity.grad.item() == pytest.approx(0.5)


def test_diffusion_nft_scales_its_loss_by_the_advantage_clip():
    algorithm = build_algorithm("diffusion_nft", beta=1.0, adv_clip_max=5.0)
    prediction = ForwardPrediction(
        sigma=torch.ones(2, 1), target=torch.zeros(2, 1, 1), velocity=torch.full((2, 1, 1), 2.0, requires_grad=True), old_velocity=torch.ones(2, 1, 1)
    )
    output = algorithm.loss(prediction, torch.tensor([5.0, -5.0]))  # r = 1: 2; r = 0: 0 -> mean 1, times c = 5
    assert output.loss.item() == pytest.approx(5.0)
    assert output.metrics["approx_kl"].item() == pytest.approx(0.5)  # 1/2 mean((2 - 1)^2)


# ---- AWM --------------------------------------------------------------------------------------------------
def test_awm_log_likelihood_by_hand():
    velocity, target, sigma = torch.tensor([[[1.0, 2.0]]]), torch.zeros(1, 1, 2), torch.tensor([[0.5]])
    loss, e = 2.5, 1e-10  # mean((1, 2)^2)
    expected = -0.5 * ((loss + e) ** 0.25 - e**0.25) / 0.25
    assert awm_log_likelihood(velocity, target, sigma, 0.25).item() == pytest.approx(expected, rel=1e-12)
    assert awm_log_likelihood(velocity, target, sigma, 1.0).item() == pytest.approx(-0.5 * 2.5, rel=1e-9)  # p = 1: -sigma l
    assert awm_log_likelihood(velocity, target, sigma, 0.25).dtype == torch.float64


def awm_prediction(velocity: float, old_velocity: float, sigma: float = 1.0) -> ForwardPrediction:
    return ForwardPrediction(
        sigma=torch.full((1, 1), sigma), target=torch.zeros(1, 1, 1), velocity=torch.full((1, 1, 1), velocity, requires_grad=True),
        old_velocity=torch.full((1, 1, 1), old_velocity),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("velocity", "old_velocity", "advantage", "clipped"),
    [
        # ratio exp(-sigma (v^2 - v_old^2)) with p = 1, clip range 0.2
        (math.sqrt(math.log(2)), 0.0, 1.0, False),  # ratio 0.5 < 0.8, A > 0: unclipped, descent lowers v
        (math.sqrt(math.log(2)), 0.0, -1.0, True),  # ratio 0.5 < 0.8, A < 0: clipped, no gradient
        (0.1, 1.0, 1.0, True),  # ratio exp(0.99) > 1.2, A > 0: clipped
        (0.1, 1.0, -1.0, False),  # ratio exp(0.99) > 1.2, A < 0: unclipped, descent raises v
    ],
)
def test_awm_ratio_is_clipped_on_both_sides(velocity, old_velocity, advantage, clipped):
    algorithm = build_algorithm("awm", clip_range=0.2, power=1.0, old_kl_weight=0.0)
    prediction = awm_prediction(velocity, old_velocity)
    output = algorithm.loss(prediction, torch.tensor([advantage]))
    output.loss.backward()
    ratio = math.exp(-(velocity**2 - old_velocity**2))
    assert output.metrics["ratio_mean"].item() == pytest.approx(ratio, rel=1e-6)
    assert output.metrics["clipfrac"].item() == 1.0
    if clipped:
        assert prediction.velocity.grad.item() == 0.0
        assert output.loss.item() == pytest.approx(-advantage * min(max(ratio, 0.8), 1.2))
    else:  # d(-A r)/dv = -A r d(log p)/dv = -A r (-2 sigma v)
        assert prediction.velocity.grad.item() == pytest.approx(advantage * ratio * 2 * velocity, rel=1e-6)
        assert math.copysign(1, -prediction.velocity.grad.item()) == -advantage  # descent: towards the target iff A > 0


def test_awm_at_the_sampling_policy_is_the_advantage_weighted_matching_gradient_plus_its_kl():
    algorithm = build_algorithm("awm", clip_range=1.0, power=0.25, old_kl_weight=1.0)
    prediction = awm_prediction(2.0, 2.0, sigma=0.5)
    output = algorithm.loss(prediction, torch.tensor([0.6]))
    output.loss.backward()
    # ratio 1: loss -A, gradient -A d(log p)/dv = A sigma (l + e)^(p - 1) 2v with l = 4
    assert output.loss.item() == pytest.approx(-0.6)
    assert prediction.velocity.grad.item() == pytest.approx(0.6 * 0.5 * (4 + 1e-10) ** -0.75 * 2 * 2.0, rel=1e-6)
    assert output.ratio_error.item() == 0.0
    moved = awm_prediction(2.5, 2.0, sigma=0.5)
    assert algorithm.loss(moved, torch.tensor([0.0])).metrics["old_policy_kl"].item() == pytest.approx(0.25)  # (2.5 - 2)^2


def test_awm_advantages_are_group_standardised_clipped_and_divided_by_the_clip():
    rewards, prompts = torch.tensor([1.0, 3.0, 0.0, 10.0]), ["a", "a", "b", "b"]
    algorithm = build_algorithm("awm", clip_range=1.0, adv_clip_max=0.5, global_std=False)
    # groups: (-1, 1) / (1 + 1e-4) and (-5, 5) / (5 + 1e-4), clipped to +-0.5, divided by 0.5
    torch.testing.assert_close(algorithm.advantages(rewards, prompts), torch.tensor([-1.0, 1.0, -1.0, 1.0]))


# ---- GRPO-Guard -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [1.0, -1.0])
def test_ratio_normalization_removes_the_left_shift_by_hand(eps):
    """One dimension, std s = 0.5, mu_old = 0, mu_theta = 0.2, x' = mu_old + s eps: the plain log ratio
    eps * 0.2 / 0.5 - 0.04 / 0.5 is +0.32 or -0.48 (shifted left); normalised it is eps * 0.2 = +-0.2."""
    s, mean, old_mean = torch.full((1, 1), 0.5), torch.full((1, 1), 0.2), torch.zeros(1, 1)
    sample = old_mean + s * eps
    log_prob, old_log_prob = gaussian_log_prob(sample, mean, s), gaussian_log_prob(sample, old_mean, s)
    assert (log_prob - old_log_prob).item() == pytest.approx(0.32 if eps > 0 else -0.48, abs=1e-6)
    assert normalized_log_ratio(log_prob, old_log_prob, mean, old_mean, s).item() == pytest.approx(0.2 * eps, abs=1e-6)


def test_flow_grpo_with_ratio_normalization_clips_both_sides_of_the_normalised_ratio():
    algorithm = build_algorithm("flow_grpo", clip_range=0.1, adv_clip_max=5.0, ratio_normalization=True)
    # Two steps (eps = +1, -1) of the example above, each with a positive and a negative advantage.
    s = torch.full((2, 1, 1), 0.5)
    mean = torch.full((2, 1, 1), 0.2, requires_grad=True)
    sample = torch.tensor([0.5, -0.5]).reshape(2, 1, 1)
    log_prob = gaussian_log_prob(sample.flatten(0, 1), mean.flatten(0, 1), s.flatten(0, 1)).reshape(2, 1)
    old_log_prob = gaussian_log_prob(sample.flatten(0, 1), torch.zeros(2, 1), s.flatten(0, 1)).reshape(2, 1)
    prediction = StepPrediction(model_output=mean, mean=mean, std=s, log_prob=log_prob, old_mean=torch.zeros(2, 1, 1))

    class Recorded:  # what log_likelihoods reads of the trajectory: the recorded log-probs
        log_probs = old_log_prob

    normalized, zero = algorithm.log_likelihoods(prediction, Recorded(), torch.arange(2)[:, None], torch.zeros(2, 1, dtype=torch.long))
    torch.testing.assert_close(normalized, torch.tensor([[0.2], [-0.2]]))
    assert torch.equal(zero, torch.zeros(2, 1))
    # ratios e^0.2 = 1.22 > 1.1 and e^-0.2 = 0.82 < 0.9: A > 0 clips the first, A < 0 the second
    for advantages, live in [(torch.tensor([1.0, 1.0]), 1), (torch.tensor([-1.0, -1.0]), 0)]:
        mean.grad = None
        output = algorithm.loss(normalized.reshape(-1), zero.reshape(-1), advantages)
        output.loss.backward(retain_graph=True)
        assert output.metrics["clipfrac"].item() == 1.0
        assert mean.grad[1 - live].abs().item() == 0.0 and mean.grad[live].abs().item() > 0


def test_grpo_guard_is_flow_grpo_with_ratio_normalization():
    config = load_config("shapes/grpo_guard")
    guard = ALGORITHMS["grpo_guard"].from_config(config.train)
    assert guard.ratio_normalization and guard.sampler == "sde" and guard.clip_range == load_config("shapes/flow_grpo").train.clip_range
    assert not ALGORITHMS["flow_grpo"].from_config(load_config("shapes/flow_grpo").train).ratio_normalization


# ---- MixGRPO ----------------------------------------------------------------------------------------------
def test_the_sliding_window_moves_every_interval_and_rolls_back():
    # T = 10, w = 2: starts 0..8, each held 3 iterations, then back to 0
    starts = [sliding_window_start(i, 10, 2, shift_interval=3, stride=1) for i in range(30)]
    assert starts == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6, 7, 7, 7, 8, 8, 8, 0, 0, 0]
    # stride 3: starts 0, 3, 6 (9 would leave the chain), one iteration each
    assert [sliding_window_start(i, 10, 2, 1, 3) for i in range(5)] == [0, 3, 6, 0, 3]
    # the code's defaults, 25 steps, window 4, tau 25: iteration 300 has the window at step 12
    assert sliding_window_start(300, 25, 4, 25, 1) == 12
    assert sliding_window_start(7, 10, 10, 1, 1) == 0  # a window as long as the chain never moves
    with pytest.raises(ValueError, match="no sliding window"):
        sliding_window_start(0, 10, 11, 1, 1)


def tiny_flow_policy(sampler: str, **sampling):
    from ddpo.policy import LoraOptions, UNetFlowPolicy
    from ddpo.policy.flow import FlowSamplingOptions
    from ddpo.policy.tiny import build_tiny_pipeline

    torch.manual_seed(0)
    options = FlowSamplingOptions(num_steps=4, guidance_scale=1.0, height=32, width=32, sampler=sampler, **sampling)
    return UNetFlowPolicy(build_tiny_pipeline(flow=True), options, LoraOptions(rank=4, alpha=4.0), train_cfg=False)


def test_mix_grpo_puts_every_samples_window_where_the_schedule_says():
    policy = tiny_flow_policy("sde", sde_window=2)
    algorithm = build_algorithm("mix_grpo", clip_range=1e-3, adv_clip_max=5.0, shift_interval=2, stride=1)
    for epoch, start in [(1, 0), (2, 0), (3, 1), (5, 2), (7, 0)]:  # T = 4, w = 2: starts 0, 1, 2, each for 2 epochs
        algorithm.begin_epoch(epoch, policy)
        trajectory = policy.sample(["a cat"] * 3, [torch.Generator().manual_seed(i) for i in range(3)], decode=False)
        assert trajectory.sde_window_start.tolist() == [start] * 3
        finite = torch.isfinite(trajectory.log_probs)
        assert finite[:, start : start + 2].all() and finite.sum().item() == 6, epoch


def test_ratio_normalization_makes_the_sampler_record_the_sampling_means():
    policy = tiny_flow_policy("sde")
    build_algorithm("flow_grpo", clip_range=1e-3, adv_clip_max=5.0, ratio_normalization=True).begin_epoch(1, policy)
    trajectory = policy.sample(["a cat", "a dog"], [torch.Generator().manual_seed(i) for i in range(2)], decode=False)
    assert trajectory.model_outputs.shape == (2, 4, *trajectory.latents.shape[2:])
    prediction = policy.predict(trajectory, torch.tensor([0, 3]))
    # Unchanged weights: the recomputed mean is the recorded one (up to the batch's floats)
    torch.testing.assert_close(prediction.old_mean, prediction.mean.detach(), atol=1e-5, rtol=0)
    with policy.evaluation():  # the ODE of evaluation records nothing
        assert policy.sample(["a cat"], [torch.Generator().manual_seed(0)], decode=False).model_outputs is None


# ---- the forward process on the policy --------------------------------------------------------------------
def test_the_velocity_is_the_unguided_network_output_and_the_reference_is_the_base():
    policy = tiny_flow_policy("ode")
    trajectory = policy.sample(["a cat", "a dog"], [torch.Generator().manual_seed(i) for i in range(2)], decode=False)
    noisy, levels = trajectory.latents[:, :2], trajectory.timesteps[:, :2]
    velocity = policy.velocity(trajectory, noisy, levels)
    with torch.no_grad():
        from ddpo.policy.diffusion import Conditioning

        direct = policy.network_output(policy.model, noisy[1, 1:2], levels[1, 1:2], Conditioning.of(trajectory.select([1])), guidance=False)
    torch.testing.assert_close(velocity[1, 1:2], direct, atol=1e-5, rtol=0)
    torch.testing.assert_close(policy.velocity(trajectory, noisy, levels, reference=True), velocity.detach())  # LoRA starts at 0
    with torch.no_grad():
        for parameter in policy.trainable_parameters():
            parameter.add_(0.05)
    assert (policy.velocity(trajectory, noisy, levels) - policy.velocity(trajectory, noisy, levels, reference=True)).abs().max() > 1e-3


def test_prepare_draws_each_samples_noise_from_its_own_initial_noise():
    policy = tiny_flow_policy("ode")
    algorithm = build_algorithm("diffusion_nft", beta=1.0, adv_clip_max=5.0, prediction_batch_size=2)
    algorithm.begin_epoch(1, policy)
    trajectory = policy.sample(["a cat", "a dog", "an otter"], [torch.Generator().manual_seed(i) for i in range(3)], decode=False)
    algorithm.prepare(trajectory)
    data = trajectory.prepared
    assert isinstance(data, ForwardProcessData) and data.noise.shape == data.old_velocity.shape == (3, 4, *trajectory.latents.shape[2:])
    reordered = trajectory.select([2, 0])  # another batch: each sample keeps its noise
    reordered.prepared = None
    algorithm.prepare(reordered)
    assert torch.equal(reordered.prepared.noise, data.noise[[2, 0]])
    torch.testing.assert_close(reordered.prepared.old_velocity, data.old_velocity[[2, 0]], atol=1e-5, rtol=0)
    assert not torch.equal(data.noise[0], data.noise[1])
    # the old velocity is the policy's at the noised latents of the chain's own levels
    noisy = noised(trajectory.latents[:, -1, None], data.noise, trajectory.timesteps)
    torch.testing.assert_close(data.old_velocity, policy.velocity(trajectory, noisy, trajectory.timesteps).detach(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("algorithm", ["diffusion_nft", "awm", "mix_grpo", "grpo_guard"])
def test_the_new_algorithms_move_the_tiny_policy_the_way_the_reward_points(algorithm, sign):
    """15 epochs of 4 prompts x 4 on the tiny flow policy, rewarded for a large (sign +1) or small (-1) mean of
    latent channel 0, through `micro_step` as the trainer calls it: the ODE samples of 32 held-out seeds move that
    way by more than 0.05 (as tests/test_flow_e2e.py's Flow-GRPO and FDFO)."""
    from ddpo.algorithms import MicroBatch

    options = {
        "diffusion_nft": dict(beta=1.0, adv_clip_max=5.0), "awm": dict(clip_range=1.0, adv_clip_max=5.0),
        "mix_grpo": dict(clip_range=1e-2, adv_clip_max=5.0, shift_interval=5), "grpo_guard": dict(clip_range=1e-2, adv_clip_max=5.0),
    }[algorithm]  # fmt: skip
    trainer = build_algorithm(algorithm, **options)
    policy = tiny_flow_policy(trainer.sampler, **({"sde_window": 2} if algorithm == "mix_grpo" else {}))
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=3e-2)

    def held_out_score() -> float:
        with policy.evaluation():
            trajectory = policy.sample(["a cat", "a dog"] * 16, [torch.Generator().manual_seed(99_999 + i) for i in range(32)], decode=False)
        return trajectory.latents[:, -1, 0].mean().item()

    before = held_out_score()
    n = 16
    for epoch in range(1, 16):
        trainer.begin_epoch(epoch, policy)
        prompts = [["a cat", "a dog", "an otter", "a horse"][i // 4] for i in range(n)]
        initial = [torch.Generator().manual_seed(1000 * epoch + 500 + i // 4) for i in range(n)] if trainer.shared_initial_noise else None
        trajectory = policy.sample(prompts, [torch.Generator().manual_seed(1000 * epoch + i) for i in range(n)], decode=False, initial_noise_generators=initial)
        trainer.prepare(trajectory)
        advantages = trainer.advantages(sign * trajectory.latents[:, -1, 0].mean(dim=(1, 2)), prompts)
        if trajectory.sde_window_start is not None:
            steps = trajectory.sde_window_start[:, None] + torch.arange(2)
        else:
            steps = torch.arange(4).expand(n, -1)
        for _ in range(1 if algorithm == "awm" else 2):  # AWM: the paper's one optimizer step per epoch
            loss = trainer.micro_step(policy, MicroBatch(trajectory, steps, advantages)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    after = held_out_score()
    assert sign * (after - before) > 0.05, (before, after)


# ---- configs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.algorithm=diffusion_nft", "sample.samples_per_prompt=1"], "diffusion_nft compares the samples of one prompt"),
        (["train.algorithm=awm", "sample.samples_per_prompt=4", "train.awm_power=0"], "train.awm_power=0 must be > 0"),
        (["train.algorithm=awm", "sample.samples_per_prompt=4", "train.awm_old_kl_weight=-1"], "train.awm_old_kl_weight=-1 must be >= 0"),
        (["train.algorithm=diffusion_nft", "sample.samples_per_prompt=4", "train.nft_beta=0"], "train.nft_beta=0 must be > 0"),
        (
            ["train.algorithm=diffusion_nft", "sample.samples_per_prompt=4", "sample.anchor_batches_per_epoch=1", "prompts.anchor_source=simple_animals", "train.anchor_kl_weight=0.5"],
            "train.anchor_kl_weight=0.5: the anchors' KL is taken on the sampler's steps",
        ),
        (["train.algorithm=diffusion_nft", "sample.samples_per_prompt=4", "sample.sde_window=2"], "sample.sde_window=2 needs the SDE sampler"),
        (["train.algorithm=mix_grpo", "sample.samples_per_prompt=4"], "sample.sde_window=0: mix_grpo takes SDE steps only inside a window"),
        (["train.algorithm=mix_grpo", "sample.samples_per_prompt=4", "sample.sde_window=2", "train.sde_window_stride=0"], "train.sde_window_stride=0 must be at least 1"),
        (["train.algorithm=grpo_guard", "sample.samples_per_prompt=1"], "grpo_guard compares the samples of one prompt"),
    ],
)
def test_configs_the_new_algorithms_cannot_run_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(overrides=overrides)


def test_a_ddim_model_cannot_train_on_the_forward_process(tiny_pipeline_dir):
    from ddpo.policy import PolicyLoadError, load_pipeline, policy_for_pipeline

    config = load_config(overrides=["train.algorithm=diffusion_nft", "sample.samples_per_prompt=2", "sample.height=32", "sample.width=32"])
    with pytest.raises(PolicyLoadError, match="needs a flow-matching model"):
        policy_for_pipeline(load_pipeline(str(tiny_pipeline_dir)), config, sampler=ALGORITHMS["diffusion_nft"].sampler)


@pytest.mark.parametrize(
    ("preset", "optimizer_steps", "trained_steps"),
    [("shapes/diffusion_nft", 2, 9), ("shapes/awm", 1, 4), ("shapes/mix_grpo", 2, 2), ("shapes/grpo_guard", 2, 9)],
)
def test_the_new_presets_have_the_flow_presets_budget(preset, optimizer_steps, trained_steps):
    from ddpo.training.assemble import derived_batch_sizes

    config = load_config(preset)
    sizes = derived_batch_sizes(config, 1)
    assert (sizes.samples_per_epoch, sizes.optimizer_steps_per_epoch, sizes.num_train_timesteps) == (32, optimizer_steps, trained_steps)
    assert config.model.pretrained == "shapes-flow" and config.sample.samples_per_prompt == 8
    if config.train.algorithm in ("diffusion_nft", "awm"):  # CFG-free, as both papers' defaults
        assert config.sample.guidance_scale == 1.0 and not config.train.cfg
