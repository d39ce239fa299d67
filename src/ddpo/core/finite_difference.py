"""The finite-difference estimate of Finite Difference Flow Optimization (FDFO; McAllister, Aittala, Karras,
Hellsten, Kanazawa, Aila, Laine 2026, arXiv 2603.12893; reference code NVlabs/finite-difference-flow-optimization).

Two samples start from one initial noise and are churned apart into near-counterfactual images x1, x2 with
rewards R1, R2. Along the direction between them, the reward changes by about dR per dx:

    dR_1 = (R1 - R2) / 2,  dR_2 = -dR_1;     dx_1 = (x1 - x2) / 2,  dx_2 = -dx_1.

Each branch's velocity is pulled towards v_target = v_ref - dx / mean(dx^2) at every step of its chain
(v = noise - x_0, so lowering v moves the endpoint along +dx); the pull is weighted by dR in the loss
(`ddpo.core.losses.spo_loss`). Nothing is backpropagated through the sampling chain.
"""

from __future__ import annotations

import torch
from torch import Tensor

NORM_EPSILON = 1e-6  # the reference code's


def _check_pairs(n: int) -> None:
    if n % 2:
        raise ValueError(f"FDFO needs pairs of samples (2k, 2k + 1); got an odd number, {n}")


def pair_reward_differences(rewards: Tensor) -> Tensor:
    """(n,) rewards of consecutive pairs -> (n,) signed half differences dR: +(R1 - R2)/2 for the first branch,
    -(R1 - R2)/2 for the second."""
    _check_pairs(rewards.numel())
    half = (rewards[0::2] - rewards[1::2]).float() / 2
    return torch.stack((half, -half), dim=1).reshape(-1)


def endpoint_directions(final_latents: Tensor) -> Tensor:
    """(n, ...) final latents of consecutive pairs -> (n, ...) dx / mean(dx^2) with dx_1 = (x1 - x2)/2, dx_2 = -dx_1.

    Dividing by the mean square (not the norm) makes ||v_ref - v_target||^2 = 1 / mean(dx^2): pairs that barely
    differ ask for a large velocity change along their (well-localised) difference."""
    _check_pairs(final_latents.shape[0])
    half = (final_latents[0::2].float() - final_latents[1::2].float()) / 2
    directions = torch.stack((half, -half), dim=1).reshape(final_latents.shape)
    mean_square = directions.pow(2).mean(dim=tuple(range(1, directions.ndim)), keepdim=True)
    return directions / (mean_square + NORM_EPSILON)


def velocity_log_likelihood(velocity: Tensor, target: Tensor, batch_dims: int = 1) -> Tensor:
    """FDFO's pseudo log-likelihood -mean((v - v_target)^2) over every dimension after the first `batch_dims`.

    It is, up to constants, the log-density of v_target under a fixed-variance Gaussian centred on v: the
    "policy" FDFO's ratio compares is this Gaussian over velocities.

    Args:
        velocity: (B, ...) (or (B, K, ...) with batch_dims=2): the model's velocity, with grad.
        target: the same shape (or broadcastable), v_target.

    Returns:
        (B,) (or (B, K)) float32.
    """
    squared = (velocity.float() - target.float()) ** 2
    return -squared.mean(dim=tuple(range(batch_dims, squared.ndim)))
