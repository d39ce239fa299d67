"""Labels-to-accuracy: how many labels of a noisy, person-like scripted labeller the preference model needs,
with pairs chosen at random or actively (`ddpo.preference.active`).

Pool: rendered Shapes pairs (`ddpo.shapes.labeller.rendered_pairs`: a caption, two renders of it with count,
colour and shape each redrawn with probability 1/2, as a model's two samples might differ). Labeller:
`PersonLikeLabeller` with a prompt-dependent taste (`ByPromptColour`: fewer objects for warm-colour prompts, more
for the others), 15% of its decided answers flipped, a tie whenever both images have the same count. Accuracy:
pairwise accuracy of the fitted preference model on fresh test pairs (other seeds, never labelled) against the
labeller's taste without the flips, over the decided test pairs.

Both arms start from the same 50 random labels; then rounds of `--round` labels: random draws them uniformly
from the unlabelled pool, active draws `--random-share` of them at random and the rest by posterior margin
variance (Laplace), refitting the model after each round. Writes JSON with every curve and prints a table.

    python benchmarks/labels_to_accuracy.py --seeds 0 1 2 --out docs/labels-to-accuracy.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from ddpo.preference.active import select_pairs
from ddpo.preference.features import ShapesDescriberFeatures
from ddpo.preference.model import TARGETS, BradleyTerryModel, _Data, fit
from ddpo.shapes.labeller import ByPromptColour, PersonLikeLabeller, rendered_pairs

BUDGETS = (50, 100, 150, 200, 250, 300, 400, 500)


def featurise(pairs, extractor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = extractor.images([p.image_a for p in pairs] + [p.image_b for p in pairs])
    return images[: len(pairs)], images[len(pairs) :], extractor.prompts([p.prompt for p in pairs])


def fit_model(features, targets: list[float], *, seed: int, l2: float, steps: int, ties: str) -> BradleyTerryModel:
    torch.manual_seed(seed)
    model = BradleyTerryModel(features[0].shape[1], features[2].shape[1])
    fit(model, _Data(*features, torch.tensor(targets)), steps=steps, lr=1e-2, l2=l2, ties=ties)
    return model.eval()


@torch.no_grad()
def accuracy(model: BradleyTerryModel, features, truth: list[str]) -> float:
    margin = model(features[0], features[2]) - model(features[1], features[2])
    decided = [i for i, t in enumerate(truth) if t != "tie"]
    return float(((margin[decided] > 0) == torch.tensor([truth[i] == "1" for i in decided])).float().mean())


def curve(strategy: str, pool, pool_features, test_features, test_truth, *, seed: int, args) -> dict:
    labeller = PersonLikeLabeller(ByPromptColour(), flip_rate=args.flip_rate, seed=seed)
    rng = random.Random(seed)
    labelled: list[int] = rng.sample(range(len(pool)), BUDGETS[0])
    answers = {i: labeller.choose_scenes(pool[i].scene_a, pool[i].scene_b, pool[i].prompt) for i in labelled}
    points = {}
    while True:
        rows = [i for i in labelled]
        features = tuple(t[rows] for t in pool_features)
        model = fit_model(features, [TARGETS[answers[i]] for i in rows], seed=seed, l2=args.l2, steps=args.steps, ties=args.ties)
        if len(labelled) in BUDGETS:
            points[len(labelled)] = accuracy(model, test_features, test_truth)
        if len(labelled) >= BUDGETS[-1]:
            break
        unlabelled = [i for i in range(len(pool)) if i not in answers]
        candidates = rng.sample(unlabelled, min(args.candidates, len(unlabelled)))
        k = min(args.round, min(b for b in BUDGETS if b > len(labelled)) - len(labelled))
        picks = select_pairs(strategy, k, tuple(t[candidates] for t in pool_features), rng=rng, model=model, labelled=features, l2=args.l2, random_share=args.random_share)
        for index, _ in picks:
            i = candidates[index]
            labelled.append(i)
            answers[i] = labeller.choose_scenes(pool[i].scene_a, pool[i].scene_b, pool[i].prompt)
    ties = sum(answers[i] == "tie" for i in labelled) / len(labelled)
    return {"strategy": strategy, "seed": seed, "accuracy": points, "tie_share": ties}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pool", type=int, default=3000, help="Unlabelled pairs to choose from.")
    parser.add_argument("--test", type=int, default=1000, help="Fresh test pairs.")
    parser.add_argument("--candidates", type=int, default=1500, help="Pool pairs scored per active round (a random subset).")
    parser.add_argument("--round", type=int, default=25, help="Labels asked between refits.")
    parser.add_argument("--flip-rate", type=float, default=0.15)
    parser.add_argument("--random-share", type=float, default=0.2, help="Share of each active round drawn at random (held-out material).")
    parser.add_argument("--l2", type=float, default=3e-2)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--ties", default="half", choices=["half", "davidson"])
    parser.add_argument("--active", default="uncertainty", choices=["uncertainty", "bald"], help="The active strategy compared with random.")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--from-log", type=Path, nargs="+", help="Summarise the per-run JSON lines earlier runs printed on stderr (e.g. to merge seeds run separately) instead of running.")
    args = parser.parse_args(argv)
    if args.from_log:
        results = [json.loads(line) for log in args.from_log for line in log.read_text().splitlines() if line.startswith('{"strategy"')]
        for result in results:
            result["accuracy"] = {int(k): v for k, v in result["accuracy"].items()}
        args.seeds = sorted({r["seed"] for r in results if r["strategy"] == args.active} & {r["seed"] for r in results if r["strategy"] == "random"})
        results = [r for r in results if r["seed"] in args.seeds and r["strategy"] in ("random", args.active)]
        return summarise(results, args, seconds=None)
    torch.set_num_threads(1)
    extractor = ShapesDescriberFeatures()
    results = []
    started = time.perf_counter()
    for seed in args.seeds:
        pool = rendered_pairs(args.pool, seed=1000 + seed)
        test = rendered_pairs(args.test, seed=5000 + seed)
        truth_labeller = PersonLikeLabeller(ByPromptColour())  # no flips: the taste itself
        test_truth = [truth_labeller.choose_scenes(p.scene_a, p.scene_b, p.prompt) for p in test]
        pool_features, test_features = featurise(pool, extractor), featurise(test, extractor)
        for strategy in ("random", args.active):
            result = curve(strategy, pool, pool_features, test_features, test_truth, seed=seed, args=args)
            results.append(result)
            print(json.dumps(result), file=sys.stderr, flush=True)
    return summarise(results, args, seconds=round(time.perf_counter() - started, 1))


def summarise(results: list[dict], args, *, seconds: float | None) -> int:
    table = {}
    for strategy in ("random", args.active):
        rows = [r for r in results if r["strategy"] == strategy]
        table[strategy] = {b: {"median": statistics.median(r["accuracy"][b] for r in rows), "min": min(r["accuracy"][b] for r in rows), "max": max(r["accuracy"][b] for r in rows)} for b in BUDGETS}
    target = table["random"][BUDGETS[-1]]["median"]
    reached = next((b for b in BUDGETS if table[args.active][b]["median"] >= target), None)
    per_seed = {}
    for seed in args.seeds:
        random_at_end = next(r for r in results if r["strategy"] == "random" and r["seed"] == seed)["accuracy"][BUDGETS[-1]]
        active = next(r for r in results if r["strategy"] == args.active and r["seed"] == seed)["accuracy"]
        per_seed[seed] = next((b for b in BUDGETS if active[b] >= random_at_end), None)
    summary = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "from_log")}, "table": table, "random_500_median": target,
               "active_labels_to_reach_it": reached, "per_seed_active_labels_to_reach_random_500": per_seed,
               "seconds": seconds, "runs": results}  # fmt: skip
    print(f"seeds {args.seeds}")
    print("labels  " + "  ".join(f"{s:>22}" for s in table))
    for b in BUDGETS:
        print(f"{b:6d}  " + "  ".join(f"{table[s][b]['median']:.3f} [{table[s][b]['min']:.3f}, {table[s][b]['max']:.3f}]" for s in table))
    print(f"random at {BUDGETS[-1]} labels (median): {target:.3f}; active reaches it at {reached} labels; per seed: {per_seed}")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
