"""RWR and sparse RWR as the paper's reference code weighs samples, on rewards of any scale (ddpo.algorithms.rwr)."""

import json

import pytest
import torch

from ddpo.algorithms import build_algorithm_from_config
from ddpo.algorithms.rwr import RewardWeightedRegression, SparseRewardWeightedRegression
from ddpo.training.assemble import load_config

GLOBAL = dict(per_prompt_stat_tracking=False)
PER_PROMPT = dict(per_prompt_stat_tracking=True, buffer_size=16, min_count=2)


def test_dense_weights_are_exponentials_of_the_standardised_rewards() -> None:
    # rewards 1..4: mean 2.5, population std sqrt(1.25), so the standardised rewards are (-3, -1, 1, 3) / sqrt(5);
    # exp of those, divided by their mean: 0.16624, 0.40661, 0.99455, 2.43260.
    weights = RewardWeightedRegression(temperature=1.0, **GLOBAL).advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), list("abcd"))
    torch.testing.assert_close(weights, torch.tensor([0.16624, 0.40661, 0.99455, 2.43260]), atol=1e-5, rtol=0)


def test_dense_weights_do_not_depend_on_the_reward_units() -> None:
    """Rewards spread by a few hundredths (JPEG kB of 32 x 32 images) are weighed as rewards spread by units."""
    algorithm = RewardWeightedRegression(temperature=1.0, **GLOBAL)
    small = algorithm.advantages(torch.tensor([-1.16, -1.15, -1.14, -1.13], dtype=torch.float64), list("abcd"))
    large = algorithm.advantages(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64), list("abcd"))
    torch.testing.assert_close(small, large, atol=1e-3, rtol=0)  # up to the 1e-6 added to the std
    assert small[-1] / small[0] > 14  # exp(6 / sqrt(5)) = 14.6: the best sample counts far more than the worst


def test_raw_rewards_with_the_reference_temperature_are_almost_uniform_on_small_rewards() -> None:
    """The reference code's form, exp(r / 5) on raw rewards: on rewards 0.03 apart every weight is within 0.4% of 1."""
    weights = RewardWeightedRegression(temperature=5.0, normalize=False).advantages(torch.tensor([-1.16, -1.13]), ["a", "b"])
    # exp(-1.16 / 5) / mean = 2 / (1 + exp(0.006)) = 0.99700, and 2 - that.
    torch.testing.assert_close(weights, torch.tensor([0.99700, 1.00300]), atol=1e-5, rtol=0)


def test_per_prompt_standardisation_weighs_each_prompt_against_its_own_mean() -> None:
    # Prompt a: rewards 1, 2 (mean 1.5, std 0.5); prompt b: 10, 12 (mean 11, std 1). Both standardise to (-1, 1),
    # so the weights are e^-1 / cosh(1) = 0.23841 and e / cosh(1) = 1.76159 in each prompt: b's larger rewards
    # alone earn it nothing.
    algorithm = RewardWeightedRegression(temperature=1.0, **PER_PROMPT)
    weights = algorithm.advantages(torch.tensor([1.0, 2.0, 10.0, 12.0]), ["a", "a", "b", "b"])
    torch.testing.assert_close(weights, torch.tensor([0.23841, 1.76159, 0.23841, 1.76159]), atol=1e-5, rtol=0)


def test_temperature_softens_the_weights() -> None:
    # Standardised rewards (-1, 1) at T = 2: e^(-1/2) / cosh(1/2) = 0.53788 and e^(1/2) / cosh(1/2) = 1.46212.
    weights = RewardWeightedRegression(temperature=2.0, **GLOBAL).advantages(torch.tensor([3.0, 5.0]), ["a", "b"])
    torch.testing.assert_close(weights, torch.tensor([0.53788, 1.46212]), atol=1e-5, rtol=0)


def test_standardised_rewards_are_clipped_before_the_exponential() -> None:
    # Nine zeros and a one: standardised to -1/3 and +3, the outlier clipped to adv_clip_max = 1.
    # exp(-1/3) = 0.71653, e = 2.71828, mean (9 x 0.71653 + 2.71828) / 10 = 0.91671.
    rewards = torch.tensor([0.0] * 9 + [1.0])
    weights = RewardWeightedRegression(temperature=1.0, adv_clip_max=1.0, **GLOBAL).advantages(rewards, ["p"] * 10)
    torch.testing.assert_close(weights[[0, 9]], torch.tensor([0.71653 / 0.91671, 2.71828 / 0.91671]), atol=1e-4, rtol=0)


def test_sparse_keeps_each_prompts_best_not_the_prompt_with_the_largest_rewards() -> None:
    # Prompts a (rewards 1..4) and b (10..40) standardise alike: (-3, -1, 1, 3) / sqrt(5) each. The 75th percentile of
    # those eight values (linear) lies between 1 / sqrt(5) and 3 / sqrt(5): the best sample of each prompt is kept,
    # at weight 8 / 2 = 4.
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0])
    prompts = ["a"] * 4 + ["b"] * 4
    tracked = dict(per_prompt_stat_tracking=True, buffer_size=16, min_count=4)
    weights = SparseRewardWeightedRegression(percentile=75.0, **tracked).advantages(rewards, prompts)
    torch.testing.assert_close(weights, torch.tensor([0.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 4.0]))
    raw = SparseRewardWeightedRegression(percentile=75.0, normalize=False).advantages(rewards, prompts)
    torch.testing.assert_close(raw, torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 4.0, 4.0]))  # b's two best


@pytest.mark.parametrize("name", ["rwr", "rwr_sparse"])
def test_presets_load_and_build_rwr_with_the_documented_defaults(name: str) -> None:
    config = load_config("shapes/compressibility", [f"train.algorithm={name}"])
    algorithm = build_algorithm_from_config(config.train)
    assert algorithm.normalize and algorithm.stat_tracker is not None  # the preset tracks per-prompt statistics
    assert getattr(algorithm, "temperature", 1.0) == 1.0 and getattr(algorithm, "percentile", 90.0) == 90.0
    raw = build_algorithm_from_config(load_config("shapes/compressibility", [f"train.algorithm={name}", "train.rwr_normalize=false"]).train)
    assert not raw.normalize and raw.stat_tracker is None


def test_rwr_state_round_trip_continues_the_per_prompt_statistics() -> None:
    """A resumed run weighs its next epoch exactly as the uninterrupted one (the tracker's buffers are state)."""
    original = RewardWeightedRegression(temperature=1.0, **PER_PROMPT)
    original.advantages(torch.tensor([1.0, 2.0, 3.0, 5.0]), ["a", "a", "b", "b"])
    restored = RewardWeightedRegression(temperature=1.0, **PER_PROMPT)
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    following = torch.tensor([4.0, 0.0]), ["a", "b"]
    assert torch.equal(restored.advantages(*following), original.advantages(*following))
