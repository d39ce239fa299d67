"""RL as an alternative to classifier-free guidance: CFG-free fine-tuned models against the base model at every CFG scale.

Reads a finished `ddpo compare` directory, takes the runs of the CFG-free entries named by --labels (each trained and
sampled at CFG 1, e.g. DiffusionNFT and FDFO from their presets), and evaluates with `ddpo sweep`'s machinery
(`ddpo.sweep.run_sweep`: the run's evaluation prompts, trained and unseen, with the same fixed seeds):
- the base model at each CFG scale of --cfg (RL-guidance scale 0), once: every run shares model and evaluation set;
- each run's last checkpoint at CFG 1 (scale 1), every seed.
It prints and writes (--out) a Markdown table and JSON: reward, held-out judge (trained and unseen prompts) and
diversity, each label's mean over seeds with a 95% t-interval, beside the base model's row at every scale and its best
scale by the reward on the trained prompts.

    python benchmarks/cfg_alternatives.py comparisons/flow --labels diffusion_nft,fdfo --cfg 1,2,3,4.5,6 --out docs/results/cfg-alternatives
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ddpo.compare import markdown_interval, mean_interval
from ddpo.sweep import parse_scales, run_sweep
from ddpo.utils import quiet_libraries


def figures(cell: dict, reward: str, judge: str | None) -> dict[str, float]:
    """The numbers the table shows, from one sweep cell's groups."""
    groups = cell["groups"]
    out = {"reward_trained": groups["trained"][reward], "diversity_trained": groups["trained"].get("diversity")}
    if "heldout" in groups:
        out["reward_unseen"] = groups["heldout"][reward]
        out["diversity_unseen"] = groups["heldout"].get("diversity")
    if judge:
        out["judge_trained"] = groups["trained"][judge]
        if "heldout" in groups:
            out["judge_unseen"] = groups["heldout"][judge]
    return {k: v for k, v in out.items() if v is not None}


COLUMNS = [("reward_trained", "reward, trained prompts"), ("reward_unseen", "reward, unseen prompts"), ("judge_trained", "held-out judge, trained"),
           ("judge_unseen", "held-out judge, unseen"), ("diversity_trained", "diversity, trained"), ("diversity_unseen", "diversity, unseen")]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("comparison", type=Path, help="a finished `ddpo compare` directory")
    parser.add_argument("--labels", required=True, help="its CFG-free entries, comma-separated")
    parser.add_argument("--cfg", default="1,2,3,4.5,6", help="the base model's CFG scales")
    parser.add_argument("--out", type=Path, help="folder for cfg_alternatives.json and .md")
    args = parser.parse_args(argv)
    quiet_libraries()
    result = json.loads((args.comparison / "comparison.json").read_text())
    labels = [label for label in args.labels.split(",") if label]
    missing = [label for label in labels if label not in result["algorithms"]]
    if missing:
        print(f"cfg_alternatives: {', '.join(missing)} not in {args.comparison} (its entries: {', '.join(result['algorithms'])})", file=sys.stderr)
        return 2
    runs = {label: [args.comparison / result["runs"][f"{label}-seed{seed}"] for seed in range(result["seeds"])] for label in labels}
    reward, judge = result["reward"], result["heldout_reward"]
    base_sweep = run_sweep(runs[labels[0]][0], parse_scales(args.cfg, "--cfg"), [0.0])
    base = {w: figures(base_sweep.cells[(w, 0.0)], reward, judge) for w in base_sweep.cfg_scales}
    best_cfg = max(base, key=lambda w: base[w]["reward_trained"])
    trained: dict[str, list[dict]] = {}
    for label in labels:
        trained[label] = []
        for run in runs[label]:
            sweep = run_sweep(run, [1.0], [1.0])
            trained[label].append(figures(sweep.cells[(1.0, 1.0)], reward, judge))
            print(f"{run.name}: {trained[label][-1]}", file=sys.stderr)
    shown = [(key, title) for key, title in COLUMNS if key in base[best_cfg]]
    lines = ["| model | sampled at | " + " | ".join(t for _, t in shown) + " |", "|---" * (len(shown) + 2) + "|"]
    for w, row in base.items():
        mark = " (best by reward)" if w == best_cfg else ""
        lines.append(f"| base model | CFG {w:g}{mark} | " + " | ".join(f"{row[k]:.4g}" for k, _ in shown) + " |")
    summary = {}
    for label in labels:
        summary[label] = {k: mean_interval([row[k] for row in trained[label]]) for k, _ in shown}
        cells = [markdown_interval(summary[label][k], ".4g") for k, _ in shown]
        lines.append(f"| {label}, {result['budget']} queries | CFG 1 | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/cfg_alternatives.py " + " ".join(sys.argv[1:]) if argv is None else ""
        payload = {"comparison": str(args.comparison), "command": command, "reward": reward, "judge": judge, "base": {str(w): row for w, row in base.items()},
                   "best_cfg": best_cfg, "trained_at_cfg_1": trained, "summary": summary, "eval_seeds": base_sweep.seeds}  # fmt: skip
        (args.out / "cfg_alternatives.json").write_text(json.dumps(payload, indent=2) + "\n")
        (args.out / "cfg_alternatives.md").write_text(f"`{command}`\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
