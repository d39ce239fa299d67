"""The interface every training algorithm implements; the trainer depends on nothing else."""

from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor


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
    """

    name: str
    uses_importance_ratio: bool
    one_step_per_epoch: bool

    @classmethod
    def from_config(cls, train: Any) -> "Algorithm":
        """The algorithm configured by the `train` section of a `ddpo.config.Config`."""
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

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state needed to resume bit for bit."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
