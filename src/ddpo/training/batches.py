"""An epoch's samples and how they are dealt into micro-batches: which samples each minibatch holds, which of
their steps are trained, which anchors join them. Every draw is seeded from what it is for, so that a resumed
run and a run on more processes draw exactly what the uninterrupted single-process run draws."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ddpo.config import BatchSizes, Config
from ddpo.core.trajectory import Trajectory
from ddpo.utils import derive_seed, generators_for


@dataclass
class EpochSamples:
    """This process's samples of one epoch, with their global indices and rewards."""

    trajectory: Trajectory
    indices: torch.Tensor  # (n,) global sample index of each local sample
    rewards: torch.Tensor  # (n,)
    reward_info: dict
    sample_seconds: float
    reward_wait_seconds: float


def global_indices(config: Config, batch: int, rank: int, world: int) -> list[int]:
    """Global sample indices of one sampling batch: batch-major, then process, then position, so that a
    1-process run with the same global batch sees the same samples in the same order. Anchor batches come last."""
    size = config.sample.batch_size
    return [(batch * world + rank) * size + i for i in range(size)]


def is_anchor(config: Config, indices: torch.Tensor, world: int) -> torch.Tensor:
    """Which global sample indices are of anchor batches (they follow the trained batches)."""
    return indices >= config.sample.num_batches_per_epoch * world * config.sample.batch_size


def minibatches(config: Config, epoch: int, inner: int, num_samples: int, rank: int) -> list[torch.Tensor]:
    """This process's minibatches (positions into its first `num_samples` samples, the scored ones) for one
    inner epoch.

    When a minibatch is a whole sampling batch (`train.batch_size == sample.batch_size`), minibatches are
    the sampling batches in an order shared by every process, so the k-th optimizer step of a W-process run
    averages exactly the samples of the k-th step of a 1-process run with W times the batch: the run does not
    depend on the number of processes. Otherwise samples are shuffled within each process.
    """
    batch = config.sample.batch_size
    if config.train.batch_size == batch and num_samples % batch == 0:
        generator = torch.Generator().manual_seed(derive_seed(config.seed, "shuffle-batches", epoch, inner))
        return [torch.arange(k * batch, (k + 1) * batch) for k in torch.randperm(num_samples // batch, generator=generator).tolist()]
    generator = torch.Generator().manual_seed(derive_seed(config.seed, "shuffle", epoch, inner, rank))
    return list(torch.randperm(num_samples, generator=generator).split(config.train.batch_size))


def anchor_parts(config: Config, epoch: int, inner: int, start: int, stop: int, num_minibatches: int, rank: int) -> list[torch.Tensor]:
    """The anchor samples (positions `start`..`stop`) shuffled and dealt out to the minibatches as evenly as
    they go: each minibatch's loss adds the KL of its share, so the weight is felt within every gradient."""
    generator = torch.Generator().manual_seed(derive_seed(config.seed, "shuffle-anchors", epoch, inner, rank))
    return list((start + torch.randperm(stop - start, generator=generator)).tensor_split(num_minibatches))


def trained_steps(config: Config, sizes: BatchSizes, epoch: int, inner: int, samples: EpochSamples) -> torch.Tensor:
    """(n, num_train_timesteps) step indices each local sample trains on in one inner epoch.

    Each sample trains on its own random subset of its steps (`train.timestep_fraction`), as in ddpo-pytorch,
    drawn from its global index so that it does not depend on the number of processes. With
    `sample.sde_window` the subset is of its SDE window only (Flow-GRPO-Fast): its other steps are ODE steps,
    with no log-prob.
    """
    trajectory = samples.trajectory
    generators = generators_for(config.seed, f"timesteps/{inner}", epoch, samples.indices.tolist())
    window = config.sample.sde_window
    if window:
        offsets = torch.stack([torch.randperm(window, generator=g) for g in generators])
        steps = trajectory.sde_window_start.cpu()[:, None] + offsets
    else:
        steps = torch.stack([torch.randperm(trajectory.num_steps, generator=g) for g in generators])
    return steps[:, : sizes.num_train_timesteps]


def merge_reward_info(infos: list[dict]) -> dict[str, float]:
    """Mean of each numeric per-sample array a reward reported (e.g. each term of a weighted sum)."""
    merged: dict[str, list] = {}
    for info in infos:
        for key, value in info.items():
            array = np.asarray(value)
            if array.dtype.kind in "fiub":
                merged.setdefault(key, []).append(array.reshape(-1))
    return {key: float(np.concatenate(values).mean()) for key, values in merged.items()}
