"""The flow-matching steps against diffusers' Euler scheduler and against the SDE's defining properties."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ddpo.core.flow import euler_step, flow_sigmas, sde_std, sde_step


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


def test_sde_std_at_sigma_one_uses_sigma_max():
    assert sde_std(torch.tensor(1.0), 0.7, 0.9).item() == pytest.approx(0.7 * 3.0)


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
