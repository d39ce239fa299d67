"""Tiny random Stable Diffusion pipelines built in code (no download), for tests and benchmarks.

The same idea as diffusers' `get_dummy_components()`: every class is the real one (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel, CLIPTokenizer, DDIMScheduler), only the sizes are tiny and the weights random.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

ANIMAL_WORDS = ("a", "an", "cat", "dog", "horse", "elephant", "otter", "monkey", "riding", "bike", "playing", "chess")


def build_tiny_pipeline(seed: int = 0, prediction_type: str = "epsilon", words: tuple[str, ...] = ANIMAL_WORDS) -> StableDiffusionPipeline:
    """A random SD-architecture pipeline: 32 px images, 8x8x4 latents, UNet of ~0.3M parameters."""
    from ..toyworld.tokenizer import write_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    with tempfile.TemporaryDirectory() as directory:
        tokenizer = write_tokenizer(Path(directory), list(words))
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(directory: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny random pipeline as a standard `StableDiffusionPipeline` directory."""
    directory = Path(directory)
    build_tiny_pipeline(seed, prediction_type).save_pretrained(directory, safe_serialization=True)
    return directory
