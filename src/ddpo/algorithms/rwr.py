"""Reward-weighted regression, dense and sparse (Black et al. 2023, Sec. 4.2).

Both maximise the log-likelihood of the sampled denoising steps weighted by a function of the final reward:
w_RWR = exp(r / T) / Z (dense) and w_sparse = 1[r >= C] / Z with C a percentile of the rewards (sparse). The
weights have mean 1 over the epoch, so the loss is a weighted regression on a fixed data set and several
optimizer steps per epoch are fine.

What the weights are computed from (`train.rwr_normalize`, default true): the epoch's rewards standardised
exactly as DDPO's advantages (`train.per_prompt_stat_tracking`: each prompt's running mean and std, else the
batch's; `train.global_std`; clipped to `train.adv_clip_max`). The paper's reference code (jannerm/ddpo) applies
its weights to raw rewards: `config/base.py` sets `"temperature": 1 / 5.0` for `compressed_animals_rwr` and
`a_animals_rwr`, which `ddpo/utils/array.py:softmax_ref` multiplies into the rewards (so it is an inverse
temperature, beta = 0.2, i.e. T = 5 in the reward's units), and `ddpo/utils/hdf5.py:make_weights` computes
N softmax(beta r), mean 1 over a round's 10,240 samples (per prompt for the aesthetic task,
`per_prompt_weights`); the JPEG reward is the negative file size in kB (`training/callbacks.py:jpeg_fn`). That
beta was set for Stable Diffusion's 512 x 512 images, whose JPEG sizes are counted in tens of kB; on a reward of
another scale it means something else (the Shapes world's 32 x 32 images differ by a few hundredths of a kB
within a prompt, where exp(r / 5) is flat and RWR degenerates into maximising the likelihood of its own
samples). Standardising first makes T mean the same on every reward: with the default T = 1 a sample one
standard deviation above its prompt's mean weighs e ~ 2.7 times one at the mean. `rwr_normalize = false` with
`rwr_temperature = 5` reproduces the reference code's weights on raw rewards.

Sparse RWR keeps the top 10% (`train.rwr_percentile = 90`, the reference code's `mask_param = 90` with
`mask_mode = "percentile"`). The reference sampled every batch from one prompt (`identical_batch = True`), so its
cut-off fell within a prompt; here a batch mixes prompts, and the cut-off on per-prompt standardised rewards
plays that part (a prompt whose images are all small does not take every kept place).

Departures from the paper kept here (the DESIGN's algorithms share the trainer): the paper treats denoising as
a one-step MDP and regresses the denoising (DDPM) loss on the final images, in a few offline rounds (RWR: 10,240
samples then 5 passes; sparse: 1,024 kept samples then 50 passes); here the weighted quantity is the
log-likelihood of the sampled denoising steps, and every epoch samples afresh (online).
"""

from typing import Any

import torch
from torch import Tensor

from ddpo.algorithms.base import LossOutput
from ddpo.algorithms.ddpo import _DDPOAdvantages
from ddpo.core import approx_kl, rwr_weights, sparse_rwr_weights, weighted_log_likelihood_loss


class _WeightedRegression(_DDPOAdvantages):
    """Loss, reward scaling and state shared by both RWR variants; subclasses turn the scaled rewards into weights."""

    uses_importance_ratio = False
    one_step_per_epoch = False

    def __init__(
        self,
        *,
        normalize: bool = True,
        adv_clip_max: float = 5.0,
        per_prompt_stat_tracking: bool = True,
        buffer_size: int = 32,
        min_count: int = 16,
        global_std: bool = False,
    ) -> None:
        super().__init__(
            adv_clip_max=adv_clip_max,
            per_prompt_stat_tracking=per_prompt_stat_tracking and normalize,  # raw rewards need no tracker
            buffer_size=buffer_size,
            min_count=min_count,
            global_std=global_std,
        )
        self.normalize = normalize

    @staticmethod
    def _scaling_options(train: Any) -> dict[str, Any]:
        return dict(normalize=train.rwr_normalize, **_DDPOAdvantages._advantage_options(train))

    def scaled_rewards(self, rewards: Tensor, prompts: list[str]) -> Tensor:
        """(n,) rewards -> (n,) what the weights are computed from: DDPO's advantages, or the raw rewards."""
        return super().advantages(rewards, prompts) if self.normalize else rewards

    def loss(self, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor) -> LossOutput:
        """(b,) log-probs and weights (as `advantages`) -> weighted negative log-likelihood."""
        loss = weighted_log_likelihood_loss(advantages, log_prob)
        metrics = {
            "loss": loss.detach(),
            "approx_kl": approx_kl((log_prob - old_log_prob).detach()),
            "clipfrac": torch.zeros((), device=log_prob.device),
        }
        return LossOutput(loss=loss, metrics=metrics)


class RewardWeightedRegression(_WeightedRegression):
    """RWR: weights exp(scaled reward / temperature), normalised to mean 1 over the epoch."""

    name = "rwr"

    @classmethod
    def from_config(cls, train: Any) -> "RewardWeightedRegression":
        """Built from the `train` config section."""
        return cls(temperature=train.rwr_temperature, **cls._scaling_options(train))

    def __init__(self, *, temperature: float, **scaling: Any) -> None:
        super().__init__(**scaling)
        self.temperature = temperature

    def advantages(self, rewards: Tensor, prompts: list[str]) -> Tensor:
        """(n,) rewards -> (n,) weights with mean 1."""
        return rwr_weights(self.scaled_rewards(rewards, prompts), self.temperature)


class SparseRewardWeightedRegression(_WeightedRegression):
    """Sparse RWR: equal weight on the samples whose scaled reward is at or above its `percentile`-th percentile."""

    name = "rwr_sparse"

    @classmethod
    def from_config(cls, train: Any) -> "SparseRewardWeightedRegression":
        """Built from the `train` config section."""
        return cls(percentile=train.rwr_percentile, **cls._scaling_options(train))

    def __init__(self, *, percentile: float, **scaling: Any) -> None:
        super().__init__(**scaling)
        self.percentile = percentile

    def advantages(self, rewards: Tensor, prompts: list[str]) -> Tensor:
        """(n,) rewards -> (n,) weights in {0, n / n_kept}."""
        return sparse_rwr_weights(self.scaled_rewards(rewards, prompts), self.percentile)
