"""Small helpers shared by the trainer, the CLI and the benchmarks."""

from __future__ import annotations

import hashlib
import os

import torch
from PIL import Image


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of names and numbers, e.g. (run seed, "noise", epoch, sample index).

    Seeding each sample from what it is (not from a shared stream) makes results independent of batch
    size, number of processes, and of where a resumed run restarts.
    """
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generators_for(seed: int, kind: str, epoch: int, indices: list[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample index, on `device`."""
    return [torch.Generator(device=device).manual_seed(derive_seed(seed, kind, epoch, i)) for i in indices]


def film_strip(frames: list[Image.Image]) -> Image.Image:
    """A video's frames side by side, left to right."""
    width, height = frames[0].size
    strip = Image.new("RGB", (len(frames) * width, height))
    for i, frame in enumerate(frames):
        strip.paste(frame, (i * width, 0))
    return strip


def image_grid(images: list[Image.Image], rows: int, columns: int) -> Image.Image:
    """Paste images row by row into one grid image."""
    if len(images) != rows * columns:
        raise ValueError(f"image_grid got {len(images)} images for a {rows}x{columns} grid")
    images = [film_strip(image) if isinstance(image, (list, tuple)) else image for image in images]  # videos: frames in a row
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def quiet_libraries() -> None:
    """Keep the console to our own messages: library warnings about optional back-ends are not actionable."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
