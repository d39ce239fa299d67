"""Online FDFO that never waits for people: the `people_and_model` reward on the Shapes flow twin, while a slow,
noisy scripted labeller (`PersonLikeLabeller`: a response time, 15% flips, ties when the two images' expected
counts are within `--tie-margin`) who prefers fewer objects labels through the app's HTTP API, as a person at
the page would. Training runs in its own process (`ddpo train`), the app and the labeller in this one.

For each seed: `shapes/fdfo_people` (`shapes/fdfo_human` with reward `people_and_model`) for `--epochs` epochs with reward `people_and_model` (the preference model,
refitted every `--refit-seconds` on the labels so far, gives every pair's choice; people's choices replace it
where they arrived in time). Measured: seconds per epoch and the reward's wait (training speed), labels per
epoch, label latency, the share of the reward from people, and the judge's mean object count on the 13
open-count prompts x 8 fixed seeds against the base model's on the same seeds.
`--no-labeller-seed S` adds one run with nobody labelling (the speed without people).

    python benchmarks/online_people.py --seeds 0 1 2 --out docs/online-people.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ddpo.preference.store import LabelStore
from ddpo.server.label_app import ServedInThread
from ddpo.shapes.labeller import FewerObjects, PersonLikeLabeller, label_over_http

TRAIN = [sys.executable, "-c", "import sys; from ddpo.cli import main; sys.exit(main())", "train"]


def judge_counts(checkpoint: Path | None, seeds: int = 8) -> np.ndarray:
    """The judge's expected object count of deterministic ODE samples, prompt x seed (as tests/test_online_fdfo.py)."""
    import torch

    from ddpo.policy import SamplingOptions, load_pipeline, resolve_model, sampling_policy
    from ddpo.prompts import build_prompt_source
    from ddpo.training.run_directory import load_checkpoint_into

    prompts = build_prompt_source("shapes_open_count").prompts
    pipe = load_pipeline(resolve_model("shapes-flow"))
    if checkpoint is not None:
        load_checkpoint_into(pipe, checkpoint)
    policy = sampling_policy(pipe, SamplingOptions(num_steps=20, guidance_scale=1.0, height=32, width=32))
    cells = [(prompt, seed) for seed in range(seeds) for prompt in prompts]
    with torch.no_grad():
        images = policy.sample([p for p, _ in cells], [torch.Generator().manual_seed(70_000 + 100 * s + i) for i, (_, s) in enumerate(cells)]).images
    return -FewerObjects().image_utilities(images)


def run(seed: int, workdir: Path, args, *, labeller: bool) -> dict:
    store_path = workdir / "labels.db"
    token = LabelStore(store_path).add_labeller("slow")
    run_dir = workdir / "run"
    kwargs = f'{{ store = "{store_path}", refit_seconds = {args.refit_seconds}, ask = "{args.ask}", model_choice = "{args.model_choice}" }}'
    command = TRAIN + [
        "--config", "shapes/fdfo_people", "--out", str(run_dir), "--no-progress", "--set", f"seed={seed}",
        "--set", f"reward.kwargs={kwargs}",
        "--set", f"train.epochs={args.epochs}", "--set", f"log.save_every={args.epochs}",
    ]  # fmt: skip
    stop = threading.Event()
    person = PersonLikeLabeller(FewerObjects(), flip_rate=args.flip_rate, tie_margin=args.tie_margin, response_seconds=args.response_seconds, seed=seed)
    given: list[int] = []
    with ServedInThread(store_path) as server:
        thread = threading.Thread(target=lambda: given.append(label_over_http(server.url, token, person, stop)), daemon=True)
        if labeller:
            thread.start()
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - started
        stop.set()
        if labeller:
            thread.join(timeout=60)
    if result.returncode != 0:
        raise SystemExit(f"seed {seed}: ddpo train failed:\n{result.stderr[-3000:]}")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    labels = LabelStore(store_path).labels()
    choices = [label.choice for label in labels]
    return {
        "seed": seed, "labeller": labeller, "wall_seconds": round(wall, 1), "labels": len(labels),
        "tie_share": choices.count("tie") / len(choices) if choices else None,
        "epoch_seconds": [round(m["sample_seconds"] + m["train_seconds"] + m["reward_wait_seconds"], 2) for m in metrics],
        "reward_wait_seconds": [round(m["reward_wait_seconds"], 3) for m in metrics],  # the trainer's wait for the reward
        "reward_call_seconds": [m.get("reward_call_seconds") for m in metrics],  # the reward call's duration
        "labels_per_epoch": [m.get("reward_labels_new") for m in metrics],
        "label_latency_seconds": [m.get("reward_label_latency_seconds") for m in metrics],
        "people_share": [m.get("reward_people_share") for m in metrics],
        "model_labels": [m.get("reward_model_labels") for m in metrics],
        "checkpoint": str(run_dir / "checkpoints" / f"epoch-{args.epochs:04d}"),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--response-seconds", type=float, default=1.0, help="The labeller's mean time per label.")
    parser.add_argument("--flip-rate", type=float, default=0.15)
    parser.add_argument("--tie-margin", type=float, default=0.05, help="A tie when the expected counts differ by at most this.")
    parser.add_argument("--refit-seconds", type=float, default=5.0)
    parser.add_argument("--ask", default="cross", choices=["fdfo", "cross"])
    parser.add_argument("--model-choice", default="sign", choices=["sign", "probability"])
    parser.add_argument("--no-labeller-seed", type=int, help="Also one run with nobody labelling (speed without people).")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    base = judge_counts(None)
    runs = []
    plan = [(seed, True) for seed in args.seeds] + ([(args.no_labeller_seed, False)] if args.no_labeller_seed is not None else [])
    with tempfile.TemporaryDirectory() as scratch:
        for seed, labeller in plan:
            workdir = Path(scratch) / f"seed-{seed}-{'people' if labeller else 'nobody'}"
            workdir.mkdir()
            record = run(seed, workdir, args, labeller=labeller)
            difference = judge_counts(Path(record.pop("checkpoint"))) - base
            record["judge_count_change"] = round(float(difference.mean()), 4)
            record["judge_count_change_stderr"] = round(float(difference.std(ddof=1) / np.sqrt(len(difference))), 4)
            runs.append(record)
            print(json.dumps(record), file=sys.stderr, flush=True)
    people = [r for r in runs if r["labeller"]]
    changes = [r["judge_count_change"] for r in people]
    summary = {
        "args": {k: v for k, v in vars(args).items() if k != "out"}, "base_judge_count": round(float(base.mean()), 4),
        "judge_count_change_mean": round(statistics.mean(changes), 4),
        "judge_count_change_seed_std": round(statistics.stdev(changes), 4) if len(changes) > 1 else None,
        "median_epoch_seconds": statistics.median(s for r in people for s in r["epoch_seconds"]),
        "median_reward_wait_seconds": statistics.median(s for r in people for s in r["reward_wait_seconds"]),
        "runs": runs,
    }  # fmt: skip
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
