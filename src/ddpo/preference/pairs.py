"""Where pairs to label come from, besides training itself (the `human_choice` reward queues those):

- a run directory: its fixed-seed sample grids (`samples/epoch-NNNN.png`, laid out by `samples/grid.json`),
  whose rows are one prompt each; seeds 0 and 1, 2 and 3, ... of a row make pairs;
- a JSONL file, one pair per line: {"prompt": "...", "image_a": "a.png", "image_b": "b.png"} (paths relative to
  the file), optional "metadata": {...}.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from .store import LabelStoreError

PairSpec = tuple[str, Image.Image, Image.Image]


def pairs_from_run(run_dir: str | Path, epoch: int | None = None) -> tuple[list[PairSpec], list[dict]]:
    """Same-prompt pairs from a run's sample grid of `epoch` (default: the last grid written), with metadata."""
    run = Path(run_dir)
    layout_path = run / "samples" / "grid.json"
    if not layout_path.is_file():
        raise LabelStoreError(f"{run} has no samples/grid.json: not a run directory, or it wrote no sample grid yet")
    layout = json.loads(layout_path.read_text())
    grids = sorted(run.glob("samples/epoch-*.png"))
    if epoch is not None:
        grids = [g for g in grids if g.stem == f"epoch-{epoch:04d}"]
    if not grids:
        raise LabelStoreError(f"{run}: no sample grid" + (f" for epoch {epoch}" if epoch is not None else ""))
    grid_path = grids[-1]
    grid = Image.open(grid_path).convert("RGB")
    width, height, seeds = layout["cell_width"], layout["cell_height"], layout["seeds"]
    pairs, metadata = [], []
    for row, prompt in enumerate(layout["prompts"]):
        cells = [grid.crop((s * width, row * height, (s + 1) * width, (row + 1) * height)) for s in range(seeds)]
        for s in range(0, seeds - 1, 2):
            pairs.append((prompt, cells[s], cells[s + 1]))
            metadata.append({"run": str(run), "grid": grid_path.name, "seeds": [s, s + 1]})
    if not pairs:
        raise LabelStoreError(f"{grid_path}: a grid with {seeds} seed(s) per prompt has no pairs; it needs at least 2")
    return pairs, metadata


def pairs_from_file(path: str | Path) -> tuple[list[PairSpec], list[dict]]:
    """Pairs listed in a JSONL file (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise LabelStoreError(f"no file {path}")
    pairs, metadata = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            prompt, images = record["prompt"], [path.parent / record[key] for key in ("image_a", "image_b")]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise LabelStoreError(f"{path}:{number}: a pair is {{\"prompt\": ..., \"image_a\": ..., \"image_b\": ...}} ({error})") from error
        for image in images:
            if not image.is_file():
                raise LabelStoreError(f"{path}:{number}: image {image} not found")
        pairs.append((str(prompt), Image.open(images[0]).convert("RGB"), Image.open(images[1]).convert("RGB")))
        metadata.append(record.get("metadata", {}))
    return pairs, metadata
