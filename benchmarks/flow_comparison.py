"""DDPO-IS vs Flow-GRPO vs FDFO on the Shapes alignment task at an equal reward-query budget, and FDFO's
CFG-free samples vs the base flow model at its best CFG scale (issue 6, "Must show").

Part 1 trains, for each seed, DDPO-IS on the Shapes DDIM model (preset shapes/default), Flow-GRPO and FDFO on its
flow twin (shapes/flow_grpo, shapes/fdfo): 32 reward queries (images) per epoch each, the same epochs, the same
run seeds. Each run's periodic evaluation (`log.eval_every`, RUN_DIR/monitor.jsonl: fixed prompts x fixed seeds,
the trained and the held-out unusual prompts) gives the training reward and the judge's exact match at each
reward-query count; the table is their mean (+- std over seeds). The DDIM model is evaluated with its stochastic
DDIM sampler (as it trains), the flow twin with its deterministic ODE: each method's own sampler.

Part 2 samples the evaluation prompts (trained and held-out halves) x `--cfg-seeds` fixed seeds with the ODE, from
the base flow twin at each scale of `--cfg-scales` and from the final FDFO checkpoint of each seed without CFG
(scale 1), and reports the judge's exact match and a diversity measure: the mean pairwise distance between the
judge's features (its penultimate layer) of one prompt's images across seeds, averaged over prompts.

    python benchmarks/flow_comparison.py --out runs/flow-comparison            # everything, then the tables
    python benchmarks/flow_comparison.py --out runs/flow-comparison --report   # tables from finished runs only

Runs that exist are resumed (or skipped when finished), so the command can be re-run after an interruption.
Writes OUT/flow-comparison.json and, with --docs DIR (default docs/), DIR/flow-comparison.md and
DIR/flow-comparison.svg. Every python child runs with OMP_NUM_THREADS=--threads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

METHODS = {  # name -> (preset, model key it trains)
    "ddpo_is": ("shapes/default", "ddim"),
    "flow_grpo": ("shapes/flow_grpo", "flow"),
    "fdfo": ("shapes/fdfo", "flow"),
}
METRICS = {  # monitor.jsonl key -> label
    "train_reward_on_trained": "reward (trained prompts)",
    "heldout_score_on_trained": "judge exact (trained prompts)",
    "heldout_score_on_heldout": "judge exact (held-out prompts)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Directory of the runs and of flow-comparison.json.")
    parser.add_argument("--docs", default="docs", help="Where flow-comparison.md/.svg go ('' to skip).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Run seeds, the same for every method.")
    parser.add_argument("--epochs", type=int, default=40, help="Epochs per run (32 reward queries each).")
    parser.add_argument("--eval-every", type=int, default=10, help="Epochs between evaluations (log.eval_every).")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--ddim-model", default="shapes", help="model.pretrained of DDPO-IS (default: the shipped Shapes model).")
    parser.add_argument("--flow-model", default="shapes-flow", help="model.pretrained of Flow-GRPO and FDFO (default: the shipped flow twin).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="Extra override for every run.")
    parser.add_argument("--cfg-scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0, 6.0], help="CFG scales of the base flow model.")
    parser.add_argument("--cfg-seeds", type=int, default=8, help="Seeds per prompt in the CFG-free comparison.")
    parser.add_argument("--cfg-prompts", type=int, default=16, help="Prompts per group (trained, held-out) in the CFG-free comparison; 0 = all.")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every child process.")
    parser.add_argument("--report", action="store_true", help="Only read finished runs and print the tables.")
    parser.add_argument("--skip-cfg", action="store_true", help="Leave out part 2.")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------ part 1: runs


def run_dir(args: argparse.Namespace, method: str, seed: int) -> Path:
    return args.out / f"{method}-seed{seed}"


def finished_epochs(directory: Path) -> int:
    path = directory / "metrics.jsonl"
    if not path.is_file():
        return 0
    return max((json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip()), default=0)


def train(args: argparse.Namespace, method: str, seed: int) -> None:
    """Train (or resume) one run; skipped when it already has `--epochs` epochs."""
    directory = run_dir(args, method, seed)
    if finished_epochs(directory) >= args.epochs:
        return
    preset, model = METHODS[method]
    pretrained = args.ddim_model if model == "ddim" else args.flow_model
    if (directory / "checkpoints").is_dir():
        command = ["train", "--resume", str(directory), "--set", f"train.epochs={args.epochs}", "--no-progress"]
    else:
        overrides = [f"seed={seed}", f"train.epochs={args.epochs}", f"log.eval_every={args.eval_every}", f'model.pretrained="{pretrained}"', *args.overrides]
        command = ["train", "--config", preset, "--out", str(directory), "--no-progress"] + [x for o in overrides for x in ("--set", o)]
    print(f"[{method} seed {seed}] ddpo {' '.join(command)}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    subprocess.run([sys.executable, "-m", "ddpo.cli", *command], check=True, env=env)


def curves(args: argparse.Namespace) -> dict:
    """{method: {metric: {samples: [value per seed]}}} from the runs' monitor.jsonl."""
    result: dict = {}
    for method in args.methods:
        for seed in args.seeds:
            path = run_dir(args, method, seed) / "monitor.jsonl"
            if not path.is_file():
                continue
            for line in path.read_text().splitlines():
                record = json.loads(line)
                for metric in METRICS:
                    if metric in record:
                        result.setdefault(method, {}).setdefault(metric, {}).setdefault(record["samples"], []).append(record[metric])
    return result


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def queries_to_reach(series: dict[int, list[float]], level: float) -> int | None:
    """The first reward-query count at which the seed-mean curve reaches `level` (None if it never does)."""
    for samples in sorted(series):
        if mean_std(series[samples])[0] >= level:
            return samples
    return None


def curve_tables(data: dict, methods: list[str]) -> str:
    lines = []
    for metric, label in METRICS.items():
        present = [m for m in methods if metric in data.get(m, {})]
        if not present:
            continue
        lines += [f"### {label}", "", "| reward queries | " + " | ".join(present) + " |", "|---:|" + "---:|" * len(present)]
        for samples in sorted({s for m in present for s in data[m][metric]}):
            cells = []
            for m in present:
                values = data[m][metric].get(samples)
                cells.append("" if not values else "%.3f ± %.3f (n=%d)" % (*mean_std(values), len(values)))
            lines.append(f"| {samples} | " + " | ".join(cells) + " |")
        # Queries each method needs to reach fractions of the way from the common start to the best final mean.
        starts = [mean_std(data[m][metric][min(data[m][metric])])[0] for m in present]
        finals = [mean_std(data[m][metric][max(data[m][metric])])[0] for m in present]
        start, best = min(starts), max(finals)
        if best > start:
            lines += ["", "| level (from start to best final) | " + " | ".join(present) + " |", "|---|" + "---:|" * len(present)]
            for fraction in (0.25, 0.5, 0.75, 1.0):
                level = start + fraction * (best - start)
                cells = [str(queries_to_reach(data[m][metric], level) or "not reached") for m in present]
                lines.append(f"| {fraction:.0%}: {level:.3f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def svg_figure(data: dict, methods: list[str]) -> str:
    """Two charts side by side (reward, judge exact on trained prompts vs reward queries), standalone SVG."""
    from ddpo.charts import Chart, Series, render_chart

    charts = []
    for metric in ("train_reward_on_trained", "heldout_score_on_trained"):
        series = []
        for m in methods:
            points = data.get(m, {}).get(metric, {})
            xs = sorted(points)
            stats = [mean_std(points[x]) for x in xs]
            series.append(Series(m, [float(x) for x in xs], [s[0] for s in stats], band=([s[0] - s[1] for s in stats], [s[0] + s[1] for s in stats])))
        charts.append(render_chart(Chart(METRICS[metric] + " (mean ± std over seeds)", "reward queries (images scored)", series)))
    style = (
        "<style>.frame{fill:none;stroke:#888}.grid{stroke:#e4e4e4}.tick,.axis,.legend,.note{font:11px sans-serif;fill:#333}"
        ".title{font:bold 12px sans-serif;fill:#111}.marker{stroke:#999;stroke-dasharray:3 3}</style>"
    )
    width, height = 440, 250
    inner = "".join(f'<g transform="translate({i * width},0)">{chart}</g>' for i, chart in enumerate(charts))
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * len(charts)}" height="{height}" viewBox="0 0 {width * len(charts)} {height}">{style}{inner}</svg>\n'


# ------------------------------------------------------------------------------------------------ part 2: CFG-free


def cfg_comparison(args: argparse.Namespace) -> dict:
    """Judge exact match and judge-feature diversity: base flow twin at each CFG scale vs FDFO without CFG."""
    import itertools

    import torch

    from ddpo.training.assemble import load_config
    from ddpo.training.evaluate import eval_generator, eval_prompts_of
    from ddpo.policy import SamplingOptions, load_pipeline, resolve_model, sampling_policy
    from ddpo.training.run_directory import load_checkpoint_into, resolve_adapter_dir
    from ddpo.shapes import WEIGHTS_DIR
    from ddpo.shapes.evaluation import exact_match
    from ddpo.shapes.recognizers import images_to_tensor, load_recognizer

    torch.set_num_threads(args.threads)
    config = load_config("shapes/fdfo", overrides=[f'model.pretrained="{args.flow_model}"'])
    prompts = eval_prompts_of(config, limit=args.cfg_prompts)
    judge = load_recognizer(WEIGHTS_DIR / "judge.safetensors", "judge").eval()

    def measure(pipe, scale: float) -> dict:
        policy = sampling_policy(pipe, SamplingOptions(num_steps=config.sample.eval_num_steps or config.sample.num_steps, guidance_scale=scale, height=32, width=32))
        result = {}
        for group in ("trained", "heldout"):
            group_prompts = prompts.of_group(group)
            if not group_prompts:
                continue
            cells = [(p, s) for p in group_prompts for s in range(args.cfg_seeds)]
            images = []
            for start in range(0, len(cells), 32):
                chunk = cells[start : start + 32]
                images += policy.sample([p for p, _ in chunk], [eval_generator(p, s) for p, s in chunk]).images
            exact = exact_match(judge, images, [p for p, _ in cells])
            with torch.no_grad():
                features = judge.features(images_to_tensor(images)).reshape(len(group_prompts), args.cfg_seeds, -1)
            first, second = (list(index) for index in zip(*itertools.combinations(range(args.cfg_seeds), 2)))
            distances = [torch.cdist(f, f)[first, second].mean().item() for f in features]
            result[group] = {"judge_exact": round(float(exact.mean()), 4), "feature_diversity": round(sum(distances) / len(distances), 4)}
        return result

    base = load_pipeline(resolve_model(args.flow_model))
    table = {"base": {str(scale): measure(base, scale) for scale in args.cfg_scales}}
    for seed in args.seeds:
        directory = run_dir(args, "fdfo", seed)
        if not (directory / "checkpoints").is_dir():
            continue
        pipe = load_pipeline(resolve_model(args.flow_model))
        load_checkpoint_into(pipe, resolve_adapter_dir(str(directory), "latest"))
        table[f"fdfo-seed{seed}"] = {"1.0": measure(pipe, 1.0)}
    return table


def cfg_table(table: dict) -> str:
    best = max(table["base"], key=lambda scale: table["base"][scale]["trained"]["judge_exact"])
    lines = [
        f"Base flow twin: best CFG scale by judge exact match on the trained prompts = {best}.", "",
        "| model | CFG scale | judge exact (trained) | judge exact (held-out) | feature diversity (trained) | feature diversity (held-out) |",
        "|---|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for name, scales in table.items():
        for scale, groups in scales.items():
            mark = " (best)" if name == "base" and scale == best else ""
            t, h = groups.get("trained", {}), groups.get("heldout", {})
            lines.append(f"| {name}{mark} | {scale} | {t.get('judge_exact', '')} | {h.get('judge_exact', '')} | {t.get('feature_diversity', '')} | {h.get('feature_diversity', '')} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.cfg_seeds < 2:
        raise SystemExit("--cfg-seeds must be at least 2: diversity compares a prompt's images across seeds")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        for seed in args.seeds:
            for method in args.methods:
                train(args, method, seed)
    data = curves(args)
    results = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "curves": data}
    text = "## Reward and judge exact match vs reward queries (32 per epoch, all methods)\n\n" + curve_tables(data, args.methods)
    if not args.skip_cfg and "fdfo" in args.methods:
        results["cfg"] = cfg_comparison(args)
        text += "\n## FDFO without CFG vs the base flow twin with CFG (ODE sampling, judge features)\n\n" + cfg_table(results["cfg"])
    (args.out / "flow-comparison.json").write_text(json.dumps(results, indent=2) + "\n")
    print(text)
    if args.docs:
        args.docs = Path(args.docs)
        args.docs.mkdir(parents=True, exist_ok=True)
        (args.docs / "flow-comparison.md").write_text("# DDPO-IS vs Flow-GRPO vs FDFO on the Shapes alignment task\n\n"
                                                      f"Generated by `python benchmarks/flow_comparison.py {' '.join(argv or sys.argv[1:])}`.\n\n" + text)  # fmt: skip
        (args.docs / "flow-comparison.svg").write_text(svg_figure(data, args.methods))
        print(f"wrote {args.docs / 'flow-comparison.md'} and {args.docs / 'flow-comparison.svg'}")


if __name__ == "__main__":
    main()
