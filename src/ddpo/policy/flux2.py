"""The flow-matching policy over `Flux2Pipeline` (FLUX.2 dev) and `Flux2KleinPipeline` (FLUX.2 klein).

Both share one transformer (`Flux2Transformer2DModel`): tokens of 2x2-patchified VAE latents with 4-axis position
ids (time, row, column, sequence), text states stacked from three hidden layers of a chat-formatted LLM (dev:
Mistral3 layers 10, 20, 30; klein: Qwen3 layers 9, 18, 27), timestep input sigma, and an empirical,
step-count-dependent exponential shift of the schedule (`compute_empirical_mu`). They differ in guidance: dev is
guidance-distilled (the scale enters as an embedding, one pass per step); klein base models get classifier-free
guidance with the empty prompt, and step-distilled klein models (`is_distilled`) no guidance at all.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from PIL import Image

from .base import LoraOptions, encode_each_distinct
from .diffusion import Conditioning, SamplingOptions, classifier_free_guidance
from .flow import FlowMatchingPolicy
from .diffusion import vae_scale_factor

MAX_SEQUENCE_LENGTH = 512  # the pipelines' default

# diffusers' train_dreambooth_lora_flux2_klein.py default: the double blocks' attention (to_out.0 is their output
# projection; to_out alone would name the ModuleList) and the single blocks' fused QKV+MLP input and their output
# projections, named per block (`single_lora_targets`).
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj")


def single_lora_targets(num_single_layers: int) -> list[str]:
    """The single blocks' output projections, which only their full names tell from the double blocks' `to_out`."""
    return [f"single_transformer_blocks.{i}.attn.to_out" for i in range(num_single_layers)]


# black-forest-labs/FLUX.2-klein-4B transformer/config.json (as quoted by mflux, DiffSynth-Studio and OpenFlowLM's
# configs found with the code search; diffusers' defaults for the rest)
KLEIN_4B = {
    "patch_size": 1, "in_channels": 128, "num_layers": 5, "num_single_layers": 20, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 7680, "timestep_guidance_channels": 256, "mlp_ratio": 3.0,
    "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000, "guidance_embeds": False,
}  # fmt: skip
REAL_ARCHITECTURES = {
    "FLUX.2 [klein] 4B": {
        "class": "Flux2Transformer2DModel",
        "config": KLEIN_4B,
        "published_parameters": 4e9,  # "FLUX.2 [klein] 4B" (model card); the built network has 3.88 B: the name is rounded
        "tolerance": 0.05,
        "source": "https://huggingface.co/black-forest-labs/FLUX.2-klein-4B/blob/main/transformer/config.json",
        "lora_targets": [*LORA_TARGETS, *single_lora_targets(KLEIN_4B["num_single_layers"])],
    },
    "FLUX.2 [dev]": {
        "class": "Flux2Transformer2DModel",
        # black-forest-labs/FLUX.2-dev transformer/config.json: diffusers' Flux2Transformer2DModel defaults (8 double,
        # 48 single blocks, 48 heads of 128, Mistral3 states 3 x 5120 = 15360 wide, guidance embedding)
        "config": {**KLEIN_4B, "num_layers": 8, "num_single_layers": 48, "num_attention_heads": 48, "joint_attention_dim": 15360, "guidance_embeds": True},
        "published_parameters": 32e9,  # "FLUX.2 [dev] is a 32 billion parameter rectified flow transformer" (model card)
        "source": "https://huggingface.co/black-forest-labs/FLUX.2-dev/blob/main/transformer/config.json",
        "lora_targets": [*LORA_TARGETS, *single_lora_targets(48)],
    },
}


class Flux2Policy(FlowMatchingPolicy):
    """Flow-GRPO / FDFO sampling and log-probs over a FLUX.2 pipeline (dev or klein); LoRA on the transformer.

    Latents are kept packed, (B, tokens, 4 * VAE channels), as the transformer sees them, normalised by the VAE's
    batch-norm statistics (which `decode` undoes).
    """

    network_name = "transformer"
    convert_lora_to_diffusers = False  # diffusers' FLUX.2 LoRA scripts save peft names as they are

    def __init__(self, pipeline, sampling: SamplingOptions, lora: LoraOptions | None = None, *, max_sequence_length: int = MAX_SEQUENCE_LENGTH, **kwargs) -> None:
        self.max_sequence_length = max_sequence_length
        self.vae = pipeline.vae
        super().__init__(pipeline, sampling, lora, frozen=[self.vae, pipeline.text_encoder], **kwargs)
        self.guidance_embedded = bool(self.model.config.guidance_embeds)  # dev
        self.distilled = bool(pipeline.config.get("is_distilled", False))  # step-distilled klein: no guidance
        height, width = self._token_grid()
        # Position ids (time, row, column, sequence) of the image tokens, row-major, as `_prepare_latent_ids`.
        self.image_ids = torch.cartesian_prod(torch.arange(1), torch.arange(height), torch.arange(width), torch.arange(1)).to(self.device)

    def _token_grid(self) -> tuple[int, int]:
        """Rows and columns of image tokens: latent size / 2 (the 2x2 patches of `prepare_latents`)."""
        factor = vae_scale_factor(self.pipeline)
        return self.sampling.height // (factor * 2), self.sampling.width // (factor * 2)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        def encode_one(prompt: str) -> tuple[torch.Tensor]:
            embeds, _ = self.pipeline.encode_prompt([prompt], device=self.device, max_sequence_length=self.max_sequence_length)
            return (embeds,)

        (embeds,) = encode_each_distinct(prompts, encode_one)  # batch-independent floats
        return Conditioning(embeds=embeds.float())

    def schedule_kwargs(self, num_steps: int) -> dict:
        """The pipelines' schedule: sigmas evenly from 1 to 1 / T, shifted by the empirical mu of the token count and T."""
        tokens = self.latent_shape()[0]
        kwargs = {"mu": compute_empirical_mu(image_seq_len=tokens, num_steps=num_steps)}
        if not self.pipeline.scheduler.config.get("use_flow_sigmas", False):
            kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
        else:
            kwargs["num_inference_steps"] = num_steps
        return kwargs

    def network_output(self, model, latents, sigmas, conditioning, guidance):
        """One pass with the guidance embedding (dev), CFG with the empty prompt (klein base), or one plain pass
        (distilled klein)."""

        def call(latents, sigmas, embeds, pooled, mask):
            batch = latents.shape[0]
            guidance_input = torch.full((batch,), self.sampling.guidance_scale, device=latents.device, dtype=torch.float32) if self.guidance_embedded else None
            text_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(embeds.shape[1])).to(latents.device)
            return model(
                hidden_states=latents, timestep=sigmas.to(latents.dtype), guidance=guidance_input, encoder_hidden_states=embeds,
                txt_ids=text_ids, img_ids=self.image_ids.to(latents.device),
            ).sample  # fmt: skip

        cfg = guidance and not self.guidance_embedded and not self.distilled and self.sampling.guidance_scale > 1
        return classifier_free_guidance(call, latents, sigmas, conditioning, self.sampling.guidance_scale, cfg)

    def latent_shape(self) -> tuple[int, int]:
        height, width = self._token_grid()
        return (height * width, self.model.config.in_channels)

    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed, normalised tokens (B, tokens, 4C) -> the VAE's latents (B, C, H, W), as the pipelines before decoding."""
        height, width = self._token_grid()
        grid = latents.permute(0, 2, 1).reshape(latents.shape[0], -1, height, width)  # `_unpack_latents_with_ids`
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(grid.device, grid.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(grid.device, grid.dtype)
        return self.pipeline._unpatchify_latents(grid * std + mean)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_type: str = "pil") -> list[Image.Image]:
        images = self.vae.decode(self.vae_latents(latents.float()).to(self.vae.dtype)).sample
        return self.pipeline.image_processor.postprocess(images.float(), output_type=output_type)
