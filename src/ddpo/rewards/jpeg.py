"""JPEG file size as a reward (Black et al. 2023, Sec. 6.1): compressibility = -size, incompressibility = +size.

As the paper's code (kvablack/ddpo-pytorch `rewards.py`): each image is saved with PIL as JPEG at quality 95
into memory, and its size is counted in kilobytes of 1000 bytes.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ddpo.rewards.base import Reward, RewardOutput, register_reward

PAPER_QUALITY = 95
"""JPEG quality of the paper's reward."""


def jpeg_size_kb(image: Image.Image, quality: int = PAPER_QUALITY) -> float:
    """Size in kB (1000 bytes) of `image` saved as JPEG at `quality`; non-RGB images are converted to RGB."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = PAPER_QUALITY) -> Reward:
    """Reward = JPEG size in kB: larger files score higher."""

    def reward(images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> RewardOutput:
        return RewardOutput(np.array([jpeg_size_kb(image, quality) for image in images], dtype=np.float32))

    return reward


@register_reward("jpeg_compressibility")
def jpeg_compressibility(quality: int = PAPER_QUALITY) -> Reward:
    """Reward = -(JPEG size in kB): smaller files score higher."""

    def reward(images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> RewardOutput:
        return RewardOutput(-np.array([jpeg_size_kb(image, quality) for image in images], dtype=np.float32))

    return reward
