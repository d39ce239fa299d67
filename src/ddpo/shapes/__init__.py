"""The Shapes world: a procedural, captioned image world with a tiny pretrained text-to-image model."""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"


def shipped_pipeline_dir() -> Path:
    """Directory of the shipped Shapes `StableDiffusionPipeline`."""
    path = WEIGHTS_DIR / "shapes-sd"
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"the shipped Shapes pipeline is missing from {path}; reinstall ddpo or run `ddpo toy pretrain`")
    return path


# Register the Shapes world's rewards and prompt sources (light: models load only when a reward is built).
from . import prompts, rewards  # noqa: E402, F401
