"""Evaluate a run: its checkpoint against the base model on trained and held-out prompts, then look at samples.

Given --run RUN_DIR it evaluates that run; otherwise it trains a short one first.
Run: python examples/evaluate_run.py [--run RUN_DIR] [--quick]
"""

import sys

import ddpo
from ddpo.utils import image_grid

if __name__ == "__main__":
    run_dir = None
    if "--run" in sys.argv:
        k = sys.argv.index("--run")
        run_dir = sys.argv[k + 1]
        del sys.argv[k : k + 2]
    from _quick import options

    args, overrides = options(__doc__.splitlines()[0], epochs=10)
    if run_dir is None:
        run_dir = ddpo.train("shapes/default", out=args.out, **overrides).path
    results = ddpo.evaluate(run_dir, seeds=1 if args.quick else 4, prompts_per_group=2 if args.quick else 0)
    for model, result in results.items():
        groups = {group: {k: v for k, v in values.items() if not k.startswith("num_")} for group, values in result["groups"].items()}
        print(f"{model}: {groups}")
    # The same prompts and seeds from the base model (RL guidance scale 0) and the fine-tuned one (scale 1).
    prompts = ["a green cross", "a cyan cross"]
    base = ddpo.sample(run_dir, prompts, n=2, rl_scale=0.0)
    tuned = ddpo.sample(run_dir, prompts, n=2)
    path = f"{run_dir}/base-vs-tuned.png"
    image_grid(base + tuned, 2 * len(prompts), 2).save(path)
    print(f"samples: {path} (rows: base, then fine-tuned)")
