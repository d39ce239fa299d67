"""MixGRPO (Li, Cui, Huang, Ma, Fan, Yang, Zhong 2025, arXiv 2507.21802; code Tencent-Hunyuan/MixGRPO): Flow-GRPO
whose chains take SDE steps only inside a sliding window, ODE steps elsewhere, and train only the window's steps.

Every sample of an epoch has its window of w = `sample.sde_window` consecutive SDE steps at the same start, which
moves over training (`ddpo.core.samplers.sliding_window_start`): from step 0, `train.sde_window_stride` steps
later every `train.sde_window_shift_interval` epochs, rolling back to 0 past the chain's last start T - w. The
high-noise steps, where the image's layout is decided, are trained first. Before each epoch `begin_epoch` puts
the policy's window there (`sampling.sde_window_start`), the sampler records it in `trajectory.sde_window_start`,
and the trainer trains the window's steps (`train.timestep_fraction` of them; the paper trains all). The loss is
Flow-GRPO's (group-standardised advantages, PPO clip; `train.ratio_normalization` adds GRPO-Guard's).

Defaults of the code (scripts/finetune/finetune_flux_grpo_MixGRPO.sh) this module follows: the "progressive"
strategy with roll-back, window 4 of 25 sampling steps, shift interval 25 iterations (one iteration = one round
of sampling and training = one epoch here), stride 1, the samples of a group starting from one initial noise
(`--init_same_noise`: `shared_initial_noise`), clip range 1e-4, advantages clipped to +-5, no KL.

Where this module departs, and why:
- The window always lies whole inside the chain: its last start is T - w. The code's last start is T - 2 and it
  truncates the window there (down to an empty one at start T - 2, because its DanceGRPO SDE's last step is
  deterministic); here the SDE's last step is a Gaussian like the others.
- The SDE is Flow-GRPO's (`sample.noise_level`, the code's optional `--flow_grpo_sampling`), not DanceGRPO's
  constant-eta one that the code uses by default.
- MixGRPO-Flash (a higher-order ODE solver after the window) is not implemented: the steps outside the window
  are Euler steps.
"""

from __future__ import annotations

from typing import Any

from ddpo.algorithms.flow_grpo import FlowGRPO
from ddpo.core.samplers import sliding_window_start


class MixGRPO(FlowGRPO):
    """Flow-GRPO on MixGRPO's sliding SDE window; the samples of a group share their initial noise."""

    name = "mix_grpo"
    shared_initial_noise = True

    @classmethod
    def from_config(cls, train: Any) -> "MixGRPO":
        """Built from the `train` config section (the window's size is `sample.sde_window`, read from the policy)."""
        return cls(
            clip_range=train.clip_range, adv_clip_max=train.adv_clip_max, global_std=train.global_std, ratio_normalization=train.ratio_normalization,
            shift_interval=train.sde_window_shift_interval, stride=train.sde_window_stride,
        )  # fmt: skip

    @classmethod
    def check_config(cls, config: Any) -> None:
        super().check_config(config)
        if config.sample.sde_window < 1:
            raise ValueError(
                f"sample.sde_window={config.sample.sde_window}: mix_grpo takes SDE steps only inside a window of sample.sde_window steps; "
                "set it (the paper's 4 of 25 steps)"
            )
        for key in ("sde_window_shift_interval", "sde_window_stride"):
            value = getattr(config.train, key)
            if value < 1:
                raise ValueError(f"train.{key}={value} must be at least 1")

    def __init__(
        self, *, clip_range: float, adv_clip_max: float, global_std: bool = False, ratio_normalization: bool = False, shift_interval: int = 25,
        stride: int = 1,
    ) -> None:  # fmt: skip
        super().__init__(clip_range=clip_range, adv_clip_max=adv_clip_max, global_std=global_std, ratio_normalization=ratio_normalization)
        self.shift_interval = shift_interval
        self.stride = stride

    def window_start(self, epoch: int, num_steps: int, window: int) -> int:
        """The first SDE step of epoch `epoch` (1-based): epoch 1 is the code's iteration 0."""
        return sliding_window_start(epoch - 1, num_steps, window, self.shift_interval, self.stride)

    def begin_epoch(self, epoch: int, policy: Any) -> None:
        """Put every sample's SDE window of this epoch at its place on the schedule."""
        super().begin_epoch(epoch, policy)
        sampling = policy.sampling
        if sampling.sde_window < 1:
            raise ValueError("mix_grpo needs a policy sampling with an SDE window (sample.sde_window >= 1)")
        sampling.sde_window_start = self.window_start(epoch, sampling.num_steps, sampling.sde_window)
