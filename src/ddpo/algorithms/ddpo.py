"""DDPO with the score-function (DDPO_SF) and importance-sampling (DDPO_IS) estimators.

Black et al. 2023, Sec. 4.3: the denoising loop is a multi-step MDP whose policy is one reverse step.
"""

from typing import Any

import torch
from torch import Tensor

from ddpo.algorithms.base import GaussianStepAlgorithm, LossOutput
from ddpo.core import (
    PerPromptStatTracker,
    approx_kl,
    clip_advantages,
    clip_fraction,
    global_normalize,
    ppo_clip_loss,
    reinforce_loss,
)


def clipped_surrogate(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float) -> LossOutput:
    """PPO's clipped importance-sampled surrogate over (b,) per-step log-probs, with its diagnostics
    (shared by DDPO-IS and Flow-GRPO, which differ only in how they sample and normalise advantages)."""
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    loss = ppo_clip_loss(advantages, ratio, clip_range)
    metrics = {
        "loss": loss.detach(),
        "approx_kl": approx_kl(log_ratio.detach()),
        "clipfrac": clip_fraction(ratio.detach(), clip_range),
        "ratio_mean": ratio.detach().mean(),
    }
    return LossOutput(loss=loss, metrics=metrics)


class _DDPOAdvantages(GaussianStepAlgorithm):
    """Advantages shared by both estimators: per-prompt or global normalisation, then clipping."""

    def __init__(
        self, *, adv_clip_max: float, per_prompt_stat_tracking: bool, buffer_size: int, min_count: int, global_std: bool = False
    ) -> None:
        self.adv_clip_max = adv_clip_max
        self.stat_tracker = PerPromptStatTracker(buffer_size, min_count, global_std) if per_prompt_stat_tracking else None

    @staticmethod
    def _advantage_options(train: Any) -> dict[str, Any]:
        return dict(
            adv_clip_max=train.adv_clip_max, per_prompt_stat_tracking=train.per_prompt_stat_tracking,
            buffer_size=train.stat_buffer_size, min_count=train.stat_min_count, global_std=train.global_std,
        )  # fmt: skip

    def advantages(self, rewards: Tensor, prompts: list[str]) -> Tensor:
        """(n,) rewards of the whole epoch -> (n,) normalised, clipped advantages."""
        if self.stat_tracker is None:
            advantages = global_normalize(rewards)
        else:
            advantages = self.stat_tracker.update(prompts, rewards)
        return clip_advantages(advantages, self.adv_clip_max)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.stat_tracker is None else {"stat_tracker": self.stat_tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.stat_tracker is not None:
            self.stat_tracker.load_state_dict(state["stat_tracker"])


class DDPOImportanceSampling(_DDPOAdvantages):
    """DDPO_IS: PPO-clipped importance-sampled policy gradient; several optimizer steps per epoch."""

    name = "ddpo_is"
    uses_importance_ratio = True
    one_step_per_epoch = False

    @classmethod
    def from_config(cls, train: Any) -> "DDPOImportanceSampling":
        """Built from the `train` config section."""
        return cls(clip_range=train.clip_range, **cls._advantage_options(train))

    def __init__(
        self,
        *,
        clip_range: float,
        adv_clip_max: float,
        per_prompt_stat_tracking: bool,
        buffer_size: int,
        min_count: int,
        global_std: bool = False,
    ) -> None:
        super().__init__(
            adv_clip_max=adv_clip_max,
            per_prompt_stat_tracking=per_prompt_stat_tracking,
            buffer_size=buffer_size,
            min_count=min_count,
            global_std=global_std,
        )
        self.clip_range = clip_range

    def loss(self, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor) -> LossOutput:
        """(b,) log-probs and advantages -> clipped surrogate loss and PPO diagnostics."""
        return clipped_surrogate(log_prob, old_log_prob, advantages, self.clip_range)


class DDPOScoreFunction(_DDPOAdvantages):
    """DDPO_SF: REINFORCE on the denoising trajectory; one optimizer step per epoch (on-policy)."""

    name = "ddpo_sf"
    uses_importance_ratio = False
    one_step_per_epoch = True

    @classmethod
    def from_config(cls, train: Any) -> "DDPOScoreFunction":
        """Built from the `train` config section."""
        return cls(**cls._advantage_options(train))

    def loss(self, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor) -> LossOutput:
        """(b,) log-probs and advantages -> score-function loss; approx_kl shows drift from the sampler."""
        loss = reinforce_loss(advantages, log_prob)
        metrics = {
            "loss": loss.detach(),
            "approx_kl": approx_kl((log_prob - old_log_prob).detach()),
            "clipfrac": torch.zeros((), device=log_prob.device),
        }
        return LossOutput(loss=loss, metrics=metrics)
