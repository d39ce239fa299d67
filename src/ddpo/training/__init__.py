"""The training wing: the epoch loop (`loop`), checkpoints (`checkpoint`), the run directory, periodic
evaluation (`monitor`, `evaluate`), sharding over processes and preemption."""

from ddpo.training.loop import OffPolicyError, Trainer, train

__all__ = ["OffPolicyError", "Trainer", "train"]
