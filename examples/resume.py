"""Stop and continue: train some epochs, then resume the same run directory for more.

A resumed run continues bit for bit (the noise, prompts and shuffles of every epoch derive from the seed and the
epoch), so 2 + 2 epochs end where 4 would have. Run: python examples/resume.py [--epochs 4] [--quick]
"""

import ddpo

if __name__ == "__main__":
    from _quick import options

    args, overrides = options(__doc__.splitlines()[0], epochs=4)
    total = overrides.pop("train.epochs")
    first = ddpo.train("shapes/default", out=args.out, **{**overrides, "train.epochs": total // 2, "log.save_every": 1})
    print(f"stopped after epoch {first.metrics[-1]['epoch']}: {first.latest_checkpoint}")
    # Only how long it runs (train.epochs) and how it logs (log.*) may change on resume.
    resumed = ddpo.train(resume=first.path, **{"train.epochs": total})
    print(f"resumed to epoch {resumed.metrics[-1]['epoch']}: reward per epoch {[round(m['reward_mean'], 4) for m in resumed.metrics]}")
