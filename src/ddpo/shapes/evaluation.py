"""Judging a Shapes pipeline: how often the judge sees exactly what the prompt asked for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .prompts import GROUPS
from .recognizers import load_recognizer
from .render import UNUSUAL, parse_caption, prompts_for

PROMPT_GROUPS: dict[str, list[str]] = {name: prompts_for(GROUPS[name]) for name in ("common", "unusual_train", "unusual_heldout")}
EVAL_SEED_OFFSET = 10_000  # evaluation seeds never coincide with the seeds of a training grid


def exact_match(judge, images, prompts: list[str]) -> np.ndarray:
    """1.0 where the judge's (count, colour, shape) equals the prompt's, per image."""
    seen = judge.predict(images)
    return np.array([float(s == parse_caption(p)) for s, p in zip(seen, prompts)], dtype=np.float32)


@torch.no_grad()
def judge_exact_match(
    pipeline_dir: str | Path,
    judge_path: str | Path,
    *,
    seeds: int = 8,
    num_steps: int = 20,
    guidance_scale: float = 3.0,
    eta: float = 1.0,
    lora_dir: str | Path | None = None,
    groups: dict[str, list[str]] | None = None,
    per_prompt: bool = False,
) -> dict:
    """Judge exact match per prompt group: every prompt x `seeds` fixed seeds, sampled like training does.

    Sampling uses the policy's DDIM sampler (eta 1 by default, the stochastic policy that RL trains), so
    base and fine-tuned models are compared on identical noise. The flow-matching twin is
    sampled with the deterministic Euler (ODE) sampler from the same initial noise. With
    `per_prompt`, the result also holds `per_prompt` (every prompt's rate) and `per_pair` (every unusual
    colour-shape pair's, over its three counts; the pairs outside both RL halves are sampled for it too).
    """
    from ..policy import SamplingOptions, load_pipeline, sampling_policy
    from ..policy.stable_diffusion import native_image_size

    pipe = load_pipeline(str(pipeline_dir))
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
    size = native_image_size(pipe)
    sampling = SamplingOptions(num_steps=num_steps, eta=eta, guidance_scale=guidance_scale, height=size, width=size)
    policy = sampling_policy(pipe, sampling)  # the flow twin: the ODE sampler
    judge = load_recognizer(judge_path, "judge")
    groups = dict(groups or PROMPT_GROUPS)
    if per_prompt:
        groups["unusual_other"] = prompts_for(GROUPS["unusual_other"])  # the per-pair table covers every unusual pair
    result, prompt_rates = {}, {}
    for group, prompts in groups.items():
        scores = []
        for seed in range(seeds):
            generators = [torch.Generator().manual_seed(EVAL_SEED_OFFSET + 1000 * seed + i) for i in range(len(prompts))]
            images = policy.sample(prompts, generators).images
            scores.append(exact_match(judge, images, prompts))
        result[group] = round(float(np.mean(scores)), 4)
        prompt_rates.update({p: round(float(r), 4) for p, r in zip(prompts, np.mean(scores, axis=0))})
    if per_prompt:
        pairs: dict[str, list[float]] = {}
        for prompt, rate in prompt_rates.items():
            scene = parse_caption(prompt)
            if (scene.color, scene.shape) in UNUSUAL:
                pairs.setdefault(f"{scene.color} {scene.shape}", []).append(rate)
        result["per_pair"] = {pair: round(float(np.mean(rates)), 4) for pair, rates in pairs.items()}
        result["per_prompt"] = prompt_rates
    return result
