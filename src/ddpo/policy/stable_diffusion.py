"""Stable Diffusion 1.x/2.x: the denoising parametrisation (DDIM/DDPM over alpha-bar), its family adapter, and
loading any supported pipeline.

Each DDIM step with eta > 0 is a Gaussian policy pi(x_{t-1} | x_t, c) = N(mu_theta(x_t, t, c), sigma_t^2 I)
(DDPO, Black et al. 2023, Sec. 4.2). The sampling loop, log-probs and KL are `ddpo.policy.diffusion`'s; this
module says how a `StableDiffusionPipeline` encodes text, calls its UNet (epsilon or v prediction, CFG with the
empty prompt) and decodes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import diffusers
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline

from ..core.ddim import ddim_alphas
from ..core.samplers import Sampler, denoising_sampler
from .base import DEFAULT_LORA_TARGETS, LoraOptions, encode_each_distinct
from .families import PIPELINE_CLASSES
from .diffusion import Conditioning, DiffusionPolicy, SamplingOptions, Schedule, classifier_free_guidance, vae_scale_factor

__all__ = ["DEFAULT_LORA_TARGETS", "LoraOptions", "PolicyLoadError", "SamplingOptions", "StableDiffusionPolicy", "load_pipeline"]



# The real networks, built on the meta device by the tests (parameter count against the published size, LoRA targets
# present) and by the README's model table.
REAL_ARCHITECTURES = {
    "SD 1.5": {
        "class": "UNet2DConditionModel",
        "published_parameters": 860e6,  # "an 860M UNet" (the SD v1 model card)
        "source": "the SD 1.x unet/config.json (CompVis/stable-diffusion-v1-4, stable-diffusion-v1-5)",
        "lora_targets": ["to_k", "to_q", "to_v", "to_out.0"],  # diffusers' train_text_to_image_lora.py
        "config": {
            "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768, "attention_head_dim": 8,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "in_channels": 4, "out_channels": 4, "sample_size": 64, "norm_num_groups": 32,
        },
    },
    "SD 2.1": {
        "class": "UNet2DConditionModel",
        "published_parameters": 865e6,  # the SD 2 model card's "865M UNet"
        "source": "stabilityai/stable-diffusion-2-1 unet/config.json",
        "lora_targets": ["to_k", "to_q", "to_v", "to_out.0"],
        "config": {
            "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "in_channels": 4, "out_channels": 4, "sample_size": 96, "norm_num_groups": 32,
        },
    },
}  # fmt: skip


class PolicyLoadError(RuntimeError):
    """The model named in `model.pretrained` could not be loaded."""


def load_pipeline(pretrained: str, revision: str | None = None) -> DiffusionPipeline:
    """Load a supported pipeline from a hub id or a local directory, with a clear error.

    Every family of `families.FAMILIES` (and the Shapes models, DDIM or flow-matching), told apart by the
    `_class_name` of the pipeline's model_index.json (the pipeline class is imported when used). Weights load in their stored precision; the policy
    casts frozen modules to its inference dtype.
    """
    local = Path(pretrained).expanduser()
    looks_local = pretrained.startswith((".", "/", "~")) or local.exists() or pretrained.count("/") != 1
    if looks_local and not local.is_dir():
        raise PolicyLoadError(f"model.pretrained={pretrained!r}: no such directory (and not a hub id of the form 'owner/name')")
    source, source_revision = (str(local), None) if looks_local else (pretrained, revision)
    try:
        class_name = DiffusionPipeline.load_config(source, revision=source_revision).get("_class_name", "StableDiffusionPipeline")
    except Exception as error:  # diffusers raises many types (OSError, ValueError, HTTP errors)
        raise PolicyLoadError(f"model.pretrained={pretrained!r} could not be loaded as a diffusers pipeline: {_first_line(error)}") from error
    if class_name not in PIPELINE_CLASSES:
        raise PolicyLoadError(f"model.pretrained={pretrained!r} is a {class_name}; supported pipelines: {', '.join(PIPELINE_CLASSES)}")
    extra = {"safety_checker": None, "requires_safety_checker": False} if class_name == "StableDiffusionPipeline" else {}
    try:
        pipe = getattr(diffusers, class_name).from_pretrained(source, revision=source_revision, **extra)
    except Exception as error:
        raise PolicyLoadError(f"model.pretrained={pretrained!r} could not be loaded as a {class_name}: {_first_line(error)}") from error
    pipe.set_progress_bar_config(disable=True)
    if class_name == "WanPipeline":  # sampled with the flow-matching Euler schedule of its flow shift (policy/wan.py)
        from .wan import use_flow_matching_scheduler

        use_flow_matching_scheduler(pipe)
    return pipe


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def ddim_scheduler_for_policy(config) -> DDIMScheduler:
    """DDIM with the pipeline's noise schedule, in the form whose every step is a Gaussian policy.

    `set_alpha_to_one` is forced off: with it, the last step has sigma = 0, is deterministic, and has no
    log-probability (SD 1.x ships it off; DDIM's default, used for configs that omit it, is on). Sample
    clipping and dynamic thresholding would make x_{t-1} a non-Gaussian function of the model output, so
    pipelines that use them are refused rather than silently sampled differently.
    """
    scheduler = DDIMScheduler.from_config(config, set_alpha_to_one=False)
    for key in ("clip_sample", "thresholding"):
        if scheduler.config.get(key):
            raise PolicyLoadError(f"the pipeline's scheduler uses {key}=True, which makes a denoising step non-Gaussian; DDPO needs it off")
    return scheduler


def native_image_size(pipeline) -> int:
    """The image size (pixels) the denoising network was trained at."""
    if getattr(pipeline, "unet", None) is not None:
        return pipeline.unet.config.sample_size * vae_scale_factor(pipeline)
    if hasattr(pipeline, "vae_scale_factor_spatial"):  # Wan: 480 px high (by 832 wide) natively
        return 480
    return pipeline.default_sample_size * vae_scale_factor(pipeline)  # SD3, FLUX


class StableDiffusionText:
    """Text encoding, latent shape and decoding of `StableDiffusionPipeline`s (SD 1.x/2.x and the UNet flow twin)."""

    pipeline: StableDiffusionPipeline
    device: torch.device

    def _set_components(self, pipeline: StableDiffusionPipeline) -> list[torch.nn.Module]:
        self.vae, self.text_encoder, self.tokenizer, self.unet = pipeline.vae, pipeline.text_encoder, pipeline.tokenizer, pipeline.unet
        return [self.vae, self.text_encoder]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(B, L, D) last hidden states of the text encoder, padded to the tokenizer's max length; each distinct
        prompt encoded on its own (`encode_each_distinct`)."""

        def encode_one(prompt: str) -> tuple[torch.Tensor]:
            ids = self.tokenizer(
                [prompt], padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids.to(self.device)
            return (self.text_encoder(ids)[0].float(),)

        return encode_each_distinct(prompts, encode_one)[0]

    def encode(self, prompts: list[str]) -> Conditioning:
        return Conditioning(embeds=self.encode_prompts(prompts))

    def unet_output(self, model, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning, guidance: bool) -> torch.Tensor:
        """The UNet's prediction at the network timesteps, with classifier-free guidance (as the pipeline)."""

        def call(latents, timesteps, embeds, pooled, mask):
            return model(latents, timesteps, embeds).sample

        return classifier_free_guidance(call, latents, timesteps, conditioning, self.sampling.guidance_scale, guidance)


class DenoisingPolicy(DiffusionPolicy):
    """The parametrisation of networks trained on a DDPM noise schedule (epsilon, v or x_0 prediction): the
    pipeline's schedule under DDIM (`ddim_scheduler_for_policy`), levels alpha-bar, DDIM (eta) or DDPM steps.
    Evaluation samples as training does."""

    def __init__(self, pipeline, sampling: SamplingOptions, lora: LoraOptions | None = None, **kwargs) -> None:
        device = torch.device(kwargs.get("device", "cpu"))
        self.scheduler = ddim_scheduler_for_policy(pipeline.scheduler.config)
        self.scheduler.set_timesteps(sampling.num_steps, device=device)
        self.prediction_type: str = self.scheduler.config.prediction_type
        self.init_noise_sigma = float(self.scheduler.init_noise_sigma)
        super().__init__(pipeline, sampling, lora, **kwargs)

    def make_schedule(self, num_steps: int) -> Schedule:
        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_steps, device=self.device)
        levels, next_levels = self.step_levels(scheduler.timesteps[None])
        return Schedule(scheduler.timesteps, levels[0], next_levels[0])

    def step_levels(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha-bar at t and at t - num_train_timesteps // T, as `DDIMScheduler.step` (T = the chain's steps)."""
        step_ratio = self.scheduler.config.num_train_timesteps // timesteps.shape[-1]
        return ddim_alphas(self.scheduler.alphas_cumprod, timesteps, step_ratio, self.scheduler.final_alpha_cumprod)

    def sampler(self, num_steps: int, *, evaluation: bool = False) -> Sampler:
        return denoising_sampler(self.sampling.scheduler, eta=self.sampling.eta, prediction_type=self.prediction_type)


class StableDiffusionPolicy(StableDiffusionText, DenoisingPolicy):
    """SD 1.x/2.x (epsilon or v prediction): CLIP text states, the UNet with CFG against the empty prompt.

    The UNet is frozen except for LoRA adapters (or fully trainable when `lora.enabled` is False); the VAE
    and the text encoder are always frozen (see `DiffusersPolicy`).
    """

    def __init__(self, pipeline: StableDiffusionPipeline, sampling: SamplingOptions, lora: LoraOptions | None = None, **kwargs) -> None:
        super().__init__(pipeline, sampling, lora, frozen=self._set_components(pipeline), **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained: str, sampling: SamplingOptions, lora: LoraOptions | None = None, *, revision: str | None = None, **kwargs) -> "StableDiffusionPolicy":
        return cls(load_pipeline(pretrained, revision), sampling, lora, **kwargs)

    network_output = StableDiffusionText.unet_output
