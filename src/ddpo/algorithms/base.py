"""The interface every training algorithm implements; the trainer depends on nothing else.

The trainer hands an algorithm one micro-batch at a time (`MicroBatch`: samples, the steps trained, their
advantages, anchors) and gets back a loss (`LossOutput`); it only accumulates, clips and steps. Everything the
loss is made of, regularizers included, is the algorithm's: a new algorithm is a new module, never an edit of
the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from ddpo.core import gaussian_kl

if TYPE_CHECKING:  # data classes only: algorithms never touch a pipeline
    from ddpo.core.trajectory import StepPrediction, Trajectory


class StepPredictor(Protocol):
    """What an algorithm may ask of the policy: its prediction at chosen steps of recorded chains."""

    def predict(self, trajectory: Trajectory, step_indices: Tensor, *, reference: bool = False) -> StepPrediction:
        """The policy at steps (B, K) of `trajectory`, with gradients; `reference` adds the reference model's."""
        ...


@dataclass
class MicroBatch:
    """One micro-step's share of an epoch.

    Attributes:
        trajectory: B scored samples.
        steps: (B, K) the step indices of each sample trained in this micro-step.
        advantages: (B,) the samples' advantages (or weights).
        anchors: unscored anchor samples whose KL to the base model joins this gradient (`prompts.anchor_source`),
            with `anchor_steps` (A, K), or None.
    """

    trajectory: Trajectory
    steps: Tensor
    advantages: Tensor
    anchors: Trajectory | None = None
    anchor_steps: Tensor | None = None


@dataclass
class LossOutput:
    """Loss of one micro-batch: the mean over its (sample, step) pairs.

    Attributes:
        loss: scalar to backpropagate.
        metrics: detached scalars, at least `loss`, `approx_kl` and `clipfrac` (0 where no clipping applies).
        ratio_error: max |pi_theta / pi_old - 1| over the micro-batch (detached) for algorithms whose loss uses the
            importance ratio, else None: on the first optimizer step of an epoch it must be 0 (the trainer's
            on-policy check).
    """

    loss: Tensor
    metrics: dict[str, Tensor]
    ratio_error: Tensor | None = None


class Algorithm(Protocol):
    """Turns rewards into per-sample advantages, and a micro-batch into a loss.

    Attributes:
        name: registry name, e.g. "ddpo_is".
        uses_importance_ratio: whether the loss depends on the ratio pi_theta / pi_old.
        one_step_per_epoch: take a single optimizer step per epoch of samples (DDPO_SF): the trainer
            accumulates gradients over the whole epoch.
        sampler: the flow policies' training sampler the algorithm needs: "sde" (a Gaussian policy with exact
            log-probs) or "churn" (FDFO's churned Euler steps). DDIM policies have their own.
        shared_initial_noise: the samples of a group (`sample.samples_per_prompt`) start from one initial noise.
        regularizers: the penalties added to its loss (KL to the reference model, the anchors' KL), from the config.
        trust_region: where `uses_importance_ratio`, how far (and under which config key) its objective lets the
            ratio move from 1 before it clips or penalises: the first step's ratios must stay inside it.
    """

    name: str
    uses_importance_ratio: bool
    one_step_per_epoch: bool
    sampler: str
    shared_initial_noise: bool
    regularizers: tuple[Regularizer, ...]
    trust_region: tuple[float, str]

    @classmethod
    def from_config(cls, train: Any) -> "Algorithm":
        """The algorithm configured by the `train` section of a `ddpo.config.Config`."""
        ...

    @classmethod
    def check_config(cls, config: Any) -> None:
        """Raise ValueError, naming the config key, if the whole `Config` cannot run this algorithm."""
        ...

    def advantages(self, rewards: Tensor, prompts: list[str]) -> Tensor:
        """Advantages (or sample weights) for the whole epoch.

        Called identically on every process with the rewards and prompts gathered from all processes, so
        that stateful normalisation stays in sync.

        Args:
            rewards: (n,) rewards of the whole epoch.
            prompts: n prompts, aligned with `rewards`.

        Returns:
            (n,) advantages.
        """
        ...

    def begin_epoch(self, epoch: int, policy: Any) -> None:
        """Called on every process before epoch `epoch` (1-based) samples, also on resume: where the algorithm sets
        what its sampling depends on (e.g. MixGRPO's window position). Must depend only on `epoch` and its state."""
        ...

    def prepare(self, trajectory: Trajectory) -> None:
        """Attach per-sample training data (`trajectory.prepared`) derived from one process's samples of the epoch."""
        ...

    def micro_step(self, policy: StepPredictor, batch: MicroBatch) -> LossOutput:
        """The loss of one micro-batch, regularizers included, with gradients through the policy."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state needed to resume bit for bit."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class OffPolicyError(ValueError):
    """The first update of an epoch found importance ratios outside the trust region: training would be off-policy."""


def add_regularizers(output: LossOutput, regularizers: Sequence[Regularizer], divergence: Any, policy: Any, batch: MicroBatch, prediction: Any) -> LossOutput:
    """`output` with each regularizer's weighted penalty added to its loss and the penalty in its metrics."""
    for regularizer in regularizers:
        penalty = regularizer.penalty(divergence, policy, batch, prediction)
        if penalty is not None:
            output.loss = output.loss + regularizer.weight * penalty
            output.metrics[regularizer.name] = penalty.detach()
    return output


def check_groups(name: str, config: Any) -> None:
    """The group algorithms compare the samples of one prompt with each other: at least 2 per prompt."""
    if config.sample.samples_per_prompt < 2:
        raise ValueError(
            f"sample.samples_per_prompt={config.sample.samples_per_prompt}: {name} compares the samples of one prompt "
            "with each other; give each prompt a group of at least 2 (the paper uses 24)"
        )


def check_on_policy(algorithm: Algorithm, epoch: int, ratio_error: float) -> None:
    """Stop before the first optimizer step of an epoch when its ratios pi_theta / pi_old, which must be 1
    (the weights that sampled are the weights that recompute), are off by more than the trust region."""
    tolerance, key = algorithm.trust_region
    if ratio_error > tolerance:
        raise OffPolicyError(
            f"epoch {epoch}: off-policy at the first update: max |ratio - 1| = {ratio_error:.3g} exceeds "
            f"{key}={tolerance:g}, so the first step already clips; the log-probs recomputed in training "
            f"differ from the sampler's (precision or batch-dependent kernels): set model.mixed_precision=\"no\" "
            f"and model.allow_tf32=false, or raise {key}; `ddpo doctor` measures it; "
            f"train.on_policy_check=false trains anyway"
        )


class Regularizer(Protocol):
    """A penalty added to an algorithm's loss: `weight` times a divergence the algorithm defines."""

    name: str  # its metric
    weight: float
    needs_reference: bool  # whether the trained samples' prediction must carry the reference model's

    def penalty(self, divergence: Any, policy: StepPredictor, batch: MicroBatch, prediction: StepPrediction) -> Tensor | None:
        """The unweighted penalty (a scalar), or None where it does not apply to this micro-batch."""
        ...


@dataclass(frozen=True)
class KLToReference:
    """KL of the trained steps to the reference model (adapters off), in the algorithm's own terms (`train.kl_weight`)."""

    weight: float
    name: str = "kl_to_reference"
    needs_reference: bool = True

    def penalty(self, divergence: Any, policy: StepPredictor, batch: MicroBatch, prediction: StepPrediction) -> Tensor:
        return divergence(prediction).mean()


@dataclass(frozen=True)
class AnchorKL:
    """The anchors' KL to the base model, in the same gradient as the reward's (`train.anchor_kl_weight`)."""

    weight: float
    name: str = "anchor_kl"
    needs_reference: bool = False

    def penalty(self, divergence: Any, policy: StepPredictor, batch: MicroBatch, prediction: StepPrediction) -> Tensor | None:
        if batch.anchors is None:
            return None
        return divergence(policy.predict(batch.anchors, batch.anchor_steps, reference=True)).mean()


def regularizers_from_config(train: Any) -> tuple[Regularizer, ...]:
    """The penalties the `train` section asks for (`kl_weight`, `anchor_kl_weight`; anchors are sampled exactly when the latter is > 0)."""
    regularizers: list[Regularizer] = []
    if train.kl_weight > 0:
        regularizers.append(KLToReference(train.kl_weight))
    if train.anchor_kl_weight > 0:
        regularizers.append(AnchorKL(train.anchor_kl_weight))
    return tuple(regularizers)


class TrajectoryStepAlgorithm:
    """Defaults of the algorithms whose loss compares a likelihood of the recorded steps under the current policy
    with its value under the sampling one (DDPO, RWR, Flow-GRPO, FDFO). Subclasses define `loss`, and
    `log_likelihoods` / `kl_to_reference` where their policy is not the sampler's Gaussian."""

    sampler = "sde"
    shared_initial_noise = False
    regularizers: tuple[Regularizer, ...] = ()

    @property
    def trust_region(self) -> tuple[float, str]:
        """PPO's clip range (`train.clip_range`) where the algorithm clips its ratio."""
        return getattr(self, "clip_range", float("inf")), "train.clip_range"

    @classmethod
    def check_config(cls, config: Any) -> None:
        pass

    def begin_epoch(self, epoch: int, policy: Any) -> None:
        pass

    def prepare(self, trajectory: Trajectory) -> None:
        pass

    def loss(self, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor) -> LossOutput:
        """(b,) log-likelihoods under the current and the sampling policy, (b,) advantages -> the loss."""
        raise NotImplementedError

    def log_likelihoods(self, prediction: StepPrediction, trajectory: Trajectory, rows: Tensor, columns: Tensor) -> tuple[Tensor, Tensor]:
        """The log-likelihood the loss's ratio compares, under the current policy and under the sampling one.

        Args:
            prediction: the policy at (rows, columns) of `trajectory`, each tensor (B, K, ...).
            trajectory: the minibatch (B samples).
            rows, columns: (B, 1) and (B, K) sample and step indices of the prediction.

        Returns:
            (B, K) log-likelihoods with grad, and (B, K) their values under the sampling policy.
        """
        raise NotImplementedError

    def kl_to_reference(self, prediction: StepPrediction) -> Tensor:
        """(B, K) per-step divergence of the policy from the reference model (`prediction.reference_*`)."""
        raise NotImplementedError

    def micro_step(self, policy: StepPredictor, batch: MicroBatch) -> LossOutput:
        """The policy at the batch's steps, the loss over its B*K (sample, step) pairs, then the regularizers."""
        trajectory, columns = batch.trajectory, batch.steps
        reference = any(r.needs_reference and r.weight > 0 for r in self.regularizers)
        prediction = policy.predict(trajectory, columns, reference=reference)
        rows = torch.arange(len(trajectory), device=columns.device)[:, None]
        log_prob, old_log_prob = self.log_likelihoods(prediction, trajectory, rows, columns)
        output = self.loss(log_prob.reshape(-1), old_log_prob.reshape(-1), batch.advantages.repeat_interleave(columns.shape[1]))
        if self.uses_importance_ratio:
            output.ratio_error = (log_prob.detach().double() - old_log_prob.double()).expm1().abs().max().float()
        return add_regularizers(output, self.regularizers, self.kl_to_reference, policy, batch, prediction)


class GaussianStepAlgorithm(TrajectoryStepAlgorithm):
    """The algorithms that train on the sampler's own Gaussian steps (DDPO, RWR, Flow-GRPO)."""

    def log_likelihoods(self, prediction: StepPrediction, trajectory: Trajectory, rows: Tensor, columns: Tensor) -> tuple[Tensor, Tensor]:
        """log pi(x_next | x_t, c) of the recorded next latents, and the log-probs recorded while sampling."""
        return prediction.log_prob, trajectory.log_probs[rows, columns]

    def kl_to_reference(self, prediction: StepPrediction) -> Tensor:
        """KL of each step's Gaussians, ||mu_theta - mu_ref||^2 / (2 std^2) per latent dimension (DPOK, Fan et al.
        2023; Flow-GRPO's KL loss): both policies share the step's std, which depends on the schedule only."""
        batch, steps = prediction.mean.shape[:2]
        kl = gaussian_kl(prediction.mean.flatten(0, 1), prediction.reference_mean.flatten(0, 1), prediction.std.flatten(0, 1))
        return kl.reshape(batch, steps)
