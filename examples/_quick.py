"""Shared by the examples: command-line options and the `--quick` budget the test suite runs them with."""

from __future__ import annotations

import argparse

# Seconds, not minutes, on a laptop CPU: few steps, one small batch, no periodic evaluation. Results at this budget
# show that the code runs, not that the model learns; drop --quick (and raise --epochs) for a real run.
QUICK = {
    "sample.num_steps": 6,
    "sample.batch_size": 4,
    "sample.num_batches_per_epoch": 1,
    "sample.samples_per_prompt": 2,
    "train.batch_size": 4,
    "train.stat_min_count": 2,
    "log.eval_every": 0,
    "log.num_eval_seeds": 1,
    "log.with": [],
}


def options(description: str, epochs: int) -> tuple[argparse.Namespace, dict]:
    """(arguments, config overrides): --out DIR, --epochs N, --quick."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=None, help="run directory (default: runs/<time>)")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--quick", action="store_true", help="a tiny budget (what the test suite runs)")
    args = parser.parse_args()
    overrides = {**(QUICK if args.quick else {}), "train.epochs": args.epochs}
    return args, overrides
