"""Tiny random pipelines built in code (no download), for tests and benchmarks: Stable Diffusion (DDIM or
flow-matching), SDXL, SD3 and FLUX.

The same idea as diffusers' `get_dummy_components()`: every class is the real one (UNet2DConditionModel,
SD3Transformer2DModel, FluxTransformer2DModel, AutoencoderKL, CLIPTextModel, T5EncoderModel, CLIP and T5
tokenizers, DDIMScheduler or FlowMatchEulerDiscreteScheduler), only the sizes are tiny and the weights random.
The tokenizers are written offline with the `tokenizers` library (a byte-level BPE for CLIP, a Unigram
vocabulary of whole words for T5).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

from .tiny_qwen_zimage import TINY_PIPELINES as QWEN_ZIMAGE_PIPELINES

ANIMAL_WORDS = ("a", "an", "cat", "dog", "horse", "elephant", "otter", "monkey", "riding", "bike", "playing", "chess")


def build_tiny_pipeline(seed: int = 0, prediction_type: str = "epsilon", words: tuple[str, ...] = ANIMAL_WORDS, flow: bool = False) -> StableDiffusionPipeline:
    """A random SD-architecture pipeline: 32 px images, 8x8x4 latents, UNet of ~0.3M parameters.

    With `flow`, the scheduler is `FlowMatchEulerDiscreteScheduler` (shift 1), the Shapes flow twin's setup: the
    UNet is read as a velocity model with timestep input 1000 * sigma.
    """
    from ..shapes.tokenizer import write_tokenizer

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
    vae = _tiny_sd_vae()
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
    if flow:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    else:
        scheduler = _tiny_ddim_scheduler(prediction_type)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_sd_vae() -> AutoencoderKL:
    """SD's VAE in miniature: 32 px images to 8x8x4 latents."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
    )  # fmt: skip


def _tiny_ddim_scheduler(prediction_type: str) -> DDIMScheduler:
    """SD 1.x's scaled-linear DDPM schedule under DDIM."""
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )  # fmt: skip


def _clip_tokenizer(words: tuple[str, ...]):
    from ..shapes.tokenizer import write_tokenizer

    with tempfile.TemporaryDirectory() as directory:
        return write_tokenizer(Path(directory), list(words))


def _clip_config(tokenizer, hidden_size: int, projection_dim: int = 16) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )  # fmt: skip


def _t5(words: tuple[str, ...], d_model: int = 32) -> tuple[T5EncoderModel, T5Tokenizer]:
    """A 2-layer T5 encoder and a Unigram T5 tokenizer whose pieces are the whole words ("▁cat"), built offline."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(f"▁{word}", -1.0) for word in sorted(set(words))]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)
    config = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(config), tokenizer


def build_tiny_sd3_pipeline(seed: int = 0, words: tuple[str, ...] = ANIMAL_WORDS):
    """A random `StableDiffusion3Pipeline`: 32 px images, 8x8x4 latents, a one-layer MMDiT, CLIP-L/G and T5 of width 16-32."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=32,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )  # fmt: skip
    tokenizer, tokenizer_2 = _clip_tokenizer(words), _clip_tokenizer(words)
    # The two CLIPs' states (16 + 16) are padded to T5's width (32); their pooled outputs (16 + 16) are the pooled projection.
    text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer, 16))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2, 16))
    text_encoder_3, tokenizer_3 = _t5(words, d_model=32)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return _eval_mode(pipe)


def build_tiny_flux_pipeline(seed: int = 0, words: tuple[str, ...] = ANIMAL_WORDS, guidance_embeds: bool = True):
    """A random `FluxPipeline`: 32 px images, 16x16x1 latents packed into 64 tokens of 4, a one-layer transformer
    (one double, one single block), CLIP and T5 of width 32; guidance-distilled (like FLUX.1-dev) by default."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8), guidance_embeds=guidance_embeds,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=1, norm_num_groups=8, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )  # fmt: skip
    tokenizer = _clip_tokenizer(words)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, 32))
    text_encoder_2, tokenizer_2 = _t5(words, d_model=32)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return _eval_mode(pipe)


def build_tiny_sdxl_pipeline(seed: int = 0, words: tuple[str, ...] = ANIMAL_WORDS):
    """A random `StableDiffusionXLPipeline` (diffusers' own test sizes): 32 px, 8x8x4 latents, a two-level UNet with
    added time ids, CLIP-L-like and CLIP-G-like encoders of width 32 (states concatenated to 64), DDIM schedule."""
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=1,
    )  # fmt: skip
    vae = _tiny_sd_vae()
    tokenizer, tokenizer_2 = _clip_tokenizer(words), _clip_tokenizer(words)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, 32, projection_dim=32))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2, 32, projection_dim=32))
    scheduler = _tiny_ddim_scheduler("epsilon")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=unet, scheduler=scheduler, add_watermarker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return _eval_mode(pipe)


def _eval_mode(pipe):
    """Modules in eval mode, as `from_pretrained` returns them (T5's dropout would make every call differ)."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


TINY_PIPELINES = {
    "sd": build_tiny_pipeline,
    "sd-flow": lambda seed=0: build_tiny_pipeline(seed, flow=True),
    "sdxl": build_tiny_sdxl_pipeline,
    "sd3": build_tiny_sd3_pipeline,
    "flux": build_tiny_flux_pipeline,
}
TINY_PIPELINES.update(QWEN_ZIMAGE_PIPELINES)
from .tiny_flux2_wan import TINY_PIPELINES as FLUX2_WAN_PIPELINES  # noqa: E402

TINY_PIPELINES.update(FLUX2_WAN_PIPELINES)


def save_tiny_pipeline(directory: str | Path, seed: int = 0, prediction_type: str = "epsilon", kind: str = "sd") -> Path:
    """Write a tiny random pipeline of `kind` ("sd", "sd-flow", "sd3", "flux") as a standard diffusers directory."""
    directory = Path(directory)
    pipe = build_tiny_pipeline(seed, prediction_type) if kind == "sd" else TINY_PIPELINES[kind](seed=seed)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory
