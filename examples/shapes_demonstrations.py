"""Demonstrations for `ddpo sft`: renders of Shapes scenes with their captions, in the imagefolder convention
(DATA/0000.png ... + DATA/metadata.jsonl with {"file_name", "text"} per line).

By default the held-out unusual pairs (orange and cyan crosses, one to three of them), 50 renders per caption.
Run: python examples/shapes_demonstrations.py DATA [--per-caption 50] [--source shapes_unusual_heldout] [--seed 0]
"""

import argparse
import json
from pathlib import Path

from ddpo.prompts import build_prompt_source
from ddpo.shapes.render import parse_caption, render_batch

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--per-caption", type=int, default=50)
    parser.add_argument("--source", default="shapes_unusual_heldout", help="a Shapes prompt source: whose captions to render")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    captions = [c for c in build_prompt_source(args.source).prompts for _ in range(args.per_caption)]
    images = render_batch([parse_caption(c) for c in captions], seed=args.seed)
    with (data / "metadata.jsonl").open("w") as metadata:
        for k, (caption, image) in enumerate(zip(captions, images)):
            image.save(data / f"{k:04d}.png")
            metadata.write(json.dumps({"file_name": f"{k:04d}.png", "text": caption}) + "\n")
    print(f"{len(captions)} demonstrations of {len(set(captions))} captions in {data}")
