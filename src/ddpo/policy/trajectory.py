"""The record of one batch of denoising chains: what the trainer needs to recompute log-probabilities."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image


@dataclass
class Trajectory:
    """A batch of B sampled chains of T denoising steps.

    latents:         (B, T + 1, C, h, w)  x_T ... x_0, in the scheduler's latent space
    timesteps:       (B, T)               the scheduler timestep of each step
    log_probs:       (B, T)               log p(x_{t-1} | x_t, c) under the sampling policy (fp32)
    prompt_embeds:   (B, L, D)            text-encoder states of the prompts
    negative_embeds: (B, L, D)            text-encoder states of the negative (empty) prompt, for CFG
    prompts, metadata, images: per-sample Python objects (images are the decoded x_0)
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor
    prompts: list[str]
    metadata: list[dict] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)

    _TENSORS = ("latents", "timesteps", "log_probs", "prompt_embeds", "negative_embeds")

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[1]

    def select(self, index: torch.Tensor | list[int]) -> "Trajectory":
        """The sub-batch at `index` (a list or 1-D tensor of sample positions)."""
        index = torch.as_tensor(index, dtype=torch.long)
        positions = index.tolist()
        tensors = {name: getattr(self, name)[index.to(getattr(self, name).device)] for name in self._TENSORS}
        return Trajectory(
            **tensors,
            prompts=[self.prompts[i] for i in positions],
            metadata=[self.metadata[i] for i in positions] if self.metadata else [],
            images=[self.images[i] for i in positions] if self.images else [],
        )

    @staticmethod
    def concatenate(parts: list["Trajectory"]) -> "Trajectory":
        tensors = {name: torch.cat([getattr(p, name) for p in parts]) for name in Trajectory._TENSORS}
        return Trajectory(
            **tensors,
            prompts=[x for p in parts for x in p.prompts],
            metadata=[x for p in parts for x in p.metadata],
            images=[x for p in parts for x in p.images],
        )
