"""ddpo.core.losses on numbers worked out by hand."""

import math

import pytest
import torch

from ddpo.core import (
    approx_kl,
    clip_advantages,
    clip_fraction,
    ppo_clip_loss,
    reinforce_loss,
    rwr_weights,
    sparse_rwr_weights,
    weighted_log_likelihood_loss,
)


# clip_range 0.2 throughout: ratios below 1 - clip, inside, and above 1 + clip.
@pytest.mark.parametrize(
    ("advantage", "ratio", "expected_loss", "expected_grad"),
    [
        # A > 0: max(-A r, -A clip(r)) keeps the pessimistic (larger) term.
        (2.0, 0.5, -1.0, -2.0),  # max(-1.0, -1.6): unclipped, gradient -A
        (2.0, 1.0, -2.0, -2.0),  # inside the range
        (2.0, 1.5, -2.4, 0.0),  # max(-3.0, -2.4): clipped at 1.2, no gradient
        # A < 0
        (-2.0, 0.5, 1.6, 0.0),  # max(1.0, 1.6): clipped at 0.8, no gradient
        (-2.0, 1.0, 2.0, 2.0),
        (-2.0, 1.5, 3.0, 2.0),  # max(3.0, 2.4): unclipped, gradient -A
    ],
)
def test_ppo_clip_loss_by_hand(advantage: float, ratio: float, expected_loss: float, expected_grad: float) -> None:
    ratio_tensor = torch.tensor([ratio], requires_grad=True)

    loss = ppo_clip_loss(torch.tensor([advantage]), ratio_tensor, clip_range=0.2)
    loss.backward()

    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
    assert ratio_tensor.grad is not None
    assert ratio_tensor.grad.item() == pytest.approx(expected_grad, abs=1e-6)


def test_ppo_clip_loss_averages_over_batch() -> None:
    # A = +1, ratios below, inside and above [0.8, 1.2]: per-sample losses (-0.5, -1.0, -1.2) -> mean -0.9
    loss = ppo_clip_loss(torch.ones(3), torch.tensor([0.5, 1.0, 1.5]), clip_range=0.2)
    assert loss.item() == pytest.approx(-0.9, abs=1e-6)


def test_reinforce_loss_by_hand() -> None:
    # -mean(A log p) = -(1 * -2 + (-3) * -1) / 2 = -0.5
    loss = reinforce_loss(torch.tensor([1.0, -3.0]), torch.tensor([-2.0, -1.0]))
    assert loss.item() == pytest.approx(-0.5)


def test_weighted_log_likelihood_loss_by_hand() -> None:
    # -mean(w log p) = -(2 * -1 + 0 * -5) / 2 = 1.0
    loss = weighted_log_likelihood_loss(torch.tensor([2.0, 0.0]), torch.tensor([-1.0, -5.0]))
    assert loss.item() == pytest.approx(1.0)


def test_rwr_weights_are_normalised_exponentials() -> None:
    rewards = torch.tensor([0.0, 1.0, 2.0])
    expected = torch.exp(rewards) / torch.exp(rewards).mean()  # (0.2693, 0.7319, 1.9988)
    torch.testing.assert_close(rwr_weights(rewards, temperature=1.0), expected)
    expected_hot = torch.exp(rewards / 2) / torch.exp(rewards / 2).mean()
    torch.testing.assert_close(rwr_weights(rewards, temperature=2.0), expected_hot)


def test_rwr_weights_do_not_overflow_on_large_rewards() -> None:
    weights = rwr_weights(torch.tensor([1000.0, 1000.0 + math.log(3.0)]), temperature=1.0)
    torch.testing.assert_close(weights, torch.tensor([0.5, 1.5]))


def test_rwr_weights_reject_non_positive_temperature() -> None:
    with pytest.raises(ValueError, match="temperature"):
        rwr_weights(torch.tensor([0.0, 1.0]), temperature=0.0)


def test_sparse_rwr_weights_keep_top_half() -> None:
    # 50th percentile of (1, 2, 3, 4) with linear interpolation is 2.5: keep 3 and 4, each at weight 4 / 2.
    weights = sparse_rwr_weights(torch.tensor([1.0, 2.0, 3.0, 4.0]), percentile=50)
    torch.testing.assert_close(weights, torch.tensor([0.0, 0.0, 2.0, 2.0]))


def test_sparse_rwr_weights_keep_ties_at_the_cutoff() -> None:
    # 50th percentile of (1, 2, 2, 5) is 2: both 2s are kept.
    weights = sparse_rwr_weights(torch.tensor([2.0, 1.0, 5.0, 2.0]), percentile=50)
    torch.testing.assert_close(weights, torch.tensor([4 / 3, 0.0, 4 / 3, 4 / 3]))


@pytest.mark.parametrize("percentile", [-1.0, 100.0])
def test_sparse_rwr_weights_reject_out_of_range_percentile(percentile: float) -> None:
    with pytest.raises(ValueError, match="percentile"):
        sparse_rwr_weights(torch.tensor([1.0, 2.0]), percentile=percentile)


def test_clip_advantages() -> None:
    clipped = clip_advantages(torch.tensor([-10.0, -1.0, 0.0, 3.0, 10.0]), max_abs=5.0)
    torch.testing.assert_close(clipped, torch.tensor([-5.0, -1.0, 0.0, 3.0, 5.0]))


def test_approx_kl() -> None:
    assert approx_kl(torch.zeros(4)).item() == 0.0
    # log_ratio = log 2: (2 - 1) - log 2 = 0.3068528
    assert approx_kl(torch.tensor([math.log(2.0)])).item() == pytest.approx(0.3068528)


def test_clip_fraction() -> None:
    # |r - 1| > 0.1 for 0.5 and 1.5 only
    fraction = clip_fraction(torch.tensor([0.5, 1.0, 1.05, 1.5]), clip_range=0.1)
    assert fraction.item() == pytest.approx(0.5)
