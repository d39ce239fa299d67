"""Policies: adapters that sample trajectories from a diffusers pipeline and recompute their log-probs.

`build_policy` picks the family adapter from the pipeline it loads (`families.FAMILIES`: SD 1.x/2.x, SDXL, SD3,
FLUX, ...; a `StableDiffusionPipeline` whose scheduler is `FlowMatchEulerDiscreteScheduler`, the Shapes flow twin,
-> `UNetFlowPolicy`). Every adapter samples with the one loop of `diffusion.py`: denoising families with DDIM/DDPM
steps, flow families with the sampler the algorithm asks for (Flow-GRPO's SDE, FDFO's churned Euler steps),
evaluating with the ODE.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from .base import DiffusersPolicy, LoraOptions, TrainablePolicy
from ..core.trajectory import StepPrediction, Trajectory
from .diffusion import DiffusionPolicy, FlowSamplingOptions, SamplingOptions
from .families import family_of
from .flow import FlowMatchingPolicy, UNetFlowPolicy
from .stable_diffusion import PolicyLoadError, StableDiffusionPolicy, load_pipeline

# Names that stand for pipelines shipped inside the package (the Shapes world): the DDIM model and its
# flow-matching twin (velocity UNet, same VAE and text encoder).
SHIPPED_MODELS = {"shapes": "shapes-sd", "shapes-flow": "shapes-flow"}


def resolve_model(pretrained: str) -> str:
    """A shipped model's name -> its directory; anything else (hub id, path) unchanged."""
    if pretrained not in SHIPPED_MODELS:
        return pretrained
    from ..shapes import WEIGHTS_DIR, shipped_pipeline_dir

    if pretrained == "shapes":
        return str(shipped_pipeline_dir())
    path = Path(WEIGHTS_DIR) / SHIPPED_MODELS[pretrained]
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"model.pretrained={pretrained!r}: the shipped Shapes flow twin is missing from {path}; run `ddpo toy pretrain` (its stage 5 writes pipeline-flow)")
    return str(path)


def is_flow_pipeline(pipeline) -> bool:
    """Whether the pipeline samples by flow matching (velocity prediction, `FlowMatchEulerDiscreteScheduler`)."""
    return isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler)


def policy_class(pipeline) -> type[DiffusionPolicy]:
    """The family adapter of a loaded pipeline, by its class (`families.FAMILIES`); a `StableDiffusionPipeline` with a
    flow-matching scheduler is the Shapes flow twin."""
    if type(pipeline).__name__ == "StableDiffusionPipeline" and is_flow_pipeline(pipeline):
        return UNetFlowPolicy
    return family_of(type(pipeline).__name__).adapter()


def policy_for_pipeline(
    pipeline, config, *, sampler: str = "sde", device: torch.device | str = "cpu", inference_dtype: torch.dtype = torch.float32, lora: LoraOptions | None = None
) -> DiffusersPolicy:
    """The policy over a loaded `pipeline` with the model, sampling and train sections of `config`.

    `sampler` is the flow policies' training sampler ("sde", "churn", or "ode" for the algorithms that train on the
    forward process; only "sde" takes `sample.sde_window`); the DDIM policy has only its own (a "churn" or "ode"
    request or `sample.sde_window` for a DDIM model is refused).
    """
    model = config.model
    if lora is None:
        lora = LoraOptions(enabled=model.use_lora, rank=model.lora_rank, alpha=model.lora_alpha, target_modules=model.lora_target_modules)
    common = dict(train_cfg=config.train.cfg, gradient_checkpointing=model.gradient_checkpointing, device=device, inference_dtype=inference_dtype)
    policy = _policy_for_pipeline(pipeline, config, sampler, lora, common)
    if model.channels_last:
        policy.model.to(memory_format=torch.channels_last)  # 4-d (convolution) weights only; the rest is unchanged
    return policy


def _policy_for_pipeline(pipeline, config, sampler: str, lora: LoraOptions, common: dict) -> DiffusersPolicy:
    """`policy_for_pipeline` up to the memory format: the policy class for the pipeline, with its sampling options."""
    model, sample = config.model, config.sample
    if not is_flow_pipeline(pipeline):
        if sampler in ("churn", "ode"):  # FDFO's churned steps; the forward-process algorithms' flow-matching velocity
            raise PolicyLoadError(
                f"train.algorithm={config.train.algorithm!r} needs a flow-matching model (FlowMatchEulerDiscreteScheduler); "
                f"model.pretrained={model.pretrained!r} uses {type(pipeline.scheduler).__name__}"
            )
        if sample.sde_window:
            raise PolicyLoadError(
                f"sample.sde_window={sample.sde_window} mixes a flow model's SDE and ODE steps; model.pretrained={model.pretrained!r} "
                f"uses {type(pipeline.scheduler).__name__} (not a flow-matching model): set sample.sde_window=0"
            )
    # One set of options; each parametrisation reads its own fields (the denoising one eta and scheduler).
    sampling = SamplingOptions(
        num_steps=sample.num_steps, eta=sample.eta, guidance_scale=sample.guidance_scale, height=sample.height, width=sample.width,
        scheduler=sample.scheduler, sampler=sampler, noise_level=sample.noise_level, churn=sample.churn,
        eval_num_steps=sample.eval_num_steps, sde_window=sample.sde_window if sampler == "sde" else 0, num_frames=sample.num_frames,
    )  # fmt: skip
    return policy_class(pipeline)(pipeline, sampling, lora, **common)


def sampling_policy(pipeline, sampling: SamplingOptions, *, flow_num_steps: int | None = None) -> DiffusersPolicy:
    """A sampling-only policy (no LoRA of its own) over a loaded pipeline: the DDIM policy with `sampling`, or a
    flow policy sampling the deterministic ODE with the same guidance and size and `flow_num_steps` steps
    (default: `sampling.num_steps`)."""
    if is_flow_pipeline(pipeline):
        sampling = dataclasses.replace(sampling, num_steps=flow_num_steps or sampling.num_steps, sampler="ode", sde_window=0)
    return policy_class(pipeline)(pipeline, sampling, LoraOptions(enabled=False))


def build_policy(config, device: torch.device | str = "cpu", inference_dtype: torch.dtype = torch.float32, *, sampler: str = "sde") -> DiffusersPolicy:
    """The policy a `Config` describes (model, LoRA and sampling sections), over the pipeline it names."""
    pipeline = load_pipeline(resolve_model(config.model.pretrained), config.model.revision)
    return policy_for_pipeline(pipeline, config, sampler=sampler, device=device, inference_dtype=inference_dtype)


__all__ = [
    "DiffusersPolicy", "FlowMatchingPolicy", "FlowSamplingOptions", "LoraOptions", "PolicyLoadError", "SamplingOptions", "TrainablePolicy",
    "StableDiffusionPolicy", "StepPrediction", "Trajectory", "UNetFlowPolicy", "build_policy", "is_flow_pipeline",
    "load_pipeline", "policy_for_pipeline", "resolve_model", "sampling_policy",
]  # fmt: skip
