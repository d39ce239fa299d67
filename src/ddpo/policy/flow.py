"""Policies over flow-matching pipelines: the Shapes flow twin (a UNet predicting velocity), SD3/SD3.5, FLUX.

The model predicts the velocity v = noise - x_0 of x_sigma = (1 - sigma) x_0 + sigma noise, and the plain
sampler integrates the ODE x' = v from sigma = 1 to 0 (`ddpo.core.flow`). Three samplers run the same loop:

- "sde": Flow-GRPO's SDE with the same marginals (Liu et al. 2025, arXiv 2505.05470, Sec. 4.2), whose
  every step is a Gaussian policy with an exact log-prob; noise level a = `noise_level`.
- "churn": FDFO's churned Euler step (McAllister et al. 2026, arXiv 2603.12893) with churn gamma = `churn`,
  the initial noise churned too; the velocities are kept in the trajectory (FDFO's v_ref).
- "ode": the deterministic Euler sampler, for evaluation (no log-prob).

With `sde_window` = k > 0 the SDE sampler is Flow-GRPO-Fast's mix (Liu et al. 2025; flow_grpo
`sd3_pipeline_with_logprob_fast`): each sample takes SDE steps only inside a window of k consecutive steps and
deterministic Euler steps elsewhere, so only those k steps have a log-prob to train on. The window's start is
uniform over the starts that keep it inside the first half of the chain, [0, max(T // 2, k) - k] (flow_grpo's
`sde_window_range = (0, num_steps // 2)`): the early, high-noise steps, where the SDE's noise changes the image
most (the last steps have tiny stds, whose log-probs are numerically fragile); a window longer than half the
chain starts at step 0.

Training samples with `sampler` and `num_steps`; inside `policy.evaluation()` the policy samples with the
ODE and `eval_num_steps` (Flow-GRPO trains on 10 steps and evaluates on 40). Subclasses supply the text
encoding, the network call, the latent shape and the decoding of their pipeline.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image
from tqdm.auto import tqdm

from ..core.ddim import StepOutput, gaussian_kl
from ..core.flow import churn_noise, churn_step, euler_step, sde_step
from .base import DiffusersPolicy, LoraOptions
from .stable_diffusion import StableDiffusionText
from .trajectory import StepPrediction, Trajectory

FLOW_SAMPLERS = ("sde", "churn", "ode")
SDE_WINDOW_START = "sde_window_start"  # the trajectory extra holding each sample's first SDE step (with `sde_window`)


@dataclass
class FlowSamplingOptions:
    num_steps: int = 10
    guidance_scale: float = 4.5
    height: int = 512
    width: int = 512
    sampler: str = "sde"  # "sde" (Flow-GRPO), "churn" (FDFO) or "ode" (deterministic, sampling only)
    noise_level: float = 0.7  # Flow-GRPO's a
    churn: float = 0.0025  # FDFO's gamma
    eval_num_steps: int = 0  # steps of the evaluation (ODE) sampler; 0 = num_steps
    sde_window: int = 0  # Flow-GRPO-Fast: SDE steps per sample, the rest ODE steps; 0 = every step SDE ("sde" only)


@dataclass
class Conditioning:
    """Text conditioning of a batch: (B, L, D) embeddings and (B, D) pooled ones (None for the UNet twin)."""

    embeds: torch.Tensor
    negative: torch.Tensor
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None

    def repeat_interleave(self, repeats: int) -> "Conditioning":
        def repeat(tensor):
            return None if tensor is None else tensor.repeat_interleave(repeats, dim=0)

        return Conditioning(repeat(self.embeds), repeat(self.negative), repeat(self.pooled), repeat(self.negative_pooled))

    def to(self, device: torch.device, dtype: torch.dtype) -> "Conditioning":
        def move(tensor):
            return None if tensor is None else tensor.to(device, dtype)

        return Conditioning(move(self.embeds), move(self.negative), move(self.pooled), move(self.negative_pooled))

    @staticmethod
    def of(trajectory: Trajectory) -> "Conditioning":
        return Conditioning(trajectory.prompt_embeds, trajectory.negative_embeds, trajectory.pooled_embeds, trajectory.negative_pooled_embeds)


class FlowMatchingPolicy(DiffusersPolicy):
    """The sampling loop, log-probs, reference predictions and KL shared by the flow-matching policies.

    Subclasses implement `encode(prompts) -> Conditioning`, `velocity(model, latents, sigmas, conditioning,
    guidance) -> v`, `latent_shape()`, `decode(latents)`, and may override `_schedule_kwargs`.
    """

    def __init__(
        self,
        pipeline,
        sampling: FlowSamplingOptions,
        lora: LoraOptions | None = None,
        *,
        frozen: Sequence[torch.nn.Module],
        train_cfg: bool = True,
        gradient_checkpointing: bool = False,
        device: torch.device | str = "cpu",
        inference_dtype: torch.dtype = torch.float32,
    ) -> None:
        if sampling.sampler not in FLOW_SAMPLERS:
            raise ValueError(f"unknown flow sampler {sampling.sampler!r}; one of {', '.join(FLOW_SAMPLERS)}")
        if not 0 <= sampling.sde_window <= sampling.num_steps:
            raise ValueError(f"sde_window={sampling.sde_window} must be in [0, num_steps={sampling.num_steps}]")
        if sampling.sde_window and sampling.sampler == "churn":
            raise ValueError("sde_window mixes SDE and ODE steps; the churn sampler has no SDE steps (use sde_window=0)")
        if not isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(f"a flow-matching policy needs a FlowMatchEulerDiscreteScheduler, not {type(pipeline.scheduler).__name__}")
        self.sampling = sampling
        self.train_cfg = train_cfg
        self._evaluating = False
        self._negative: Conditioning | None = None
        self._schedules: dict[int, torch.Tensor] = {}
        super().__init__(pipeline, lora, frozen=frozen, gradient_checkpointing=gradient_checkpointing, device=device, inference_dtype=inference_dtype)

    # ---- what subclasses provide ------------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> Conditioning:
        """Conditioning of the prompts; `negative` left empty (filled by `conditioning`)."""
        raise NotImplementedError

    def velocity(self, model, latents: torch.Tensor, sigmas: torch.Tensor, conditioning: Conditioning, guidance: bool) -> torch.Tensor:
        """v = noise - x_0 predicted by `model` at (latents, sigmas (B,)), guided when `guidance` (fp32 out)."""
        raise NotImplementedError

    def latent_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        raise NotImplementedError

    def _schedule_kwargs(self, num_steps: int) -> dict:
        """Arguments of the scheduler's `set_timesteps` for `num_steps` (FLUX adds its resolution-dependent shift)."""
        return {"num_inference_steps": num_steps}

    # ---- schedule and conditioning ----------------------------------------------------------------------
    def schedule(self, num_steps: int) -> torch.Tensor:
        """The num_steps + 1 noise levels sigma (from 1 down to 0) of the pipeline's own scheduler, fp32 on CPU."""
        if num_steps not in self._schedules:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)
            scheduler.set_timesteps(**self._schedule_kwargs(num_steps))
            self._schedules[num_steps] = scheduler.sigmas.float().cpu()
        return self._schedules[num_steps]

    @torch.no_grad()
    def conditioning(self, prompts: list[str]) -> Conditioning:
        """The prompts' conditioning with the empty prompt's as the negative one (for CFG), fp32."""
        if self._negative is None:
            self._negative = self.encode([""])
        cond = self.encode(prompts)
        batch = len(prompts)
        cond.negative = self._negative.embeds.expand(batch, *self._negative.embeds.shape[1:])
        if self._negative.pooled is not None:
            cond.negative_pooled = self._negative.pooled.expand(batch, *self._negative.pooled.shape[1:])
        return cond

    @contextmanager
    def evaluation(self) -> Iterator[None]:
        """Sample with the deterministic ODE and `eval_num_steps` inside this block."""
        previous, self._evaluating = self._evaluating, True
        try:
            yield
        finally:
            self._evaluating = previous

    # ---- one step ---------------------------------------------------------------------------------------
    def _step(self, sampler: str, velocity: torch.Tensor, latents: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, sigma_max: float, *, prev_sample=None, noise=None) -> StepOutput:
        if sampler == "sde":
            return sde_step(velocity, latents, sigma, sigma_next, noise_level=self.sampling.noise_level, sigma_max=sigma_max, prev_sample=prev_sample, noise=noise)
        if sampler == "churn":
            return churn_step(velocity, latents, sigma, sigma_next, churn=self.sampling.churn, prev_sample=prev_sample, noise=noise)
        raise ValueError("the ODE sampler is deterministic: it has no log-probability to train on (use 'sde' or 'churn')")

    # ---- sampling ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        generators: Sequence[torch.Generator],
        metadata: list[dict] | None = None,
        *,
        decode: bool = True,
        progress: bool = False,
        initial_noise_generators: Sequence[torch.Generator] | None = None,
    ) -> Trajectory:
        """Run the sampler for each prompt; all randomness of sample i comes from `generators[i]`.

        From each sample's generator, in order: its initial noise x_1 (from `initial_noise_generators[i]`
        instead when given, so that samples with equal generators start alike: FDFO's pairs), the fresh noise
        of the initial churn (churn sampler), the noise of every step, then (with `sde_window`) the start of
        its SDE window, recorded in `trajectory.extras[SDE_WINDOW_START]` ((B,) int64); its other steps are
        Euler steps with NaN log-probs. The ODE sampler draws x_1 only, the same x_1 as
        `ddpo.toyworld.evaluation.euler_sample` for the same generator.
        """
        batch = len(prompts)
        if len(generators) != batch:
            raise ValueError(f"sample() got {len(generators)} generators for {batch} prompts")
        sampler = "ode" if self._evaluating else self.sampling.sampler
        T = (self.sampling.eval_num_steps or self.sampling.num_steps) if self._evaluating else self.sampling.num_steps
        sigmas = self.schedule(T)
        sigma_max = sigmas[1].item() if T > 1 else 0.0
        shape = self.latent_shape()
        latents = _draw(initial_noise_generators if initial_noise_generators is not None else generators, shape, self.device)
        if sampler == "churn":
            latents = churn_noise(latents, _draw(generators, shape, self.device), self.sampling.churn)
        step_noise = _draw(generators, (T, *shape), self.device) if sampler != "ode" else None
        window = self.sampling.sde_window if sampler == "sde" else 0
        extras = {}
        if window:  # drawn after the step noise, so the window's steps get the noise they would get without one
            window_start = _draw_window_starts(generators, max(T // 2, window) - window + 1, self.device)
            extras[SDE_WINDOW_START] = window_start
        cond = self.conditioning(prompts)
        dtype = self.model.dtype  # read once: diffusers walks every submodule to answer it
        cond_in = cond.to(self.device, dtype)
        all_latents, all_log_probs, velocities = [latents], [], []
        for i in tqdm(range(T), desc="sampling", leave=False, disable=not progress):
            sigma = sigmas[i].expand(batch).to(self.device)
            sigma_next = sigmas[i + 1].expand(batch).to(self.device)
            v = self.velocity(self.model, latents.to(dtype), sigma, cond_in, guidance=True).float()
            if sampler == "ode":
                latents = euler_step(v, latents, sigma, sigma_next)
                log_prob = torch.full((batch,), float("nan"), device=self.device)
            else:
                step = self._step(sampler, v, latents, sigma, sigma_next, sigma_max, noise=step_noise[:, i])
                if window:  # Flow-GRPO-Fast: the SDE step inside each sample's window, the ODE step outside it
                    in_window = (window_start <= i) & (i < window_start + window)
                    latents = torch.where(in_window.view(-1, *[1] * (latents.ndim - 1)), step.prev_sample, euler_step(v, latents, sigma, sigma_next))
                    log_prob = torch.where(in_window, step.log_prob, float("nan"))
                else:
                    latents, log_prob = step.prev_sample, step.log_prob
            all_latents.append(latents)
            all_log_probs.append(log_prob)
            if sampler == "churn":
                velocities.append(v)
        images = self.decode(latents) if decode else []
        return Trajectory(
            latents=torch.stack(all_latents, dim=1),
            timesteps=sigmas[:-1].to(self.device).expand(batch, -1).clone(),
            log_probs=torch.stack(all_log_probs, dim=1),
            prompt_embeds=cond.embeds,
            negative_embeds=cond.negative.clone(),
            pooled_embeds=cond.pooled,
            negative_pooled_embeds=None if cond.negative_pooled is None else cond.negative_pooled.clone(),
            model_outputs=torch.stack(velocities, dim=1) if velocities else None,
            prompts=list(prompts),
            metadata=list(metadata) if metadata is not None else [{} for _ in prompts],
            images=images,
            extras=extras,
        )

    # ---- training ---------------------------------------------------------------------------------------
    def predict(self, trajectory: Trajectory, step_indices: torch.Tensor, *, reference: bool = False) -> StepPrediction:
        """The policy at the chosen steps under its training sampler, in one model call, with gradients.

        As `StableDiffusionPolicy.predict`: the B*K chosen (sample, step) pairs (twice that with CFG) go through
        the network at once; with `reference`, the base model (adapters disabled) too, without gradients.

        step_indices: (B, K) step positions per sample (or (K,) shared by all).
        """
        batch = len(trajectory)
        step_indices = step_indices.to(trajectory.latents.device)
        if step_indices.dim() == 1:
            step_indices = step_indices.expand(batch, -1)
        num_columns = step_indices.shape[1]
        rows = torch.arange(batch, device=step_indices.device)[:, None].expand(-1, num_columns).reshape(-1)
        index = step_indices.reshape(-1)  # sample-major: row b's K steps are consecutive
        sigmas = _with_final_zero(trajectory.timesteps)
        sigma, sigma_next = sigmas[rows, index], sigmas[rows, index + 1]
        sigma_max = self.schedule(trajectory.num_steps)[1].item() if trajectory.num_steps > 1 else 0.0
        latents = trajectory.latents[rows, index].float()
        prev_sample = trajectory.latents[rows, index + 1].float()
        dtype = self.model.dtype
        cond = Conditioning.of(trajectory).repeat_interleave(num_columns).to(latents.device, dtype)

        def unflatten(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.reshape(batch, num_columns, *tensor.shape[1:])

        sampler = self.sampling.sampler
        v = self.velocity(self.denoiser, latents.to(dtype), sigma, cond, guidance=self.train_cfg).float()
        step = self._step(sampler, v, latents, sigma, sigma_next, sigma_max, prev_sample=prev_sample)
        prediction = StepPrediction(model_output=unflatten(v), mean=unflatten(step.mean), std=unflatten(step.std), log_prob=unflatten(step.log_prob))
        if reference:
            with torch.no_grad(), self.reference_model() as base:
                v_base = self.velocity(base, latents.to(dtype), sigma, cond, guidance=self.train_cfg).float()
            prediction.reference_model_output = unflatten(v_base)
            prediction.reference_mean = unflatten(self._step(sampler, v_base, latents, sigma, sigma_next, sigma_max, prev_sample=prev_sample).mean)
        return prediction

    def log_prob(self, trajectory: Trajectory, step_indices: torch.Tensor) -> torch.Tensor:
        """log p(x_next | x, c) under the training sampler, with gradients: (B, K) fp32 (see `predict`)."""
        return self.predict(trajectory, step_indices).log_prob

    @torch.no_grad()
    def kl_to_base(self, trajectory: Trajectory) -> torch.Tensor:
        """KL between this policy and the base model (adapters disabled) along sampled chains: the sum over
        steps of the KL between their Flow-GRPO SDE steps (noise level `noise_level`) at the trajectory's own
        states, per latent dimension, both guided as when sampling. Defined for chains of any sampler (the
        ODE's included), so evaluation can report it; see `StableDiffusionPolicy.kl_to_base`.

        Returns:
            (B,) float32, 0 for an adapter that still equals the base model.
        """
        batch = len(trajectory)
        sigmas = _with_final_zero(trajectory.timesteps.to(self.device))
        sigma_max = sigmas[0, 1].item() if trajectory.num_steps > 1 else 0.0
        dtype = self.model.dtype
        cond = Conditioning.of(trajectory).to(self.device, dtype)
        total = torch.zeros(batch, device=self.device)
        for k in range(trajectory.num_steps):
            latents = trajectory.latents[:, k].to(self.device).float()
            sigma, sigma_next = sigmas[:, k], sigmas[:, k + 1]
            v = self.velocity(self.model, latents.to(dtype), sigma, cond, guidance=True).float()
            with self.reference_model() as base:
                v_base = self.velocity(base, latents.to(dtype), sigma, cond, guidance=True).float()
            step = self._step("sde", v, latents, sigma, sigma_next, sigma_max, prev_sample=latents)
            base_step = self._step("sde", v_base, latents, sigma, sigma_next, sigma_max, prev_sample=latents)
            total += gaussian_kl(step.mean, base_step.mean, step.std)
        return total


def _with_final_zero(timesteps: torch.Tensor) -> torch.Tensor:
    """(B, T) sigmas of the steps -> (B, T + 1) with the final sigma = 0 appended."""
    return torch.cat([timesteps.float(), timesteps.new_zeros(timesteps.shape[0], 1, dtype=torch.float32)], dim=1)


def _draw(generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(B, *shape) standard normal noise, sample i from `generators[i]` (advancing it)."""
    return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generators]).to(device)


def _draw_window_starts(generators: Sequence[torch.Generator], num_starts: int, device: torch.device) -> torch.Tensor:
    """(B,) int64 SDE-window starts, uniform in [0, num_starts), sample i from `generators[i]` (advancing it)."""
    return torch.cat([torch.randint(num_starts, (1,), generator=g, device=g.device) for g in generators]).to(device)


class UNetFlowPolicy(StableDiffusionText, FlowMatchingPolicy):
    """A `StableDiffusionPipeline` whose UNet predicts velocity and whose scheduler is the flow-matching Euler one
    (the Shapes flow twin): CLIP text states, timestep input 1000 * sigma, CFG with the empty prompt."""

    def __init__(self, pipeline, sampling: FlowSamplingOptions, lora: LoraOptions | None = None, **kwargs) -> None:
        self.vae, self.text_encoder, self.tokenizer, self.unet = pipeline.vae, pipeline.text_encoder, pipeline.tokenizer, pipeline.unet
        self._negative_embeds = None
        super().__init__(pipeline, sampling, lora, frozen=(self.vae, self.text_encoder), **kwargs)

    def encode(self, prompts: list[str]) -> Conditioning:
        embeds = self.encode_prompts(prompts)
        return Conditioning(embeds=embeds, negative=embeds)

    def velocity(self, model, latents, sigmas, conditioning, guidance):
        timesteps = sigmas * 1000
        scale = self.sampling.guidance_scale
        if guidance and scale != 1.0:
            both = model(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), torch.cat([conditioning.negative, conditioning.embeds])).sample
            uncond, cond = both.chunk(2)
            return uncond + scale * (cond - uncond)
        return model(latents, timesteps, conditioning.embeds).sample
