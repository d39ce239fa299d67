"""The flow-matching policies (UNet flow twin, SD3, FLUX) on tiny random pipelines: on-policy log-probs, the
ODE evaluation sampler, FDFO's pairs, the reference model and KL, LoRA saving, picking the policy."""

from __future__ import annotations

import pytest
import torch

from ddpo.algorithms.base import GaussianStepAlgorithm
from ddpo.training.assemble import load_config
from ddpo.policy import LoraOptions, PolicyLoadError, StableDiffusionPolicy, UNetFlowPolicy, policy_for_pipeline
from ddpo.core.flow import euler_step
from ddpo.policy.flow import FlowSamplingOptions
from ddpo.policy.flux import FluxPolicy
from ddpo.policy.sd3 import StableDiffusion3Policy
from ddpo.policy.tiny import TINY_PIPELINES, build_tiny_pipeline

POLICIES = {"sd-flow": UNetFlowPolicy, "sd3": StableDiffusion3Policy, "flux": FluxPolicy}
PROMPTS = ["a cat", "a dog", "an otter", "a cat"]


def generators(n: int, offset: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


def make_policy(kind: str, sampler: str = "sde", guidance_scale: float = 4.0, lora: LoraOptions | None = None, perturb: bool = True, num_steps: int = 4, **options):
    sampling = FlowSamplingOptions(num_steps=num_steps, guidance_scale=guidance_scale, height=32, width=32, sampler=sampler, **options)
    policy = POLICIES[kind](TINY_PIPELINES[kind](seed=0), sampling, lora or LoraOptions(rank=4, alpha=8.0))
    if perturb:  # move the LoRA off its zero init so that the policy differs from the base model
        torch.manual_seed(1)
        with torch.no_grad():
            for parameter in policy.trainable_parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
    return policy


@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_log_probs_recomputed_for_training_equal_the_sampled_ones(kind):
    """Ratio 1 on-policy (within 1e-5), with CFG, after shuffling samples and steps the way the trainer does."""
    policy = make_policy(kind)
    trajectory = policy.sample(PROMPTS, generators(4), decode=False)
    part = trajectory.select(torch.tensor([2, 0, 3, 1]))
    steps = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(i)) for i in range(4)])
    recomputed = policy.log_prob(part, steps)
    recorded = part.log_probs.gather(1, steps)
    assert torch.isfinite(recorded).all()
    assert torch.exp(recomputed - recorded).sub(1).abs().max() < 1e-5
    # a different policy gives different log-probs for the same chains: the check above can fail
    with torch.no_grad():
        for parameter in policy.trainable_parameters():
            parameter.add_(0.05)
    assert (policy.log_prob(part, steps) - recorded).abs().max() > 1e-3


def test_the_ode_evaluation_sampler_is_the_euler_sampler_of_the_shapes_flow_twin():
    """Inside `evaluation()` the policy samples the deterministic ODE with `eval_num_steps`: the same images as the
    independent Euler sampler of the tests (velocity UNet, timestep 1000 sigma, CFG) from the same generators."""
    from helpers import euler_sample

    pipe = build_tiny_pipeline(flow=True)
    policy = UNetFlowPolicy(pipe, FlowSamplingOptions(num_steps=2, eval_num_steps=5, guidance_scale=3.0, height=32, width=32), LoraOptions(enabled=False))
    with policy.evaluation():
        trajectory = policy.sample(["a cat", "a dog"], generators(2))
    assert trajectory.num_steps == 5 and torch.isnan(trajectory.log_probs).all()
    expected = euler_sample(pipe, ["a cat", "a dog"], generators(2), num_steps=5, guidance_scale=3.0)
    for ours, theirs in zip(trajectory.images, expected):
        assert ours.tobytes() == theirs.tobytes()
    assert policy.sample(["a cat"], generators(1), decode=False).num_steps == 2  # training sampler again after the block


@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_a_churned_pair_shares_its_initial_noise_and_diverges_a_little(kind):
    policy = make_policy(kind, sampler="churn", guidance_scale=1.0, churn=0.0025)
    shared = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)]
    pair = policy.sample(["a cat", "a cat"], generators(2), initial_noise_generators=shared, decode=False)
    strangers = policy.sample(["a cat", "a cat"], generators(2), decode=False)
    pair_gap = (pair.latents[0, -1] - pair.latents[1, -1]).abs().mean()
    stranger_gap = (strangers.latents[0, -1] - strangers.latents[1, -1]).abs().mean()
    assert 0 < pair_gap < 0.3 * stranger_gap
    assert pair.model_outputs is not None and pair.model_outputs.shape[:2] == (2, 4)
    # the recorded velocity is the model's at the recorded state: recomputing it gives the same values
    prediction = policy.predict(pair, torch.arange(4))
    torch.testing.assert_close(prediction.model_output, pair.model_outputs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["sd-flow", "sd3"])
def test_reference_predictions_are_the_base_model_and_give_the_gaussian_kl(kind):
    policy = make_policy(kind)
    trajectory = policy.sample(PROMPTS[:2], generators(2), decode=False)
    steps = torch.tensor([[0, 2], [3, 1]])
    prediction = policy.predict(trajectory, steps, reference=True)
    with policy.reference_model():
        base = policy.predict(trajectory, steps)
    torch.testing.assert_close(prediction.reference_model_output, base.model_output, atol=1e-6, rtol=0)
    kl = GaussianStepAlgorithm().kl_to_reference(prediction)
    by_hand = ((prediction.mean - base.mean) ** 2 / (2 * prediction.std**2)).mean(dim=(2, 3, 4))
    torch.testing.assert_close(kl, by_hand, atol=1e-6, rtol=1e-5)
    assert (kl > 0).all()
    assert policy.trainable_parameters()[0].requires_grad and policy.predict(trajectory, steps).log_prob.requires_grad  # adapters back on


@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_kl_to_base_is_zero_for_a_fresh_adapter_and_grows_with_it(kind):
    fresh = make_policy(kind, perturb=False)
    with fresh.evaluation():
        trajectory = fresh.sample(PROMPTS[:2], generators(2), decode=False)
    assert torch.equal(fresh.kl_to_base(trajectory), torch.zeros(2))
    moved = make_policy(kind)
    assert (moved.kl_to_base(trajectory) > 0).all()


@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_saved_lora_loads_with_diffusers_at_its_own_alpha(kind, tmp_path):
    policy = make_policy(kind, lora=LoraOptions(rank=4, alpha=16.0))
    policy.save_adapter(tmp_path)
    reloaded = TINY_PIPELINES[kind](seed=0)
    reloaded.load_lora_weights(tmp_path)
    fresh = POLICIES[kind](reloaded, policy.sampling, LoraOptions(enabled=False))
    with policy.evaluation(), fresh.evaluation():
        a = policy.sample(["a cat"], generators(1), decode=False).latents
        b = fresh.sample(["a cat"], generators(1), decode=False).latents
        base = POLICIES[kind](TINY_PIPELINES[kind](seed=0), policy.sampling, LoraOptions(enabled=False)).sample(["a cat"], generators(1), decode=False).latents
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - base).abs().max() > 1e-3


def test_flux_without_guidance_embedding_uses_classifier_free_guidance():
    pipe = TINY_PIPELINES["flux"](seed=0, guidance_embeds=False)
    policy = FluxPolicy(pipe, FlowSamplingOptions(num_steps=3, guidance_scale=4.0, height=32, width=32), LoraOptions(enabled=False))
    unguided = FluxPolicy(TINY_PIPELINES["flux"](seed=0, guidance_embeds=False), FlowSamplingOptions(num_steps=3, guidance_scale=1.0, height=32, width=32), LoraOptions(enabled=False))
    a = policy.sample(["a cat"], generators(1), decode=False)
    b = unguided.sample(["a cat"], generators(1), decode=False)
    assert (a.latents[:, -1] - b.latents[:, -1]).abs().max() > 1e-4
    steps = torch.arange(3)
    assert torch.exp(policy.log_prob(a, steps) - a.log_probs).sub(1).abs().max() < 1e-5


@pytest.mark.parametrize(("kind", "expected"), [("sd", StableDiffusionPolicy), ("sd-flow", UNetFlowPolicy), ("sd3", StableDiffusion3Policy), ("flux", FluxPolicy)])
def test_the_policy_is_picked_from_the_pipeline(kind, expected):
    config = load_config(overrides=["sample.height=32", "sample.width=32", "sample.num_steps=3"])
    policy = policy_for_pipeline(TINY_PIPELINES[kind](seed=0), config)
    assert type(policy) is expected


def test_fdfo_on_a_ddim_model_is_refused_naming_the_algorithm():
    config = load_config(overrides=["train.algorithm=fdfo", "sample.samples_per_prompt=2", "sample.guidance_scale=1"])
    with pytest.raises(PolicyLoadError, match="train.algorithm='fdfo' needs a flow-matching model"):
        policy_for_pipeline(TINY_PIPELINES["sd"](seed=0), config, sampler="churn")


def test_the_ode_sampler_has_no_log_probability_to_train_on():
    policy = make_policy("sd-flow", sampler="ode")
    trajectory = policy.sample(["a cat"], generators(1), decode=False)
    with pytest.raises(ValueError, match="deterministic"):
        policy.log_prob(trajectory, torch.arange(4))


# ---- Flow-GRPO-Fast: an SDE window among ODE steps --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd-flow", "sd3"])
def test_an_sde_window_gives_each_sample_k_consecutive_log_probs_placed_by_its_own_generator(kind):
    """sde_window=2 of 8 steps: each sample's log-probs are finite on exactly 2 consecutive steps starting in
    [0, 8 // 2 - 2] (the first half of the chain), NaN elsewhere; the start is recorded, differs between samples,
    and depends on the sample's generator only (alone or in a batch of 3: the same chain)."""
    policy = make_policy(kind, num_steps=8, sde_window=2)
    trajectory = policy.sample(["a cat"] * 6, generators(6), decode=False)
    starts = trajectory.sde_window_start
    assert starts.dtype == torch.int64 and starts.min() >= 0 and starts.max() <= 2
    assert len(set(starts.tolist())) > 1  # drawn per sample, not once per batch
    for log_probs, start in zip(trajectory.log_probs, starts.tolist()):
        window = torch.zeros(8, dtype=torch.bool)
        window[start : start + 2] = True
        assert torch.equal(torch.isfinite(log_probs), window)
        assert torch.isnan(log_probs[~window]).all()
    # in the window the log-probs are the policy's own (ratio 1 when recomputed for training)
    window_steps = starts[:, None] + torch.arange(2)
    recomputed = policy.log_prob(trajectory, window_steps)
    assert torch.exp(recomputed - trajectory.log_probs.gather(1, window_steps)).sub(1).abs().max() < 1e-5

    alone = policy.sample(["a cat"], generators(1, offset=4), decode=False)
    in_batch = policy.sample(["a cat"] * 3, generators(3, offset=3), decode=False).select([1])
    assert torch.equal(alone.sde_window_start, in_batch.sde_window_start)
    assert torch.equal(alone.sde_window_start, starts[4:5])
    torch.testing.assert_close(alone.latents, in_batch.latents, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone.log_probs, in_batch.log_probs, atol=1e-4, rtol=0, equal_nan=True)


def test_steps_outside_the_sde_window_are_euler_steps_of_the_recorded_latents():
    """Outside its window a sample's step is x_next = x + (sigma_next - sigma) v with the guided velocity at the
    recorded x; inside it the SDE's noise makes it differ from that Euler step."""
    policy = make_policy("sd-flow", num_steps=6, sde_window=2)
    trajectory = policy.sample(PROMPTS[:3], generators(3), decode=False)
    steps = torch.arange(6)
    velocity = policy.predict(trajectory, steps).model_output.detach()  # (B, T, ...), guided as when sampling
    sigmas = torch.cat([trajectory.timesteps, torch.zeros(3, 1)], dim=1)
    for k in range(6):
        euler = euler_step(velocity[:, k], trajectory.latents[:, k], sigmas[:, k], sigmas[:, k + 1])
        gap = (euler - trajectory.latents[:, k + 1]).flatten(1).abs().amax(dim=1)
        ode = torch.isnan(trajectory.log_probs[:, k])
        assert (gap[ode] < 1e-5).all()
        assert (gap[~ode] > 1e-2).all()


def test_a_window_as_long_as_the_chain_is_the_plain_sde_sampler():
    """The window's start is drawn after all the step noise: sde_window = num_steps samples the same chains, with
    the same log-probs, as sde_window = 0 (every step SDE)."""
    policy = make_policy("sd-flow")
    plain = policy.sample(PROMPTS, generators(4), decode=False)
    policy.sampling.sde_window = 4
    full = policy.sample(PROMPTS, generators(4), decode=False)
    assert torch.equal(full.latents, plain.latents) and torch.equal(full.log_probs, plain.log_probs)
    assert torch.equal(full.sde_window_start, torch.zeros(4, dtype=torch.int64)) and plain.sde_window_start is None


def test_an_sde_window_for_a_ddim_model_is_refused_naming_the_key():
    config = load_config(overrides=["sample.num_steps=4", "sample.sde_window=2"])
    with pytest.raises(PolicyLoadError, match="sample.sde_window=2 mixes a flow model's SDE and ODE steps") as error:
        policy_for_pipeline(TINY_PIPELINES["sd"](seed=0), config)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_a_prompt_s_conditioning_does_not_depend_on_the_batch_it_is_encoded_in(kind):
    """Bitwise: each distinct prompt is encoded on its own, so a sample's conditioning (and hence its trajectory)
    is the same whether it was drawn alone, with other prompts, or on another process of a larger run."""
    policy = make_policy(kind, perturb=False)
    prompts = ["a cat", "a dog wearing a hat", "an otter", "a cat"] * 3
    batched = policy.encode(prompts)
    for k, prompt in enumerate(prompts):
        alone = policy.encode([prompt])
        assert torch.equal(batched.embeds[k], alone.embeds[0]), prompt
        if alone.pooled is not None:
            assert torch.equal(batched.pooled[k], alone.pooled[0]), prompt
