"""The training wing: the epoch loop (`loop`), checkpoints (`checkpoint`), the run directory, periodic
evaluation (`monitor`, `evaluate`), sharding over processes and preemption."""

from ddpo.algorithms import OffPolicyError
from ddpo.training.loop import Trainer, train

__all__ = ["OffPolicyError", "Trainer", "train"]
