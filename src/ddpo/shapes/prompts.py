"""Prompt sources of the Shapes world, registered by name (`prompts.source`).

- `shapes_unusual_train`: the 9 captions (3 counts x 3 pairs: red, green and white crosses) of the unusual
  pairs RL trains on, the miniature of the paper's "animals doing human activities".
- `shapes_unusual_heldout`: the 6 captions of the held-out unusual pairs (orange and cyan crosses), never seen
  by RL (for evaluation).
- `shapes_common`: the 27 captions of the common pairs (9 pairs x 3 counts).
- `shapes_all`: all 108 captions: common, unusual train, unusual held-out, then the other unusual pairs.
- `shapes_open_count`: 13 prompts that leave the count to the model: the 9 common pairs in the plural
  without a count ("red circles"), then the 4 shapes alone ("circles"). The base model draws one, two or
  three objects for them, so a labeller's taste for fewer objects has room to act (people-in-the-loop tests).

Metadata of each prompt: `count` (1-3), `color`, `shape` and `group` ("common", "unusual_train",
"unusual_heldout" (the names `ddpo.shapes.evaluation` reports under) or "unusual_other"); the open-count
prompts have no `count`, and group "open_count".
"""

from __future__ import annotations

from ddpo.prompts import ListPromptSource, register_prompt_source

JUDGE = "shapes_judge"  # the held-out scorer of every Shapes source: no algorithm trains on it (ddpo.shapes.rewards)

from .render import COMMON, COUNTS, PLURALS, SHAPES, UNUSUAL, UNUSUAL_HELDOUT, UNUSUAL_TRAIN, caption

GROUPS: dict[str, tuple[tuple[str, str], ...]] = {
    "common": COMMON,
    "unusual_train": UNUSUAL_TRAIN,
    "unusual_heldout": UNUSUAL_HELDOUT,
    "unusual_other": tuple(pair for pair in UNUSUAL if pair not in UNUSUAL_TRAIN + UNUSUAL_HELDOUT),
}
"""Colour-shape pairs of each prompt group."""


def shapes_source(*groups: str) -> ListPromptSource:
    """Every caption of the given groups, in the order of `render.prompts_for`, with its metadata."""
    prompts: list[str] = []
    metadata: list[dict] = []
    for group in groups:
        for color, shape in GROUPS[group]:
            for count in COUNTS:
                prompts.append(caption(count, color, shape))
                metadata.append({"count": count, "color": color, "shape": shape, "group": group})
    return ListPromptSource(prompts, metadata)


@register_prompt_source("shapes_unusual_train", heldout_source="shapes_unusual_heldout", heldout_reward=JUDGE)
def shapes_unusual_train() -> ListPromptSource:
    """The 9 captions of the unusual pairs RL trains on, e.g. "two red crosses"."""
    return shapes_source("unusual_train")


@register_prompt_source("shapes_unusual_heldout", heldout_reward=JUDGE)
def shapes_unusual_heldout() -> ListPromptSource:
    """The 6 captions of the held-out unusual pairs, e.g. "a cyan cross"."""
    return shapes_source("unusual_heldout")


@register_prompt_source("shapes_common", heldout_reward=JUDGE)
def shapes_common() -> ListPromptSource:
    """The 27 captions of the common pairs, e.g. "three blue triangles"."""
    return shapes_source("common")


@register_prompt_source("shapes_all", heldout_reward=JUDGE)
def shapes_all() -> ListPromptSource:
    """All 108 captions of the Shapes world."""
    return shapes_source("common", "unusual_train", "unusual_heldout", "unusual_other")


@register_prompt_source("shapes_open_count", heldout_reward=JUDGE)
def shapes_open_count() -> ListPromptSource:
    """Prompts without a count, e.g. "red circles" and "circles": how many objects is left to the model."""
    prompts = [f"{color} {PLURALS[shape]}" for color, shape in COMMON] + [PLURALS[shape] for shape in SHAPES]
    metadata = [{"color": color, "shape": shape, "group": "open_count"} for color, shape in COMMON] + [{"shape": shape, "group": "open_count"} for shape in SHAPES]
    return ListPromptSource(prompts, metadata)
