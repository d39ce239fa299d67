"""Where one DDPO-IS epoch's wall time goes: sampling, reward scoring, training.

Builds `ddpo.train.Trainer` from the `sd_compressibility` preset, sized down for a small model (overrides below,
then the user's `--set`), on a temporary run directory, and times each part of an epoch on its own:

- sample: `Trainer.sample_epoch`, with the reward replaced by a stub that scores zeros. (In training the reward
  scores batch b in a thread while batch b + 1 samples; the stub keeps that work out of the sampling time.)
- reward: the configured reward called directly on the epoch's images, batch by batch as the trainer calls it.
- train:  `Trainer.advantages` then `Trainer.update` (the inner epochs of the clipped DDPO-IS objective).

`Trainer.record` (metrics, the fixed-seed sample grid, a checkpoint) is timed too but kept outside the split.
Two epochs run and the second is reported: the first includes warm-up (first-call allocations, lazy imports).
Because training overlaps the reward with sampling, a real epoch can take less than the sum.

    python benchmarks/epoch_split.py --model tiny --set sample.num_steps=10

Prints numbers only; the last line is `epoch_seconds=S sample=P% reward=P% train=P%`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

# Before transformers is imported: its import-time warnings (e.g. about optional back-ends) are not actionable here.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from ddpo.config import ConfigError  # noqa: E402

from ddpo.training.assemble import load_config
from ddpo.policy import PolicyLoadError, resolve_model  # noqa: E402
from ddpo.policy.tiny import save_tiny_pipeline  # noqa: E402
from ddpo.rewards import checked_reward  # noqa: E402
from ddpo.training.loop import Trainer  # noqa: E402

PRESET = "sd_compressibility"
EPOCHS = 2  # the first is warm-up; the second is reported


def fail(message: str) -> NoReturn:
    print(f"epoch_split: {message}", file=sys.stderr)
    sys.exit(2)


def model_directory(model: str, scratch: Path) -> str:
    """`tiny` is written to `scratch`; `shapes` is the shipped model; anything else is a hub id or directory."""
    if model == "tiny":
        return str(save_tiny_pipeline(scratch / "tiny-sd"))
    try:
        return resolve_model(model)
    except FileNotFoundError as error:
        fail(f"cannot load --model {model}: {error}")


def native_size(pretrained: str) -> int | None:
    """Image side in pixels the UNet was built for (latent sample_size x the VAE's downsampling), if on disk."""
    unet_config, vae_config = Path(pretrained, "unet", "config.json"), Path(pretrained, "vae", "config.json")
    if not (unet_config.is_file() and vae_config.is_file()):
        return None
    sample_size = json.loads(unet_config.read_text())["sample_size"]
    return sample_size * 2 ** (len(json.loads(vae_config.read_text())["block_out_channels"]) - 1)


def small_run_overrides(pretrained: str) -> list[str]:
    """The preset sized for a short benchmark on a small model: 2 batches of 8 samples, 20 steps, fp32."""
    overrides = [
        f"model.pretrained={json.dumps(pretrained)}",
        "model.mixed_precision=no",
        "sample.num_steps=20",
        "sample.batch_size=8",
        "sample.num_batches_per_epoch=2",
        "train.batch_size=8",  # 16 samples -> 2 micro-batches; the preset's gradient_accumulation_steps=2 -> 1 step
        f"train.epochs={EPOCHS}",
        "log.with=[]",
    ]
    size = native_size(pretrained)
    if size is not None:
        overrides += [f"sample.height={size}", f"sample.width={size}"]
    return overrides


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that a timer stops when the work is done (a no-op on CPU)."""
    backend = getattr(torch, device.type, None)
    if backend is not None and hasattr(backend, "synchronize"):
        backend.synchronize()


def timed(call: Callable[[], object], device: torch.device) -> tuple[object, float]:
    synchronize(device)
    started = time.perf_counter()
    result = call()
    synchronize(device)
    return result, time.perf_counter() - started


zero_reward = checked_reward("zero", lambda images, prompts, metadata: np.zeros(len(images), dtype=np.float32))


def timed_epoch(trainer: Trainer, epoch: int) -> dict[str, float]:
    """Seconds of each part of one epoch: sample, reward, advantages, update, record."""
    device = trainer.accelerator.device
    reward = trainer.reward
    trainer.reward = zero_reward
    try:
        samples, sample_seconds = timed(lambda: trainer.sample_epoch(epoch), device)
    finally:
        trainer.reward = reward

    trajectory, batch = samples.trajectory, trainer.config.sample.batch_size

    def score_epoch() -> np.ndarray:
        parts = [
            reward(trajectory.images[i : i + batch], trajectory.prompts[i : i + batch], trajectory.metadata[i : i + batch])
            for i in range(0, len(trajectory), batch)
        ]
        return np.concatenate([part.scores for part in parts])

    scores, reward_seconds = timed(score_epoch, device)
    samples = dataclasses.replace(samples, rewards=torch.from_numpy(scores).to(device))
    advantages, advantages_seconds = timed(lambda: trainer.advantages(samples), device)
    (metrics, _), update_seconds = timed(lambda: trainer.update(epoch, samples, advantages), device)
    _, record_seconds = timed(lambda: trainer.record(epoch, samples, metrics, update_seconds), device)
    return {
        "sample": sample_seconds,
        "reward": reward_seconds,
        "advantages": advantages_seconds,
        "update": update_seconds,
        "record": record_seconds,
    }


def main() -> None:
    # Pipeline save/load progress bars would bury the numbers.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, metavar="ID_OR_DIR|tiny|shapes", help="hub id, pipeline directory, 'tiny' or 'shapes'")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override, applied last; repeatable")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ddpo-epoch-split-") as scratch:
        pretrained = model_directory(args.model, Path(scratch))
        try:
            config = load_config(PRESET, small_run_overrides(pretrained) + args.overrides)
            trainer = Trainer(config, Path(scratch) / "run", progress=False)
        except (ConfigError, PolicyLoadError, FileNotFoundError) as error:
            fail(str(error))
        device = trainer.accelerator.device
        print(
            f"model: {args.model}  device: {device}  torch threads: {torch.get_num_threads()}  "
            f"load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
        )
        sample = config.sample
        print(
            f"preset {PRESET} + overrides: {sample.num_steps} steps, {sample.height}x{sample.width} px, guidance {sample.guidance_scale}, "
            f"train.batch_size {config.train.batch_size}, timestep_fraction {config.train.timestep_fraction}, "
            f"inner_epochs {config.train.inner_epochs}, mixed_precision {config.model.mixed_precision}"
        )
        trainer.describe()
        for epoch in range(1, EPOCHS + 1):
            parts = timed_epoch(trainer, epoch)
            print(f"epoch {epoch} ({'warm-up' if epoch < EPOCHS else 'reported'}): " + "  ".join(f"{name} {s:.3f} s" for name, s in parts.items()))
        trainer.accelerator.end_training()

    split = {"sample": parts["sample"], "reward": parts["reward"], "train": parts["advantages"] + parts["update"]}
    total = sum(split.values())
    samples_per_epoch = trainer.sizes.samples_per_process
    notes = {
        "sample": f"Trainer.sample_epoch, {samples_per_epoch} images, {samples_per_epoch / split['sample']:.2f} images/s",
        "reward": f"{trainer.reward.name} alone on the {samples_per_epoch} images",
        "train": f"Trainer.advantages {parts['advantages']:.3f} s + Trainer.update {parts['update']:.3f} s",
    }
    print(f"split of epoch {EPOCHS}:")
    for name, seconds in split.items():
        print(f"  {name:7s} {seconds:8.3f} s  {100 * seconds / total:5.1f}%  ({notes[name]})")
    print(f"  record  {parts['record']:8.3f} s          (metrics, sample grid, checkpoint; outside the split)")
    print(f"epoch_seconds={total:.2f} " + " ".join(f"{name}={100 * seconds / total:.1f}%" for name, seconds in split.items()))


if __name__ == "__main__":
    main()
