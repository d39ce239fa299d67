"""Judging a Shapes pipeline: how often the judge sees exactly what the prompt asked for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .recognizers import load_recognizer
from .render import COMMON, UNUSUAL_HELDOUT, UNUSUAL_TRAIN, parse_caption, prompts_for

PROMPT_GROUPS: dict[str, list[str]] = {
    "common": prompts_for(COMMON),
    "unusual_train": prompts_for(UNUSUAL_TRAIN),
    "unusual_heldout": prompts_for(UNUSUAL_HELDOUT),
}


def exact_match(judge, images, prompts: list[str]) -> np.ndarray:
    """1.0 where the judge's (count, colour, shape) equals the prompt's, per image."""
    seen = judge.predict(images)
    return np.array([float(s == parse_caption(p)) for s, p in zip(seen, prompts)], dtype=np.float32)


@torch.no_grad()
def judge_exact_match(
    pipeline_dir: str | Path, judge_path: str | Path, *, seeds: int = 4, num_steps: int = 20, guidance_scale: float = 3.0
) -> dict[str, float]:
    """Sample every prompt of each group with `seeds` fixed seeds (plain DDIM) and report judge exact match."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    judge = load_recognizer(judge_path, "judge")
    result = {}
    for group, prompts in PROMPT_GROUPS.items():
        scores = []
        for seed in range(seeds):
            generator = torch.Generator().manual_seed(seed)
            images = pipe(prompts, num_inference_steps=num_steps, guidance_scale=guidance_scale, generator=generator).images
            scores.append(exact_match(judge, images, prompts))
        result[group] = round(float(np.mean(scores)), 4)
    return result
