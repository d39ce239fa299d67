"""How many timesteps one model call of the update may batch (`train.timestep_chunk = 0`, the default): the most
whose activations fit the device's budget.

Every chunk gives the same loss and gradients (each micro-step's loss is scaled by its share of the optimizer
step); a bigger chunk is faster (fewer, larger model calls: 1.4-1.6x from one timestep per call to all of them on
this project's CPU runs, docs/performance.md) and holds proportionally more activations for backward. The
activations of one timestep are measured, not guessed: the run's first micro-step trains one timestep, and the
tensors autograd saves for its backward are counted (`ActivationMeter`; frozen weights excluded: they are held
anyway); the rest of the run uses the chunk chosen from it, which checkpoints keep, so a resumed run goes on with it. The budget (`train.activation_memory_mb`; 0 = the
device's default):
- CUDA: half of the memory free on the device at that point (after the model, the optimizer and the epoch's
  samples), so the batched speed is kept where memory allows;
- CPU: 96 MiB. On the peer benchmark's tiny pipeline (35 MiB of activations per timestep) that is 2 timesteps per
  call, which measured 8.1 s per epoch against 8.0 s for all 20 and 10.6 s for one, at a peak of 676 MiB against
  1,732 and 610 (benchmarks/peers.py --chunks, docs/performance.md): most of the batched speed at the memory of a
  trainer that backpropagates one timestep at a time. A preset for a machine with memory to spare raises it (the
  Shapes default: 1024).
The chunk is the same on every process (the smallest of their choices) and, read from the checkpoint, at every
resume, so resumed runs repeat the uninterrupted one's arithmetic.
"""

from __future__ import annotations

from typing import Any

import torch

CPU_ACTIVATION_BUDGET_MB = 96.0
CUDA_FREE_FRACTION = 0.5


class ActivationMeter:
    """While active, counts the bytes autograd saves for backward (each storage once), the model's own weights and
    buffers excluded: they are held anyway."""

    def __init__(self, model: Any) -> None:
        self.held = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())} if model is not None else set()
        self.saved: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    @property
    def bytes(self) -> int:
        return sum(self.saved.values())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.held:
            self.saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self) -> "ActivationMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def activation_budget_bytes(device: torch.device, budget_mb: float) -> int:
    """`train.activation_memory_mb` in bytes, or the device's default (see the module docstring)."""
    if budget_mb > 0:
        return int(budget_mb * 2**20)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FREE_FRACTION)
    return int(CPU_ACTIVATION_BUDGET_MB * 2**20)


def chunk_for(per_timestep: int, budget: int, num_timesteps: int) -> int:
    """The most timesteps (1 to `num_timesteps`) whose activations, `per_timestep` bytes each, fit `budget`."""
    if per_timestep <= 0:
        return num_timesteps
    return max(1, min(num_timesteps, budget // per_timestep))


def choose_timestep_chunk(accelerator: Any, per_timestep: int, num_timesteps: int, budget_mb: float) -> int:
    """The update's chunk for a run from the activations of one timestep, announced in one line (*collective* with
    several processes: all take the smallest of their chunks)."""
    budget = activation_budget_bytes(accelerator.device, budget_mb)
    chunk = chunk_for(per_timestep, budget, num_timesteps)
    if accelerator.num_processes > 1:
        chunk = int(accelerator.gather(torch.tensor([chunk], device=accelerator.device)).min())
    accelerator.print(
        f"ddpo: {chunk} of {num_timesteps} timesteps per model call in the update ({per_timestep / 2**20:.3g} MiB of "
        f"activations each, budget {budget / 2**20:.3g} MiB: train.activation_memory_mb)"
    )
    return chunk
