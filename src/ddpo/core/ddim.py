"""One reverse-diffusion step as a Gaussian policy: posterior mean, std, sample and log-prob.

DDPO (Black et al. 2023, Sec. 4.2) treats each denoising step as the policy
pi(x_{t-1} | x_t, c) = N(mu_theta(x_t, t, c), sigma_t^2 I). This module computes mu and sigma for the DDIM
sampler (Song et al. 2021) and the DDPM ancestral sampler (Ho et al. 2020), exactly as diffusers'
`DDIMScheduler.step` / `DDPMScheduler.step` do, and adds the log-probability of the next sample. All math
runs in float32 whatever the model's dtype, so that log-prob ratios recomputed during training match the ones
recorded while sampling.
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

PredictionType = Literal["epsilon", "v_prediction", "sample"]


@dataclass(frozen=True)
class StepOutput:
    """Result of one stochastic reverse step.

    Attributes:
        prev_sample: x_{t-1}, shape (B, ...), in the dtype of the input sample.
        mean: posterior mean mu_theta(x_t, t), shape (B, ...), float32.
        std: posterior standard deviation sigma_t, shape (B, 1, ..., 1), float32.
        log_prob: log pi(x_{t-1} | x_t) averaged over the non-batch dimensions, shape (B,), float32.
    """

    prev_sample: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Log density of N(mean, std^2) at `sample`, averaged (not summed) over all non-batch dimensions.

    Averaging follows ddpo-pytorch and keeps log-probs of different image sizes on the same scale.

    Args:
        sample: (B, ...).
        mean: (B, ...).
        std: broadcastable to `sample`, e.g. (B, 1, ..., 1).

    Returns:
        (B,) float32.
    """
    sample, mean, std = sample.float(), mean.float(), std.float()
    log_density = -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density.mean(dim=tuple(range(1, sample.ndim)))


def gaussian_kl(mean_p: Tensor, mean_q: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean_p, std^2 I) || N(mean_q, std^2 I)) = |mean_p - mean_q|^2 / (2 std^2), averaged over the
    non-batch dimensions (per latent dimension, like `gaussian_log_prob`).

    Two DDIM policies at the same x_t and t share sigma_t (it depends on the schedule only), so the KL of
    one denoising step reduces to this closed form.

    Args:
        mean_p: (B, ...).
        mean_q: (B, ...).
        std: broadcastable to `mean_p`, e.g. (B, 1, ..., 1).

    Returns:
        (B,) float32, >= 0.
    """
    mean_p, mean_q, std = mean_p.float(), mean_q.float(), std.float()
    kl = (mean_p - mean_q) ** 2 / (2 * std**2)
    return kl.expand_as(mean_p).mean(dim=tuple(range(1, mean_p.ndim)))


def predicted_original_and_epsilon(
    model_output: Tensor, sample: Tensor, alpha_prod_t: Tensor, prediction_type: PredictionType
) -> tuple[Tensor, Tensor]:
    """Predicted clean sample x_0 and noise eps from the model output (DDIM, Song et al. 2021, eq. 12).

    Args:
        model_output: (B, ...) the network's prediction of `prediction_type`.
        sample: x_t, (B, ...).
        alpha_prod_t: cumulative alpha at t, broadcastable to `sample`.
        prediction_type: what the network predicts: "epsilon", "v_prediction" or "sample".

    Returns:
        (pred_original_sample, pred_epsilon), each (B, ...).
    """
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        pred_epsilon = model_output
        pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
    elif prediction_type == "v_prediction":
        # v = sqrt(a) eps - sqrt(1 - a) x_0 (Salimans & Ho 2022, Sec. 4).
        pred_original_sample = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
        pred_epsilon = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
    elif prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t**0.5 * model_output) / beta_prod_t**0.5
    else:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; expected 'epsilon', 'v_prediction' or 'sample'"
        )
    return pred_original_sample, pred_epsilon


def ddim_alphas(
    alphas_cumprod: Tensor, timesteps: Tensor, step_ratio: int, final_alpha_cumprod: Tensor
) -> tuple[Tensor, Tensor]:
    """Cumulative alphas at t and at the previous DDIM timestep t - step_ratio, per sample.

    Mirrors `DDIMScheduler.step`: a previous timestep below zero uses `final_alpha_cumprod`
    (1.0 when the scheduler's `set_alpha_to_one` is set, otherwise `alphas_cumprod[0]`).

    Args:
        alphas_cumprod: (num_train_timesteps,).
        timesteps: (B,) integer timesteps.
        step_ratio: num_train_timesteps // num_inference_steps.
        final_alpha_cumprod: 0-d tensor.

    Returns:
        (alpha_prod_t, alpha_prod_t_prev), each (B,), on `timesteps`' device.
    """
    alphas_cumprod = alphas_cumprod.to(timesteps.device)
    prev_timesteps = timesteps - step_ratio
    alpha_prod_t = alphas_cumprod[timesteps]
    alpha_prod_t_prev = torch.where(
        prev_timesteps >= 0,
        alphas_cumprod[prev_timesteps.clamp(min=0)],
        final_alpha_cumprod.to(alphas_cumprod),
    )
    return alpha_prod_t, alpha_prod_t_prev


def ddim_step(
    model_output: Tensor,
    sample: Tensor,
    alpha_prod_t: Tensor | float,
    alpha_prod_t_prev: Tensor | float,
    *,
    eta: float,
    prediction_type: PredictionType = "epsilon",
    prev_sample: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """One stochastic DDIM step x_t -> x_{t-1} and its log-prob (Song et al. 2021, eq. 12 and 16).

    With `prev_sample=None` a new x_{t-1} = mean + sigma_t * noise is drawn (`noise` if given, else
    `torch.randn` with `generator`); otherwise the log-prob of the given `prev_sample` is recomputed, which is
    how training re-evaluates a recorded trajectory under the current weights.

    Args:
        model_output: (B, ...) network output at (x_t, t).
        sample: x_t, (B, ...).
        alpha_prod_t: cumulative alpha at t, (B,) or scalar.
        alpha_prod_t_prev: cumulative alpha at the previous timestep, (B,) or scalar.
        eta: noise scale; 1.0 gives the DDPM posterior variance. Must be > 0.
        prediction_type: what the network predicts.
        prev_sample: x_{t-1} to score, (B, ...), or None to sample one.
        noise: standard normal noise, (B, ...), used only when sampling.
        generator: random generator, used only when sampling without `noise`.

    Returns:
        StepOutput; `log_prob` treats x_{t-1} as data (no gradient flows through the drawn sample).
    """
    if eta <= 0:
        raise ValueError(
            f"eta must be > 0 for a stochastic policy, got {eta}; "
            "eta=0 makes DDIM deterministic and its log-prob undefined"
        )
    mean, std = _ddim_mean_and_std(model_output, sample, alpha_prod_t, alpha_prod_t_prev, eta, prediction_type)
    return _sample_and_score(mean, std, sample.dtype, prev_sample, noise, generator)


def ddim_deterministic_step(
    model_output: Tensor,
    sample: Tensor,
    alpha_prod_t: Tensor | float,
    alpha_prod_t_prev: Tensor | float,
    *,
    prediction_type: PredictionType = "epsilon",
    prev_sample: Tensor | None = None,
    noise: Tensor | None = None,
) -> StepOutput:
    """One deterministic DDIM step (eta = 0, Song et al. 2021, eq. 12 with sigma_t = 0): what diffusers'
    `DDIMScheduler.step(..., eta=0)` computes, for sampling only (std 0; log-prob NaN: the step is no policy).

    Args and Returns: as `ddim_step`; `prev_sample` and `noise` are ignored (kept for the common signature).
    """
    mean, _ = _ddim_mean_and_std(model_output, sample, alpha_prod_t, alpha_prod_t_prev, 0.0, prediction_type)
    return deterministic_output(mean, sample.dtype)


def _ddim_mean_and_std(model_output: Tensor, sample: Tensor, alpha_prod_t, alpha_prod_t_prev, eta: float, prediction_type: PredictionType) -> tuple[Tensor, Tensor]:
    """Mean and std (B, 1, ..., 1) of the DDIM step's Gaussian, fp32 (Song et al. 2021, eq. 12 and 16)."""
    alpha_prod_t = _per_sample(alpha_prod_t, sample)
    alpha_prod_t_prev = _per_sample(alpha_prod_t_prev, sample)
    # 1. predicted x_0 and eps ("predicted x_0" of eq. 12)
    pred_original_sample, pred_epsilon = predicted_original_and_epsilon(model_output.float(), sample.float(), alpha_prod_t, prediction_type)
    # 2. sigma_t(eta) of eq. 16
    variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std = eta * variance**0.5
    # 3. mean of eq. 12: sqrt(a_prev) x_0 + "direction pointing to x_t"
    mean = alpha_prod_t_prev**0.5 * pred_original_sample + (1 - alpha_prod_t_prev - std**2) ** 0.5 * pred_epsilon
    return mean, std


def deterministic_output(mean: Tensor, dtype: torch.dtype) -> StepOutput:
    """The StepOutput of a deterministic step landing on `mean`: std 0 and a NaN log-prob (B,)."""
    batch = mean.shape[0]
    return StepOutput(
        prev_sample=mean.to(dtype),
        mean=mean,
        std=mean.new_zeros((batch,) + (1,) * (mean.ndim - 1)),
        log_prob=mean.new_full((batch,), float("nan")),
    )


def ddpm_step(
    model_output: Tensor,
    sample: Tensor,
    alpha_prod_t: Tensor | float,
    alpha_prod_t_prev: Tensor | float,
    *,
    prediction_type: PredictionType = "epsilon",
    prev_sample: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """One ancestral DDPM step from the posterior q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 6-7).

    Uses diffusers' `DDPMScheduler` "fixed_small" variance, generalised to strided timesteps through
    beta_t = 1 - alpha_prod_t / alpha_prod_t_prev. When the chain ends at alpha_prod_t_prev = 1 the final
    step is a point mass; the variance is clamped at 1e-20 so the log-prob stays finite, but it carries no
    useful signal there.

    Args and Returns: as `ddim_step` (without `eta`).
    """
    model_output_fp32, sample_fp32 = model_output.float(), sample.float()
    alpha_prod_t = _per_sample(alpha_prod_t, sample)
    alpha_prod_t_prev = _per_sample(alpha_prod_t_prev, sample)

    pred_original_sample, _ = predicted_original_and_epsilon(
        model_output_fp32, sample_fp32, alpha_prod_t, prediction_type
    )
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    # posterior mean mu~_t(x_t, x_0) and variance beta~_t of eq. 7
    mean = (alpha_prod_t_prev**0.5 * current_beta_t / (1 - alpha_prod_t)) * pred_original_sample + (
        current_alpha_t**0.5 * (1 - alpha_prod_t_prev) / (1 - alpha_prod_t)
    ) * sample_fp32
    variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
    return _sample_and_score(mean, variance**0.5, sample.dtype, prev_sample, noise, generator)


def _per_sample(alpha: Tensor | float, sample: Tensor) -> Tensor:
    """(B,) or scalar alpha -> float32 (B, 1, ..., 1) on `sample`'s device."""
    alpha = torch.as_tensor(alpha, dtype=torch.float32, device=sample.device)
    return alpha.expand(sample.shape[0]).reshape(-1, *([1] * (sample.ndim - 1)))


def _sample_and_score(
    mean: Tensor,
    std: Tensor,
    dtype: torch.dtype,
    prev_sample: Tensor | None,
    noise: Tensor | None,
    generator: torch.Generator | None,
) -> StepOutput:
    """Draw x_{t-1} ~ N(mean, std^2) unless given, and score it under that Gaussian."""
    if prev_sample is None:
        if noise is not None and generator is not None:
            raise ValueError("pass either noise or generator, not both")
        if noise is None:
            # Draw on the generator's device (a CPU generator seeds CUDA runs, as in diffusers' randn_tensor).
            noise_device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=dtype)
        prev_sample = (mean + std * noise.to(mean)).to(dtype)
    else:
        prev_sample = prev_sample.to(dtype)
    # Score the sample as stored (after the cast to `dtype`) so that recomputing the log-prob from the
    # trajectory reproduces it exactly; detached because the policy gradient treats the action as data.
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std)
    return StepOutput(prev_sample=prev_sample, mean=mean, std=std, log_prob=log_prob)
