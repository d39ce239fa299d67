"""The flow-matching policy over `StableDiffusion3Pipeline` (SD3, SD3.5): an MMDiT transformer conditioned on
CLIP-L + CLIP-G + T5 states and the two CLIPs' pooled embeddings, timestep input 1000 * sigma."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .base import LoraOptions
from .diffusion import Conditioning, SamplingOptions, classifier_free_guidance, encode_each
from .flow import FlowMatchingPolicy

if TYPE_CHECKING:
    from diffusers import StableDiffusion3Pipeline

# T5 tokens per prompt: what Flow-GRPO and FDFO use for SD3.5 (the pipeline's default is 256).
MAX_SEQUENCE_LENGTH = 128


# The real networks, built on the meta device by the tests (parameter count against the published size, LoRA targets
# present) and by the README's model table. LoRA targets: diffusers' train_dreambooth_lora_sd3.py and Flow-GRPO.
SD3_LORA_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]
REAL_ARCHITECTURES = {
    "SD3.5 Medium": {
        "class": "SD3Transformer2DModel",
        "published_parameters": 2.5e9,  # "2.5 billion parameters" (its model card)
        "source": "stabilityai/stable-diffusion-3.5-medium transformer/config.json",
        "lora_targets": SD3_LORA_TARGETS,
        "config": {
            "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24,
            "joint_attention_dim": 4096, "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "out_channels": 16,
            "pos_embed_max_size": 384, "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm",
        },
    },
    "SD3.5 Large": {
        "class": "SD3Transformer2DModel",
        "published_parameters": 8.1e9,  # "8.1 billion parameters" (its model card)
        "source": "stabilityai/stable-diffusion-3.5-large transformer/config.json",
        "lora_targets": SD3_LORA_TARGETS,
        "config": {
            "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 38, "attention_head_dim": 64, "num_attention_heads": 38,
            "joint_attention_dim": 4096, "caption_projection_dim": 2432, "pooled_projection_dim": 2048, "out_channels": 16,
            "pos_embed_max_size": 192, "qk_norm": "rms_norm",
        },
    },
}  # fmt: skip


class StableDiffusion3Policy(FlowMatchingPolicy):
    """Flow-GRPO / FDFO sampling and log-probs over an SD3 pipeline; LoRA on the transformer."""

    network_name = "transformer"
    convert_lora_to_diffusers = False  # diffusers' SD3 LoRA scripts save peft names as they are

    def __init__(
        self,
        pipeline: "StableDiffusion3Pipeline",
        sampling: SamplingOptions,
        lora: LoraOptions | None = None,
        *,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        **kwargs,
    ) -> None:
        self.max_sequence_length = max_sequence_length
        self.vae = pipeline.vae
        encoders = [pipeline.text_encoder, pipeline.text_encoder_2, pipeline.text_encoder_3]
        super().__init__(pipeline, sampling, lora, frozen=[self.vae, *[e for e in encoders if e is not None]], **kwargs)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        def encode_one(prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
            embeds, _, pooled, _ = self.pipeline.encode_prompt(
                [prompt], None, None, device=self.device, do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length
            )
            return embeds, pooled

        return encode_each(prompts, encode_one)

    def network_output(self, model, latents, sigmas, conditioning, guidance):
        def call(latents, timesteps, embeds, pooled, mask):
            return model(hidden_states=latents, timestep=timesteps, encoder_hidden_states=embeds, pooled_projections=pooled).sample

        timesteps = sigmas * self.pipeline.scheduler.config.num_train_timesteps
        return classifier_free_guidance(call, latents, timesteps, conditioning, self.sampling.guidance_scale, guidance)
