"""Losses on the forward (noising) process of a flow model: DiffusionNFT and Advantage Weighted Matching.

Both train the velocity v_theta(x_sigma, sigma, c) on noised copies of the epoch's own clean samples x_0, as
flow-matching pretraining does (convention of `ddpo.core.flow`):

    x_sigma = (1 - sigma) x_0 + sigma eps,   eps ~ N(0, I),   target velocity v = eps - x_0,

so neither needs the sampler's likelihood: any solver may draw x_0 (their point).

- DiffusionNFT (Zheng et al., ICLR 2026, arXiv 2509.16117; code NVlabs/DiffusionNFT): an
  optimality probability r in [0, 1] per sample, and two implicit policies built from the sampling ("old")
  velocity v_old, v+ = (1 - beta) v_old + beta v_theta and v- = (1 + beta) v_old - beta v_theta; the loss
  r ||v+ - v||^2 + (1 - r) ||v- - v||^2 pulls v+ to the positive samples and v- to the negative ones, which
  moves v_theta towards the positives and away from the negatives.
- AWM (Xue et al. 2025, arXiv 2509.25050; code scxue/advantage_weighted_matching): the flow-matching
  loss of each sample as a pseudo log-likelihood, weighted by its advantage through PPO's ratio.

All functions work over any leading "pair" dimensions: tensors (N, ...) or (B, K, ...), with per-pair scalars
shaped like the leading dimensions.
"""

from __future__ import annotations

import torch
from torch import Tensor

NFT_WEIGHT_FLOOR = 1e-5  # DiffusionNFT's code: the adaptive weight is clipped below at this value
AWM_EPSILON = 1e-10  # AWM's code: inside the power of the generalised Huber weighting


def _per_pair(value: Tensor, like: Tensor) -> Tensor:
    """(leading dims) -> (leading dims, 1, ..., 1), float32, broadcastable against `like`."""
    value = value.float()
    return value.reshape(*value.shape, *([1] * (like.ndim - value.ndim)))


def _pair_mean(tensor: Tensor, leading: int) -> Tensor:
    """Mean over every dimension after the first `leading` ones."""
    return tensor.mean(dim=tuple(range(leading, tensor.ndim)))


def noised(clean: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """x_sigma = (1 - sigma) x_0 + sigma eps (rectified flow's forward process), float32.

    Args:
        clean: x_0, broadcastable to `noise` (e.g. (B, 1, ...) against (B, K, ...)).
        noise: eps, (B, K, ...) or (N, ...).
        sigma: the noise levels, shaped like the leading dimensions of `noise`.
    """
    noise = noise.float()
    s = _per_pair(sigma, noise)
    return (1 - s) * clean.float() + s * noise


def flow_matching_target(clean: Tensor, noise: Tensor) -> Tensor:
    """The velocity the flow-matching loss regresses onto: v = eps - x_0 (d x_sigma / d sigma), float32."""
    return noise.float() - clean.float()


def nft_optimality(advantages: Tensor, adv_clip_max: float) -> Tensor:
    """DiffusionNFT's optimality probability r = clip(A, -c, c) / (2c) + 1/2, in [0, 1] (its code's "normalized
    advantage", c = adv_clip_max; the paper's r from normalised rewards): r = 1/2 at the group mean.

    Args:
        advantages: (...) normalised rewards.
        adv_clip_max: c > 0.
    """
    return (advantages.float().clamp(-adv_clip_max, adv_clip_max) / adv_clip_max / 2 + 0.5).clamp(0.0, 1.0)


def nft_implicit_velocities(velocity: Tensor, old_velocity: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """The implicit positive and negative policies of DiffusionNFT:

        v+ = (1 - beta) v_old + beta v_theta,    v- = (1 + beta) v_old - beta v_theta,

    with v_old the sampling policy's velocity (no gradient through it). v+ and v- are reflections of each other
    about v_old, so lowering the positive loss and lowering the negative loss move v_theta the same way."""
    old = old_velocity.detach().float()
    velocity = velocity.float()
    return (1 - beta) * old + beta * velocity, (1 + beta) * old - beta * velocity


def adaptive_matching_loss(velocity: Tensor, target: Tensor, sigma: Tensor) -> Tensor:
    """DiffusionNFT's adaptively weighted flow-matching loss of each pair (its code's "adaptive weighting"):

        e = sigma (v - v_target)  (= x_0 prediction x_sigma - sigma v minus x_0),   loss = mean(e^2) / sg(mean|e|),

    the mean over the pair's latent dimensions, the weight's floor `NFT_WEIGHT_FLOOR`, sg: no gradient. Dividing by
    the detached mean absolute error puts pairs of every noise level and error size on one scale.

    Args:
        velocity, target: (B, K, ...) or (N, ...).
        sigma: the leading dimensions' noise levels.

    Returns:
        The leading dimensions' losses, float32.
    """
    leading = sigma.ndim
    error = _per_pair(sigma, velocity) * (velocity.float() - target.float())
    weight = _pair_mean(error.detach().abs(), leading).clamp(min=NFT_WEIGHT_FLOOR)
    return _pair_mean(error.pow(2), leading) / weight


def nft_loss(velocity: Tensor, old_velocity: Tensor, target: Tensor, sigma: Tensor, optimality: Tensor, beta: float) -> Tensor:
    """DiffusionNFT's policy loss of each pair (the paper's, with its code's adaptive weighting and 1 / beta scale):

        (r L(v+) + (1 - r) L(v-)) / beta,    L = `adaptive_matching_loss`.

    Its gradient in v_theta is r dL(v+) - (1 - r) dL(v-), which at v_theta = v_old (where v+ = v- = v_old) is
    (2r - 1) dL(v_old): zero at r = 1/2, a sample above its group's mean (r > 1/2) pulls v_theta towards its own
    flow-matching target, one below pushes it away.

    Args:
        velocity: v_theta, (B, K, ...) with grad.
        old_velocity: v_old at the same noised latents, (B, K, ...).
        target: eps - x_0, (B, K, ...).
        sigma: (B, K) noise levels.
        optimality: r of each pair, (B, K) (or broadcastable).
        beta: > 0.

    Returns:
        (B, K) float32.
    """
    positive, negative = nft_implicit_velocities(velocity, old_velocity, beta)
    r = optimality.float().expand(sigma.shape)
    return (r * adaptive_matching_loss(positive, target, sigma) + (1 - r) * adaptive_matching_loss(negative, target, sigma)) / beta


def awm_log_likelihood(velocity: Tensor, target: Tensor, sigma: Tensor, power: float) -> Tensor:
    """AWM's pseudo log-likelihood of a pair: its flow-matching loss l = mean((v - v_target)^2), weighted by the
    generalised Huber function of its code's default ("ghuber"; p = 0.25):

        log p = -sigma ((l + e)^p - e^p) / p,    e = `AWM_EPSILON`,

    computed in float64 as the code does. p = 1 is the sigma-weighted loss -sigma l; p < 1 damps pairs with large
    errors (robust to outliers), and the factor sigma weights the noisier steps more.

    Args:
        velocity: v_theta, (B, K, ...).
        target: eps - x_0, (B, K, ...).
        sigma: (B, K) noise levels.
        power: p > 0.

    Returns:
        (B, K) float64.
    """
    leading = sigma.ndim
    loss = _pair_mean((velocity.double() - target.double()).pow(2), leading)
    epsilon = torch.tensor(AWM_EPSILON, dtype=torch.float64, device=loss.device)
    return -sigma.double() * ((loss + epsilon).pow(power) - epsilon.pow(power)) / power


def velocity_divergence(velocity: Tensor, other: Tensor, leading: int = 2) -> Tensor:
    """mean((v - v_other)^2) over the latent dimensions of each pair: the KL, up to the factor 1/2, of two unit-
    variance Gaussians centred on the velocities (DiffusionNFT's and AWM's "KL" to the reference model)."""
    return _pair_mean((velocity.float() - other.float()).pow(2), leading)
