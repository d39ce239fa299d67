"""Prompts of your own: a list, or a function drawing one prompt (and its metadata) from a random generator.

The function gets a `random.Random` seeded per sample by the trainer, so a run and its resume draw the same
prompts. Run: python examples/custom_prompts.py [--epochs 20] [--quick]
"""

import random

import ddpo

COLOURS = ["red", "green", "white"]
COUNTS = {"a": 1, "two": 2, "three": 3}


def cross_prompts(rng: random.Random):
    """Crosses in three colours, with the metadata the Shapes rewards read (count, colour, shape)."""
    count_word = rng.choice(list(COUNTS))
    colour = rng.choice(COLOURS)
    shape = "cross" if count_word == "a" else "crosses"
    return f"{count_word} {colour} {shape}", {"count": COUNTS[count_word], "color": colour, "shape": "cross"}


if __name__ == "__main__":
    from _quick import options

    args, overrides = options(__doc__.splitlines()[0], epochs=20)
    # The embedded default's reward (the describer's caption against the prompt), our prompts.
    result = ddpo.train("shapes/default", prompts=cross_prompts, out=args.out, **overrides)
    # A fixed list works too: ddpo.train(..., prompts=["a red cross", "two green crosses"]) (kept in RUN_DIR/prompts.txt).
    print(f"run {result.path}: reward per epoch {[round(m['reward_mean'], 4) for m in result.metrics]}")
