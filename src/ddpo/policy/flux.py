"""The flow-matching policy over `FluxPipeline` (FLUX.1): a transformer over 2x2-packed latent tokens,
conditioned on T5 states and CLIP's pooled embedding, timestep input sigma, and a resolution-dependent shift
of the schedule. Guidance-distilled models (FLUX.1-dev, `guidance_embeds`) take the guidance scale as an input
and need one pass per step; others get classifier-free guidance with the empty prompt."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from PIL import Image

from .base import LoraOptions
from .diffusion import Conditioning, SamplingOptions, classifier_free_guidance, encode_each, vae_decode
from .flow import FlowMatchingPolicy
from .diffusion import vae_scale_factor

MAX_SEQUENCE_LENGTH = 512  # the pipeline's default


# The real network, built on the meta device by the tests (parameter count against the published size, LoRA targets
# present) and by the README's model table.
REAL_ARCHITECTURES = {
    "FLUX.1 [dev]": {
        "class": "FluxTransformer2DModel",
        "published_parameters": 12e9,  # "a 12 billion parameter rectified flow transformer" (its model card)
        "source": "black-forest-labs/FLUX.1-dev transformer/config.json (schnell: the same without guidance_embeds)",
        "lora_targets": ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0"],  # diffusers' train_dreambooth_lora_flux.py
        "config": {
            "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
            "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
            "axes_dims_rope": [16, 56, 56],
        },
    },
}  # fmt: skip


class FluxPolicy(FlowMatchingPolicy):
    """Flow-GRPO / FDFO sampling and log-probs over a FLUX pipeline; LoRA on the transformer.

    Latents are kept packed, (B, tokens, 4 * channels), as the transformer sees them.
    """

    network_name = "transformer"
    convert_lora_to_diffusers = False  # diffusers' FLUX LoRA scripts save peft names as they are

    def __init__(
        self,
        pipeline: FluxPipeline,
        sampling: SamplingOptions,
        lora: LoraOptions | None = None,
        *,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        **kwargs,
    ) -> None:
        self.max_sequence_length = max_sequence_length
        self.vae = pipeline.vae
        super().__init__(pipeline, sampling, lora, frozen=[self.vae, pipeline.text_encoder, pipeline.text_encoder_2], **kwargs)
        self.guidance_embedded = bool(self.model.config.guidance_embeds)
        height, width = self._latent_size()
        self.image_ids = FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, self.device, torch.float32)

    def _latent_size(self) -> tuple[int, int]:
        """Unpacked latent height and width (even, for the 2x2 packing), as `FluxPipeline.prepare_latents`."""
        factor = vae_scale_factor(self.pipeline)
        return 2 * (self.sampling.height // (factor * 2)), 2 * (self.sampling.width // (factor * 2))

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        def encode_one(prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
            embeds, pooled, _ = self.pipeline.encode_prompt([prompt], None, device=self.device, max_sequence_length=self.max_sequence_length)
            return embeds, pooled

        return encode_each(prompts, encode_one)

    def schedule_kwargs(self, num_steps: int) -> dict:
        """FluxPipeline's schedule: sigmas evenly from 1 to 1 / T, shifted by mu for the image's token count."""
        config = self.pipeline.scheduler.config
        kwargs = {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps)}
        if config.get("use_dynamic_shifting", False):
            tokens = self.latent_shape()[0]
            kwargs["mu"] = calculate_shift(
                tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5), config.get("max_shift", 1.15),
            )  # fmt: skip
        return kwargs

    def network_output(self, model, latents, sigmas, conditioning, guidance):
        """One pass with the guidance embedding (FLUX.1-dev), or CFG with the empty prompt (undistilled models)."""

        def call(latents, sigmas, embeds, pooled, mask):
            batch = latents.shape[0]
            guidance_input = torch.full((batch,), self.sampling.guidance_scale, device=latents.device, dtype=torch.float32) if self.guidance_embedded else None
            text_ids = torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=latents.dtype)
            return model(
                hidden_states=latents, timestep=sigmas.to(latents.dtype), guidance=guidance_input, pooled_projections=pooled,
                encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=self.image_ids.to(latents.device, latents.dtype),
            ).sample  # fmt: skip

        return classifier_free_guidance(call, latents, sigmas, conditioning, self.sampling.guidance_scale, guidance and not self.guidance_embedded)

    def latent_shape(self) -> tuple[int, int]:
        height, width = self._latent_size()
        return ((height // 2) * (width // 2), self.model.config.in_channels)

    def decode(self, latents: torch.Tensor, output_type: str = "pil") -> list[Image.Image]:
        return vae_decode(self.pipeline, FluxPipeline._unpack_latents(latents, self.sampling.height, self.sampling.width, vae_scale_factor(self.pipeline)), output_type)
