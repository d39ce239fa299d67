"""Reward normalisation into advantages: per-prompt running statistics (as ddpo-pytorch's
`PerPromptStatTracker`, the reference implementation of Black et al. 2023) or one global mean/std."""

from collections import deque

import torch
from torch import Tensor

EPSILON = 1e-6


def global_normalize(rewards: Tensor) -> Tensor:
    """(r - mean) / (std + 1e-6) over the whole batch, with the population std.

    Args:
        rewards: (n,).

    Returns:
        (n,) advantages.
    """
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + EPSILON)


class PerPromptStatTracker:
    """Normalises each prompt's rewards by running statistics of that prompt (as ddpo-pytorch).

    Every prompt keeps its last `buffer_size` rewards. A prompt with fewer than `min_count` buffered rewards
    is normalised by the statistics of the whole current batch instead, so new prompts still get sensible
    advantages. Statistics are computed in float64 and the std is the population std (numpy's `np.std`).

    With `global_std`, each prompt's rewards are centred on its own buffer's mean but divided by the std of
    the whole current batch: a prompt whose rewards barely differ (all samples wrong in slightly different
    ways, under a near-binary reward) then gets small advantages instead of having its noise blown up to
    unit scale (Flow-GRPO's option, applied to DDPO's running statistics).
    """

    def __init__(self, buffer_size: int, min_count: int, global_std: bool = False) -> None:
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.global_std = global_std
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: Tensor) -> Tensor:
        """Add this epoch's rewards to the buffers and return their advantages.

        Args:
            prompts: n prompts, one per sample.
            rewards: (n,) rewards, aligned with `prompts`.

        Returns:
            (n,) advantages, in `rewards`' dtype and device.
        """
        if len(prompts) != rewards.numel():
            raise ValueError(f"got {len(prompts)} prompts for {rewards.numel()} rewards")
        rewards_fp64 = rewards.detach().cpu().double()
        advantages = torch.empty_like(rewards_fp64)
        batch_mean, batch_std = rewards_fp64.mean(), rewards_fp64.std(unbiased=False)
        for prompt in dict.fromkeys(prompts):  # unique prompts in first-occurrence order
            index = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards_fp64[index].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                history = torch.tensor(buffer, dtype=torch.float64)
                mean = history.mean()
                std = batch_std if self.global_std else history.std(unbiased=False)
            advantages[index] = (rewards_fp64[index] - mean) / (std + EPSILON)
        return advantages.to(device=rewards.device, dtype=rewards.dtype)

    def stats(self) -> dict[str, float]:
        """Number of tracked prompts and their mean buffer length, for logging."""
        lengths = [len(buffer) for buffer in self.buffers.values()]
        return {
            "num_prompts": len(lengths),
            "mean_buffer_length": sum(lengths) / len(lengths) if lengths else 0.0,
        }

    def state_dict(self) -> dict[str, dict[str, list[float]]]:
        """JSON-serialisable buffers; loading them makes later `update`s reproduce bit for bit."""
        return {"buffers": {prompt: list(buffer) for prompt, buffer in self.buffers.items()}}

    def load_state_dict(self, state: dict[str, dict[str, list[float]]]) -> None:
        self.buffers = {
            prompt: deque(values, maxlen=self.buffer_size) for prompt, values in state["buffers"].items()
        }


GROUP_EPSILON = 1e-4  # flow_grpo's stat tracker


def group_normalize(rewards: Tensor, groups: list, global_std: bool = False) -> Tensor:
    """GRPO advantages (Flow-GRPO, Liu et al. 2025, eq. 4): (r - mean of the group) / (std + 1e-4).

    The std is each group's own (population std), or with `global_std` the std of all `rewards` (Flow-GRPO's
    `global_std` option, which keeps groups whose rewards barely differ from being blown up). Computed in float64.

    Args:
        rewards: (n,).
        groups: n hashable group labels (e.g. prompts); samples with equal labels form a group.
        global_std: divide by the std of the whole batch instead of the group's.

    Returns:
        (n,) advantages in `rewards`' dtype and device.
    """
    if len(groups) != rewards.numel():
        raise ValueError(f"got {len(groups)} group labels for {rewards.numel()} rewards")
    values = rewards.detach().cpu().double()
    advantages = torch.empty_like(values)
    batch_std = values.std(unbiased=False)
    for label in dict.fromkeys(groups):
        index = torch.tensor([i for i, g in enumerate(groups) if g == label])
        group = values[index]
        std = batch_std if global_std else group.std(unbiased=False)
        advantages[index] = (group - group.mean()) / (std + GROUP_EPSILON)
    return advantages.to(device=rewards.device, dtype=rewards.dtype)
