"""Advantage Weighted Matching (AWM; Xue, Ge, Zhang, Li, Ma 2025, arXiv 2509.25050): RL with the pretraining
loss, the flow-matching loss of the epoch's own samples weighted by their advantages.

The paper argues that DDPO's objective amounts to denoising score matching on noisy data, and replaces it by the
flow-matching loss on the clean samples x_0 (lower variance, the same objective as pretraining). Each prompt is
sampled G times by any solver (here the Euler ODE, CFG-free); at a noised copy x = (1 - sigma) x_0 + sigma eps of
each sample, the flow-matching loss l = mean((v - (eps - x_0))^2) becomes a pseudo log-likelihood

    log p = -sigma ((l + e)^p - e^p) / p    (`ddpo.core.forward_process.awm_log_likelihood`, p = `train.awm_power`),

and the loss is PPO's clipped surrogate on the ratio exp(log p - log p_old) with the sample's advantage, plus
`train.awm_old_kl_weight` * mean((v - v_old)^2) and `train.kl_weight` * mean((v - v_ref)^2) (to the base model).
At the first optimizer step of an epoch the ratio is 1 and the gradient is exactly -A d(log p): the advantage-
weighted matching loss.

Defaults of the paper's code (scxue/advantage_weighted_matching, config/dgx_awm.py, its GenEval/OCR/PickScore
configs) that this module follows: the generalised Huber weighting ("ghuber") with p = 0.25, e = 1e-10, in float64;
per-step ratios ("exp_first") clipped with clip range 1 (`train.clip_range`); advantages standardised per prompt
with the global std, clipped to +-5 (`train.adv_clip_max`) and divided by 5 (its `advantage_max = 1`); the KL to
the "EMA" policy with weight 1 ("Uniform", `train.awm_old_kl_weight`); KL to the reference model 1e-3 (GenEval),
3e-3 (OCR) or 1e-4 (PickScore), `train.kl_weight`; CFG off in sampling and training; the noise levels of the
sampling schedule (14 steps, 6 trained per sample: `train.timestep_fraction` of them), fresh noise per (sample,
level); one optimizer step per epoch (`train.gradient_accumulation_steps` = the epoch's micro-batches).

Where this module departs, and why:
- The "EMA" policy of the KL term and the old policy of the ratio are the epoch's sampling policy (velocity
  computed once before training, `ForwardProcessAlgorithm.prepare`). The code's KL policy is an EMA of the trained
  weights whose decay grows from 0 with the optimizer step (min(0.001 step, 0.3)): at decay 0, its start, it is
  the sampling policy. A second set of weights is beyond the trainer's interface.
- The trained noise levels are a random subset of the chain's (the trainer's `timestep_fraction`), shared by no
  two samples; the code stratifies 6 levels over steps 1..12 of 14 and gives one micro-batch the same levels.
- It samples with the Euler ODE; the code uses SA-Solver with stochasticity 0.4 on sigma in [0.3, 0.9] for
  GenEval and OCR (deterministic for PickScore). SA-Solver is not implemented here; any solver fits the loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ddpo.algorithms.base import LossOutput
from ddpo.algorithms.forward_process import ForwardPrediction, ForwardProcessAlgorithm
from ddpo.core import approx_kl, awm_log_likelihood, clip_fraction, ppo_clip_loss, velocity_divergence


class AdvantageWeightedMatching(ForwardProcessAlgorithm):
    """Advantage-weighted flow matching through PPO's clipped ratio, with a KL to the sampling policy."""

    name = "awm"
    uses_importance_ratio = True

    @classmethod
    def from_config(cls, train: Any) -> "AdvantageWeightedMatching":
        """Built from the `train` config section (clip_range, awm_power, awm_old_kl_weight, adv_clip_max, global_std)."""
        return cls(
            clip_range=train.clip_range, power=train.awm_power, old_kl_weight=train.awm_old_kl_weight, adv_clip_max=train.adv_clip_max,
            global_std=train.global_std, prediction_batch_size=train.batch_size,
        )  # fmt: skip

    @classmethod
    def check_config(cls, config: Any) -> None:
        super().check_config(config)
        if config.train.awm_power <= 0:
            raise ValueError(f"train.awm_power={config.train.awm_power:g} must be > 0 (the paper's 0.25)")
        if config.train.awm_old_kl_weight < 0:
            raise ValueError(f"train.awm_old_kl_weight={config.train.awm_old_kl_weight:g} must be >= 0 (0 = off; the paper's 1.0)")

    def __init__(
        self, *, clip_range: float, power: float = 0.25, old_kl_weight: float = 1.0, adv_clip_max: float = 5.0, global_std: bool = True,
        prediction_batch_size: int = 16,
    ) -> None:  # fmt: skip
        super().__init__(adv_clip_max=adv_clip_max, global_std=global_std, prediction_batch_size=prediction_batch_size)
        self.clip_range = clip_range
        self.power = power
        self.old_kl_weight = old_kl_weight

    def advantages(self, rewards: Tensor, prompts: list[str]) -> Tensor:
        """Group-standardised advantages clipped to +-adv_clip_max, then divided by it: in [-1, 1] (the code's
        `advantage_max = 1`)."""
        return super().advantages(rewards, prompts) / self.adv_clip_max

    def loss(self, prediction: ForwardPrediction, advantages: Tensor) -> LossOutput:
        """(B, K) pairs and (B,) advantages -> clipped surrogate of the pseudo log-likelihoods + the old-policy KL."""
        log_prob = awm_log_likelihood(prediction.velocity, prediction.target, prediction.sigma, self.power)
        old_log_prob = awm_log_likelihood(prediction.old_velocity, prediction.target, prediction.sigma, self.power)
        log_ratio = log_prob - old_log_prob
        ratio = torch.exp(log_ratio)
        policy_loss = ppo_clip_loss(advantages.double()[:, None].expand_as(ratio).reshape(-1), ratio.reshape(-1), self.clip_range)
        old_kl = velocity_divergence(prediction.velocity, prediction.old_velocity).mean()
        loss = policy_loss.float() + self.old_kl_weight * old_kl
        metrics = {
            "loss": loss.detach(),
            "policy_loss": policy_loss.detach().float(),
            "old_policy_kl": old_kl.detach(),
            "approx_kl": approx_kl(log_ratio.detach()).float(),
            "clipfrac": clip_fraction(ratio.detach(), self.clip_range),
            "ratio_mean": ratio.detach().mean().float(),
        }
        return LossOutput(loss=loss, metrics=metrics, ratio_error=log_ratio.detach().expm1().abs().max().float())
