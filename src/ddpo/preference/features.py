"""Frozen features for the preference model: what it sees of an image and of a prompt.

A feature extractor is named by a string saved with the model, so that `preference:PATH` rebuilds it:

- `shapes-describer`: the Shapes world's describer (`ddpo.shapes.recognizers.Describer`), its 128-d
  penultimate layer, for the image; hashed bag of words for the prompt.
- `clip:MODEL`: any CLIP checkpoint (hub id or directory, transformers `CLIPModel`): unit-norm image and
  text embeddings (`ddpo.rewards.clip.CLIPEmbedder`).
"""

from __future__ import annotations

import hashlib
import re
from typing import Protocol

import torch
from PIL import Image

SHAPES_DESCRIBER = "shapes-describer"
PROMPT_HASH_DIM = 64
BATCH_SIZE = 64


class FeatureExtractor(Protocol):
    name: str
    """The string that rebuilds this extractor (`build_features`)."""

    def images(self, images: list[Image.Image]) -> torch.Tensor:
        """(n, image_dim) float32."""
        ...

    def prompts(self, prompts: list[str]) -> torch.Tensor:
        """(n, prompt_dim) float32."""
        ...


def hashed_bag_of_words(prompts: list[str], dim: int = PROMPT_HASH_DIM) -> torch.Tensor:
    """(n, dim): each lower-cased word adds 1 to a bucket chosen by its sha1 (stable across processes, unlike
    Python's `hash`); rows are L2-normalised."""
    features = torch.zeros(len(prompts), dim)
    for row, prompt in enumerate(prompts):
        for word in re.findall(r"[a-z0-9]+", prompt.lower()):
            features[row, int.from_bytes(hashlib.sha1(word.encode()).digest()[:4], "little") % dim] += 1.0
    return torch.nn.functional.normalize(features, dim=-1)


class ShapesDescriberFeatures:
    """The Shapes describer's penultimate features (128-d) and hashed prompt words."""

    name = SHAPES_DESCRIBER

    def __init__(self) -> None:
        from ddpo.shapes.rewards import load_describer

        self.describer = load_describer()

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        from ddpo.shapes.recognizers import images_to_tensor

        parts = [self.describer.features(images_to_tensor(images[start : start + 256])) for start in range(0, len(images), 256)]
        return torch.cat(parts).float() if parts else torch.zeros(0, 128)

    def prompts(self, prompts: list[str]) -> torch.Tensor:
        return hashed_bag_of_words(prompts)


class CLIPFeatures:
    """Unit-norm CLIP image and text embeddings of any checkpoint."""

    def __init__(self, model: str) -> None:
        from ddpo.rewards.clip import CLIPEmbedder

        self.name = f"clip:{model}"
        self.embedder = CLIPEmbedder("preference", model, None, None, "float32")

    def images(self, images: list[Image.Image]) -> torch.Tensor:
        return self.embedder.images(images, BATCH_SIZE)

    def prompts(self, prompts: list[str]) -> torch.Tensor:
        unique = list(dict.fromkeys(prompts))
        embedded = self.embedder.texts(unique, BATCH_SIZE)
        return embedded[[unique.index(prompt) for prompt in prompts]]


def build_features(name: str) -> FeatureExtractor:
    """The extractor a name stands for: `shapes-describer` or `clip:MODEL`.

    Raises:
        ValueError: any other name.
    """
    if name == SHAPES_DESCRIBER:
        return ShapesDescriberFeatures()
    if name.startswith("clip:") and len(name) > len("clip:"):
        return CLIPFeatures(name[len("clip:") :])
    raise ValueError(f"unknown preference features {name!r}: use {SHAPES_DESCRIBER!r} (the Shapes world) or 'clip:MODEL' (a CLIP hub id or directory)")


def unique_image_features(extractor: FeatureExtractor, pngs: list[bytes]) -> tuple[torch.Tensor, list[int]]:
    """Features of each distinct PNG once: returns (u, image_dim) features and, per input, its row."""
    from ddpo.preference.store import decode_png

    index: dict[bytes, int] = {}
    rows = [index.setdefault(png, len(index)) for png in pngs]
    distinct = list(index)
    features = [extractor.images([decode_png(png) for png in distinct[start : start + 256]]) for start in range(0, len(distinct), 256)]
    return (torch.cat(features) if features else torch.zeros(0, 1)), rows


__all__ = ["CLIPFeatures", "FeatureExtractor", "ShapesDescriberFeatures", "build_features", "hashed_bag_of_words", "unique_image_features"]
