"""DiffusionNFT (Zheng, Chen, Ye, Wang, Zhang, Jiang, Su, Ermon, Zhu, Liu; ICLR 2026, arXiv 2509.16117): online
RL on the forward process, "Negative-aware FineTuning".

Each prompt is sampled G times (`sample.samples_per_prompt`) by any solver (here the Euler ODE, CFG-free: the
paper's default samples with a deterministic solver and guidance 1). A sample's reward, standardised within its
group and clipped to +-c (c = `train.adv_clip_max`), becomes an optimality probability r = A / (2c) + 1/2. At a
noised copy x = (1 - sigma) x_0 + sigma eps of each clean sample, the trained velocity v and the sampling policy's
v_old define an implicit positive policy v+ = (1 - beta) v_old + beta v and a negative one
v- = (1 + beta) v_old - beta v; the loss

    c / beta * (r L(v+) + (1 - r) L(v-)),    L = adaptively weighted flow-matching loss towards eps - x_0,

(`ddpo.core.forward_process.nft_loss`) pulls v towards the better samples of each group and away from the worse.
There is no likelihood and no ratio; `train.kl_weight` adds the paper's mean((v - v_ref)^2) to the base model.

Defaults of the paper's code (NVlabs/DiffusionNFT, config/nft.py) that this module follows: beta = 1 (`train.nft_beta`;
0.1 for its OCR and multi-reward runs), c = 5, the adaptive weighting (the x_0-prediction error divided by its
detached mean absolute value, floor 1e-5), the loss scaled by c / beta, per-prompt groups with the global std
(`train.global_std = true`), training on the sampling schedule's own noise levels (a random 9 of 10 with
`train.timestep_fraction = 0.9`), fresh noise per (sample, level), KL weight 1e-4 (`train.kl_weight`), CFG off.

Where this module departs, and why:
- The old policy is the sampling policy of the epoch (the weights before its first optimizer step), its velocity
  computed once before training (`ForwardProcessAlgorithm.prepare`). The code keeps a separate "old" adapter that
  trails the trained one by an EMA whose decay grows from 0 with the optimizer step (min(0.001 step, 0.5)), and
  samples with it; at decay 0, its start, the two are the same. A second set of weights, sampled with, is beyond
  the trainer's interface; the early regime is what this implements.
- It samples with the Euler ODE, not the code's second-order DPM solver (not implemented here; any solver fits).
- The noise of a (sample, level) is drawn once per epoch (the code draws it afresh per inner epoch, of which it
  runs one): what makes the prepared old velocities valid for every micro-step of the epoch.
- The code also keeps an EMA of the weights (decay 0.9) for evaluation only; evaluation here uses the weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ddpo.algorithms.base import LossOutput
from ddpo.algorithms.forward_process import ForwardPrediction, ForwardProcessAlgorithm
from ddpo.core import nft_loss, nft_optimality, velocity_divergence


class DiffusionNFT(ForwardProcessAlgorithm):
    """Implicit positive/negative policies on the forward process; no likelihood ratio."""

    name = "diffusion_nft"
    uses_importance_ratio = False

    @classmethod
    def from_config(cls, train: Any) -> "DiffusionNFT":
        """Built from the `train` config section: beta is `train.nft_beta`, c is `train.adv_clip_max`."""
        return cls(beta=train.nft_beta, adv_clip_max=train.adv_clip_max, global_std=train.global_std, prediction_batch_size=train.batch_size)

    @classmethod
    def check_config(cls, config: Any) -> None:
        super().check_config(config)
        if config.train.nft_beta <= 0:
            raise ValueError(f"train.nft_beta={config.train.nft_beta:g} must be > 0 (the paper's 1.0)")

    def __init__(self, *, beta: float, adv_clip_max: float, global_std: bool = True, prediction_batch_size: int = 16) -> None:
        super().__init__(adv_clip_max=adv_clip_max, global_std=global_std, prediction_batch_size=prediction_batch_size)
        self.beta = beta

    def loss(self, prediction: ForwardPrediction, advantages: Tensor) -> LossOutput:
        """(B, K) pairs and (B,) clipped advantages -> c * mean(nft_loss); approx_kl is 1/2 mean((v - v_old)^2), the KL
        of unit-variance Gaussians on the velocities (there is no ratio to estimate it from)."""
        optimality = nft_optimality(advantages, self.adv_clip_max)[:, None]
        # The code scales the loss by c (train.adv_clip_max); kept, as its published learning rates go with it.
        loss = self.adv_clip_max * nft_loss(prediction.velocity, prediction.old_velocity, prediction.target, prediction.sigma, optimality, self.beta).mean()
        drift = velocity_divergence(prediction.velocity.detach(), prediction.old_velocity).mean()
        metrics = {"loss": loss.detach(), "approx_kl": drift / 2, "clipfrac": torch.zeros((), device=loss.device)}
        return LossOutput(loss=loss, metrics=metrics)
