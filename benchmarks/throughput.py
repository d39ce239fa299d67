"""Training throughput: the per-timestep loop vs the batched log-prob path, on the same work in one run.

The policy and the samples are those of a config (the Shapes default, `ddpo train` with no arguments, unless
`--config` / `--set` say otherwise). One epoch of trajectories is sampled once; then the DDPO-IS update
(recomputed log-probs, clipped loss, backward) runs over the same minibatches and the same timesteps with
`train.timestep_chunk=1` (one UNet call per timestep, the ddpo-pytorch way) and with the batched path
(`timestep_chunk=0`: all trained timesteps of a minibatch in one call). Optimizer steps are left out so both
modes do identical work. Each mode runs in its own child process so its peak RSS is its own; modes alternate
for `--repeats` rounds, and the fastest pass (of three per round) of each counts.

    python benchmarks/throughput.py                       # Shapes default settings
    python benchmarks/throughput.py --set train.batch_size=8
    python benchmarks/throughput.py --chunks 2 5 0        # also sweep train.timestep_chunk

Prints numbers only; the last line is `ratio_batched_vs_loop=X.XX` (loop time / batched time).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def child(config_name: str, overrides: list[str], chunk: int) -> dict:
    import torch

    from ddpo.config import derived_batch_sizes, load_config
    from ddpo.core.losses import ppo_clip_loss
    from ddpo.policy import build_policy
    from ddpo.prompts import build_prompt_source
    from ddpo.utils import generators_for

    config = load_config(config_name, overrides)
    sizes = derived_batch_sizes(config, num_processes=1)
    torch.manual_seed(config.seed)
    policy = build_policy(config)
    source = build_prompt_source(config.prompts.source, config.prompts.file)
    n = sizes["samples_per_epoch"]
    prompts = [source(random.Random(i))[0] for i in range(n)]
    started = time.perf_counter()
    parts = []
    for start in range(0, n, config.sample.batch_size):
        batch = prompts[start : start + config.sample.batch_size]
        parts.append(policy.sample(batch, generators_for(config.seed, "bench", 0, list(range(start, start + len(batch)))), decode=False))
    sample_seconds = time.perf_counter() - started
    from ddpo.policy import Trajectory

    trajectory = Trajectory.concatenate(parts)
    steps_per_sample = sizes["num_train_timesteps"]
    generator = torch.Generator().manual_seed(1)
    steps = torch.stack([torch.randperm(trajectory.num_steps, generator=generator) for _ in range(n)])[:, :steps_per_sample]
    advantages = torch.randn(n, generator=generator)
    width = chunk or steps_per_sample

    def update() -> None:
        for minibatch in torch.arange(n).split(config.train.batch_size):
            part = trajectory.select(minibatch)
            rows = torch.arange(len(part))[:, None]
            for start in range(0, steps_per_sample, width):
                columns = steps[minibatch, start : start + width]
                log_prob = policy.log_prob(part, columns)
                ratio = torch.exp(log_prob - part.log_probs[rows, columns]).reshape(-1)
                loss = ppo_clip_loss(advantages[minibatch].repeat_interleave(columns.shape[1]), ratio, config.train.clip_range)
                (loss * columns.shape[1]).backward()
        policy.unet.zero_grad(set_to_none=True)

    update()  # warm-up
    timings = []
    for _ in range(3):  # the fastest of three passes: this machine's speed drifts by tens of percent
        started = time.perf_counter()
        update()
        timings.append(time.perf_counter() - started)
    train_seconds = min(timings)
    return {
        "samples": n,
        "sample_seconds": sample_seconds,
        "train_seconds": train_seconds,
        "trained_timesteps": n * steps_per_sample,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="shapes/default", help="config file or preset (default: the Shapes default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunks", type=int, nargs="+", default=[0], help="timestep_chunk values of the batched path to time (0 = all trained timesteps in one call); the ratio line uses the first")
    parser.add_argument("--child-chunk", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_chunk is not None:
        print(json.dumps(child(args.config, args.overrides, args.child_chunk)))
        return
    modes = {"loop": 1, **{f"chunk={chunk}": chunk for chunk in args.chunks if chunk != 1}}
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for mode, chunk in modes.items():
            command = [sys.executable, __file__, "--config", args.config, "--child-chunk", str(chunk)]
            for override in args.overrides:
                command += ["--set", override]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[mode].append(json.loads(output.strip().splitlines()[-1]))
    best = {mode: min(runs, key=lambda r: r["train_seconds"]) for mode, runs in results.items()}
    for mode, r in best.items():
        print(
            f"{mode:8s} train {r['train_seconds']:.2f}s for {r['trained_timesteps']} trained timesteps "
            f"({r['trained_timesteps'] / r['train_seconds']:.1f} timesteps/s); sampling {r['samples'] / r['sample_seconds']:.2f} samples/s; "
            f"peak RSS {r['peak_rss_mb']:.0f} MB"
        )  # fmt: skip
    for mode in list(modes)[1:]:
        print(f"{mode:8s} ratio vs loop {best['loop']['train_seconds'] / best[mode]['train_seconds']:.2f}")
    batched = list(modes)[1] if len(modes) > 1 else "loop"
    print(f"ratio_batched_vs_loop={best['loop']['train_seconds'] / best[batched]['train_seconds']:.2f}")


if __name__ == "__main__":
    main()
