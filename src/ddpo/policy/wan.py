"""The flow-matching policy over `WanPipeline` (Wan 2.1 text-to-video, one transformer).

Video latents (B, C, F, H, W) of the 3-D causal VAE (F = (frames - 1) / 4 + 1, H and W an eighth of the frame's),
UMT5 text states zero-padded after each prompt, timestep input 1000 * sigma, classifier-free guidance with the
negative prompt (the pipeline's default: the empty prompt) when the scale exceeds 1, and decoding through the VAE's
per-channel latents mean and std into each sample's frames.

The hub's Wan pipelines sample with `UniPCMultistepScheduler` (flow sigmas, shift `flow_shift`), a multistep solver
with no per-step Gaussian policy. The policy samples the same flow with the flow-matching Euler schedule of the same
shift (`use_flow_matching_scheduler`, applied on loading): its SDE steps are Flow-GRPO's and its deterministic steps
the Euler ODE, which a pipeline configured with that scheduler reproduces exactly.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from .base import LoraOptions, encode_each_distinct
from .diffusion import Conditioning, SamplingOptions, classifier_free_guidance, wan_vae_latents
from .flow import FlowMatchingPolicy

MAX_SEQUENCE_LENGTH = 512  # the pipeline's default

# The attention projections of both attentions (self, cross) and the feed-forward of every block: the targets of
# DiffSynth-Studio's Wan 2.1 LoRA recipe ("q,k,v,o,ffn.0,ffn.2" in Wan's original names).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json, as diffusers' scripts/convert_wan_to_diffusers.py writes it
WAN_1_3B = {
    "patch_size": [1, 2, 2], "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16, "out_channels": 16,
    "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
}  # fmt: skip
REAL_ARCHITECTURES = {
    "Wan 2.1 T2V 1.3B": {
        "class": "WanTransformer3DModel",
        "config": WAN_1_3B,
        "published_parameters": 1.3e9,  # "Wan2.1-T2V-1.3B" (model card); the built network has 1.42 B: the name is rounded
        "tolerance": 0.10,
        "lora_targets": list(LORA_TARGETS),
        "source": "https://huggingface.co/Wan-AI/Wan2.1-T2V-1.3B-Diffusers/blob/main/transformer/config.json",
    },
    "Wan 2.1 T2V 14B": {
        "class": "WanTransformer3DModel",
        "lora_targets": list(LORA_TARGETS),
        # Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json: the 1.3B's with 40 heads, FFN 13824, 40 layers
        "config": {**WAN_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
        "published_parameters": 14e9,  # "Wan2.1-T2V-14B" (model card)
        "source": "https://huggingface.co/Wan-AI/Wan2.1-T2V-14B-Diffusers/blob/main/transformer/config.json",
    },
}  # fmt: skip


def use_flow_matching_scheduler(pipeline) -> None:
    """Replace a Wan pipeline's UniPC scheduler by the flow-matching Euler scheduler of the same flow shift."""
    config = pipeline.scheduler.config
    if not isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler):
        pipeline.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.get("num_train_timesteps", 1000), shift=config.get("flow_shift", 1.0))


class WanPolicy(FlowMatchingPolicy):
    """Flow-GRPO / FDFO sampling and log-probs over a Wan text-to-video pipeline; LoRA on the transformer.

    `decode` returns each sample's frames (a list of PIL images per sample; with output_type="np" the pipeline's
    (B, frames, H, W, 3) float array). Wan 2.2's two-expert pipelines (`transformer_2`, `boundary_ratio`) and its
    per-token timesteps (`expand_timesteps`, TI2V-5B) are refused.
    """

    network_name = "transformer"
    convert_lora_to_diffusers = False  # peft names, as diffusers' Wan LoRA loader reads them

    def __init__(self, pipeline, sampling: SamplingOptions, lora: LoraOptions | None = None, *, max_sequence_length: int = MAX_SEQUENCE_LENGTH, **kwargs) -> None:
        if getattr(pipeline, "transformer_2", None) is not None or pipeline.config.get("boundary_ratio") is not None:
            raise ValueError("Wan 2.2's two-expert pipelines (transformer_2, boundary_ratio) are not supported: one transformer only (Wan 2.1 T2V)")
        if pipeline.config.get("expand_timesteps", False):
            raise ValueError("Wan pipelines with expand_timesteps=True (Wan 2.2 TI2V) are not supported")
        temporal = pipeline.vae_scale_factor_temporal
        if (sampling.num_frames - 1) % temporal:
            raise ValueError(f"sample.num_frames={sampling.num_frames}: Wan needs num_frames - 1 divisible by {temporal} (e.g. 33, 81)")
        self.max_sequence_length = max_sequence_length
        self.vae = pipeline.vae
        use_flow_matching_scheduler(pipeline)
        super().__init__(pipeline, sampling, lora, frozen=[self.vae, pipeline.text_encoder], **kwargs)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        def encode_one(prompt: str) -> tuple[torch.Tensor]:
            embeds, _ = self.pipeline.encode_prompt([prompt], do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length, device=self.device)
            return (embeds,)

        (embeds,) = encode_each_distinct(prompts, encode_one)  # batch-independent floats
        return Conditioning(embeds=embeds.float())

    def network_output(self, model, latents, sigmas, conditioning, guidance):
        def call(latents, timesteps, embeds, pooled, mask):
            return model(hidden_states=latents, timestep=timesteps, encoder_hidden_states=embeds).sample

        timesteps = sigmas * self.pipeline.scheduler.config.num_train_timesteps
        # The pipeline guides only with a scale above 1.
        return classifier_free_guidance(call, latents, timesteps, conditioning, self.sampling.guidance_scale, guidance and self.sampling.guidance_scale > 1)

    def latent_shape(self) -> tuple[int, int, int, int]:
        spatial = self.pipeline.vae_scale_factor_spatial
        frames = (self.sampling.num_frames - 1) // self.pipeline.vae_scale_factor_temporal + 1
        return (self.model.config.in_channels, frames, self.sampling.height // spatial, self.sampling.width // spatial)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_type: str = "pil") -> list[list[Image.Image]]:
        video = self.vae.decode(wan_vae_latents(self.vae, latents)).sample
        return self.pipeline.video_processor.postprocess_video(video.float(), output_type=output_type)
