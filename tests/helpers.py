"""Helpers for tests that run training on the tiny random pipeline."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it): tests never collide on a fixed port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

def tiny_overrides(model_dir, **extra) -> list[str]:
    """`--set` overrides for a small, fast run of the sd_compressibility preset on the tiny pipeline."""
    values = {
        "model.pretrained": f'"{model_dir}"',
        "model.mixed_precision": '"no"',
        "sample.num_steps": 6,
        "sample.height": 32,
        "sample.width": 32,
        "sample.batch_size": 4,
        "sample.num_batches_per_epoch": 2,
        "train.batch_size": 4,
        "train.gradient_accumulation_steps": 1,
        "train.epochs": 2,
        "train.stat_min_count": 2,
        "prompts.source": '"simple_animals"',
        "log.num_eval_seeds": 2,
        "log.grid_prompts": '["a cat", "a dog"]',
        "log.with": "[]",
        "log.eval_every": 0,  # tests of the periodic evaluation turn it on
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def cli_args(model_dir, out, **extra) -> list[str]:
    args = ["train", "--config", "sd_compressibility", "--out", str(out), "--no-progress"]
    for override in tiny_overrides(model_dir, **extra):
        args += ["--set", override]
    return args


# Misbehaving rewards, referenced from configs as "helpers:<name>".
def nan_reward(images, prompts, metadata):
    return [float("nan")] + [0.0] * (len(images) - 1)


def short_reward(images, prompts, metadata):
    return [0.0] * (len(images) - 1)


def raising_reward(images, prompts, metadata):
    raise ValueError("the scorer is offline")


def raising_on_rank_one(images, prompts, metadata):
    import os

    if os.environ.get("RANK") == "1":
        raise ValueError("the rank 1 scorer is offline")
    return [0.0] * len(images)


# The held-out scorer of the early-stopping test: evaluation k (0 = before training) scores every image
# HELDOUT_SCHEDULE[k], so the test knows which epoch is the held-out best.
HELDOUT_SCHEDULE: list[float] = []
heldout_calls: list[int] = []


def scripted_heldout(images, prompts, metadata):
    index = len(heldout_calls)
    heldout_calls.append(index)
    return [HELDOUT_SCHEDULE[min(index, len(HELDOUT_SCHEDULE) - 1)]] * len(images)


# A reward that works for the first epoch (2 batches) and then fails: the run ends after its first checkpoint.
first_epoch_calls: list[int] = []


def fails_after_first_epoch(images, prompts, metadata):
    first_epoch_calls.append(1)
    if len(first_epoch_calls) > 2:
        raise RuntimeError("the scorer went away")
    return [0.5] * len(images)


def mean_brightness(images, prompts, metadata):
    """A smooth reward (the mean pixel value in [0, 1]) for tests that compare runs: JPEG size moves in whole bytes,
    so a difference of 1e-7 in a sample can change its reward by a step and the runs' updates with it."""
    import numpy as np

    return [float(np.asarray(image, dtype=np.float32).mean() / 255) for image in images]


# Every prompt a reward was asked to score, for tests of which samples are scored.
scored_prompts: list[str] = []


def recording_brightness(images, prompts, metadata):
    scored_prompts.extend(prompts)
    return mean_brightness(images, prompts, metadata)


def euler_sample(pipe, prompts, generators, *, num_steps: int, guidance_scale: float) -> list:
    """An independent reference for the flow twin (a velocity UNet in a `StableDiffusionPipeline`, which diffusers'
    own pipeline cannot run with a flow scheduler): the Euler ODE sampler with classifier-free guidance, written
    from the formulas (`flow_sigmas`, timestep 1000 sigma, the pipeline's own batched prompt encoding)."""
    import torch

    from ddpo.core.flow import euler_step, flow_sigmas

    with torch.no_grad():
        size = pipe.unet.config.sample_size
        cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True, [""] * len(prompts))
        context = torch.cat([uncond, cond])
        x = torch.stack([torch.randn(pipe.unet.config.in_channels, size, size, generator=g) for g in generators])
        sigmas = flow_sigmas(num_steps, shift=pipe.scheduler.config.get("shift", 1.0))
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            v_uncond, v_cond = pipe.unet(torch.cat([x, x]), (sigma * 1000).expand(2 * len(x)), context).sample.chunk(2)
            x = euler_step(v_uncond + guidance_scale * (v_cond - v_uncond), x, sigma, sigma_next)
        decoded = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
        return pipe.image_processor.postprocess(decoded, output_type="pil")
