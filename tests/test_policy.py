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


def test_batched_log_probs_give_the_loop_s_loss_and_gradients():
    """Several timesteps in one model call (the trainer's timestep_chunk) = one call per timestep."""
    from ddpo.core.losses import ppo_clip_loss

    torch.manual_seed(0)
    policy = StableDiffusionPolicy(build_tiny_pipeline(), SAMPLING, LoraOptions(rank=4, alpha=4.0))
    with torch.no_grad():  # move the LoRA off its zero init so that every adapter tensor gets a gradient
        for parameter in policy.trainable_parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    trajectory = policy.sample(["a cat", "a dog", "an otter"], generators(3), decode=False)
    steps = torch.stack([torch.randperm(5, generator=torch.Generator().manual_seed(i))[:4] for i in range(3)])
    advantages = torch.tensor([1.0, -0.5, 0.3])
    old = trajectory.log_probs.gather(1, steps)

    # the loop: one model call per timestep, losses summed
    loop_loss = torch.zeros(())
    for k in range(4):
        log_prob = policy.log_prob(trajectory, steps[:, k : k + 1])
        loss = ppo_clip_loss(advantages, torch.exp(log_prob[:, 0] - old[:, k]), 0.2)
        loss.backward()
        loop_loss += loss.detach()
    loop_grads = [p.grad.clone() for p in policy.trainable_parameters()]
    policy.unet.zero_grad(set_to_none=True)
    # batched: all four timesteps in one call, the mean over the 3 x 4 pairs scaled by 4
    log_prob = policy.log_prob(trajectory, steps)
    batched_loss = ppo_clip_loss(advantages.repeat_interleave(4), torch.exp(log_prob.reshape(-1) - old.reshape(-1)), 0.2) * 4
    batched_loss.backward()
    assert torch.allclose(batched_loss.detach(), loop_loss, atol=1e-5, rtol=0)
    assert all(g.abs().max() > 0 for g in loop_grads)
    for loop_grad, parameter in zip(loop_grads, policy.trainable_parameters()):
        assert torch.allclose(parameter.grad, loop_grad, atol=1e-5, rtol=0)


def test_channels_last_stores_conv_weights_nhwc_and_samples_the_same_images(tiny_pipeline_dir):
    """`model.channels_last` changes the memory layout, not the model: same chains within float rounding."""
    from helpers import tiny_overrides

    from ddpo.training.assemble import load_config
    from ddpo.policy import build_policy

    def policy(channels_last: bool):
        overrides = tiny_overrides(tiny_pipeline_dir, **{"model.channels_last": str(channels_last).lower()})
        return build_policy(load_config("sd_compressibility", overrides))

    plain, nhwc = policy(False), policy(True)
    conv = nhwc.model.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert plain.model.conv_in.weight.is_contiguous()
    a = plain.sample(["a cat", "a dog"], generators(2), decode=False)
    b = nhwc.sample(["a cat", "a dog"], generators(2), decode=False)
    assert torch.allclose(a.latents, b.latents, atol=1e-4) and torch.allclose(a.log_probs, b.log_probs, atol=1e-3)
    steps = torch.tensor([[0, 3], [1, 4]])
    assert torch.allclose(nhwc.log_prob(b, steps), b.log_probs.gather(1, steps), atol=1e-5)  # still on-policy
