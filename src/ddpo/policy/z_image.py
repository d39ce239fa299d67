"""The flow-matching policy over `ZImagePipeline` (Z-Image): a 6B single-stream DiT that takes a list of latents
(B x (C, 1, H, W), patchified 2x2 inside) and a list of variable-length caption states (Qwen3's second-to-last
hidden states of the prompt in its chat template, padding dropped), timestep input 1 - sigma, and predicts the
negated velocity. Its CFG is pos + s (pos - neg) (s = `guidance_scale`, on when s > 0), optionally clamped to
`cfg_normalization` times the conditional prediction's norm and switched off where 1 - sigma > `cfg_truncation`.
"""

from __future__ import annotations

import torch
from diffusers import ZImagePipeline
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

from .base import LoraOptions, encode_each_distinct, pad_states
from .diffusion import Conditioning, SamplingOptions
from .flow import FlowMatchingPolicy

HUB_ID = "Tongyi-MAI/Z-Image"
# Tokens per prompt, chat template included: the pipeline's default. Each prompt's states are stored padded to this
# length with a mask, so trajectories of any batch concatenate; the network gets each prompt's states unpadded.
MAX_SEQUENCE_LENGTH = 512
# diffusers' Z-Image LoRA script (examples/dreambooth/train_dreambooth_lora_z_image.py, default --lora_layers).
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
# The released transformer (Tongyi-MAI/Z-Image transformer/config.json; also diffusers' defaults) and its size
# (model card: "6B"; the bf16 checkpoint is 12.3 GB).
REAL_ARCHITECTURES = {
    "Z-Image": {
        "class": "ZImageTransformer2DModel",
        "config": {
            "all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 3840, "n_layers": 30, "n_refiner_layers": 2,
            "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True, "cap_feat_dim": 2560, "rope_theta": 256.0,
            "t_scale": 1000.0, "axes_dims": [32, 48, 48], "axes_lens": [1024, 512, 512],
        },
        "published_parameters": 6e9,
        "source": "Tongyi-MAI/Z-Image transformer/config.json; model card: 6B",
        "lora_targets": list(LORA_TARGETS),
    },
}  # fmt: skip


class ZImagePolicy(FlowMatchingPolicy):
    """Flow-GRPO / FDFO sampling and log-probs over a Z-Image pipeline; LoRA on the transformer.

    Latents are (B, C, H, W), as the pipeline keeps them; `network_output` returns the velocity (the network's
    output negated), so the flow kernels apply unchanged.
    """

    network_name = "transformer"
    convert_lora_to_diffusers = False  # diffusers' Z-Image LoRA script saves peft names as they are
    negative_prompt = ""  # the pipeline's default negative prompt

    def __init__(
        self,
        pipeline: ZImagePipeline,
        sampling: SamplingOptions,
        lora: LoraOptions | None = None,
        *,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        cfg_normalization: float = 0.0,
        cfg_truncation: float = 1.0,
        **kwargs,
    ) -> None:
        self.max_sequence_length = max_sequence_length
        self.cfg_normalization = float(cfg_normalization)  # the pipeline's defaults: off (False) and 1.0 (never truncated)
        self.cfg_truncation = float(cfg_truncation)
        self.vae = pipeline.vae
        super().__init__(pipeline, sampling, lora, frozen=[self.vae, pipeline.text_encoder], **kwargs)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """(B, max_sequence_length, D) states, zero after each prompt's tokens, and the (B, max_sequence_length) mask."""

        def encode_one(prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
            (states,) = self.pipeline._encode_prompt([prompt], device=self.device, max_sequence_length=self.max_sequence_length)
            return pad_states(states[None], self.max_sequence_length)  # the pipeline's (L, D) states, padding dropped

        embeds, mask = encode_each_distinct(prompts, encode_one)  # batch-independent floats
        return Conditioning(embeds=embeds.float(), mask=mask)

    def schedule_kwargs(self, num_steps: int) -> dict:
        """ZImagePipeline's schedule: its float32 sigmas evenly from 1 to 1 / T, and mu for the image's token count
        (used only by a scheduler with dynamic shifting; the released one has a fixed shift of 6)."""
        config = self.pipeline.scheduler.config
        channels, height, width = self.latent_shape()
        mu = calculate_shift(
            (height // 2) * (width // 2), config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5), config.get("max_shift", 1.15),
        )  # fmt: skip
        return {"sigmas": get_default_z_image_sigmas(num_steps), "mu": mu}

    def network_output(self, model, latents, sigmas, conditioning, guidance):
        """The velocity: the network's output negated, guided as ZImagePipeline guides (per sample, in fp32)."""
        # The pipeline's timestep input (1000 - t) / 1000 with t its scheduler timestep 1000 sigma.
        timesteps = (1000 - sigmas.float() * self.pipeline.scheduler.config.num_train_timesteps) / 1000
        batch, c = latents.shape[0], conditioning

        def unpadded(embeds: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
            return [states[row.bool()] for states, row in zip(embeds, mask)]

        def call(latents, timesteps, captions) -> torch.Tensor:
            outputs = model(list(latents.unsqueeze(2).unbind(dim=0)), timesteps, captions, return_dict=False)[0]
            return torch.stack([output.float() for output in outputs]).squeeze(2)

        # CFG truncation (when cfg_truncation <= 1): no guidance where the normalised time 1 - sigma exceeds it.
        truncated = timesteps > self.cfg_truncation if self.cfg_truncation <= 1 else torch.zeros_like(timesteps, dtype=torch.bool)
        scales = torch.where(truncated, 0.0, self.sampling.guidance_scale)
        if not (guidance and bool((scales > 0).any())):
            return -call(latents, timesteps, unpadded(c.embeds, c.mask))
        # Both halves in one call, positive first (the pipeline's order).
        both = call(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), unpadded(c.embeds, c.mask) + unpadded(c.negative, c.negative_mask))
        positive, negative = both[:batch], both[batch:]
        guided = positive + scales.view(-1, *[1] * (positive.ndim - 1)) * (positive - negative)
        if self.cfg_normalization > 0:  # renormalisation of guided samples: norm at most cfg_normalization times pos's
            limit = torch.linalg.vector_norm(positive.flatten(1), dim=1) * self.cfg_normalization
            norm = torch.linalg.vector_norm(guided.flatten(1), dim=1)
            guided = guided * torch.where((norm > limit) & (scales > 0), limit / norm, 1.0).view(-1, 1, 1, 1)  # (x 1.0 is exact)
        return -guided

    def latent_shape(self) -> tuple[int, int, int]:
        factor = self.pipeline.vae_scale_factor
        return (self.model.config.in_channels, 2 * (self.sampling.height // (factor * 2)), 2 * (self.sampling.width // (factor * 2)))
