"""Policy-gradient losses, sample weights and their diagnostics (Black et al. 2023, Sec. 4).

All losses are means over the given minibatch of (sample, timestep) pairs and are minimised.
"""

import torch
from torch import Tensor


def ppo_clip_loss(advantages: Tensor, ratio: Tensor, clip_range: float) -> Tensor:
    """Clipped importance-sampling surrogate of DDPO_IS (Black et al. 2023, Sec. 4.3, with PPO clipping).

    Schulman et al. 2017, eq. 7, negated: mean(max(-A r, -A clip(r, 1 - eps, 1 + eps))).

    Args:
        advantages: (b,).
        ratio: pi_theta(x_{t-1} | x_t) / pi_old(x_{t-1} | x_t), (b,).
        clip_range: eps.

    Returns:
        Scalar loss.
    """
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.max(pg_loss1, pg_loss2).mean()


def reinforce_loss(advantages: Tensor, log_prob: Tensor) -> Tensor:
    """Score-function (REINFORCE) loss of DDPO_SF (Black et al. 2023, Sec. 4.3): -mean(A log pi).

    Args:
        advantages: (b,).
        log_prob: log pi_theta(x_{t-1} | x_t), (b,).

    Returns:
        Scalar loss.
    """
    return -(advantages * log_prob).mean()


def weighted_log_likelihood_loss(weights: Tensor, log_prob: Tensor) -> Tensor:
    """Reward-weighted regression loss (Black et al. 2023, Sec. 4.2): -mean(w log pi).

    The weights are expected to be normalised once over the whole epoch (mean 1, see `rwr_weights`), so a
    minibatch loss is a plain mean and minibatches of one epoch share one scale.

    Args:
        weights: (b,) non-negative sample weights.
        log_prob: log pi_theta(x_{t-1} | x_t), (b,).

    Returns:
        Scalar loss.
    """
    return -(weights * log_prob).mean()


def rwr_weights(rewards: Tensor, temperature: float) -> Tensor:
    """RWR weights exp(r / T), normalised to mean 1 (w_RWR of Black et al. 2023, Sec. 4.2; Peters & Schaal 2007).

    Computed as n * softmax(r / T), which cannot overflow: the paper's reference code computes the same
    N softmax(beta r) with beta = 1 / T (jannerm/ddpo, `ddpo/utils/hdf5.py:make_weights`).

    Args:
        rewards: (n,) rewards of the whole epoch, raw or standardised (`ddpo.algorithms.rwr`).
        temperature: T > 0; smaller values concentrate the weight on the best samples.

    Returns:
        (n,) weights with mean 1.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(rewards / temperature, dim=0) * rewards.numel()


def sparse_rwr_weights(rewards: Tensor, percentile: float) -> Tensor:
    """Sparse RWR weights 1[r >= C] with C the `percentile`-th percentile (w_sparse of Black et al. 2023, Sec. 4.2).

    The cut-off is `torch.quantile(rewards, percentile / 100)` with linear interpolation (numpy's
    `np.percentile` default). Kept samples get equal weight n / n_kept, so the weights have mean 1 over the
    epoch like `rwr_weights`: the loss is the mean log-likelihood of the kept samples, rescaled by the fraction
    kept. At least the best sample is always kept.

    Args:
        rewards: (n,) float rewards of the whole epoch, raw or standardised (`ddpo.algorithms.rwr`).
        percentile: in [0, 100).

    Returns:
        (n,) weights in {0, n / n_kept}.
    """
    if not 0 <= percentile < 100:
        raise ValueError(f"percentile must be in [0, 100), got {percentile}")
    threshold = torch.quantile(rewards, percentile / 100, interpolation="linear")
    keep = (rewards >= threshold).to(rewards.dtype)
    return keep * rewards.numel() / keep.sum()


def clip_advantages(advantages: Tensor, max_abs: float) -> Tensor:
    """Clamp advantages to [-max_abs, max_abs] (ddpo-pytorch's `adv_clip_max`)."""
    return torch.clamp(advantages, -max_abs, max_abs)


def approx_kl(log_ratio: Tensor) -> Tensor:
    """Estimate of KL(pi_old || pi_theta) from log(pi_theta / pi_old), as in cleanrl (Schulman 2020, "k3").

    Args:
        log_ratio: (b,).

    Returns:
        Scalar, >= 0.
    """
    ratio = torch.exp(log_ratio)
    return ((ratio - 1) - log_ratio).mean()


def clip_fraction(ratio: Tensor, clip_range: float) -> Tensor:
    """Fraction of ratios outside [1 - clip_range, 1 + clip_range], i.e. where the PPO clip is active.

    Args:
        ratio: (b,).

    Returns:
        Scalar float tensor in [0, 1].
    """
    return ((ratio - 1.0).abs() > clip_range).float().mean()


def spo_loss(advantages: Tensor, ratio: Tensor, epsilon: float) -> Tensor:
    """Simple Policy Optimization surrogate (Xie et al. 2025, arXiv 2401.13244), as FDFO uses it:
    mean(-A r + |A| / (2 eps) (r - 1)^2).

    Instead of PPO's hard clip, a quadratic penalty whose minimum in r is at r = 1 + eps sign(A): the ratio is
    pulled towards the edge of the trust region and never past it, and the gradient never vanishes.

    Args:
        advantages: (b,).
        ratio: (b,).
        epsilon: eps > 0.

    Returns:
        Scalar loss.
    """
    return (-advantages * ratio + advantages.abs() / (2.0 * epsilon) * (ratio - 1.0) ** 2).mean()


def normalized_log_ratio(log_prob: Tensor, old_log_prob: Tensor, mean: Tensor, old_mean: Tensor, std: Tensor) -> Tensor:
    """GRPO-Guard's ratio normalization (RatioNorm; Wang et al. 2025, arXiv 2510.22319) of one Gaussian step's log
    importance ratio.

    For a step x' = mu_old + s eps of std s, with Delta = mu_theta - mu_old, the per-dimension log ratio is
    log r = mean(eps Delta) / s - mean(Delta^2) / (2 s^2): its mean is negative (the ratios sit left of 1, so
    the upper clip rarely fires on positive advantages) and its spread scales as 1/s, which differs from step to
    step. RatioNorm removes the shift and the 1/s scale:

        log r_norm = s log r + mean(Delta^2) / (2 s) = mean(eps Delta),

    zero-mean and of the same scale at every step (as X-GenGroup/Flow-Factory's `GRPOGuardTrainer` computes it).

    Args:
        log_prob: (...) log pi_theta(x' | x) averaged over latent dimensions (`gaussian_log_prob`), with grad.
        old_log_prob: (...) the same under the sampling policy.
        mean: (..., *latent) the current policy's Gaussian mean mu_theta, with grad.
        old_mean: (..., *latent) the sampling policy's mean mu_old.
        std: the step's std s, one per step: (...) or (..., 1, ..., 1).

    Returns:
        (...) the normalised log ratio, float32.
    """
    leading = log_prob.ndim
    drift = (mean.float() - old_mean.float()).pow(2).mean(dim=tuple(range(leading, mean.ndim)))
    step_std = std.float().reshape(log_prob.shape)
    return step_std * (log_prob.float() - old_log_prob.float()) + drift / (2 * step_std)
