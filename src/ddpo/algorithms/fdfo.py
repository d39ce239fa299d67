"""Finite Difference Flow Optimization (FDFO; McAllister, Aittala, Karras, Hellsten, Kanazawa, Aila, Laine 2026,
arXiv 2603.12893), with the defaults of its reference code (NVlabs/finite-difference-flow-optimization).

Each prompt's initial noise is duplicated into a pair; both branches are churned (`ddpo.core.flow.churn_step`,
gamma = `sample.churn`, the initial noise too) so they drift into near-counterfactual images x1, x2. The
reward difference along the endpoint difference is a finite-difference estimate of the reward's gradient:

    dR = +-(R1 - R2) / 2,   dx = +-(x1 - x2) / 2 normalised by its mean square   (`ddpo.core.finite_difference`).

At every step of a branch the same dx is used (no backpropagation through the chain): the velocity target is
v_target = v_ref - dx, with v_ref the velocity recorded while sampling; the pseudo log-likelihood is
ps = -mean((v - v_target)^2), the ratio r = exp(ps - ps_ref) with ps_ref = -mean(dx^2) (= ps at v = v_ref), and
the loss is the SPO surrogate -dR r + |dR| / (2 eps) (r - 1)^2 with eps = `train.spo_epsilon` (3e-2 in the
paper). The KL to the base model, `train.kl_weight` * mean((v - v_base)^2), is the trainer's. CFG is off in
the paper's default (sample.guidance_scale = 1): FDFO is meant to make it unnecessary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ddpo.algorithms.base import LossOutput, TrajectoryStepAlgorithm
from ddpo.core import approx_kl, endpoint_directions, pair_reward_differences, spo_loss, velocity_log_likelihood
from ddpo.core.trajectory import SampleData

if TYPE_CHECKING:
    from ddpo.core.trajectory import StepPrediction, Trajectory


@dataclass
class FiniteDifferences(SampleData):
    """direction: (B, ...) each sample's normalised endpoint difference dx to its pair partner."""

    direction: Tensor


class FiniteDifferenceFlowOptimization(TrajectoryStepAlgorithm):
    """FDFO: pairs, finite-difference velocity targets, SPO surrogate; several optimizer steps per epoch."""

    name = "fdfo"
    uses_importance_ratio = True
    one_step_per_epoch = False
    sampler = "churn"
    shared_initial_noise = True

    @classmethod
    def from_config(cls, train: Any) -> "FiniteDifferenceFlowOptimization":
        """Built from the `train` config section: eps of the SPO surrogate is `train.spo_epsilon`."""
        return cls(epsilon=train.spo_epsilon)

    @property
    def trust_region(self) -> tuple[float, str]:
        return self.epsilon, "train.spo_epsilon"

    @classmethod
    def check_config(cls, config: Any) -> None:
        sample = config.sample
        if sample.samples_per_prompt != 2:
            raise ValueError(f"sample.samples_per_prompt={sample.samples_per_prompt}: fdfo samples each prompt as one pair; set it to 2")
        if sample.batch_size % 2:
            raise ValueError(f"sample.batch_size={sample.batch_size} must be even for fdfo, so that both samples of a pair are drawn together")
        if sample.churn <= 0:
            raise ValueError(f"sample.churn={sample.churn:g} must be > 0 for fdfo: without churn both samples of a pair are identical")

    def __init__(self, *, epsilon: float) -> None:
        self.epsilon = epsilon

    def advantages(self, rewards: Tensor, prompts: list[str]) -> Tensor:
        """(n,) rewards of consecutive pairs -> (n,) signed half reward differences dR (no normalisation)."""
        if any(prompts[i] != prompts[i + 1] for i in range(0, len(prompts) - 1, 2)):
            raise ValueError("fdfo: samples 2k and 2k + 1 must share a prompt (sample.samples_per_prompt = 2)")
        return pair_reward_differences(rewards)

    def prepare(self, trajectory: Trajectory) -> None:
        """Attach each sample's normalised endpoint difference to its pair partner (pairs are consecutive)."""
        if trajectory.model_outputs is None:
            raise ValueError("fdfo needs the velocities recorded while sampling: sample with the churn sampler of a flow-matching policy")
        trajectory.prepared = FiniteDifferences(direction=endpoint_directions(trajectory.latents[:, -1]))

    def log_likelihoods(self, prediction: StepPrediction, trajectory: Trajectory, rows: Tensor, columns: Tensor) -> tuple[Tensor, Tensor]:
        """ps = -mean((v - (v_ref - dx))^2) with grad, and ps_ref = -mean(dx^2), both (B, K)."""
        direction = trajectory.prepared.direction[:, None]  # (B, 1, ...): the same dx at every step
        velocity_target = trajectory.model_outputs[rows, columns].float() - direction
        log_prob = velocity_log_likelihood(prediction.model_output, velocity_target, batch_dims=2)
        old_log_prob = -direction.pow(2).mean(dim=tuple(range(2, direction.ndim))).expand_as(log_prob)
        return log_prob, old_log_prob

    def loss(self, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor) -> LossOutput:
        """(b,) pseudo log-likelihoods and dR -> SPO surrogate loss; clipfrac counts ratios outside 1 +- eps."""
        log_ratio = log_prob - old_log_prob
        ratio = torch.exp(log_ratio)
        loss = spo_loss(advantages, ratio, self.epsilon)
        metrics = {
            "loss": loss.detach(),
            "approx_kl": approx_kl(log_ratio.detach()),
            "clipfrac": ((ratio.detach() - 1.0).abs() > self.epsilon).float().mean(),
            "ratio_mean": ratio.detach().mean(),
        }
        return LossOutput(loss=loss, metrics=metrics)

    def kl_to_reference(self, prediction: StepPrediction) -> Tensor:
        """mean((v - v_base)^2) per step, (B, K): the KL, up to scale, of FDFO's fixed-variance velocity Gaussians."""
        return -velocity_log_likelihood(prediction.model_output, prediction.reference_model_output, batch_dims=2)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
