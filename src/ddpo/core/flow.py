"""Steps of a rectified-flow sampler: the deterministic Euler step and Flow-GRPO's stochastic (SDE) step.

Convention (diffusers' `FlowMatchEulerDiscreteScheduler`, SD3, FLUX): time is the noise level sigma in
[0, 1]; x_sigma = (1 - sigma) * x_0 + sigma * noise, and the model predicts the velocity v = noise - x_0.
Sampling runs sigma from 1 down to 0, so every step has dt = sigma_next - sigma < 0.

Flow-GRPO (Liu et al. 2025, arXiv 2505.05470, Sec. 4.2) turns the ODE x' = v into an SDE with the same
marginals, whose Euler-Maruyama step is Gaussian with a cheap exact log-prob:

    x_next = x + [v + s^2 / (2 sigma) * (x + (1 - sigma) v)] dt + s * sqrt(-dt) * eps,
    s = a * sqrt(sigma / (1 - sigma)),

where a is the noise level (0.7 in the paper). At sigma = 1 the schedule's std is infinite; like the
paper's code (flow_grpo `sde_step_with_logprob`) we put the largest sigma below 1 (`sigma_max`) in its
denominator instead: s(1) = a / sqrt(1 - sigma_max).

FDFO (McAllister et al. 2026, arXiv 2603.12893; NVlabs/finite-difference-flow-optimization `edm_step`) samples
with a churned Euler step in the manner of EDM's stochastic sampler (Karras et al. 2022, Alg. 2): from sigma the
Euler step overshoots to r = s / (1 + gamma - gamma s) < s, the sample is scaled by 1 / (1 + gamma r) and fresh
noise of std s sqrt((1 + gamma)^2 - 1) / (1 + gamma) is added, which lands exactly on the marginal at s
(signal coefficient 1 - s, total noise std s). The initial noise is churned the same way (`churn_noise`).
All math is float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddpo.core.ddim import StepOutput, deterministic_output, gaussian_log_prob


def flow_sigmas(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> Tensor:
    """The num_steps + 1 noise levels of diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps` (static
    shift), then a final 0: num_steps evenly spaced from 1 down to the smallest training sigma, each passed
    through SD3's time shift sigma' = shift * sigma / (1 + (shift - 1) * sigma). (diffusers' smallest
    training sigma is itself already shifted, so it is shifted twice; we keep that to match its samplers.)"""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")

    def shifted(sigma):
        return shift * sigma / (1 + (shift - 1) * sigma)

    sigmas = shifted(torch.linspace(1.0, shifted(1.0 / num_train_timesteps), num_steps, dtype=torch.float64))
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def _per_sample(value: Tensor | float, like: Tensor) -> Tensor:
    """A scalar or (B,) tensor as float32 shaped (B, 1, ..., 1) for broadcasting against `like`."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.ndim == 0:
        value = value.expand(like.shape[0])
    return value.reshape(-1, *([1] * (like.ndim - 1)))


def _draw(shape_like: Tensor, noise: Tensor | None, generator: torch.Generator | list[torch.Generator] | None) -> Tensor:
    """`noise` as float32, or standard normal noise shaped like `shape_like` from one generator or one per sample."""
    if noise is not None:
        return noise.float().to(shape_like.device)
    if isinstance(generator, list):
        return torch.stack([torch.randn(shape_like.shape[1:], generator=g, device=g.device) for g in generator]).to(shape_like.device)
    device = shape_like.device if generator is None else generator.device
    return torch.randn(shape_like.shape, generator=generator, device=device).to(shape_like.device)


def euler_step(velocity: Tensor, sample: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
    """x_next = x + (sigma_next - sigma) * v: one step of the probability-flow ODE, in the sample's dtype."""
    dt = _per_sample(sigma_next, sample) - _per_sample(sigma, sample)
    return (sample.float() + dt * velocity.float()).to(sample.dtype)


def ode_step(velocity: Tensor, sample: Tensor, sigma: Tensor | float, sigma_next: Tensor | float, *, prev_sample: Tensor | None = None, noise: Tensor | None = None) -> StepOutput:
    """The Euler step of the probability-flow ODE (`euler_step`) as a StepOutput: std 0, log-prob NaN (no policy).
    `prev_sample` and `noise` are ignored (kept for the step kernels' common signature)."""
    x = sample.float()
    dt = _per_sample(sigma_next, x) - _per_sample(sigma, x)
    return deterministic_output(x + dt * velocity.float(), sample.dtype)


def sde_std(sigma: Tensor | float, noise_level: float, sigma_max: float) -> Tensor:
    """Flow-GRPO's diffusion coefficient s = a * sqrt(sigma / (1 - sigma)); where sigma = 1 the denominator
    uses sigma_max instead (as the paper's code: s = a / sqrt(1 - sigma_max) there)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    safe = torch.where(sigma >= 1.0, torch.full_like(sigma, sigma_max), sigma)
    return noise_level * torch.sqrt(sigma / (1 - safe))


def sde_step(
    velocity: Tensor,
    sample: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    *,
    noise_level: float = 0.7,
    sigma_max: float,
    prev_sample: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> StepOutput:
    """One Flow-GRPO SDE step from `sample` at `sigma` to `sigma_next` (< sigma) as a Gaussian policy.

    Args:
        velocity: the model's v prediction at (sample, sigma), (B, ...).
        sample: x at sigma, (B, ...).
        sigma, sigma_next: scalars or (B,) tensors of noise levels.
        noise_level: a in s = a * sqrt(sigma / (1 - sigma)).
        sigma_max: the largest sigma below 1 in the schedule, used where sigma = 1.
        prev_sample: if given, the log-prob of this next sample (training); otherwise one is drawn.
        noise: the standard normal noise to use when drawing (same shape as sample).
        generator: one generator, or one per sample, for drawing the noise.

    Returns:
        StepOutput with prev_sample (the sample's dtype), mean, std (B, 1, ..., 1) and log_prob (B,) float32.
    """
    x = sample.float()
    v = velocity.float()
    sig = _per_sample(sigma, x)
    dt = _per_sample(sigma_next, x) - sig
    s = _per_sample(sde_std(sig.flatten().cpu(), noise_level, sigma_max).to(x.device), x)
    mean = x + (v + s**2 / (2 * sig) * (x + (1 - sig) * v)) * dt
    std = s * torch.sqrt(-dt)
    if prev_sample is None:
        prev_sample = (mean + std * _draw(x, noise, generator)).to(sample.dtype)
    return StepOutput(prev_sample=prev_sample, mean=mean, std=std, log_prob=gaussian_log_prob(prev_sample, mean, std))


def churn_noise(noise: Tensor, fresh: Tensor, churn: float) -> Tensor:
    """FDFO's churn of the initial noise: (x + sqrt((1 + gamma)^2 - 1) * fresh) / (1 + gamma), still N(0, I).

    Two samples sharing `noise` with different `fresh` start as near-counterfactual twins (gamma small)."""
    scale = 1.0 / (1.0 + churn)
    return scale * noise.float() + ((1.0 + churn) ** 2 - 1.0) ** 0.5 * scale * fresh.float()


def churn_step(
    velocity: Tensor,
    sample: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    *,
    churn: float,
    prev_sample: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> StepOutput:
    """One churned Euler step (FDFO's sampler, see the module docstring) from sigma = t to sigma_next = s < t.

    r = s / (1 + gamma - gamma s);  x_next = (x + (r - t) v) / (1 + gamma r) + r sqrt((1 + gamma)^2 - 1) / (1 + gamma r) * eps.

    gamma = 0 is the Euler step; at s = 0 the step is deterministic (std 0, log-prob undefined, NaN).

    Args:
        velocity: the model's v prediction at (sample, sigma), (B, ...).
        sample: x at sigma, (B, ...).
        sigma, sigma_next: scalars or (B,) tensors.
        churn: gamma >= 0.
        prev_sample: if given, its log-prob under the step's Gaussian; otherwise one is drawn.
        noise, generator: as in `sde_step`.

    Returns:
        StepOutput with prev_sample (the sample's dtype), mean, std (B, 1, ..., 1) and log_prob (B,) float32.
    """
    x, v = sample.float(), velocity.float()
    t = _per_sample(sigma, x)
    s = _per_sample(sigma_next, x)
    r = s / (1 + churn - churn * s)
    scale = 1 / (1 + churn * r)
    mean = scale * (x + (r - t) * v)
    std = r * ((1 + churn) ** 2 - 1) ** 0.5 * scale
    if prev_sample is None:
        prev_sample = (mean + std * _draw(x, noise, generator)).to(sample.dtype)
    return StepOutput(prev_sample=prev_sample, mean=mean, std=std, log_prob=gaussian_log_prob(prev_sample, mean, std))
