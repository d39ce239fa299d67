"""Samplers: a step kernel with its parameters bound, and what the sampling loop does around it.

Every step kernel has one signature, k-diffusion style:

    kernel(model_output, sample, level, next_level, *, prev_sample=None, noise=None) -> StepOutput

`level` and `next_level` are the noise levels the step goes between, (B,) or scalars, in the kernel's own
parametrisation: the cumulative alpha-bar for the denoising (DDIM/DDPM) kernels, sigma for the flow kernels.
A stochastic kernel draws `mean + std * noise` (or scores the given `prev_sample`) and returns its exact
Gaussian log-prob; a deterministic one returns std 0 and a NaN log-prob. A new sampler is a new kernel here;
the policy's one sampling loop (`ddpo.policy.diffusion`) runs any of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from ddpo.core.ddim import StepOutput, ddim_deterministic_step, ddim_step, ddpm_step
from ddpo.core.flow import churn_step, ode_step, sde_step

StepKernel = Callable[..., StepOutput]

DENOISING_SAMPLERS = ("ddim", "ddpm")  # with eta = 0, "ddim" is the deterministic DDIM sampler
FLOW_SAMPLERS = ("sde", "churn", "ode")


@dataclass(frozen=True)
class Sampler:
    """A sampler as the loop runs it.

    name:                what a user calls it ("ddim", "ddim eta=0", "ddpm", "sde", "churn", "ode")
    step:                the kernel of every step (inside the SDE window only, when `window` > 0)
    deterministic_step:  the deterministic kernel of the same parametrisation: the steps outside the window
    stochastic:          whether `step` draws noise (and so has a log-prob to train on)
    initial_churn:       FDFO's gamma: the initial noise is churned with fresh noise (`churn_noise`) first
    keeps_model_outputs: record the guided model output of every step (FDFO's v_ref)
    window:              Flow-GRPO-Fast: SDE steps per sample (a window of consecutive steps); 0 = every step
    """

    name: str
    step: StepKernel
    deterministic_step: StepKernel
    stochastic: bool
    initial_churn: float = 0.0
    keeps_model_outputs: bool = False
    window: int = 0


def denoising_sampler(name: str, *, eta: float, prediction_type: str) -> Sampler:
    """DDIM with eta (Song et al. 2021; eta = 0 is deterministic) or ancestral DDPM (Ho et al. 2020) over
    alpha-bar levels, for networks predicting epsilon, v or x_0."""
    deterministic = partial(ddim_deterministic_step, prediction_type=prediction_type)
    if name == "ddpm":
        return Sampler("ddpm", partial(ddpm_step, prediction_type=prediction_type), deterministic, stochastic=True)
    if name != "ddim":
        raise ValueError(f"unknown denoising sampler {name!r}; one of {', '.join(DENOISING_SAMPLERS)}")
    if eta == 0:
        return Sampler("ddim eta=0", deterministic, deterministic, stochastic=False)
    return Sampler("ddim", partial(ddim_step, eta=eta, prediction_type=prediction_type), deterministic, stochastic=True)


def flow_sampler(name: str, *, noise_level: float, sigma_max: float, churn: float, window: int = 0) -> Sampler:
    """Flow-GRPO's SDE ("sde", noise level a, Flow-GRPO-Fast's `window`), FDFO's churned Euler steps ("churn",
    gamma) or the Euler ODE ("ode") over sigma levels. `sigma_max` is the schedule's largest sigma below 1."""
    if name == "sde":
        return Sampler("sde", partial(sde_step, noise_level=noise_level, sigma_max=sigma_max), ode_step, stochastic=True, window=window)
    if name == "churn":
        return Sampler("churn", partial(churn_step, churn=churn), ode_step, stochastic=True, initial_churn=churn, keeps_model_outputs=True)
    if name == "ode":
        return Sampler("ode", ode_step, ode_step, stochastic=False)
    raise ValueError(f"unknown flow sampler {name!r}; one of {', '.join(FLOW_SAMPLERS)}")


def sliding_window_start(iteration: int, num_steps: int, window: int, shift_interval: int, stride: int) -> int:
    """MixGRPO's sliding window (Li et al. 2025, arXiv 2507.21802; Tencent-Hunyuan/MixGRPO, its "progressive"
    strategy with roll-back): the first SDE step of every chain at training iteration `iteration` (0-based).

    The window of `window` consecutive steps starts at step 0 and moves `stride` steps later every
    `shift_interval` iterations; past the last start that keeps it inside the chain, num_steps - window, it rolls
    back to 0. From the high-noise steps, where the sample's layout is decided, towards the detail steps:

        start = stride * ((iteration // shift_interval) mod (floor((num_steps - window) / stride) + 1)).

    Args:
        iteration: >= 0.
        num_steps: T, the steps of a chain.
        window: w in [1, T].
        shift_interval: tau >= 1, iterations between moves.
        stride: s >= 1, steps per move.
    """
    if not 1 <= window <= num_steps or shift_interval < 1 or stride < 1 or iteration < 0:
        raise ValueError(f"no sliding window with iteration={iteration}, num_steps={num_steps}, window={window}, shift_interval={shift_interval}, stride={stride}")
    positions = (num_steps - window) // stride + 1
    return stride * ((iteration // shift_interval) % positions)
