"""The same DDPO work in ddpo (`ddpo train`, the real CLI) and in TRL 0.23.1's `DDPOTrainer` (the last TRL release
that has it), side by side: per-epoch time, whole-process wall time and peak memory, runs alternating A B A B.

    python benchmarks/peers.py                          # tiny random SD pipeline at 64 px, 5 pairs + 1 warm-up pair
    python benchmarks/peers.py --model shapes --pairs 5 # the shipped Shapes model (its native 32 px)
    python benchmarks/peers.py --chunks 0 1 2 5 20      # ddpo alone, one run per train.timestep_chunk in rotation
    python benchmarks/peers.py --pairs 1 --warmup 0 --epochs 2 --json /tmp/peers.json   # a quick check

TRL runs in a virtual environment of its own, created on first use (`--trl-venv`, default
~/.cache/ddpo-bench/trl-0.23.1): torch==2.13.0 first (so that pip does not pull another build), then trl==0.23.1
with exactly the diffusers, peft, transformers, accelerate and tensorboard versions of the environment running this
script. Never torchvision: TRL 0.23.1 imports it only for AlignProp's aesthetic scorer, which DDPO does not use.

The work, identical on both sides (`WORK` below): DDPO-IS with the clipped objective, 20 DDIM steps at eta 1, CFG 5
when sampling and training, 16 samples per epoch in 2 batches of 8, LoRA rank 4 (alpha 4) on to_q/k/v/out, JPEG
compressibility at quality 95 (ddpo's `jpeg_compressibility`; the TRL driver scores with the same code), every
timestep trained, train batch 8 (one optimizer step per 8 samples), AdamW lr 3e-4, clip range 1e-4, per-prompt
advantage statistics (buffer 16, min count 16), prompts drawn from ddpo's `simple_animals` list, fp32, a checkpoint
every epoch (3 kept), TensorBoard logging on both (ddpo always logs to RUN_DIR/tb). ddpo's own per-epoch work around
the loop (the fixed-seed sample grid, report.html) is left as a user gets it; its periodic evaluation is off
(`log.eval_every=0`) because TRL has none.

Each run is a fresh process. Per run: the median of its per-epoch times (ddpo: `sample_seconds +
reward_wait_seconds + train_seconds` of metrics.jsonl; TRL: its `DDPOTrainer.step` timed by the driver, minus the
`save_state` checkpoint it writes inside the step, so both count sampling, rewards and the update only), the
whole-process wall time, the peak resident memory of the process (`ru_maxrss` from `os.wait4`), and the overhead
(wall time minus the epochs: start-up, grids, checkpoints, reports, shutdown). Printed: the medians over runs and,
per pair, the ratio ddpo/TRL with its min-max; `--json FILE` writes everything.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

TRL_VERSION = "0.23.1"
TORCH_VERSION = "2.13.0"
MATCHED_PACKAGES = ("diffusers", "peft", "transformers", "accelerate", "tensorboard")
DEFAULT_TRL_VENV = Path("~/.cache/ddpo-bench/trl-0.23.1").expanduser()


@dataclass(frozen=True)
class Work:
    """One training run's settings, the same in both tools."""

    num_steps: int = 20
    eta: float = 1.0
    guidance_scale: float = 5.0
    sample_batch_size: int = 8
    sample_batches_per_epoch: int = 2
    train_batch_size: int = 8
    epochs: int = 4
    lr: float = 3e-4
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    max_grad_norm: float = 1.0
    lora_rank: int = 4
    stat_buffer_size: int = 16
    stat_min_count: int = 16
    keep_checkpoints: int = 3
    seed: int = 0


def fail(message: str) -> NoReturn:
    print(f"peers: {message}", file=sys.stderr)
    sys.exit(2)


# ------------------------------------------------------------------------------------------------ the models


def tiny_model(directory: Path, size: int) -> Path:
    """ddpo's tiny random SD pipeline, its UNet's `sample_size` set so that `size` px is the pipeline's default
    (TRL samples at the default: its `_generate_samples` passes no height or width)."""
    from ddpo.policy.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if size < 8 or size % 8:
        fail(f"--size {size} must be a positive multiple of 8")
    pipe.unet.register_to_config(sample_size=size // factor)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def native_size(model_dir: Path) -> int:
    """Pixels of the pipeline's default image: the UNet's sample_size times the VAE's downsampling."""
    unet = json.loads((model_dir / "unet" / "config.json").read_text())
    vae = json.loads((model_dir / "vae" / "config.json").read_text())
    return unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)


def shapes_model() -> Path:
    from ddpo.policy import resolve_model

    try:
        return Path(resolve_model("shapes"))
    except FileNotFoundError as error:
        fail(f"the shipped Shapes model is not installed: {error}")


def animal_prompts() -> list[str]:
    from ddpo.prompts import build_prompt_source

    return list(build_prompt_source("simple_animals").prompts)


# ------------------------------------------------------------------------------------------------ ddpo side


def ddpo_command(model_dir: Path, size: int, work: Work, run_dir: Path, extra: list[str]) -> list[str]:
    """`ddpo train` from the sd_compressibility preset, set to `work`; `extra` overrides come last and win."""
    settings = {
        "seed": work.seed,
        "model.pretrained": json.dumps(str(model_dir)),
        "model.mixed_precision": "no",
        "model.lora_rank": work.lora_rank,
        "model.lora_alpha": float(work.lora_rank),
        "sample.num_steps": work.num_steps,
        "sample.eta": work.eta,
        "sample.guidance_scale": work.guidance_scale,
        "sample.batch_size": work.sample_batch_size,
        "sample.num_batches_per_epoch": work.sample_batches_per_epoch,
        "sample.height": size,
        "sample.width": size,
        "train.algorithm": "ddpo_is",
        "train.epochs": work.epochs,
        "train.lr": work.lr,
        "train.batch_size": work.train_batch_size,
        "train.gradient_accumulation_steps": 1,
        "train.inner_epochs": 1,
        "train.clip_range": work.clip_range,
        "train.adv_clip_max": work.adv_clip_max,
        "train.max_grad_norm": work.max_grad_norm,
        "train.timestep_fraction": 1.0,
        "train.cfg": "true",
        "train.per_prompt_stat_tracking": "true",
        "train.stat_buffer_size": work.stat_buffer_size,
        "train.stat_min_count": work.stat_min_count,
        "reward.name": '"jpeg_compressibility"',
        "prompts.source": '"simple_animals"',
        "log.save_every": 1,
        "log.keep_last": work.keep_checkpoints,
        "log.eval_every": 0,
    }
    ddpo = Path(sys.executable).with_name("ddpo")
    command = [str(ddpo) if ddpo.exists() else "ddpo", "train", "--config", "sd_compressibility", "--no-progress", "--out", str(run_dir)]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    for override in extra:
        command += ["--set", override]
    return command


def ddpo_epochs(run_dir: Path) -> list[float]:
    """Seconds of each epoch's loop work (sampling, waiting for rewards, the update) from metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [r["sample_seconds"] + r.get("reward_wait_seconds", 0.0) + r["train_seconds"] for r in records]


# ------------------------------------------------------------------------------------------------ TRL side

TRL_DRIVER = r'''"""Written by ddpo's benchmarks/peers.py: TRL 0.23.1's DDPOTrainer on the benchmark's work, each step timed."""
import io
import json
import os
import random
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
spec = json.loads(open(sys.argv[1]).read())

import torch
from accelerate import PartialState
from PIL import Image
from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline


def jpeg_compressibility(images, prompts, metadata):
    """ddpo's `jpeg_compressibility`: -(JPEG size in kB at quality 95) of each image, converted to 8-bit as
    diffusers' image processor does for PIL output ((x * 255).round())."""
    pixels = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).convert("RGB").save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return -torch.tensor(sizes, dtype=torch.float32), {}


prompts = spec["prompts"]


def prompt_fn():
    return random.choice(prompts), {}


work, out = spec["work"], spec["out"]
config = DDPOConfig(
    seed=work["seed"], log_with="tensorboard", tracker_project_name="trl",
    project_kwargs={"project_dir": out, "logging_dir": os.path.join(out, "logs"), "automatic_checkpoint_naming": True, "total_limit": work["keep_checkpoints"]},
    num_epochs=work["epochs"], save_freq=1, mixed_precision="no",
    sample_num_steps=work["num_steps"], sample_eta=work["eta"], sample_guidance_scale=work["guidance_scale"],
    sample_batch_size=work["sample_batch_size"], sample_num_batches_per_epoch=work["sample_batches_per_epoch"],
    train_batch_size=work["train_batch_size"], train_gradient_accumulation_steps=1, train_learning_rate=work["lr"],
    train_max_grad_norm=work["max_grad_norm"], train_num_inner_epochs=1, train_cfg=True, train_adv_clip_max=work["adv_clip_max"],
    train_clip_range=work["clip_range"], train_timestep_fraction=1.0, per_prompt_stat_tracking=True,
    per_prompt_stat_tracking_buffer_size=work["stat_buffer_size"], per_prompt_stat_tracking_min_count=work["stat_min_count"],
)
# TRL's pipeline logs a warning through accelerate's logger when the directory has no LoRA weights, which raises
# unless accelerate's state exists: DDPOTrainer creates it only later, so create it first.
PartialState()
pipeline = DefaultDDPOStableDiffusionPipeline(spec["model"], use_lora=True)  # TRL's LoRA: r=4, alpha 4, to_q/k/v/out
trainer = DDPOTrainer(config, jpeg_compressibility, prompt_fn, pipeline)

saves = []
save_state = trainer.accelerator.save_state


def timed_save_state(*args, **kwargs):
    started = time.perf_counter()
    result = save_state(*args, **kwargs)
    saves.append(time.perf_counter() - started)
    return result


trainer.accelerator.save_state = timed_save_state
global_step = 0
with open(spec["timings"], "w") as timings:
    for epoch in range(config.num_epochs):  # DDPOTrainer.train(), one step timed at a time
        before, started = len(saves), time.perf_counter()
        global_step = trainer.step(epoch, global_step)
        step_seconds, checkpoint_seconds = time.perf_counter() - started, sum(saves[before:])
        timings.write(json.dumps({"epoch": epoch + 1, "step_seconds": step_seconds, "checkpoint_seconds": checkpoint_seconds}) + "\n")
        timings.flush()
trainer.accelerator.end_training()
'''


def trl_python(venv: Path) -> Path:
    """The TRL environment's interpreter, created first if missing (see the module docstring)."""
    python = venv / "bin" / "python"
    stamp = venv / ".ddpo-bench-installed"
    wanted = {"torch": TORCH_VERSION, "trl": TRL_VERSION}
    for name in MATCHED_PACKAGES:
        try:
            wanted[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            fail(f"{name} is not installed in this environment ({sys.executable}); the TRL environment copies its version")
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return python
    print(f"peers: creating TRL's environment in {venv} ({', '.join(f'{k}=={v}' for k, v in wanted.items())})", file=sys.stderr)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", f"torch=={TORCH_VERSION}"],
        [str(python), "-m", "pip", "install", "--quiet"] + [f"{name}=={version}" for name, version in wanted.items()],
    ]
    for step in steps:
        if subprocess.run(step).returncode != 0:
            fail(f"creating TRL's environment failed at: {' '.join(step)}")
    check = subprocess.run([str(python), "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('torchvision') is not None)"])
    if check.returncode != 0:
        fail(f"torchvision got installed into {venv}; remove it (this project never installs it)")
    stamp.write_text(json.dumps(wanted))
    return python


# ------------------------------------------------------------------------------------------------ running


@dataclass
class Run:
    """One finished process."""

    tool: str
    label: str
    wall_seconds: float
    peak_rss_mib: float
    epoch_seconds: list[float]
    exit_status: int

    @property
    def median_epoch(self) -> float:
        return statistics.median(self.epoch_seconds) if self.epoch_seconds else float("nan")

    @property
    def overhead_seconds(self) -> float:
        return self.wall_seconds - sum(self.epoch_seconds)


def timed_process(command: list[str], log: Path, env: dict[str, str]) -> tuple[float, float, int]:
    """Run `command` to its end with output to `log`: (wall seconds, peak RSS in MiB, exit status)."""
    with open(log, "w") as out:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 1024, process.returncode  # Linux reports ru_maxrss in KiB


def run_ddpo(label: str, model_dir: Path, size: int, work: Work, scratch: Path, extra: list[str]) -> Run:
    run_dir = scratch / f"ddpo-{label}"
    shutil.rmtree(run_dir, ignore_errors=True)
    log = scratch / f"ddpo-{label}.log"
    wall, peak, status = timed_process(ddpo_command(model_dir, size, work, run_dir, extra), log, dict(os.environ))
    if status != 0:
        fail(f"ddpo run {label} exited with status {status}; its output is in {log}")
    return Run("ddpo", label, wall, peak, ddpo_epochs(run_dir), status)


def run_trl(label: str, python: Path, model_dir: Path, work: Work, prompts: list[str], scratch: Path) -> Run:
    out = scratch / f"trl-{label}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    driver = scratch / "trl_ddpo_driver.py"
    driver.write_text(TRL_DRIVER)
    spec = out / "spec.json"
    timings = out / "timings.jsonl"
    spec.write_text(json.dumps({"model": str(model_dir), "work": asdict(work), "prompts": prompts, "out": str(out), "timings": str(timings)}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # TRL's environment, not ddpo's sources
    log = scratch / f"trl-{label}.log"
    wall, peak, status = timed_process([str(python), str(driver), str(spec)], log, env)
    if status != 0:
        fail(f"TRL run {label} exited with status {status}; its output is in {log}")
    records = [json.loads(line) for line in timings.read_text().splitlines() if line.strip()]
    return Run("trl", label, wall, peak, [r["step_seconds"] - r["checkpoint_seconds"] for r in records], status)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------------------ reporting

FIGURES = (("per-epoch s (median)", "median_epoch"), ("whole process s", "wall_seconds"), ("peak RSS MiB", "peak_rss_mib"), ("overhead s", "overhead_seconds"))


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(groups: dict[str, list[Run]], reference: str) -> dict:
    """Medians over runs of each figure per group, and per round the ratio group / reference (median, min, max)."""
    summary = {}
    for name, runs in groups.items():
        entry = {attr: spread([getattr(r, attr) for r in runs]) for _, attr in FIGURES}
        if name != reference:
            entry["ratio_to_" + reference] = {
                attr: spread([getattr(a, attr) / getattr(b, attr) for a, b in zip(runs, groups[reference])]) for _, attr in FIGURES
            }
        summary[name] = entry
    return summary


def table(summary: dict, reference: str) -> str:
    names = list(summary)
    header = "| figure | " + " | ".join(f"{n} (median)" for n in names) + " | " + " | ".join(f"{n}/{reference} median (min-max)" for n in names if n != reference) + " |"
    lines = [header, "|" + "---|" * (1 + 2 * len(names) - 1)]
    for title, attr in FIGURES:
        cells = [f"{summary[n][attr]['median']:,.2f}" for n in names]
        ratios = [summary[n]["ratio_to_" + reference][attr] for n in names if n != reference]
        cells += [f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})" for r in ratios]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "shapes"], default="tiny", help="tiny random SD pipeline (default) or the shipped Shapes model")
    parser.add_argument("--size", type=int, default=64, help="image side in px of the tiny model (default 64); Shapes runs at its native 32")
    parser.add_argument("--pairs", type=int, default=5, help="counted rounds (default 5): one ddpo and one TRL run each, or one run per --chunks value")
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted (default 1)")
    parser.add_argument("--epochs", type=int, default=Work.epochs, help=f"epochs per run (default {Work.epochs})")
    parser.add_argument("--chunks", type=int, nargs="+", metavar="C", help="ddpo alone: one run per train.timestep_chunk value per round, ratios to the first")
    parser.add_argument("--ddpo-set", action="append", default=[], metavar="KEY=VALUE", help="extra `ddpo train --set` override (repeatable)")
    parser.add_argument("--trl-venv", type=Path, default=DEFAULT_TRL_VENV, help=f"TRL's virtual environment, created if missing (default {DEFAULT_TRL_VENV})")
    parser.add_argument("--work-dir", type=Path, help="where runs and logs go (default: a temporary directory, deleted afterwards)")
    parser.add_argument("--json", type=Path, help="write runs, medians and ratios to this file")
    args = parser.parse_args()
    if args.pairs < 1 or args.warmup < 0 or args.epochs < 1:
        fail("--pairs and --epochs must be >= 1 and --warmup >= 0")
    if args.chunks is not None and any(c < 0 for c in args.chunks):
        fail("--chunks values must be >= 0 (0 = all trained timesteps in one call)")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

    work = Work(epochs=args.epochs)
    scratch = args.work_dir or Path(tempfile.mkdtemp(prefix="ddpo-peers-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        if args.model == "tiny":
            model_dir, size = tiny_model(scratch / "tiny-sd", args.size), args.size
        else:
            model_dir = shapes_model()
            size = native_size(model_dir)
        prompts = animal_prompts()
        python = None if args.chunks else trl_python(args.trl_venv)
        variants = [f"chunk{c}" for c in args.chunks] if args.chunks else ["ddpo", "trl"]
        reference = variants[0] if args.chunks else "trl"

        def one(variant: str, label: str) -> Run:
            if variant == "trl":
                return run_trl(label, python, model_dir, work, prompts, scratch)
            extra = list(args.ddpo_set) + ([f"train.timestep_chunk={variant[len('chunk'):]}"] if args.chunks else [])
            return run_ddpo(f"{variant}-{label}", model_dir, size, work, scratch, extra)

        print(f"peers: model {args.model} ({model_dir}, {size} px), {work.epochs} epochs, {args.warmup} warm-up + {args.pairs} counted rounds of {' '.join(variants)}; load {load_average()}", flush=True)
        load_before = load_average()
        for w in range(args.warmup):
            for variant in variants:
                run = one(variant, f"warmup{w}")
                print(f"  warm-up {variant}: wall {run.wall_seconds:.1f}s", flush=True)
        groups: dict[str, list[Run]] = {v: [] for v in variants}
        for i in range(args.pairs):
            for variant in variants:
                run = one(variant, f"run{i}")
                groups[variant].append(run)
                epochs = " ".join(f"{s:.2f}" for s in run.epoch_seconds)
                print(f"  round {i + 1} {variant}: epochs [{epochs}] s, median {run.median_epoch:.2f} s, wall {run.wall_seconds:.1f} s, peak RSS {run.peak_rss_mib:,.0f} MiB, overhead {run.overhead_seconds:.1f} s", flush=True)
        summary = summarize(groups, reference)
        load_after = load_average()
        print(f"\nload average before {load_before}, after {load_after} ({os.cpu_count()} CPUs)\n")
        print(table(summary, reference))
        if args.json:
            args.json.write_text(json.dumps({
                "model": args.model, "size": size, "work": asdict(work), "ddpo_set": args.ddpo_set, "chunks": args.chunks,
                "versions": {name: importlib.metadata.version(name) for name in ("torch",) + MATCHED_PACKAGES} | {"trl": TRL_VERSION},
                "load_average_before": load_before, "load_average_after": load_after, "cpus": os.cpu_count(),
                "runs": {v: [asdict(r) | {"median_epoch": r.median_epoch, "overhead_seconds": r.overhead_seconds} for r in rs] for v, rs in groups.items()},
                "summary": summary,
            }, indent=1) + "\n")
    finally:
        if args.work_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
