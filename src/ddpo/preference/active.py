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
    rest = [i for i in range(count) if i not in set(chosen_random)]
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


__all__ = ["ACTIVE", "RANDOM", "STRATEGIES", "margin_posterior_covariance", "select_pairs", "uncertain_pairs"]
