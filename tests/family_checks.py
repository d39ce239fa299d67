"""Checks every model family must pass (issue 19), written once and run per family by `tests/test_families*.py`.

A `FamilyCase` says how to build a tiny random pipeline of the family, which policy adapts it, and how to call the
family's own diffusers pipeline so that it samples what the policy's deterministic sampler samples. The checks:

- full-chain parity: the same initial noise through the policy's deterministic sampler (DDIM eta 0 / the flow
  ODE) and through `pipe(..., latents=noise)` ends in the same latents and decoded images (1e-5), with guidance;
- on-policy log-probs: recomputed with grad under the stochastic sampler they equal the recorded ones (ratio 1
  within 1e-5), and differ after one optimizer step;
- LoRA round trip: the policy's saved LoRA, loaded with the pipeline's own `load_lora_weights`, makes the pipeline
  sample what the policy samples (1e-5);
- the real architecture on the meta device: its parameter count against the published size, and every LoRA
  target module name present in it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ddpo.policy import LoraOptions, SamplingOptions

PROMPTS = ["a cat riding a bike", "a dog", "an otter playing chess", "a horse"]


@dataclass
class FamilyCase:
    """One family under test.

    build:            () -> a tiny random pipeline of the family (modules in eval mode)
    policy_class:     the policy adapter, constructed as policy_class(pipeline, sampling, lora, **policy_kwargs)
    deterministic:    SamplingOptions fields of the deterministic sampler the pipeline runs (eta 0, or "ode")
    stochastic:       SamplingOptions fields of the training sampler (eta 1, or "sde")
    pipeline_kwargs:  (guidance_scale) -> the extra keyword arguments of pipe(...) that make it sample alike
    size:             image height and width
    pipeline_latents: the policy's initial noise -> the pipeline's `latents` argument (FLUX.2 takes it unpacked)
    output_latents:   (policy, final latents) -> what the pipeline returns with output_type="latent" (FLUX.2 klein
                      returns the VAE's latents)
    lora_targets:     the LoRA target modules of the LoRA checks (None: `LoraOptions`' default)
    """

    name: str
    build: Callable[[], object]
    policy_class: type
    deterministic: dict
    stochastic: dict
    pipeline_kwargs: Callable[[float], dict] = lambda scale: {"guidance_scale": scale}
    size: int = 32
    num_steps: int = 4
    guidance_scale: float = 3.0
    policy_kwargs: dict = field(default_factory=dict)
    pipeline_latents: Callable[[torch.Tensor], torch.Tensor] = lambda noise: noise
    output_latents: Callable[[object, torch.Tensor], torch.Tensor] = lambda policy, latents: latents
    lora_targets: list[str] | None = None

    def lora(self, rank: int, alpha: float) -> LoraOptions:
        return LoraOptions(rank=rank, alpha=alpha, **({} if self.lora_targets is None else {"target_modules": list(self.lora_targets)}))

    def sampling(self, kind: str, **overrides) -> SamplingOptions:
        options = dict(num_steps=self.num_steps, guidance_scale=self.guidance_scale, height=self.size, width=self.size)
        options.update(self.deterministic if kind == "deterministic" else self.stochastic)
        options.update(overrides)
        return SamplingOptions(**options)

    def policy(self, pipe, kind: str = "deterministic", lora: LoraOptions | None = None, **overrides):
        return self.policy_class(pipe, self.sampling(kind, **overrides), lora or LoraOptions(enabled=False), **self.policy_kwargs)


def generators(n: int, offset: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


def initial_noise(policy, n: int) -> torch.Tensor:
    return torch.stack([torch.randn(policy.latent_shape(), generator=g) for g in generators(n, 100)])


def pipeline_sample(case: FamilyCase, pipe, prompts: list[str], noise: torch.Tensor, output_type: str):
    """The family's own pipeline from `noise`, as latents (packed as the policy keeps them) or a float image array."""
    with torch.no_grad():  # a copy of the prompts: ZImagePipeline writes its chat template into the list it is given
        result = pipe(
            prompt=list(prompts), latents=case.pipeline_latents(noise.clone()), num_inference_steps=case.num_steps, height=case.size, width=case.size,
            output_type=output_type, **case.pipeline_kwargs(case.guidance_scale),
        )  # fmt: skip
    images = result.frames if hasattr(result, "frames") else result.images
    return images if isinstance(images, torch.Tensor) else np.asarray(images)


def check_full_chain_parity(case: FamilyCase, batch_size: int) -> dict:
    """The policy's deterministic chain equals the pipeline's from the same noise, with guidance on.

    Returns the maxima of |latents difference| and |image difference| (each asserted <= 1e-5)."""
    pipe = case.build()
    policy = case.policy(pipe)
    prompts = PROMPTS[:batch_size]
    noise = initial_noise(policy, batch_size)
    trajectory = policy.sample(prompts, generators(batch_size), decode=False, initial_latents=noise)
    final = trajectory.latents[:, -1]
    ours = case.output_latents(policy, final)
    ours_images = np.asarray(policy.decode(final, output_type="np"))
    theirs = pipeline_sample(case, pipe, prompts, noise, "latent")
    theirs_images = pipeline_sample(case, pipe, prompts, noise, "np")
    latent_gap = (ours.float() - theirs.float()).abs().max().item()
    image_gap = float(np.abs(ours_images.astype(np.float64) - theirs_images.astype(np.float64)).max())
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    assert (final - noise).abs().max() > 1e-3  # the chain moved: the comparison is not of the noise with itself
    assert latent_gap <= 1e-5 and image_gap <= 1e-5, (latent_gap, image_gap)
    return {"latents": latent_gap, "images": image_gap}


def check_on_policy_log_probs(case: FamilyCase) -> float:
    """Log-probs recomputed with grad equal the recorded ones; after one optimizer step they differ.

    Returns max |ratio - 1| before the step."""
    pipe = case.build()
    policy = case.policy(pipe, "stochastic", case.lora(rank=4, alpha=4.0))
    trajectory = policy.sample(PROMPTS[:2], generators(2), decode=False)
    steps = torch.tensor([s for s in range(trajectory.num_steps) if torch.isfinite(trajectory.log_probs[:, s]).all()])
    recomputed = policy.log_prob(trajectory, steps)
    ratio_gap = (recomputed - trajectory.log_probs[:, steps]).exp().sub(1).abs().max().item()
    assert recomputed.requires_grad and ratio_gap <= 1e-5, ratio_gap
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)
    (-recomputed.mean()).backward()
    with torch.no_grad():  # LoRA's B starts at zero: perturb A and B so the step changes the network's output
        for parameter in policy.trainable_parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    optimizer.step()
    with torch.no_grad():
        after = policy.log_prob(trajectory, steps)
    assert (after - trajectory.log_probs[:, steps]).abs().max() > 1e-4
    return ratio_gap


def check_lora_round_trip(case: FamilyCase, tmp_path) -> float:
    """The saved LoRA, loaded by the pipeline's own `load_lora_weights`, samples what the policy samples.

    Returns max |latents difference| (asserted <= 1e-5)."""
    pipe = case.build()
    fresh = copy.deepcopy(pipe)
    policy = case.policy(pipe, lora=case.lora(rank=4, alpha=8.0))
    with torch.no_grad():
        for parameter in policy.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(parameter.numel())) * 0.1)
    policy.save_adapter(tmp_path / "lora")
    fresh.load_lora_weights(str(tmp_path / "lora"))
    noise = initial_noise(policy, 2)
    ours = policy.sample(PROMPTS[:2], generators(2), decode=False, initial_latents=noise).latents[:, -1]
    base = case.policy(case.build()).sample(PROMPTS[:2], generators(2), decode=False, initial_latents=noise).latents[:, -1]
    theirs = pipeline_sample(case, fresh, PROMPTS[:2], noise, "latent")
    gap = (case.output_latents(policy, ours).float() - theirs.float()).abs().max().item()
    assert (ours - base).abs().max() > 1e-3  # the LoRA changes the samples: the round trip is not vacuous
    assert gap <= 1e-5, gap
    return gap


def check_real_architecture(architecture: dict) -> int:
    """The real network's weights (built on the meta device from its config) are within 3% of the published size (or
    the architecture's own `tolerance`, where the published name is rounded), and every LoRA target names modules
    that exist in it. Returns the count."""
    from ddpo.policy.families import build_on_meta_device

    network = build_on_meta_device(architecture)
    count = sum(tensor.numel() for tensor in network.state_dict().values())
    published = architecture["published_parameters"]
    assert abs(count - published) / published <= architecture.get("tolerance", 0.03), (count, published)
    names = [name for name, _ in network.named_modules()]
    for target in architecture["lora_targets"]:
        assert any(name == target or name.endswith("." + target) for name in names), target
    return count


def save_tiny_dirs(tmp_path_factory, kinds: tuple[str, ...]) -> dict:
    """Each tiny family of `kinds` saved as a diffusers directory (what `ddpo train` loads), by kind."""
    from ddpo.policy.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny-" + "-".join(kinds))
    return {kind: save_tiny_pipeline(root / kind, kind=kind) for kind in kinds}
