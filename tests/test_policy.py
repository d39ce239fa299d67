"""The Stable Diffusion policy on a tiny random pipeline: on-policy log-probs, LoRA saving, scheduler safety."""

from __future__ import annotations

import pytest
import torch

from ddpo.policy import LoraOptions, PolicyLoadError, SamplingOptions, StableDiffusionPolicy
from ddpo.policy.tiny import build_tiny_pipeline

SAMPLING = SamplingOptions(num_steps=5, eta=1.0, guidance_scale=5.0, height=32, width=32)


def generators(n: int, offset: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_log_probs_recomputed_for_training_equal_the_sampled_ones(prediction_type):
    """Ratio 1 on-policy, with guidance, after shuffling samples and steps the way the trainer does."""
    policy = StableDiffusionPolicy(build_tiny_pipeline(prediction_type=prediction_type), SAMPLING)
    trajectory = policy.sample(["a cat", "a dog", "an otter", "a cat"], generators(4))
    order = torch.tensor([2, 0, 3, 1])
    part = trajectory.select(order)
    steps = torch.stack([torch.randperm(5, generator=torch.Generator().manual_seed(i)) for i in range(4)])
    recomputed = policy.log_prob(part, steps)
    recorded = part.log_probs.gather(1, steps)
    assert torch.allclose(recomputed, recorded, atol=1e-5, rtol=0)
    assert torch.isfinite(trajectory.log_probs).all()


def test_samples_depend_only_on_their_own_generator():
    policy = StableDiffusionPolicy(build_tiny_pipeline(), SAMPLING)
    alone = policy.sample(["a dog"], generators(1, offset=7), decode=False)
    batched = policy.sample(["a cat", "a dog"], [torch.Generator().manual_seed(3), torch.Generator().manual_seed(7)], decode=False)
    # Equal up to float differences between batch sizes; another generator would differ by O(1).
    assert torch.allclose(alone.latents[0], batched.latents[1], atol=1e-3)


def test_saved_lora_loads_with_diffusers_at_its_own_alpha(tmp_path):
    """alpha != rank must survive the round trip (diffusers assumes alpha = rank without the metadata)."""
    policy = StableDiffusionPolicy(build_tiny_pipeline(), SAMPLING, LoraOptions(rank=4, alpha=16.0))
    with torch.no_grad():
        for parameter in policy.trainable_parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    policy.save_adapter(tmp_path)
    reloaded = build_tiny_pipeline()
    reloaded.load_lora_weights(tmp_path)
    fresh = StableDiffusionPolicy(reloaded, SAMPLING, LoraOptions(enabled=False))
    a = policy.sample(["a cat"], generators(1), decode=False).latents
    b = fresh.sample(["a cat"], generators(1), decode=False).latents
    assert torch.allclose(a, b, atol=1e-5)
    base = StableDiffusionPolicy(build_tiny_pipeline(), SAMPLING, LoraOptions(enabled=False)).sample(["a cat"], generators(1), decode=False).latents
    assert (a - base).abs().max() > 1e-3


def test_a_scheduler_with_set_alpha_to_one_still_gives_a_finite_last_step():
    pipe = build_tiny_pipeline()
    pipe.scheduler.register_to_config(set_alpha_to_one=True)
    policy = StableDiffusionPolicy(pipe, SAMPLING)
    assert torch.isfinite(policy.sample(["a cat"], generators(1), decode=False).log_probs).all()


def test_a_clipping_scheduler_is_refused():
    pipe = build_tiny_pipeline()
    pipe.scheduler.register_to_config(clip_sample=True)
    with pytest.raises(PolicyLoadError, match="clip_sample"):
        StableDiffusionPolicy(pipe, SAMPLING)
