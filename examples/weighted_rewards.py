"""A weighted sum of rewards: prompt alignment plus a little JPEG compressibility (simpler images).

Each term is a registered reward name (or "package.module:function"); metrics.jsonl records every term's mean
beside the total. Run: python examples/weighted_rewards.py [--epochs 20] [--quick]
"""

import ddpo

TERMS = [
    {"name": "shapes_alignment_soft", "weight": 1.0},
    {"name": "jpeg_compressibility", "weight": 0.05},
]

if __name__ == "__main__":
    from _quick import options

    args, overrides = options(__doc__.splitlines()[0], epochs=20)
    result = ddpo.train("shapes/default", out=args.out, **{"reward.terms": TERMS, **overrides})
    last = result.metrics[-1]
    terms = {key: round(value, 4) for key, value in last.items() if key.startswith("reward_") and key not in ("reward_mean", "reward_std", "reward_wait_seconds")}
    print(f"run {result.path}: total {last['reward_mean']:.4f}, terms {terms}")
