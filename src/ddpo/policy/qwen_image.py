"""The flow-matching policy over `QwenImagePipeline` (Qwen-Image): a 20B MMDiT over 2x2-packed latent tokens,
conditioned on the last hidden states of Qwen2.5-VL (the prompt in Qwen-Image's system template, the template's
first 34 tokens dropped) with a padding mask, timestep input sigma, a dynamic exponential shift of the schedule
for the image's token count, and true CFG whose combined prediction is rescaled to the norm of the conditional one.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from PIL import Image

from .base import LoraOptions, encode_each_distinct, pad_states
from .diffusion import Conditioning, SamplingOptions, wan_vae_latents
from .flow import FlowMatchingPolicy

HUB_ID = "Qwen/Qwen-Image"
# Text tokens per prompt after the template: the pipeline's default (its limit is 1024). Each prompt's states are
# stored padded to this length with a mask, so trajectories of any batch concatenate; the network sees them cut
# to the longest prompt of its batch, as the pipeline pads them.
MAX_SEQUENCE_LENGTH = 512
# Flow-GRPO's LoRA on Qwen-Image (verl-project/verl examples/flowgrpo_trainer, Qwen-Image recipe): the joint
# attention's image and text projections and both streams' MLPs.
LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
)  # fmt: skip
# The released transformer (Qwen/Qwen-Image, transformer/config.json; these are also diffusers' defaults) and the
# model card's size ("a 20B MMDiT image foundation model").
REAL_ARCHITECTURES = {
    "Qwen-Image": {
        "class": "QwenImageTransformer2DModel",
        "config": {
            "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
            "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False, "axes_dims_rope": [16, 56, 56],
        },
        "published_parameters": 20e9,
        "source": "Qwen/Qwen-Image transformer/config.json; model card: 20B MMDiT",
        "lora_targets": list(LORA_TARGETS),
    },
}  # fmt: skip


class QwenImagePolicy(FlowMatchingPolicy):
    """Flow-GRPO / FDFO sampling and log-probs over a Qwen-Image pipeline; LoRA on the transformer.

    Latents are kept packed, (B, tokens, 4 * channels), as the transformer sees them.
    """

    network_name = "transformer"
    convert_lora_to_diffusers = False  # diffusers' Qwen-Image LoRA script saves peft names as they are
    negative_prompt = " "  # the model card's: "using an empty string if you do not have specific concept to remove"

    def __init__(
        self, pipeline: QwenImagePipeline, sampling: SamplingOptions, lora: LoraOptions | None = None, *, max_sequence_length: int = MAX_SEQUENCE_LENGTH, **kwargs
    ) -> None:
        self.max_sequence_length = max_sequence_length
        self.vae = pipeline.vae
        super().__init__(pipeline, sampling, lora, frozen=[self.vae, pipeline.text_encoder], **kwargs)
        height, width = self._latent_size()
        self.image_shape = (1, height // 2, width // 2)  # the pipeline's img_shapes entry: frames, token rows, token columns

    def _latent_size(self) -> tuple[int, int]:
        """Unpacked latent height and width (even, for the 2x2 packing), as `QwenImagePipeline.prepare_latents` (the
        packing and `latent_shape` are FLUX's, `FluxPolicy`'s twins)."""
        factor = self.pipeline.vae_scale_factor
        return 2 * (self.sampling.height // (factor * 2)), 2 * (self.sampling.width // (factor * 2))

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """(B, max_sequence_length, D) states, zero after each prompt's tokens, and the (B, max_sequence_length) mask."""

        def encode_one(prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
            embeds, _ = self.pipeline.encode_prompt([prompt], device=self.device, max_sequence_length=self.max_sequence_length)
            return pad_states(embeds, self.max_sequence_length)  # alone, a prompt has no padding (the pipeline's mask is None)

        embeds, mask = encode_each_distinct(prompts, encode_one)  # batch-independent floats
        return Conditioning(embeds=embeds.float(), mask=mask)

    def schedule_kwargs(self, num_steps: int) -> dict:
        """QwenImagePipeline's schedule: sigmas evenly from 1 to 1 / T, shifted by mu for the image's token count."""
        config = self.pipeline.scheduler.config
        mu = calculate_shift(
            self.latent_shape()[0], config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5), config.get("max_shift", 1.15),
        )  # fmt: skip
        return {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps), "mu": mu}

    def network_output(self, model, latents, sigmas, conditioning, guidance):
        """The conditional velocity, or (with `guidance` and scale > 1) true CFG rescaled per token to the
        conditional prediction's norm, as the pipeline's `true_cfg_scale`; both halves in one batch."""
        # The pipeline's timestep input: its scheduler timestep (1000 sigma), in the latents' dtype, over 1000.
        timesteps = (sigmas * self.pipeline.scheduler.config.num_train_timesteps).to(latents.dtype) / 1000

        def call(latents, timesteps, embeds, mask):
            length = int(mask.sum(dim=1).max())  # the batch's longest prompt, as the pipeline pads
            embeds, mask = embeds[:, :length], mask[:, :length]
            return model(
                hidden_states=latents, timestep=timesteps, encoder_hidden_states=embeds, encoder_hidden_states_mask=None if mask.all() else mask,
                img_shapes=[[self.image_shape]] * latents.shape[0], return_dict=False,
            )[0]  # fmt: skip

        scale, c = self.sampling.guidance_scale, conditioning
        if not (guidance and scale > 1):
            return call(latents, timesteps, c.embeds, c.mask)
        uncond, cond = call(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), torch.cat([c.negative, c.embeds]), torch.cat([c.negative_mask, c.mask])).chunk(2)
        combined = uncond + scale * (cond - uncond)
        return combined * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))

    def latent_shape(self) -> tuple[int, int]:
        height, width = self._latent_size()
        return ((height // 2) * (width // 2), self.model.config.in_channels)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_type: str = "pil") -> list[Image.Image]:
        """Unpack to (B, C, 1, H, W), undo the per-channel latent normalisation, decode the one frame."""
        unpacked = QwenImagePipeline._unpack_latents(latents, self.sampling.height, self.sampling.width, self.pipeline.vae_scale_factor)
        images = self.vae.decode(wan_vae_latents(self.vae, unpacked), return_dict=False)[0][:, :, 0]
        return self.pipeline.image_processor.postprocess(images.float(), output_type=output_type)
