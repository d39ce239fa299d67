"""Active pair selection: ask people the pairs whose answers teach the preference model most.

The preference model's uncertainty about a pair is the posterior variance of its margin d = s_a - s_b under a
Laplace approximation around the fit (`bradley_terry.laplace_covariance`); a batch is picked greedily, each pair
the most uncertain given the answers to the ones before it (`bradley_terry.greedy_most_uncertain`). A share of
each batch (`random_share`) is drawn uniformly at random instead and tagged "random": those pairs are an
unbiased sample of the pool, so a held-out accuracy measured on them means what it says (an accuracy measured
on actively chosen pairs would be one on the hardest pairs).

Strategies: "random" (every pair uniformly at random; what the app did before), "uncertainty" (the largest
posterior margin variance) and "bald" (the largest expected information about the weights, Houlsby et al. 2011:
uncertain margins near 0, not pairs the model already ranks confidently however uncertain their exact margin).
"""

from __future__ import annotations

import random

import torch

from .bradley_terry import greedy_most_uncertain, laplace_covariance
from .model import BradleyTerryModel, margin_jacobian

STRATEGIES = ("random", "uncertainty", "bald")
RANDOM, ACTIVE = "random", "active"
"""Tags of a selected pair: drawn at random, or chosen for its uncertainty."""


def select_pairs(
    strategy: str,
    k: int,
    candidates: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    rng: random.Random,
    model: BradleyTerryModel | None = None,
    labelled: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    l2: float = 3e-2,
    random_share: float = 0.2,
) -> list[tuple[int, str]]:
    """k candidate pairs to ask next, as (index into candidates, "random" or "active"), in the order to ask them.

    candidates, labelled: (image_a features (n, D), image_b features (n, D), prompt features (n, P)); the fitted
    `model` and the pairs it was fitted on (`labelled`) are needed for "uncertainty" (without them it falls back
    to random, as at the start of a run when nothing is labelled yet).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"pair selection {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if not 0 <= random_share <= 1:
        raise ValueError(f"random_share {random_share} must be in [0, 1]")
    count = len(candidates[0])
    k = min(k, count)
    order = list(range(count))
    rng.shuffle(order)
    if strategy == "random" or model is None or labelled is None or len(labelled[0]) == 0:
        return [(i, RANDOM) for i in order[:k]]
    num_random = sum(rng.random() < random_share for _ in range(k))
    chosen_random = order[:num_random]
    taken = set(chosen_random)
    rest = [i for i in range(count) if i not in taken]
    active = uncertain_pairs(model, labelled, tuple(t[rest] for t in candidates), k - num_random, l2=l2, information=strategy == "bald")
    picks = [(rest[i], ACTIVE) for i in active] + [(i, RANDOM) for i in chosen_random]
    rng.shuffle(picks)  # interleave, so that a labeller who stops early has answered both kinds
    return picks


@torch.no_grad()
def margin_posterior_covariance(model: BradleyTerryModel, labelled: tuple[torch.Tensor, torch.Tensor, torch.Tensor], l2: float) -> torch.Tensor:
    """Laplace covariance of the model's weights given the pairs it was fitted on: the Bradley-Terry curvature
    p (1 - p) of each pair and the Gaussian prior of the fit's L2 penalty (2 n l2 for a mean loss)."""
    jacobian = margin_jacobian(model, *labelled)
    probability = torch.sigmoid(model(labelled[0], labelled[2]) - model(labelled[1], labelled[2]))
    return laplace_covariance(jacobian.double(), (probability * (1 - probability)).double(), 2 * len(jacobian) * l2)


@torch.no_grad()
def uncertain_pairs(model: BradleyTerryModel, labelled: tuple[torch.Tensor, torch.Tensor, torch.Tensor], candidates: tuple[torch.Tensor, torch.Tensor, torch.Tensor], k: int, *, l2: float = 3e-2, information: bool = False) -> list[int]:
    """Indices of k candidates picked greedily by posterior margin variance, or with `information` by BALD
    (module docstring)."""
    if k <= 0:
        return []
    covariance = margin_posterior_covariance(model, labelled, l2)
    jacobian = margin_jacobian(model, *candidates).double()
    margin = (model(candidates[0], candidates[2]) - model(candidates[1], candidates[2])).double()
    probability = torch.sigmoid(margin)
    return greedy_most_uncertain(jacobian, covariance, probability * (1 - probability), k, mean=margin if information else None)


def queue_for_store(store, strategy: str = "bald", count: int = 100, *, random_share: float = 0.2, features: str = "shapes-describer", l2: float = 3e-2, seed: int = 0) -> dict:
    """Fit a preference model on `store`'s labels, choose `count` of its unlabelled pairs and write them as the
    queue the app shows next (`LabelStore.set_queue`); returns what `ddpo label select` prints. With fewer than
    MIN_COMPARISONS labels it chooses at random and says so.

    Raises:
        LabelStoreError: no unlabelled pairs. ValueError: a bad strategy, count or share.
    """
    from .features import unique_image_features
    from .model import MIN_COMPARISONS, _tensors, train_preference_model
    from .store import LabelStoreError

    if count < 1 or not 0 <= random_share <= 1:
        raise ValueError(f"count must be at least 1 and random_share in [0, 1]; got {count}, {random_share}")
    if strategy not in STRATEGIES:
        raise ValueError(f"pair selection {strategy!r} is not one of {', '.join(STRATEGIES)}")
    pairs = store.unlabelled_pairs()
    if not pairs:
        raise LabelStoreError(f"{store.path} has no unlabelled pairs to select from; add some with `ddpo label add-pairs`")
    comparisons = [c for c in store.comparisons() if c.choice in ("1", "2", "tie")]
    model = labelled = None
    if strategy != "random" and len(comparisons) >= MIN_COMPARISONS:
        model, extractor, _ = train_preference_model(comparisons, features, heldout_fraction=0.0, seed=seed, l2=l2)
        data = _tensors(comparisons, extractor)
        labelled = (data.image_a, data.image_b, data.prompt)
        image_features, rows = unique_image_features(extractor, [store.image(p.image_a) for p in pairs] + [store.image(p.image_b) for p in pairs])
        candidates = (image_features[rows[: len(pairs)]], image_features[rows[len(pairs) :]], extractor.prompts([p.prompt for p in pairs]))
    else:
        candidates = tuple(torch.zeros(len(pairs), 1) for _ in range(3))
    picks = select_pairs(strategy, count, candidates, rng=random.Random(seed), model=model, labelled=labelled, l2=l2, random_share=random_share)
    store.set_queue([(pairs[index].id, selection) for index, selection in picks])
    fell_back = strategy != "random" and model is None
    return {
        "strategy": "random" if fell_back else strategy, "queued": len(picks), "unlabelled": len(pairs), "labels": len(comparisons),
        "active": sum(selection == ACTIVE for _, selection in picks), "random": sum(selection == RANDOM for _, selection in picks),
        **({"note": f"fewer than {MIN_COMPARISONS} labels: chosen at random until there are enough to fit a model"} if fell_back else {}),
    }  # fmt: skip


__all__ = ["ACTIVE", "RANDOM", "STRATEGIES", "margin_posterior_covariance", "queue_for_store", "select_pairs", "uncertain_pairs"]
