"""A reward of your own: a plain Python function of (images, prompts, metadata) returning one score per image.

Here: how much of each image is the colour its prompt names (the Shapes world draws "a red cross" etc.), a
hand-written proxy for prompt alignment. Run: python examples/custom_reward.py [--epochs 20] [--quick]
"""

import numpy as np

import ddpo
from ddpo.shapes.render import COLORS


def colour_coverage(images, prompts, metadata):
    """Fraction of pixels within a distance of 60 (RGB) of the prompt's colour."""
    scores = []
    for image, prompt in zip(images, prompts):
        colour = next((rgb for name, rgb in COLORS.items() if name in prompt.split()), None)
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        if colour is None:
            scores.append(0.0)
            continue
        distance = np.linalg.norm(pixels - np.array(colour, dtype=np.float32), axis=-1)
        scores.append(float((distance < 60).mean()))
    return scores


if __name__ == "__main__":
    from _quick import options

    args, overrides = options(__doc__.splitlines()[0], epochs=20)
    result = ddpo.train("shapes/default", reward=colour_coverage, out=args.out, **overrides)
    rewards = [round(m["reward_mean"], 4) for m in result.metrics]
    print(f"run {result.path}: colour coverage per epoch {rewards}")
