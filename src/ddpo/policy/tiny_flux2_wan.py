"""Tiny random FLUX.2 (dev and klein) and Wan 2.1 text-to-video pipelines built in code (no download), for tests.

As `ddpo.policy.tiny` and diffusers' `get_dummy_components()`: every class is the real one (Flux2Transformer2DModel,
AutoencoderKLFlux2, Mistral3ForConditionalGeneration, Qwen3ForCausalLM, WanTransformer3DModel, AutoencoderKLWan,
UMT5EncoderModel), only the sizes are tiny and the weights random. The FLUX.2 text encoders are as deep as the
layers the pipelines read (dev stacks hidden states 10, 20, 30; klein 9, 18, 27), so the pipelines run with their
defaults. Their tokenizers are word-level `tokenizers` vocabularies with a chat template (the pipelines format each
prompt as a chat); Wan's is the T5 Unigram tokenizer of `ddpo.policy.tiny`.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


# Renders a conversation (content a string, or a list of {"type": "text", "text": ...} parts) as "role : text" turns.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}{{ part['text'] }}{% endfor %}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def _chat_tokenizer(words: tuple[str, ...]) -> PreTrainedTokenizerFast:
    """A whitespace, word-level tokenizer with a chat template; words outside `words` map to <unk>."""
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for word in (*sorted(set(words)), "system", "user", "assistant", ":"):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>", model_max_length=512
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _flux2_vae():
    """An AutoencoderKLFlux2 with two blocks (32 px -> 16x16x1 latents, patchified to 8x8 tokens of 4) and random
    batch-norm statistics, so that decoding's de-normalisation matters."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=1, norm_num_groups=8, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape) * 0.5)
    vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape) + 0.5)
    return vae


def _flux2_transformer(joint_attention_dim: int, guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=joint_attention_dim, timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds,
    )  # fmt: skip


def _flux2_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.2's scheduler config (dynamic, exponential time shift; the pipelines pass their empirical mu)."""
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")


def build_tiny_flux2_pipeline(seed: int = 0, words: tuple[str, ...] | None = None):
    """A random `Flux2Pipeline` (FLUX.2 dev): guidance-embedded transformer (one double, one single block), a 30-layer
    Mistral3 text encoder of width 16 (its states 10, 20, 30 stacked: 48 wide), 32 px images."""
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    from .tiny import ANIMAL_WORDS, _eval_mode  # here: `tiny` registers this module's builders

    torch.manual_seed(seed)
    tokenizer = _chat_tokenizer(words or ANIMAL_WORDS)
    config = Mistral3Config(
        text_config={
            "model_type": "mistral", "vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 37, "max_position_embeddings": 512,
            "num_attention_heads": 4, "num_hidden_layers": 30, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 1e9,
            "sliding_window": None, "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0,
        },
        vision_config={
            "model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 37,
            "image_size": 30, "patch_size": 6, "num_channels": 3,
        },
        bos_token_id=2, eos_token_id=3, pad_token_id=0, image_seq_length=4, vision_feature_layer=-1, image_token_index=1,
    )  # fmt: skip
    text_encoder = Mistral3ForConditionalGeneration(config)
    pipe = Flux2Pipeline(
        scheduler=_flux2_scheduler(), vae=_flux2_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
        transformer=_flux2_transformer(joint_attention_dim=48, guidance_embeds=True),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return _eval_mode(pipe)


def build_tiny_flux2_klein_pipeline(seed: int = 0, words: tuple[str, ...] | None = None, is_distilled: bool = False):
    """A random `Flux2KleinPipeline` (FLUX.2 klein): transformer without guidance embedding (CFG with the empty prompt
    unless `is_distilled`), a 27-layer Qwen3 text encoder of width 16 (states 9, 18, 27 stacked: 48 wide), 32 px."""
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from .tiny import ANIMAL_WORDS, _eval_mode  # here: `tiny` registers this module's builders

    torch.manual_seed(seed)
    tokenizer = _chat_tokenizer(words or ANIMAL_WORDS)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=16, num_hidden_layers=27, num_attention_heads=2, num_key_value_heads=2,
        head_dim=8, max_position_embeddings=512, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    text_encoder = Qwen3ForCausalLM(config)
    pipe = Flux2KleinPipeline(
        scheduler=_flux2_scheduler(), vae=_flux2_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
        transformer=_flux2_transformer(joint_attention_dim=48, guidance_embeds=False), is_distilled=is_distilled,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return _eval_mode(pipe)


def build_tiny_wan_pipeline(seed: int = 0, words: tuple[str, ...] | None = None, shift: float = 3.0):
    """A random `WanPipeline` (Wan 2.1 text-to-video): a two-layer WanTransformer3DModel, the 3-D causal VAE with
    spatial factor 8 and temporal factor 4 (5 frames of 32 px -> 2 x 4 x 4 latents of 16 channels), UMT5 of
    width 32; the flow-matching Euler scheduler with Wan's flow shift `shift` (the hub's UniPC is replaced by it
    for sampling: `ddpo.policy.wan`)."""
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from .tiny import ANIMAL_WORDS, _eval_mode, _t5  # here: `tiny` registers this module's builders

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    _, tokenizer = _t5(words or ANIMAL_WORDS, d_model=32)
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16, text_dim=32,
        freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )  # fmt: skip
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return _eval_mode(pipe)


TINY_PIPELINES = {"flux2": build_tiny_flux2_pipeline, "flux2-klein": build_tiny_flux2_klein_pipeline, "wan": build_tiny_wan_pipeline}
