"""Policies: adapters that sample trajectories from a diffusers pipeline and recompute their log-probs."""

from __future__ import annotations

import torch

from .stable_diffusion import LoraOptions, PolicyLoadError, SamplingOptions, StableDiffusionPolicy, load_pipeline
from .trajectory import Trajectory

# Names that stand for pipelines shipped inside the package (the Shapes world).
SHIPPED_MODELS = ("shapes",)


def resolve_model(pretrained: str) -> str:
    """A shipped model's name -> its directory; anything else (hub id, path) unchanged."""
    if pretrained in SHIPPED_MODELS:
        from ..toyworld import shipped_pipeline_dir

        return str(shipped_pipeline_dir())
    return pretrained


def build_policy(config, device: torch.device | str = "cpu", inference_dtype: torch.dtype = torch.float32) -> StableDiffusionPolicy:
    """The policy a `Config` describes (model, LoRA and sampling sections)."""
    model, sample = config.model, config.sample
    return StableDiffusionPolicy.from_pretrained(
        resolve_model(model.pretrained),
        SamplingOptions(
            num_steps=sample.num_steps, eta=sample.eta, guidance_scale=sample.guidance_scale,
            height=sample.height, width=sample.width, scheduler=sample.scheduler,
        ),
        LoraOptions(enabled=model.use_lora, rank=model.lora_rank, alpha=model.lora_alpha, target_modules=model.lora_target_modules),
        revision=model.revision,
        train_cfg=config.train.cfg,
        gradient_checkpointing=model.gradient_checkpointing,
        device=device,
        inference_dtype=inference_dtype,
    )  # fmt: skip


__all__ = [
    "LoraOptions", "PolicyLoadError", "SamplingOptions", "StableDiffusionPolicy", "Trajectory",
    "build_policy", "load_pipeline", "resolve_model",
]  # fmt: skip
