"""Reward-weighted regression, dense and sparse (Black et al. 2023, Sec. 4.2).

Both maximise the log-likelihood of the sampled denoising steps weighted by a function of the final reward.
The weights are normalised over the whole epoch, so the loss is a weighted regression on a fixed data set and
several optimizer steps per epoch are fine.
"""

from typing import Any

import torch
from torch import Tensor

from ddpo.algorithms.base import GaussianStepAlgorithm, LossOutput
from ddpo.core import approx_kl, rwr_weights, sparse_rwr_weights, weighted_log_likelihood_loss


class _WeightedRegression(GaussianStepAlgorithm):
    """Loss and (empty) state shared by both RWR variants; subclasses define the weights."""

    uses_importance_ratio = False
    one_step_per_epoch = False

    def loss(self, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor) -> LossOutput:
        """(b,) log-probs and weights (as `advantages`) -> weighted negative log-likelihood."""
        loss = weighted_log_likelihood_loss(advantages, log_prob)
        metrics = {
            "loss": loss.detach(),
            "approx_kl": approx_kl((log_prob - old_log_prob).detach()),
            "clipfrac": torch.zeros((), device=log_prob.device),
        }
        return LossOutput(loss=loss, metrics=metrics)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class RewardWeightedRegression(_WeightedRegression):
    """RWR: weights exp(r / temperature), normalised to mean 1 over the epoch."""

    name = "rwr"

    @classmethod
    def from_config(cls, train: Any) -> "RewardWeightedRegression":
        """Built from the `train` config section."""
        return cls(temperature=train.rwr_temperature)

    def __init__(self, *, temperature: float) -> None:
        self.temperature = temperature

    def advantages(self, rewards: Tensor, prompts: list[str]) -> Tensor:
        """(n,) rewards -> (n,) weights; prompts are unused."""
        return rwr_weights(rewards, self.temperature)


class SparseRewardWeightedRegression(_WeightedRegression):
    """Sparse RWR: equal weight on the samples at or above the `percentile`-th reward percentile, 0 elsewhere."""

    name = "rwr_sparse"

    @classmethod
    def from_config(cls, train: Any) -> "SparseRewardWeightedRegression":
        """Built from the `train` config section."""
        return cls(percentile=train.rwr_percentile)

    def __init__(self, *, percentile: float) -> None:
        self.percentile = percentile

    def advantages(self, rewards: Tensor, prompts: list[str]) -> Tensor:
        """(n,) rewards -> (n,) weights with mean 1; prompts are unused."""
        return sparse_rwr_weights(rewards, self.percentile)
