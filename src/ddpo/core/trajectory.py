"""The record of one batch of denoising chains (what the trainer needs to recompute log-probabilities) and a
policy's prediction at chosen steps of it: the types that the policy writes and the algorithms read."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from PIL import Image


@dataclass
class SampleData:
    """Per-sample tensors (every field (B, ...)) that an algorithm derives from an epoch's samples before training.

    Subclass it as a dataclass with one tensor field per quantity; selection, concatenation and the round trip
    through a checkpoint (`to_state` / `from_state`) then work field by field.
    """

    _types: ClassVar[dict[str, type[SampleData]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        SampleData._types[cls.__name__] = cls

    def select(self, index: torch.Tensor) -> SampleData:
        return replace(self, **{f.name: getattr(self, f.name)[index.to(getattr(self, f.name).device)] for f in fields(self)})

    @classmethod
    def concatenate(cls, parts: list[SampleData]) -> SampleData:
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def to(self, device: torch.device | str) -> SampleData:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def to_state(self) -> dict[str, object]:
        """Plain tensors and the type's name (loadable with `torch.load(weights_only=True)`)."""
        return {"type": type(self).__name__, **{f.name: getattr(self, f.name).detach().cpu() for f in fields(self)}}

    @staticmethod
    def from_state(state: dict[str, object]) -> SampleData:
        values = dict(state)
        kind = values.pop("type")
        if kind not in SampleData._types:
            raise ValueError(f"unknown prepared sample data {kind!r}")
        return SampleData._types[kind](**values)


@dataclass
class Trajectory:
    """A batch of B sampled chains of T denoising steps.

    latents:         (B, T + 1, ...)      x_T ... x_0, in the policy's latent space (FLUX: packed tokens)
    timesteps:       (B, T)               the timestep of each step: the scheduler's for DDIM, sigma in [0, 1] for flows
    log_probs:       (B, T)               log p(x_{t-1} | x_t, c) under the sampling policy (fp32); NaN where the
                                          step is deterministic (an ODE step, the last churned step)
    prompt_embeds:   (B, L, D)            text-encoder states of the prompts
    negative_embeds: (B, L, D)            text-encoder states of the negative (empty) prompt, for CFG
    pooled_embeds, negative_pooled_embeds: (B, D) pooled text embeddings (SDXL, SD3, FLUX.1), else None
    prompt_mask, negative_mask: (B, L) attention masks of the text states where the family pads them per
                     prompt (Qwen-Image, Z-Image), else None
    model_outputs:   (B, T, ...) or None  the guided model output (velocity) at each step, when the sampler keeps
                                          it (FDFO's v_ref; GRPO-Guard's sampling-policy means)
    sde_window_start: (B,) int64 or None  the first step of each chain's SDE window (Flow-GRPO-Fast: drawn per
                                          chain; MixGRPO: one for the epoch): the steps outside it are deterministic
    prepared:        what the training algorithm derived from the epoch's samples before training (its own
                     `SampleData`, e.g. FDFO's finite differences), else None
    prompts, metadata, images: per-sample Python objects (images are the decoded x_0; for a video family, each
                     sample's frames as a list of images)
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor
    prompts: list[str]
    metadata: list[dict] = field(default_factory=list)
    images: list[Image.Image] | list[list[Image.Image]] = field(default_factory=list)
    pooled_embeds: torch.Tensor | None = None
    negative_pooled_embeds: torch.Tensor | None = None
    model_outputs: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    negative_mask: torch.Tensor | None = None
    sde_window_start: torch.Tensor | None = None
    prepared: SampleData | None = None

    _TENSORS = ("latents", "timesteps", "log_probs", "prompt_embeds", "negative_embeds")
    _OPTIONAL_TENSORS = ("pooled_embeds", "negative_pooled_embeds", "model_outputs", "prompt_mask", "negative_mask", "sde_window_start")

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[1]

    def select(self, index: torch.Tensor | list[int]) -> "Trajectory":
        """The sub-batch at `index` (a list or 1-D tensor of sample positions)."""
        index = torch.as_tensor(index, dtype=torch.long)
        positions = index.tolist()

        def pick(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[index.to(tensor.device)]

        tensors = {name: pick(getattr(self, name)) for name in self._TENSORS + self._OPTIONAL_TENSORS}
        return Trajectory(
            **tensors,
            prepared=None if self.prepared is None else self.prepared.select(index),
            prompts=[self.prompts[i] for i in positions],
            metadata=[self.metadata[i] for i in positions] if self.metadata else [],
            images=[self.images[i] for i in positions] if self.images else [],
        )

    @staticmethod
    def concatenate(parts: list["Trajectory"]) -> "Trajectory":
        def cat(values: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if values[0] is None else torch.cat(values)

        tensors = {name: cat([getattr(p, name) for p in parts]) for name in Trajectory._TENSORS + Trajectory._OPTIONAL_TENSORS}
        return Trajectory(
            **tensors,
            prepared=None if parts[0].prepared is None else type(parts[0].prepared).concatenate([p.prepared for p in parts]),
            prompts=[x for p in parts for x in p.prompts],
            metadata=[x for p in parts for x in p.metadata],
            images=[x for p in parts for x in p.images],
        )


@dataclass
class StepPrediction:
    """A policy evaluated at K chosen steps of each of B chains (`Policy.predict`).

    model_output:           (B, K, ...) the guided model output (noise or velocity prediction), with grad
    mean, std:              (B, K, ...) and (B, K, 1, ..., 1): the Gaussian of the next latent under the policy's sampler
    log_prob:               (B, K) log-density of the recorded next latent (fp32, with grad)
    reference_model_output, reference_mean: the same from the reference model (adapters disabled, no grad),
                            present when asked for (KL regularisation)
    old_mean:               (B, K, ...) the sampling policy's mean at the same steps, from the model outputs
                            recorded while sampling, where the trajectory kept them (GRPO-Guard's ratio
                            normalization), else None
    """

    model_output: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor
    reference_model_output: torch.Tensor | None = None
    reference_mean: torch.Tensor | None = None
    old_mean: torch.Tensor | None = None
