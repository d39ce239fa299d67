"""Tiny random reward models written to disk by code (no download), for tests and benchmarks: a CLIP with its
processor and a LAION-layout aesthetic head, and a LLaVA with its processor and chat template. Their
architectures, processors and file layouts are the real ones (`CLIPModel`, `LlavaForConditionalGeneration`),
only the sizes are tiny and the weights random, so scores are meaningless but every code path runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_WORDS = (
    "a", "an", "the", "of", "and", "with", "on", "in", "is", "this", "image", "contains", "what", "going",
    "does", "match", "caption", "answer", "yes", "no", "or", "cat", "dog", "horse", "red", "blue", "green",
    "circle", "circles", "square", "two", "three", "riding", "bike", "playing", "chess",
)  # fmt: skip
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}USER: {% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def save_tiny_clip(directory: str | Path, seed: int = 0, image_size: int = 32, projection_dim: int = 8) -> Path:
    """A random `CLIPModel` (2 layers, width 16), its CLIP tokenizer and PIL image processor in `directory`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from ddpo.shapes.tokenizer import write_tokenizer

    directory = Path(directory)
    tokenizer = write_tokenizer(directory, list(TINY_WORDS))
    text = {
        "vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": tokenizer.model_max_length,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.eos_token_id,
    }  # fmt: skip
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": image_size, "patch_size": 8}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim))
    model.save_pretrained(directory)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def save_tiny_aesthetic_head(path: str | Path, input_dim: int = 8, seed: int = 0) -> Path:
    """A random LAION-layout aesthetic MLP for `input_dim`-d embeddings, saved as the released state dict
    (`layers.N.weight/bias`) with `torch.save` (the `.pth` format of the real head)."""
    from ddpo.rewards.clip import aesthetic_head

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = aesthetic_head(input_dim)
    path = Path(path)
    torch.save({f"layers.{key}": value for key, value in head.state_dict().items()}, path)
    return path


def save_tiny_llava(directory: str | Path, seed: int = 0, image_size: int = 16) -> Path:
    """A random `LlavaForConditionalGeneration` (CLIP vision tower + 2-layer Llama, width 16), a word-level
    tokenizer over `TINY_WORDS` (words are tokens, case kept, "Yes" and "No" included) and an
    `LlavaProcessor` with a LLaVA-1.5 style chat template ("USER: <image>\\n... ASSISTANT:")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    directory = Path(directory)
    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    words = specials + ["USER", "ASSISTANT", ":", "Yes", "No", "What", "Does", "The", "?", '"', ".", ","] + list(TINY_WORDS)
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=image_size, patch_size=8)
    text = LlamaConfig(
        vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=words.index("<image>"), vision_feature_layer=-1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.save_pretrained(directory)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8, num_additional_image_tokens=1,
        vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE,
    )  # fmt: skip
    processor.save_pretrained(directory)
    return directory
