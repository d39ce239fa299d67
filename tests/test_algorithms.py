"""ddpo.algorithms: registry, advantages and loss gradients of each algorithm."""

import json

import pytest
import torch

from ddpo.algorithms import ALGORITHMS, build_algorithm

DDPO_KWARGS = dict(adv_clip_max=5.0, per_prompt_stat_tracking=True, buffer_size=16, min_count=2)
KWARGS = {
    "ddpo_is": dict(clip_range=1e-4, **DDPO_KWARGS),
    "ddpo_sf": DDPO_KWARGS,
    "rwr": dict(temperature=0.5),
    "rwr_sparse": dict(percentile=75.0),
    "flow_grpo": dict(clip_range=1e-4, adv_clip_max=5.0),
    "fdfo": dict(epsilon=3e-2),
    "grpo_guard": dict(clip_range=1e-4, adv_clip_max=5.0),
    "mix_grpo": dict(clip_range=1e-4, adv_clip_max=5.0),
}
# The forward-process algorithms (diffusion_nft, awm) take velocities, not log-probs: tests/test_new_algorithms.py.
LOG_PROB_ALGORITHMS = sorted(name for name in ALGORITHMS if name in KWARGS)
ADVANTAGES = torch.tensor([1.5, -0.5, 2.0, -3.0])


def test_every_algorithm_is_tested_here_or_with_the_forward_process_ones() -> None:
    assert set(ALGORITHMS) - set(LOG_PROB_ALGORITHMS) == {"diffusion_nft", "awm"}


@pytest.mark.parametrize("name", LOG_PROB_ALGORITHMS)
def test_build_algorithm_gives_a_working_algorithm(name: str) -> None:
    algorithm = build_algorithm(name, **KWARGS[name])
    rewards = torch.tensor([0.1, 0.9, 0.4, 0.6])
    advantages = algorithm.advantages(rewards, ["a", "a", "b", "b"])
    log_prob = torch.randn(4, requires_grad=True)

    output = algorithm.loss(log_prob, log_prob.detach(), advantages)
    output.loss.backward()

    assert algorithm.name == name
    assert advantages.shape == (4,)
    assert {"loss", "approx_kl", "clipfrac"} <= output.metrics.keys()
    assert log_prob.grad is not None and log_prob.grad.abs().sum() > 0
    json.dumps(algorithm.state_dict())


def test_unknown_algorithm_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="'ppo'.*ddpo_is, ddpo_sf, rwr, rwr_sparse"):
        build_algorithm("ppo")


def test_ddpo_is_at_ratio_one_is_the_policy_gradient() -> None:
    algorithm = build_algorithm("ddpo_is", **KWARGS["ddpo_is"])
    log_prob = torch.tensor([-1.0, -2.0, -0.5, -4.0], requires_grad=True)

    output = algorithm.loss(log_prob, log_prob.detach(), ADVANTAGES)
    output.loss.backward()

    assert output.loss.item() == pytest.approx(-ADVANTAGES.mean().item())
    torch.testing.assert_close(log_prob.grad, -ADVANTAGES / 4)
    assert output.metrics["approx_kl"].item() == 0.0
    assert output.metrics["clipfrac"].item() == 0.0


def test_ddpo_is_stops_gradient_outside_clip_range() -> None:
    algorithm = build_algorithm("ddpo_is", **KWARGS["ddpo_is"])
    log_prob = torch.zeros(4, requires_grad=True)
    # log-ratio +1 for every sample: ratio e >> 1 + 1e-4, so the clip binds wherever A > 0.
    output = algorithm.loss(log_prob, torch.full((4,), -1.0), ADVANTAGES)
    output.loss.backward()

    assert output.metrics["clipfrac"].item() == 1.0
    assert output.metrics["approx_kl"].item() > 0
    assert log_prob.grad is not None
    assert torch.equal(log_prob.grad[ADVANTAGES > 0], torch.zeros(2))
    assert (log_prob.grad[ADVANTAGES < 0] > 0).all()


def test_ddpo_sf_gradient_is_reinforce() -> None:
    algorithm = build_algorithm("ddpo_sf", **KWARGS["ddpo_sf"])
    log_prob = torch.tensor([-1.0, -2.0, -0.5, -4.0], requires_grad=True)

    algorithm.loss(log_prob, log_prob.detach() - 0.1, ADVANTAGES).loss.backward()

    torch.testing.assert_close(log_prob.grad, -ADVANTAGES / 4)
    assert algorithm.one_step_per_epoch and not algorithm.uses_importance_ratio


def test_ddpo_advantages_are_clipped() -> None:
    algorithm = build_algorithm(
        "ddpo_is", clip_range=1e-4, adv_clip_max=2.0, per_prompt_stat_tracking=False, buffer_size=16, min_count=2
    )
    # One outlier among nine zeros: global normalisation gives it +3, clipped to 2.
    rewards = torch.tensor([0.0] * 9 + [1.0])
    advantages = algorithm.advantages(rewards, ["p"] * 10)
    assert advantages.max().item() == pytest.approx(2.0)
    assert advantages[0].item() == pytest.approx(-1 / 3, abs=1e-5)


def test_ddpo_state_dict_round_trip_restores_stat_tracker() -> None:
    original = build_algorithm("ddpo_is", **KWARGS["ddpo_is"])
    original.advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), ["a", "a", "b", "b"])
    restored = build_algorithm("ddpo_is", **KWARGS["ddpo_is"])
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))

    next_rewards, next_prompts = torch.tensor([5.0, 0.0]), ["a", "b"]
    restored_advantages = restored.advantages(next_rewards, next_prompts)
    assert torch.equal(restored_advantages, original.advantages(next_rewards, next_prompts))


@pytest.mark.parametrize("name", ["rwr", "rwr_sparse"])
def test_rwr_weights_have_mean_one_and_weight_the_gradient(name: str) -> None:
    algorithm = build_algorithm(name, **KWARGS[name])
    weights = algorithm.advantages(torch.tensor([0.1, 0.9, 0.4, 0.6]), ["a", "b", "c", "d"])
    log_prob = torch.zeros(4, requires_grad=True)

    algorithm.loss(log_prob, log_prob.detach(), weights).loss.backward()

    assert weights.mean().item() == pytest.approx(1.0)
    assert weights.argmax().item() == 1
    torch.testing.assert_close(log_prob.grad, -weights / 4)
