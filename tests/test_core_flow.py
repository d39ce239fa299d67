"""The flow-matching steps against diffusers' Euler scheduler and against the SDE's defining properties."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ddpo.core.flow import churn_noise, churn_step, euler_step, flow_sigmas, sde_std, sde_step


def test_euler_step_matches_diffusers_flow_match_euler_scheduler():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(10)
    ours = flow_sigmas(10, shift=3.0)
    torch.testing.assert_close(ours, scheduler.sigmas.float(), atol=1e-6, rtol=0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    for i, t in enumerate(scheduler.timesteps[:3]):
        v = torch.randn(x.shape, generator=generator)
        expected = scheduler.step(v, t, x).prev_sample
        x_next = euler_step(v, x, ours[i], ours[i + 1])
        torch.testing.assert_close(x_next, expected, atol=1e-6, rtol=0)
        x = expected


def test_sde_step_mean_and_std_follow_flow_grpo():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 4, 4, generator=generator)
    v = torch.randn(x.shape, generator=generator)
    sigma, sigma_next, a = 0.6, 0.5, 0.7
    out = sde_step(v, x, sigma, sigma_next, noise_level=a, sigma_max=0.95, generator=generator)
    s = a * math.sqrt(sigma / (1 - sigma))
    dt = sigma_next - sigma
    expected_mean = x + (v + s**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    torch.testing.assert_close(out.mean, expected_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.std.flatten(), torch.full((3,), s * math.sqrt(-dt)), atol=1e-6, rtol=0)
    # the log-prob of the drawn sample, recomputed from it, is the same (on-policy ratio 1)
    again = sde_step(v, x, sigma, sigma_next, noise_level=a, sigma_max=0.95, prev_sample=out.prev_sample)
    torch.testing.assert_close(again.log_prob, out.log_prob, atol=1e-6, rtol=0)


def test_sde_with_tiny_noise_level_is_the_euler_step():
    x = torch.randn(2, 4, 4, 4)
    v = torch.randn(2, 4, 4, 4)
    out = sde_step(v, x, 0.7, 0.6, noise_level=1e-6, sigma_max=0.95)
    torch.testing.assert_close(out.prev_sample, euler_step(v, x, 0.7, 0.6), atol=1e-5, rtol=0)


def test_sde_std_at_sigma_one_uses_sigma_max_in_the_denominator():
    """As flow_grpo's sde_step_with_logprob: sqrt(sigma / (1 - where(sigma == 1, sigma_max, sigma))) * a."""
    assert sde_std(torch.tensor(1.0), 0.7, 0.9).item() == pytest.approx(0.7 * math.sqrt(1 / 0.1))
    assert sde_std(torch.tensor(0.5), 0.7, 0.9).item() == pytest.approx(0.7)


def test_sde_preserves_the_marginal_of_a_gaussian_data_distribution():
    """For data x_0 ~ N(0, c^2), x_sigma ~ N(0, (1-sigma)^2 c^2 + sigma^2) and the exact velocity is linear in x;
    the SDE step from the marginal at sigma lands (up to O(dt^2)) on the marginal at sigma_next."""
    c = 0.5
    sigma, sigma_next = 0.5, 0.49

    def variance(s):
        return (1 - s) ** 2 * c**2 + s**2

    def velocity(x, s):  # E[noise - x_0 | x_sigma = x] for Gaussian data
        return x * (s - (1 - s) * c**2) / variance(s)

    generator = torch.Generator().manual_seed(2)
    x = torch.randn(200_000, 1, generator=generator) * math.sqrt(variance(sigma))
    out = sde_step(velocity(x, sigma), x, sigma, sigma_next, noise_level=0.7, sigma_max=0.95, generator=generator)
    assert out.prev_sample.var().item() == pytest.approx(variance(sigma_next), rel=1e-2)


def test_sde_mean_is_the_ode_step_when_the_noise_level_is_zero():
    """a = 0 turns Flow-GRPO's SDE back into the probability-flow ODE: its mean is exactly the Euler step."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 4, 4, generator=generator)
    v = torch.randn(x.shape, generator=generator)
    sigmas = flow_sigmas(5, shift=3.0)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        out = sde_step(v, x, sigma, sigma_next, noise_level=0.0, sigma_max=sigmas[1].item())
        torch.testing.assert_close(out.mean, euler_step(v, x, sigma, sigma_next), atol=1e-6, rtol=0)
        assert torch.count_nonzero(out.std) == 0


def test_churn_step_with_zero_churn_is_the_euler_step():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 4, 4, generator=generator)
    v = torch.randn(x.shape, generator=generator)
    out = churn_step(v, x, 0.8, 0.6, churn=0.0, generator=generator)
    torch.testing.assert_close(out.prev_sample, euler_step(v, x, 0.8, 0.6), atol=1e-6, rtol=0)


def test_churn_step_lands_on_the_next_noise_level_with_fresh_noise():
    """For a single data point the exact velocity is noise - x_0 everywhere; FDFO's churned step from
    x_t = (1 - t) x_0 + t n gives (1 - s) x_0 + s (n + sqrt((1 + g)^2 - 1) eps) / (1 + g): the data kept, the
    noise part re-drawn by a fraction set by gamma, its std still s (hand-derived from edm_step's r and scales)."""
    gamma, t, s = 0.3, 0.7, 0.4
    generator = torch.Generator().manual_seed(5)
    x0, n, eps = (torch.randn(1, 2, 3, 3, generator=generator) for _ in range(3))
    out = churn_step(n - x0, (1 - t) * x0 + t * n, t, s, churn=gamma, noise=eps)
    expected = (1 - s) * x0 + s * (n + math.sqrt((1 + gamma) ** 2 - 1) * eps) / (1 + gamma)
    torch.testing.assert_close(out.prev_sample, expected, atol=1e-6, rtol=0)
    r = s / (1 + gamma - gamma * s)
    assert out.std.flatten().item() == pytest.approx(r * math.sqrt((1 + gamma) ** 2 - 1) / (1 + gamma * r))


def test_churn_step_preserves_the_marginal_of_a_gaussian_data_distribution():
    """As the SDE test: from the marginal at sigma, one churned step (overshoot, rescale, fresh noise) lands on the
    marginal at sigma_next up to the Euler step's O(dt^2)."""
    c, gamma = 0.5, 0.02
    sigma, sigma_next = 0.5, 0.49

    def variance(s):
        return (1 - s) ** 2 * c**2 + s**2

    generator = torch.Generator().manual_seed(6)
    x = torch.randn(200_000, 1, generator=generator) * math.sqrt(variance(sigma))
    velocity = x * (sigma - (1 - sigma) * c**2) / variance(sigma)
    out = churn_step(velocity, x, sigma, sigma_next, churn=gamma, generator=generator)
    assert out.prev_sample.var().item() == pytest.approx(variance(sigma_next), rel=1e-2)


def test_churned_initial_noise_is_standard_normal_and_stays_close_to_its_twin():
    gamma = 0.0025
    generator = torch.Generator().manual_seed(7)
    shared = torch.randn(100_000, generator=generator)
    a = churn_noise(shared, torch.randn(100_000, generator=generator), gamma)
    b = churn_noise(shared, torch.randn(100_000, generator=generator), gamma)
    assert a.var().item() == pytest.approx(1.0, rel=2e-2)
    # the two branches differ by about sqrt(2 ((1 + g)^2 - 1)) / (1 + g) ~ 0.1 per element
    assert (a - b).std().item() == pytest.approx(math.sqrt(2 * ((1 + gamma) ** 2 - 1)) / (1 + gamma), rel=2e-2)
