"""Flow-GRPO (Liu et al. 2025, arXiv 2505.05470): group-relative policy optimisation of a flow model, and
GRPO-Guard's ratio normalization (Wang et al. 2025, arXiv 2510.22319) as its option.

Each prompt is sampled G times (`sample.samples_per_prompt`) with the SDE sampler, whose every step is a
Gaussian policy (`ddpo.core.flow.sde_step`). A sample's advantage is its reward standardised within its group
(eq. 4; or by the std of the whole epoch with `train.global_std`), and the loss is PPO's clipped surrogate on
the per-step log-probs (eq. 6). The paper's KL penalty to the reference model is the trainer's
`train.kl_weight` (its beta), available to every algorithm. The paper trains on fewer sampling steps than it
evaluates with (`sample.num_steps` vs `sample.eval_num_steps`, "denoising reduction").

GRPO-Guard (`train.ratio_normalization`, always on in `grpo_guard`): the log ratio of an SDE step,
mean(eps Delta) / s - mean(Delta^2) / (2 s^2) with Delta = mu_theta - mu_old and s the step's std, sits left of 0
and spreads as 1/s, so PPO's upper clip seldom stops a positive update and the clip's strength differs from step
to step; RatioNorm (`ddpo.core.normalized_log_ratio`) clips s log r + mean(Delta^2) / (2 s) = mean(eps Delta)
instead. mu_old comes from the model outputs the sampler records (`sampling.keep_model_outputs`, set before each
epoch). We follow the one public implementation (X-GenGroup/Flow-Factory's `GRPOGuardTrainer`, which implements
the normalization alone); the paper's second component, reweighting the gradient across noise levels, is not
included here: its form is not public in code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ddpo.algorithms.base import GaussianStepAlgorithm, LossOutput, check_groups
from ddpo.algorithms.ddpo import clipped_surrogate
from ddpo.core import clip_advantages, group_normalize, normalized_log_ratio

if TYPE_CHECKING:
    from ddpo.core.trajectory import StepPrediction, Trajectory


class FlowGRPO(GaussianStepAlgorithm):
    """Group-normalised advantages, PPO-clip on the SDE log-probs; several optimizer steps per epoch."""

    name = "flow_grpo"
    uses_importance_ratio = True
    one_step_per_epoch = False

    @classmethod
    def from_config(cls, train: Any) -> "FlowGRPO":
        """Built from the `train` config section."""
        return cls(clip_range=train.clip_range, adv_clip_max=train.adv_clip_max, global_std=train.global_std, ratio_normalization=train.ratio_normalization)

    @classmethod
    def check_config(cls, config: Any) -> None:
        check_groups(cls.name, config)

    def __init__(self, *, clip_range: float, adv_clip_max: float, global_std: bool = False, ratio_normalization: bool = False) -> None:
        self.clip_range = clip_range
        self.adv_clip_max = adv_clip_max
        self.global_std = global_std
        self.ratio_normalization = ratio_normalization

    def begin_epoch(self, epoch: int, policy: Any) -> None:
        """With ratio normalization, the sampler records its model outputs (the sampling policy's step means)."""
        if self.ratio_normalization:
            policy.sampling.keep_model_outputs = True

    def advantages(self, rewards: Tensor, prompts: list[str]) -> Tensor:
        """(n,) rewards -> (n,) advantages, standardised within each prompt's samples of this epoch, clipped.

        Groups are the samples sharing a prompt text, as in the paper's code (whose statistics, too, are
        cleared every epoch); two groups that drew the same prompt are pooled.
        """
        return clip_advantages(group_normalize(rewards, prompts, global_std=self.global_std), self.adv_clip_max)

    def log_likelihoods(self, prediction: StepPrediction, trajectory: Trajectory, rows: Tensor, columns: Tensor) -> tuple[Tensor, Tensor]:
        """The recorded steps' log-probs under the current and the sampling policy; with ratio normalization, the
        normalised log ratio against 0 (their difference is what the loss's ratio exponentiates)."""
        log_prob, old_log_prob = super().log_likelihoods(prediction, trajectory, rows, columns)
        if not self.ratio_normalization:
            return log_prob, old_log_prob
        if prediction.old_mean is None:
            raise ValueError(f"{self.name} with ratio normalization needs the model outputs recorded while sampling (begin_epoch sets the policy to keep them)")
        normalized = normalized_log_ratio(log_prob, old_log_prob, prediction.mean, prediction.old_mean, prediction.std)
        return normalized, torch.zeros_like(normalized)

    def loss(self, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor) -> LossOutput:
        """(b,) SDE log-probs and advantages -> clipped surrogate loss and PPO diagnostics."""
        return clipped_surrogate(log_prob, old_log_prob, advantages, self.clip_range)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class GRPOGuard(FlowGRPO):
    """Flow-GRPO with GRPO-Guard's ratio normalization always on (`train.ratio_normalization` is implied)."""

    name = "grpo_guard"

    @classmethod
    def from_config(cls, train: Any) -> "GRPOGuard":
        """Built from the `train` config section, with ratio normalization."""
        return cls(clip_range=train.clip_range, adv_clip_max=train.adv_clip_max, global_std=train.global_std)

    def __init__(self, *, clip_range: float, adv_clip_max: float, global_std: bool = False) -> None:
        super().__init__(clip_range=clip_range, adv_clip_max=adv_clip_max, global_std=global_std, ratio_normalization=True)
