"""How far each labeller can be trusted: agreement with the other labellers' majority and with a preference model.

- Majority: on each pair a labeller answered "1" or "2", the majority of the *other* labellers' 1s and 2s (a
  leave-one-out `vote`; split votes and pairs nobody else decided are not
  compared). A labeller who is counted in their own majority would agree with it more than they deserve.
- Model: on each pair a labeller decided, whether the preference model scores their chosen image higher.

Ties are counted per labeller (`tie_share`) and left out of both agreements: a tie agrees with nothing and
contradicts nothing. A labeller is flagged `at_chance` when at least `min_compared` of their answers were
compared and the 95% Wilson interval of their agreement reaches down to 1/2 (what a coin gets): with 40
comparisons that flags agreement below about 0.65.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from .store import Label

MIN_COMPARED = 20
CHANCE = 0.5


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson (1927) score interval of a binomial proportion: (centre -+ half-width) / (1 + z^2/n), with centre
    p + z^2/(2n) and half-width z sqrt(p(1-p)/n + z^2/(4n^2)). (0, 1) with no trials."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = p + z * z / (2 * trials)
    half_width = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return (centre - half_width) / denominator, (centre + half_width) / denominator


@dataclass(frozen=True)
class LabellerAgreement:
    labeller: str
    labels: int
    """Current labels (skips included)."""
    tie_share: float
    majority_compared: int
    majority_agreement: float | None
    model_compared: int
    model_agreement: float | None
    at_chance: bool
    """Enough answers compared and agreement not clearly above 1/2 (module docstring)."""
    judged_against: str | None
    """What `at_chance` was decided on: "majority" (when at least `min_compared` answers met one), else "model";
    None with too few comparisons of either kind."""

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def vote(choices: Sequence[str]) -> int:
    """+1 when more labellers chose the first image than the second, -1 for the reverse, 0 otherwise (ties,
    skips, no labels, or a split vote)."""
    balance = list(choices).count("1") - list(choices).count("2")
    return (balance > 0) - (balance < 0)


def labeller_agreement(labels: Sequence[Label], model_prefers_first: Mapping[str, float] | None = None, *, min_compared: int = MIN_COMPARED) -> list[LabellerAgreement]:
    """Per labeller, in name order. `model_prefers_first` maps a pair id to the model's margin s_a - s_b (pairs
    not in it are not compared with the model)."""
    by_pair: dict[str, list[Label]] = defaultdict(list)
    for label in labels:
        by_pair[label.pair].append(label)
    result = []
    for name in sorted({label.labeller for label in labels}):
        own = [label for label in labels if label.labeller == name]
        agree_majority = compared_majority = agree_model = compared_model = 0
        for label in own:
            if label.choice not in ("1", "2"):
                continue
            mine = 1 if label.choice == "1" else -1
            others = vote([other.choice for other in by_pair[label.pair] if other.labeller != name])
            if others:
                compared_majority += 1
                agree_majority += others == mine
            margin = None if model_prefers_first is None else model_prefers_first.get(label.pair)
            if margin is not None and margin != 0:
                compared_model += 1
                agree_model += (margin > 0) == (mine > 0)
        majority = agree_majority / compared_majority if compared_majority else None
        model = agree_model / compared_model if compared_model else None
        # Flag on the majority where there is one to compare with, else on the model.
        if compared_majority >= min_compared:
            judged_against, successes, trials = "majority", agree_majority, compared_majority
        elif compared_model >= min_compared:
            judged_against, successes, trials = "model", agree_model, compared_model
        else:
            judged_against, successes, trials = None, 0, 0
        at_chance = judged_against is not None and wilson_interval(successes, trials)[0] <= CHANCE
        ties = sum(label.choice == "tie" for label in own)
        answered = sum(label.choice != "skip" for label in own)
        result.append(LabellerAgreement(name, len(own), ties / answered if answered else 0.0, compared_majority, majority, compared_model, model, at_chance, judged_against))
    return result


def model_margins(store, model_path: str) -> dict[str, float]:
    """The preference model at `model_path`'s margin s_a - s_b on every labelled pair of `store`."""
    import torch

    from .model import PreferenceModel
    from .store import decode_png

    model = PreferenceModel(model_path)
    pairs = sorted({label.pair for label in store.labels()})
    margins: dict[str, float] = {}
    for start in range(0, len(pairs), 256):
        chunk = [store.pair(identifier) for identifier in pairs[start : start + 256]]
        prompts = [pair.prompt for pair in chunk]
        score_a = model.scores([decode_png(store.image(pair.image_a)) for pair in chunk], prompts)
        score_b = model.scores([decode_png(store.image(pair.image_b)) for pair in chunk], prompts)
        margins.update({pair.id: float(a - b) for pair, a, b in zip(chunk, torch.as_tensor(score_a), torch.as_tensor(score_b))})
    return margins


__all__ = ["CHANCE", "MIN_COMPARED", "LabellerAgreement", "labeller_agreement", "model_margins", "vote", "wilson_interval"]
