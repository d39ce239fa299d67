"""Flow-GRPO (Liu et al. 2025, arXiv 2505.05470): group-relative policy optimisation of a flow model.

Each prompt is sampled G times (`sample.samples_per_prompt`) with the SDE sampler, whose every step is a
Gaussian policy (`ddpo.core.flow.sde_step`). A sample's advantage is its reward standardised within its group
(eq. 4; or by the std of the whole epoch with `train.global_std`), and the loss is PPO's clipped surrogate on
the per-step log-probs (eq. 6). The paper's KL penalty to the reference model is the trainer's
`train.kl_weight` (its beta), available to every algorithm. The paper trains on fewer sampling steps than it
evaluates with (`sample.num_steps` vs `sample.eval_num_steps`, "denoising reduction").
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ddpo.algorithms.base import GaussianStepAlgorithm, LossOutput
from ddpo.algorithms.ddpo import clipped_surrogate
from ddpo.core import clip_advantages, group_normalize


class FlowGRPO(GaussianStepAlgorithm):
    """Group-normalised advantages, PPO-clip on the SDE log-probs; several optimizer steps per epoch."""

    name = "flow_grpo"
    uses_importance_ratio = True
    one_step_per_epoch = False

    @classmethod
    def from_config(cls, train: Any) -> "FlowGRPO":
        """Built from the `train` config section."""
        return cls(clip_range=train.clip_range, adv_clip_max=train.adv_clip_max, global_std=train.global_std)

    @classmethod
    def check_config(cls, config: Any) -> None:
        if config.sample.samples_per_prompt < 2:
            raise ValueError(
                f"sample.samples_per_prompt={config.sample.samples_per_prompt}: flow_grpo compares the samples of one prompt "
                "with each other; give each prompt a group of at least 2 (the paper uses 24)"
            )

    def __init__(self, *, clip_range: float, adv_clip_max: float, global_std: bool = False) -> None:
        self.clip_range = clip_range
        self.adv_clip_max = adv_clip_max
        self.global_std = global_std

    def advantages(self, rewards: Tensor, prompts: list[str]) -> Tensor:
        """(n,) rewards -> (n,) advantages, standardised within each prompt's samples of this epoch, clipped.

        Groups are the samples sharing a prompt text, as in the paper's code (whose statistics, too, are
        cleared every epoch); two groups that drew the same prompt are pooled.
        """
        return clip_advantages(group_normalize(rewards, prompts, global_std=self.global_std), self.adv_clip_max)

    def loss(self, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor) -> LossOutput:
        """(b,) SDE log-probs and advantages -> clipped surrogate loss and PPO diagnostics."""
        return clipped_surrogate(log_prob, old_log_prob, advantages, self.clip_range)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
