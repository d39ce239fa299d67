"""Training throughput: the per-timestep loop vs the batched log-prob path, on the same work in one run.

The policy and the samples are those of a config (the Shapes default, `ddpo train` with no arguments, unless
`--config` / `--set` say otherwise). One epoch of trajectories is sampled once; then the DDPO-IS update
(recomputed log-probs, clipped loss, backward) runs over the same minibatches and the same timesteps with
`train.timestep_chunk=1` (one UNet call per timestep, the ddpo-pytorch way) and with the batched path
(`timestep_chunk=0`: all trained timesteps of a minibatch in one call). Optimizer steps are left out so both
modes do identical work. Timing: one child process runs the modes' passes interleaved (loop, batched, loop,
batched, ... for `--rounds` rounds, after a warm-up pass of each), and the fastest pass of each mode counts; this
machine's speed drifts by tens of percent from minute to minute, and interleaving lets both modes see the same
drift. Memory: each mode also runs once in a child process of its own, so that its peak RSS is its own.

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
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def setup(config_name: str, overrides: list[str]):
    """The policy, one epoch of sampled trajectories, and `update(chunk)`: the DDPO-IS update over them."""
    import torch

    from ddpo.training.assemble import derived_batch_sizes, load_config
    from ddpo.core.losses import ppo_clip_loss
    from ddpo.policy import Trajectory, build_policy
    from ddpo.prompts import build_prompt_source
    from ddpo.utils import generators_for

    config = load_config(config_name, overrides)
    sizes = derived_batch_sizes(config, num_processes=1)
    torch.manual_seed(config.seed)
    policy = build_policy(config)
    source = build_prompt_source(config.prompts.source, config.prompts.file)
    n = sizes.samples_per_epoch
    prompts = [source(random.Random(i))[0] for i in range(n)]
    started = time.perf_counter()
    parts = []
    for start in range(0, n, config.sample.batch_size):
        batch = prompts[start : start + config.sample.batch_size]
        parts.append(policy.sample(batch, generators_for(config.seed, "bench", 0, list(range(start, start + len(batch)))), decode=False))
    sample_seconds = time.perf_counter() - started
    trajectory = Trajectory.concatenate(parts)
    steps_per_sample = sizes.num_train_timesteps
    generator = torch.Generator().manual_seed(1)
    steps = torch.stack([torch.randperm(trajectory.num_steps, generator=generator) for _ in range(n)])[:, :steps_per_sample]
    advantages = torch.randn(n, generator=generator)

    def update(chunk: int) -> None:
        width = chunk or steps_per_sample
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

    info = {"samples": n, "sample_seconds": sample_seconds, "trained_timesteps": n * steps_per_sample}
    return update, info


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_memory(config_name: str, overrides: list[str], chunk: int) -> dict:
    """Peak RSS of sampling plus one update with this chunk, alone in its process."""
    update, info = setup(config_name, overrides)
    update(chunk)
    return {**info, "peak_rss_mb": peak_rss_mb()}


def child_timing(config_name: str, overrides: list[str], chunks: list[int], rounds: int) -> dict:
    """Seconds per update for each chunk, passes interleaved (loop, batched, loop, batched, ...) in one process,
    so that both modes see the same machine: this machine's speed drifts by tens of percent from minute to
    minute, which separate processes would turn into differences between the modes. Fastest pass counts."""
    update, info = setup(config_name, overrides)
    for chunk in chunks:
        update(chunk)  # warm-up
    seconds: dict[int, list[float]] = {chunk: [] for chunk in chunks}
    for _ in range(rounds):
        for chunk in chunks:
            started = time.perf_counter()
            update(chunk)
            seconds[chunk].append(time.perf_counter() - started)
    return {**info, "seconds": {str(chunk): values for chunk, values in seconds.items()}}


def run_child(args: argparse.Namespace, *extra: str) -> dict:
    command = [sys.executable, __file__, "--config", args.config, *extra]
    for override in args.overrides:
        command += ["--set", override]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="shapes/default", help="config file or preset (default: the Shapes default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (one pass of every mode each)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[0], help="timestep_chunk values of the batched path to time (0 = all trained timesteps in one call); the ratio line uses the first")
    parser.add_argument("--child-memory", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-timing", type=int, nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory is not None:
        print(json.dumps(child_memory(args.config, args.overrides, args.child_memory)))
        return
    if args.child_timing is not None:
        print(json.dumps(child_timing(args.config, args.overrides, args.child_timing, args.rounds)))
        return
    modes = {"loop": 1, **{f"chunk={chunk}": chunk for chunk in args.chunks if chunk != 1}}
    memory = {mode: run_child(args, "--child-memory", str(chunk)) for mode, chunk in modes.items()}
    timing = run_child(args, "--rounds", str(args.rounds), "--child-timing", *map(str, modes.values()))
    best = {mode: min(timing["seconds"][str(chunk)]) for mode, chunk in modes.items()}
    work = timing["trained_timesteps"]
    print(f"{timing['samples']} samples, {work} trained timesteps per update; sampling {timing['samples'] / timing['sample_seconds']:.2f} samples/s")
    for mode, chunk in modes.items():
        median = statistics.median(timing["seconds"][str(chunk)])
        print(
            f"{mode:8s} train {best[mode]:.2f}s (median {median:.2f}s of {args.rounds}) = {work / best[mode]:.1f} trained timesteps/s; "
            f"peak RSS {memory[mode]['peak_rss_mb']:.0f} MB"
        )  # fmt: skip
    for mode in list(modes)[1:]:
        print(f"{mode:8s} ratio vs loop {best['loop'] / best[mode]:.2f}")
    batched = list(modes)[1] if len(modes) > 1 else "loop"
    print(f"ratio_batched_vs_loop={best['loop'] / best[batched]:.2f}")


if __name__ == "__main__":
    main()
