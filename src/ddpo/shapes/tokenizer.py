"""A tiny CLIP tokenizer for the Shapes world, written by code (no download).

`CLIPTokenizer` reads a byte-level BPE vocabulary (`vocab.json`) and its merge rules (`merges.txt`). We
give it every byte symbol (so any text still tokenizes, character by character), every caption word as a
single token, and the merges (learned by a BPE trainer) that build each word from its letters.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer

from .render import vocabulary

MAX_LENGTH = 8  # <|startoftext|> + the longest caption (3 words) + <|endoftext|>, with room to spare
EXTRA_WORDS = ("the", "image", "contains", "of", "and", "with")


def _byte_symbols() -> list[str]:
    """The printable stand-ins CLIP's byte-level BPE uses for the 256 byte values (GPT-2's table)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def write_tokenizer(directory: str | Path, words: list[str] | None = None) -> CLIPTokenizer:
    """Write vocab.json, merges.txt and the tokenizer config into `directory` and load it back."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    words = sorted(set(words or vocabulary()) | set(EXTRA_WORDS))
    # Learn the merges with a BPE trainer: learned merges reproduce every training word as one token,
    # which hand-ordered merges do not guarantee (an early "r e" from "red" would split "three").
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=100_000, min_frequency=1, end_of_word_suffix="</w>", show_progress=False)
    bpe.train_from_iterator(words, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    symbols = _byte_symbols()
    vocab: list[str] = symbols + [s + "</w>" for s in symbols]
    vocab += [token for token in sorted(model["vocab"], key=model["vocab"].get) if token not in set(vocab)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    config = {"model_max_length": MAX_LENGTH, "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    # Loading from the files (rather than the constructor, whose arguments changed across transformers
    # versions) and saving again also writes tokenizer.json for the fast backend.
    tokenizer = CLIPTokenizer.from_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return tokenizer
