"""The interface every training algorithm implements; the trainer depends on nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor

from ddpo.core import gaussian_kl

if TYPE_CHECKING:  # data classes only: algorithms never touch a pipeline
    from ddpo.core.trajectory import StepPrediction, Trajectory


@dataclass
class LossOutput:
    """Loss of one minibatch at one timestep.

    Attributes:
        loss: scalar to backpropagate.
        metrics: detached scalars, at least `loss`, `approx_kl` and `clipfrac` (0 where no clipping applies).
    """

    loss: Tensor
    metrics: dict[str, Tensor]


class Algorithm(Protocol):
    """Turns rewards into per-sample advantages, and log-probs plus advantages into a loss.

    Attributes:
        name: registry name, e.g. "ddpo_is".
        uses_importance_ratio: whether the loss depends on the ratio pi_theta / pi_old.
        one_step_per_epoch: take a single optimizer step per epoch of samples (DDPO_SF): the trainer
            accumulates gradients over the whole epoch.
        sampler: the flow policies' training sampler the algorithm needs: "sde" (a Gaussian policy with exact
            log-probs) or "churn" (FDFO's churned Euler steps). DDIM policies have their own.
        shared_initial_noise: the samples of a group (`sample.samples_per_prompt`) start from one initial noise.
    """

    name: str
    uses_importance_ratio: bool
    one_step_per_epoch: bool
    sampler: str
    shared_initial_noise: bool

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

    def loss(self, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor) -> LossOutput:
        """Loss for one timestep of a minibatch.

        Args:
            log_prob: (b,) log pi_theta(x_{t-1} | x_t), with grad.
            old_log_prob: (b,) the log-prob recorded while sampling.
            advantages: (b,) this minibatch's slice of `advantages(...)`.
        """
        ...

    def prepare(self, trajectory: Trajectory) -> None:
        """Attach per-sample training data derived from one process's samples of the epoch, before training."""
        ...

    def log_likelihoods(self, prediction: StepPrediction, trajectory: Trajectory, rows: Tensor, columns: Tensor) -> tuple[Tensor, Tensor]:
        """The log-likelihood the loss's ratio compares, under the current policy and under the sampling one.

        Args:
            prediction: the policy at (rows, columns) of `trajectory`, each tensor (B, K, ...).
            trajectory: the minibatch (B samples).
            rows, columns: (B, 1) and (B, K) sample and step indices of the prediction.

        Returns:
            (B, K) log-likelihoods with grad, and (B, K) their values under the sampling policy.
        """
        ...

    def kl_to_reference(self, prediction: StepPrediction) -> Tensor:
        """(B, K) per-step divergence of the policy from the reference model (`prediction.reference_*`)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state needed to resume bit for bit."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class GaussianStepAlgorithm:
    """Defaults of the algorithms that train on the sampler's own Gaussian steps (DDPO, RWR, Flow-GRPO)."""

    sampler = "sde"
    shared_initial_noise = False

    @classmethod
    def check_config(cls, config: Any) -> None:
        pass

    def prepare(self, trajectory: Trajectory) -> None:
        pass

    def log_likelihoods(self, prediction: StepPrediction, trajectory: Trajectory, rows: Tensor, columns: Tensor) -> tuple[Tensor, Tensor]:
        """log pi(x_next | x_t, c) of the recorded next latents, and the log-probs recorded while sampling."""
        return prediction.log_prob, trajectory.log_probs[rows, columns]

    def kl_to_reference(self, prediction: StepPrediction) -> Tensor:
        """KL of each step's Gaussians, ||mu_theta - mu_ref||^2 / (2 std^2) per latent dimension (DPOK, Fan et al.
        2023; Flow-GRPO's KL loss): both policies share the step's std, which depends on the schedule only."""
        batch, steps = prediction.mean.shape[:2]
        kl = gaussian_kl(prediction.mean.flatten(0, 1), prediction.reference_mean.flatten(0, 1), prediction.std.flatten(0, 1))
        return kl.reshape(batch, steps)
