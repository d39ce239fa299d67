"""Tiny random Qwen-Image and Z-Image pipelines built in code (no download), for tests and benchmarks.

As `ddpo.policy.tiny` and diffusers' `get_dummy_components()` (tests/pipelines/qwenimage, tests/pipelines/z_image):
every class is the real one (`QwenImageTransformer2DModel`, `AutoencoderKLQwenImage`,
`Qwen2_5_VLForConditionalGeneration`; `ZImageTransformer2DModel`, `AutoencoderKL`, `Qwen3Model`; `Qwen2Tokenizer`,
`FlowMatchEulerDiscreteScheduler` with the released models' scheduler configs), only the sizes are tiny and the
weights random. diffusers' tests download a tiny Qwen tokenizer; here it is written offline: a byte-level BPE
with Qwen2's pre-tokenizer whose merges (learned by a BPE trainer) make every word of the prompts and of
Qwen-Image's prompt template one token, so the template's prefix is 34 tokens, as with the real tokenizer (the
pipeline drops exactly 34), and a ChatML chat template for Z-Image's `apply_chat_template`.
"""

from __future__ import annotations

import json

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen3's chat template reduced to what ZImagePipeline uses (one user message, add_generation_prompt=True,
# enable_thinking=True, which adds nothing after "<|im_start|>assistant\n").
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# Qwen-Image's system prompt (QwenImagePipeline.prompt_template_encode) and the chat roles: their words become tokens.
TEMPLATE_TEXT = (
    "system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of "
    "the objects and background:\nuser\nassistant\n"
)


# (`ddpo.policy.tiny` imports this module into its registry: names from it are imported where used.)


def build_qwen_tokenizer(words: tuple[str, ...] | None = None) -> Qwen2Tokenizer:
    """A `Qwen2Tokenizer` over a byte-level BPE whose merges make each template and prompt word one token."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from .tiny import ANIMAL_WORDS

    words = words or ANIMAL_WORDS

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=100_000, min_frequency=1, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=list(SPECIAL_TOKENS)
    )
    corpus = [TEMPLATE_TEXT, " ".join(words), " ".join(f" {word}" for word in words)]
    bpe.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, additional_special_tokens=list(SPECIAL_TOKENS[1:]), model_max_length=2048)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_qwen_image_pipeline(seed: int = 0, words: tuple[str, ...] | None = None):
    """A random `QwenImagePipeline`: 32 px images, 8x8x4 latents packed 2x2 into 16 tokens of 16, a two-block MMDiT of
    width 48, a two-layer Qwen2.5-VL text model of width 16, and Qwen-Image's released scheduler config (dynamic
    exponential shift, terminal sigma 0.02)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from .tiny import _eval_mode

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )  # fmt: skip
    vae = AutoencoderKLQwenImage(
        base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.1, -0.2, 0.05, 0.0], latents_std=[1.5, 0.8, 1.2, 1.0],
    )  # fmt: skip
    tokenizer = build_qwen_tokenizer(words)
    vocab_size = len(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}, "rope_theta": 1000000.0,
            "vocab_size": vocab_size, "bos_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=vocab_size, vision_start_token_id=vocab_size - 3, vision_end_token_id=vocab_size - 2,
        vision_token_id=vocab_size - 1, image_token_id=vocab_size - 1, video_token_id=vocab_size - 1,
    )  # fmt: skip
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    # Qwen/Qwen-Image scheduler/scheduler_config.json
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )  # fmt: skip
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return _eval_mode(pipe)


def build_tiny_z_image_pipeline(seed: int = 0, words: tuple[str, ...] | None = None):
    """A random `ZImagePipeline`: 32 px images, 8x8x16 latents (the transformer patchifies 2x2 itself), a two-layer
    single-stream DiT of width 32 with one refiner layer per stream, a two-layer Qwen3 of width 16, and Z-Image's
    released scheduler config (shift 6, no dynamic shift)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from .tiny import _eval_mode

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )  # fmt: skip
    with torch.no_grad():  # initialised with torch.empty (diffusers' tests fix them the same way)
        transformer.x_pad_token.copy_(torch.randn_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.randn_like(transformer.cap_pad_token))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=32,
        scaling_factor=0.3611, shift_factor=0.1159,
    )  # fmt: skip
    tokenizer = build_qwen_tokenizer(words)
    text_encoder = Qwen3Model(
        Qwen3Config(
            hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
            vocab_size=len(tokenizer), max_position_embeddings=512, bos_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=False, shift=6.0)  # Tongyi-MAI/Z-Image
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return _eval_mode(pipe)


TINY_PIPELINES = {"qwen-image": build_tiny_qwen_image_pipeline, "z-image": build_tiny_z_image_pipeline}
