"""SDXL (`StableDiffusionXLPipeline`): a UNet conditioned on two CLIP text encoders' penultimate states (CLIP-L and
OpenCLIP-G, concatenated), the second one's pooled projection, and the added time ids (original size, crop
corner, target size). Classifier-free guidance contrasts with zeros where the pipeline's
`force_zeros_for_empty_prompt` says so (SDXL base's default), else with the empty prompt. DDIM/DDPM steps over
its noise schedule, as SD 1.x."""

from __future__ import annotations

import torch

from .base import LoraOptions
from .diffusion import Conditioning, SamplingOptions, classifier_free_guidance, encode_each
from .stable_diffusion import DenoisingPolicy

# The real network, built on the meta device by the tests (parameter count against the published size, LoRA targets
# present) and by the README's model table.
REAL_ARCHITECTURES = {
  "SDXL base 1.0": {
    "class": "UNet2DConditionModel",
    "published_parameters": 2.6e9,  # "2.6B UNet" (Podell et al. 2023, Tab. 1)
    "source": "stabilityai/stable-diffusion-xl-base-1.0 unet/config.json",
    "lora_targets": ["to_k", "to_q", "to_v", "to_out.0"],  # diffusers' train_dreambooth_lora_sdxl.py
    "config": {
        "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
        "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
    },
  },
}  # fmt: skip


class StableDiffusionXLPolicy(DenoisingPolicy):
    """DDPO over an SDXL pipeline; LoRA on the UNet's attention projections (diffusers' SDXL LoRA scripts)."""

    def __init__(self, pipeline, sampling: SamplingOptions, lora: LoraOptions | None = None, **kwargs) -> None:
        self.vae, self.unet = pipeline.vae, pipeline.unet
        encoders = [e for e in (pipeline.text_encoder, pipeline.text_encoder_2) if e is not None]
        super().__init__(pipeline, sampling, lora, frozen=[self.vae, *encoders], **kwargs)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        def encode_one(prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
            embeds, _, pooled, _ = self.pipeline.encode_prompt(prompt=[prompt], device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
            return embeds, pooled

        return encode_each(prompts, encode_one)

    def encode_negative(self) -> Conditioning:
        """Zeros when the pipeline zeroes an absent negative prompt (`force_zeros_for_empty_prompt`), else ""."""
        empty = self.encode([self.negative_prompt])
        if self.pipeline.config.get("force_zeros_for_empty_prompt", True):
            return Conditioning(embeds=torch.zeros_like(empty.embeds), pooled=torch.zeros_like(empty.pooled))
        return empty

    def time_ids(self, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(B, 6) added time ids: original size, crop top-left (0, 0), target size, all the sampled size."""
        size = (self.sampling.height, self.sampling.width)
        return torch.tensor([size + (0, 0) + size], device=device, dtype=dtype).repeat(batch, 1)

    def network_output(self, model, latents, timesteps, conditioning, guidance):
        def call(latents, timesteps, embeds, pooled, mask):
            added = {"text_embeds": pooled, "time_ids": self.time_ids(latents.shape[0], latents.device, embeds.dtype)}
            return model(latents, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added).sample

        return classifier_free_guidance(call, latents, timesteps, conditioning, self.sampling.guidance_scale, guidance)
