"""ddpo.core.ddim against diffusers' schedulers and against independent Gaussian formulas."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ddpo.core import ddim_alphas, ddim_step, ddpm_step, gaussian_log_prob

SHAPE = (2, 4, 8, 8)
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)


def ddim_scheduler(prediction_type: str) -> DDIMScheduler:
    scheduler = DDIMScheduler(**SCHEDULE, set_alpha_to_one=False, prediction_type=prediction_type)
    scheduler.set_timesteps(10)
    return scheduler


def random_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    model_output, sample, noise = (torch.randn(SHAPE, generator=generator) for _ in range(3))
    return model_output, sample, noise


def alphas_at(scheduler: DDIMScheduler, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    step_ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    return ddim_alphas(scheduler.alphas_cumprod, timesteps, step_ratio, scheduler.final_alpha_cumprod)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("timestep", [900, 500, 100, 0])
def test_ddim_step_matches_diffusers(prediction_type: str, eta: float, timestep: int) -> None:
    scheduler = ddim_scheduler(prediction_type)
    model_output, sample, noise = random_inputs(timestep)
    alpha_prod_t, alpha_prod_t_prev = alphas_at(scheduler, torch.full((SHAPE[0],), timestep))

    ours = ddim_step(
        model_output, sample, alpha_prod_t, alpha_prod_t_prev, eta=eta, prediction_type=prediction_type, noise=noise
    )
    expected = scheduler.step(model_output, timestep, sample, eta=eta, variance_noise=noise).prev_sample

    torch.testing.assert_close(ours.prev_sample, expected, atol=1e-6, rtol=0)


def test_ddim_step_per_sample_timesteps_match_separate_steps() -> None:
    scheduler = ddim_scheduler("epsilon")
    model_output, sample, noise = random_inputs(0)
    timesteps = torch.tensor([700, 0])
    alpha_prod_t, alpha_prod_t_prev = alphas_at(scheduler, timesteps)

    ours = ddim_step(model_output, sample, alpha_prod_t, alpha_prod_t_prev, eta=1.0, noise=noise)

    for i, timestep in enumerate(timesteps.tolist()):
        expected = scheduler.step(
            model_output[i : i + 1], timestep, sample[i : i + 1], eta=1.0, variance_noise=noise[i : i + 1]
        ).prev_sample
        torch.testing.assert_close(ours.prev_sample[i : i + 1], expected, atol=1e-6, rtol=0)


def test_ddim_alphas_uses_final_alpha_below_zero() -> None:
    alphas_cumprod = torch.tensor([0.9, 0.8, 0.7, 0.6])
    alpha_prod_t, alpha_prod_t_prev = ddim_alphas(alphas_cumprod, torch.tensor([3, 1]), 2, torch.tensor(1.0))
    torch.testing.assert_close(alpha_prod_t, torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(alpha_prod_t_prev, torch.tensor([0.8, 1.0]))


def test_log_prob_equals_normal_distribution_mean_over_dims() -> None:
    model_output, sample, _ = random_inputs(1)
    out = ddim_step(model_output, sample, torch.tensor(0.3), torch.tensor(0.5), eta=1.0)

    expected = torch.distributions.Normal(out.mean, out.std).log_prob(out.prev_sample).mean(dim=(1, 2, 3))

    assert out.log_prob.shape == (SHAPE[0],)
    torch.testing.assert_close(out.log_prob, expected)


def test_gaussian_log_prob_by_hand() -> None:
    # N(0, 2^2) at x = (2, 0, 4): mean(-x^2 / 8) - log 2 - log sqrt(2 pi) = -0.8333333 - 0.6931472 - 0.9189385
    sample = torch.tensor([[2.0, 0.0, 4.0]])
    log_prob = gaussian_log_prob(sample, torch.zeros(1, 3), torch.full((1, 1), 2.0))
    torch.testing.assert_close(log_prob, torch.tensor([-2.4454190]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputed_log_prob_reproduces_sampled_one(dtype: torch.dtype) -> None:
    model_output, sample, _ = random_inputs(2)
    model_output, sample = model_output.to(dtype), sample.to(dtype)
    alphas = (torch.tensor([0.2, 0.6]), torch.tensor([0.3, 0.7]))
    generator = torch.Generator().manual_seed(0)

    sampled = ddim_step(model_output, sample, *alphas, eta=1.0, generator=generator)
    recomputed = ddim_step(model_output, sample, *alphas, eta=1.0, prev_sample=sampled.prev_sample)

    assert sampled.prev_sample.dtype == dtype
    assert sampled.log_prob.dtype == torch.float32
    ratio = torch.exp(recomputed.log_prob - sampled.log_prob)
    torch.testing.assert_close(ratio, torch.ones(2), atol=1e-5, rtol=0)


def test_sampled_log_prob_has_score_function_gradient() -> None:
    # The drawn sample is data: d log_prob / d model_output must not cancel through the reparameterisation.
    model_output, sample, noise = random_inputs(3)
    model_output.requires_grad_(True)
    alphas = (torch.tensor(0.3), torch.tensor(0.5))

    sampled = ddim_step(model_output, sample, *alphas, eta=1.0, noise=noise)
    (grad_sampled,) = torch.autograd.grad(sampled.log_prob.sum(), model_output)
    recomputed = ddim_step(model_output, sample, *alphas, eta=1.0, prev_sample=sampled.prev_sample.detach())
    (grad_recomputed,) = torch.autograd.grad(recomputed.log_prob.sum(), model_output)

    assert grad_sampled.abs().max() > 1e-3
    torch.testing.assert_close(grad_sampled, grad_recomputed)


def test_generator_makes_sampling_repeatable() -> None:
    model_output, sample, _ = random_inputs(4)
    first, second = (
        ddim_step(model_output, sample, 0.3, 0.5, eta=1.0, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    )
    assert torch.equal(first.prev_sample, second.prev_sample)


def test_eta_zero_raises() -> None:
    model_output, sample, _ = random_inputs(5)
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim_step(model_output, sample, 0.3, 0.5, eta=0.0)


def test_unknown_prediction_type_is_named() -> None:
    model_output, sample, _ = random_inputs(6)
    with pytest.raises(ValueError, match="'flow'"):
        ddim_step(model_output, sample, 0.3, 0.5, eta=1.0, prediction_type="flow")  # type: ignore[arg-type]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("timestep", [900, 400, 0])
def test_ddpm_step_matches_diffusers(prediction_type: str, timestep: int) -> None:
    scheduler = DDPMScheduler(**SCHEDULE, variance_type="fixed_small", prediction_type=prediction_type)
    scheduler.set_timesteps(10)
    model_output, sample, _ = random_inputs(timestep)
    prev_timestep = timestep - 100
    alpha_prod_t = scheduler.alphas_cumprod[timestep]
    alpha_prod_t_prev = scheduler.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else torch.tensor(1.0)

    # Both draw their noise with torch.randn from identically seeded CPU generators.
    ours = ddpm_step(
        model_output,
        sample,
        alpha_prod_t,
        alpha_prod_t_prev,
        prediction_type=prediction_type,
        generator=torch.Generator().manual_seed(0),
    )
    expected = scheduler.step(model_output, timestep, sample, generator=torch.Generator().manual_seed(0))

    torch.testing.assert_close(ours.prev_sample, expected.prev_sample, atol=1e-6, rtol=0)
    assert torch.isfinite(ours.log_prob).all()  # also at t = 0, where the posterior is a point mass


def test_ddpm_step_equals_ddim_step_at_eta_one() -> None:
    # DDIM with eta = 1 has the DDPM posterior variance (Song et al. 2021, below eq. 16), hence the same mean.
    scheduler = ddim_scheduler("epsilon")
    model_output, sample, noise = random_inputs(8)
    alpha_prod_t, alpha_prod_t_prev = alphas_at(scheduler, torch.tensor([900, 300]))

    ddim = ddim_step(model_output, sample, alpha_prod_t, alpha_prod_t_prev, eta=1.0, noise=noise)
    ddpm = ddpm_step(model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise=noise)

    torch.testing.assert_close(ddpm.std, ddim.std, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ddpm.mean, ddim.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ddpm.prev_sample, ddim.prev_sample, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ddpm.log_prob, ddim.log_prob, atol=1e-4, rtol=1e-5)
