"""The one sampling loop, `predict`/log-prob path and KL-to-base path of every model family.

A family adapter (one small file per diffusers pipeline) subclasses `DenoisingPolicy` (networks predicting
epsilon or v over a DDPM noise schedule: SD 1.x/2.x, SDXL) or `FlowMatchingPolicy` (rectified-flow networks predicting
the velocity: SD3, FLUX, Qwen-Image, Z-Image, Wan, the Shapes flow twin) and supplies only what differs:

- `encode(prompts) -> Conditioning`: its text encoders (pooled states, masks);
- `network_output(model, latents, timesteps, conditioning, guidance) -> Tensor`: the network call with its
  guidance (CFG with the negative prompt, a guidance embedding, true CFG with norm rescaling), fp32 out;
- `latent_shape()` (packed as the network sees it), `decode(latents)`;
- the schedule, when it is not the parametrisation's default (a resolution-dependent shift).

Steps are pure kernels of `ddpo.core.samplers`; the loop below runs any of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..core.ddim import gaussian_kl
from ..core.flow import churn_noise
from ..core.samplers import Sampler
from ..core.trajectory import StepPrediction, Trajectory
from .base import DiffusersPolicy, LoraOptions, encode_each_distinct



@dataclass
class SamplingOptions:
    """How a policy samples. Denoising families use `scheduler` ("ddim" with `eta`, eta = 0 deterministic, or
    "ddpm"); flow families use `sampler` ("sde", "churn" or "ode") with `noise_level`, `churn`, `sde_window`."""

    num_steps: int = 50
    eta: float = 1.0
    guidance_scale: float = 5.0
    height: int = 512
    width: int = 512
    scheduler: str = "ddim"  # "ddim" or "ddpm" (the same posterior at eta = 1; kept for users who think in DDPM)
    sampler: str = "sde"  # flow families: "sde" (Flow-GRPO), "churn" (FDFO) or "ode" (deterministic, sampling only)
    noise_level: float = 0.7  # Flow-GRPO's a
    churn: float = 0.0025  # FDFO's gamma
    eval_num_steps: int = 0  # steps of the evaluation sampler (flow families: the ODE); 0 = num_steps
    sde_window: int = 0  # Flow-GRPO-Fast: SDE steps per sample, the rest ODE steps; 0 = every step SDE ("sde" only)
    sde_window_start: int | None = None  # MixGRPO: every sample's window starts at this step (set before each epoch); None = drawn per sample
    keep_model_outputs: bool = False  # record every step's model output in the trajectory, whatever the sampler (GRPO-Guard)
    num_frames: int = 1  # video families: frames per sample

    @classmethod
    def from_config(cls, sample, *, num_steps: int | None = None, eta: float | None = None, guidance_scale: float | None = None) -> "SamplingOptions":
        """Sample as a config's `sample` section says (steps, eta, guidance, size, frames), with the values given
        here instead where they are not None (`ddpo sample`'s options)."""
        return cls(
            num_steps=num_steps or sample.num_steps, eta=sample.eta if eta is None else eta,
            guidance_scale=sample.guidance_scale if guidance_scale is None else guidance_scale,
            height=sample.height, width=sample.width, num_frames=sample.num_frames,
        )  # fmt: skip


@dataclass
class FlowSamplingOptions(SamplingOptions):
    """`SamplingOptions` with the flow families' defaults (Flow-GRPO's 10 training steps, guidance 4.5)."""

    num_steps: int = 10
    guidance_scale: float = 4.5


@dataclass
class Conditioning:
    """Text conditioning of a batch: (B, L, D) states, (B, D) pooled states and (B, L) masks where the family
    has them, for the prompts and for the negative prompt (classifier-free guidance)."""

    embeds: torch.Tensor
    negative: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    negative_mask: torch.Tensor | None = None

    def _map(self, function) -> "Conditioning":
        return Conditioning(**{f.name: None if getattr(self, f.name) is None else function(getattr(self, f.name)) for f in fields(self)})

    def repeat_interleave(self, repeats: int) -> "Conditioning":
        return self._map(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    def to(self, device: torch.device, dtype: torch.dtype) -> "Conditioning":
        """Floating tensors to `dtype`; masks keep theirs."""
        return self._map(lambda tensor: tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device))

    @staticmethod
    def of(trajectory: Trajectory) -> "Conditioning":
        return Conditioning(
            trajectory.prompt_embeds, trajectory.negative_embeds, trajectory.pooled_embeds, trajectory.negative_pooled_embeds,
            trajectory.prompt_mask, trajectory.negative_mask,
        )  # fmt: skip


@dataclass(frozen=True)
class Schedule:
    """The T steps of a chain: `timesteps` (T,) is what the trajectory records and the network is called with
    (the scheduler's integer t, or sigma for flows); step i goes from noise level `levels[i]` to
    `next_levels[i]` (alpha-bar, or sigma), in the kernels' parametrisation."""

    timesteps: torch.Tensor
    levels: torch.Tensor
    next_levels: torch.Tensor


class DiffusionPolicy(DiffusersPolicy):
    """Sampling with trajectories, differentiable log-probs and KL to the base model, for any family.

    Subclasses: a parametrisation (`DenoisingPolicy`, `FlowMatchingPolicy`: schedule, step levels, samplers) and then
    a family (text encoding, network call, latent shape, decoding).
    """

    init_noise_sigma = 1.0

    def __init__(
        self,
        pipeline,
        sampling: SamplingOptions,
        lora: LoraOptions | None = None,
        *,
        frozen: Sequence[torch.nn.Module],
        train_cfg: bool = True,
        gradient_checkpointing: bool = False,
        device: torch.device | str = "cpu",
        inference_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.sampling = sampling
        self.train_cfg = train_cfg
        self._evaluating = False
        self._negative: Conditioning | None = None
        self._schedules: dict[int, Schedule] = {}
        super().__init__(pipeline, lora, frozen=frozen, gradient_checkpointing=gradient_checkpointing, device=device, inference_dtype=inference_dtype)

    # ---- what a family provides -------------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> Conditioning:
        """The prompts' conditioning (`negative` left empty: `conditioning` fills it), fp32, batch-independent."""
        raise NotImplementedError

    def network_output(self, model, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning, guidance: bool) -> torch.Tensor:
        """The guided (when `guidance`) prediction of `model` at (latents, timesteps (B,)), fp32."""
        raise NotImplementedError

    def latent_shape(self) -> tuple[int, ...]:
        """One sample's latents as the network sees them (default: (C, H, W) of an image VAE, unpacked)."""
        factor = vae_scale_factor(self.pipeline)
        return (self.model.config.in_channels, self.sampling.height // factor, self.sampling.width // factor)

    def decode(self, latents: torch.Tensor, output_type: str = "pil") -> list[Image.Image]:
        """Images of final latents (`output_type` as the pipeline's image processor: "pil", or "np" for the float
        (B, H, W, C) array the pipeline returns); a video family returns each sample's frames."""
        return vae_decode(self.pipeline, latents, output_type)

    negative_prompt = ""  # what classifier-free guidance contrasts with

    def encode_negative(self) -> Conditioning:
        """The negative conditioning of classifier-free guidance (SDXL zeroes it)."""
        return self.encode([self.negative_prompt])

    # ---- what a parametrisation provides ----------------------------------------------------------------
    def make_schedule(self, num_steps: int) -> Schedule:
        raise NotImplementedError

    def step_levels(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) recorded timesteps -> (B, T) noise levels and (B, T) next noise levels of their steps."""
        raise NotImplementedError

    def sampler(self, num_steps: int, *, evaluation: bool = False) -> Sampler:
        """The training sampler for chains of `num_steps` (the evaluation one with `evaluation`)."""
        raise NotImplementedError

    def kl_sampler(self, num_steps: int) -> Sampler:
        """The Gaussian step whose KL `kl_to_base` sums (the training sampler's, by default)."""
        return self.sampler(num_steps)

    def eval_num_steps(self) -> int:
        """Steps of the evaluation sampler (grids, periodic evaluation): `sample.eval_num_steps`, else the training's."""
        return self.sampling.eval_num_steps or self.sampling.num_steps

    # ---- schedule and conditioning ----------------------------------------------------------------------
    def schedule(self, num_steps: int) -> Schedule:
        if num_steps not in self._schedules:
            self._schedules[num_steps] = self.make_schedule(num_steps)
        return self._schedules[num_steps]

    @torch.no_grad()
    def conditioning(self, prompts: list[str]) -> Conditioning:
        """The prompts' conditioning with the negative prompt's as the negative one (for CFG), fp32."""
        if self._negative is None:
            self._negative = self.encode_negative()
        cond = self.encode(prompts)
        batch, negative = len(prompts), self._negative

        def expand(tensor):
            return None if tensor is None else tensor.expand(batch, *tensor.shape[1:])

        cond.negative, cond.negative_pooled, cond.negative_mask = expand(negative.embeds), expand(negative.pooled), expand(negative.mask)
        return cond

    @contextmanager
    def evaluation(self) -> Iterator[None]:
        """Sample as evaluation does (the flow families: the deterministic ODE with `eval_num_steps`)."""
        previous, self._evaluating = self._evaluating, True
        try:
            yield
        finally:
            self._evaluating = previous

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
        initial_latents: torch.Tensor | None = None,
    ) -> Trajectory:
        """Run the sampler for each prompt; all randomness of sample i comes from `generators[i]`.

        Drawing per sample (not per batch) makes a sample depend only on its own generator, so results do not
        change with batch size or the number of processes. From each sample's generator, in order: its initial
        noise (from `initial_noise_generators[i]` instead when given, so that samples with equal generators
        start alike: FDFO's pairs; or `initial_latents` itself when given), the fresh noise of the initial
        churn (churn sampler), the noise of every step (stochastic samplers), then (with `sde_window`) the
        start of its SDE window, recorded in `trajectory.sde_window_start` ((B,) int64); its other
        steps are deterministic, with NaN log-probs. With `sampling.sde_window_start` set, every window starts
        there instead (MixGRPO) and nothing is drawn for it.
        """
        batch = len(prompts)
        if len(generators) != batch:
            raise ValueError(f"sample() got {len(generators)} generators for {batch} prompts")
        num_steps = self.eval_num_steps() if self._evaluating else self.sampling.num_steps
        sampler = self.sampler(num_steps, evaluation=self._evaluating)
        schedule = self.schedule(num_steps)
        shape = self.latent_shape()
        if initial_latents is not None:
            latents = initial_latents.to(self.device).float()
        else:
            latents = draw(initial_noise_generators if initial_noise_generators is not None else generators, shape, self.device)
        if sampler.initial_churn:
            latents = churn_noise(latents, draw(generators, shape, self.device), sampler.initial_churn)
        latents = latents * self.init_noise_sigma
        step_noise = draw(generators, (num_steps, *shape), self.device) if sampler.stochastic else None
        window_start = None
        if sampler.window and self.sampling.sde_window_start is not None:
            if not 0 <= self.sampling.sde_window_start <= num_steps - sampler.window:
                raise ValueError(f"an SDE window of {sampler.window} steps cannot start at step {self.sampling.sde_window_start} of a {num_steps}-step chain")
            window_start = torch.full((batch,), self.sampling.sde_window_start, dtype=torch.long, device=self.device)
        elif sampler.window:  # drawn after the step noise, so the window's steps get the noise they would get without one
            window_start = draw_window_starts(generators, max(num_steps // 2, sampler.window) - sampler.window + 1, self.device)
        keep_outputs = sampler.keeps_model_outputs or (self.sampling.keep_model_outputs and not self._evaluating)
        cond = self.conditioning(prompts)
        dtype = self.model.dtype  # read once: diffusers walks every submodule to answer it
        cond_in = cond.to(self.device, dtype)
        all_latents, all_log_probs, outputs = [latents], [], []
        for i in tqdm(range(num_steps), desc="sampling", leave=False, disable=not progress):
            t = schedule.timesteps[i].expand(batch).to(self.device)
            level, next_level = schedule.levels[i].expand(batch).to(self.device), schedule.next_levels[i].expand(batch).to(self.device)
            output = self.network_output(self.model, latents.to(dtype), t, cond_in, guidance=True).float()
            step = sampler.step(output, latents, level, next_level, noise=None if step_noise is None else step_noise[:, i])
            latents, log_prob = step.prev_sample, step.log_prob
            if sampler.window:  # Flow-GRPO-Fast: the SDE step inside each sample's window, the ODE step outside it
                in_window = (window_start <= i) & (i < window_start + sampler.window)
                outside = sampler.deterministic_step(output, all_latents[-1], level, next_level).prev_sample
                latents = torch.where(in_window.view(-1, *[1] * (latents.ndim - 1)), latents, outside)
                log_prob = torch.where(in_window, log_prob, float("nan"))
            all_latents.append(latents)
            all_log_probs.append(log_prob)
            if keep_outputs:
                outputs.append(output)
        return Trajectory(
            latents=torch.stack(all_latents, dim=1),
            timesteps=schedule.timesteps.to(self.device).expand(batch, -1).clone(),
            log_probs=torch.stack(all_log_probs, dim=1),
            prompt_embeds=cond.embeds,
            negative_embeds=cond.negative.clone(),
            pooled_embeds=cond.pooled,
            negative_pooled_embeds=None if cond.negative_pooled is None else cond.negative_pooled.clone(),
            prompt_mask=cond.mask,
            negative_mask=None if cond.negative_mask is None else cond.negative_mask.clone(),
            model_outputs=torch.stack(outputs, dim=1) if outputs else None,
            prompts=list(prompts),
            metadata=list(metadata) if metadata is not None else [{} for _ in prompts],
            images=self.decode(latents) if decode else [],
            sde_window_start=window_start,
        )

    # ---- training ---------------------------------------------------------------------------------------
    def predict(self, trajectory: Trajectory, step_indices: torch.Tensor, *, reference: bool = False) -> StepPrediction:
        """The policy at the chosen steps under its training sampler, in one model call, with gradients.

        The K chosen steps of the B samples (and both classifier-free-guidance halves) go through the network
        as one batch of B*K (2*B*K with CFG); per-timestep calls give the same values, only slower. Callers that
        must bound memory pass fewer columns at a time (the trainer's `train.timestep_chunk`). With `reference`,
        the base model (adapters disabled) is evaluated too, without gradients.

        step_indices: (B, K) step positions per sample (or (K,) shared by all).
        """
        batch = len(trajectory)
        step_indices = step_indices.to(trajectory.latents.device)
        if step_indices.dim() == 1:
            step_indices = step_indices.expand(batch, -1)
        num_columns = step_indices.shape[1]
        rows = torch.arange(batch, device=step_indices.device)[:, None].expand(-1, num_columns).reshape(-1)
        index = step_indices.reshape(-1)  # sample-major: row b's K steps are consecutive
        levels, next_levels = self.step_levels(trajectory.timesteps)
        level, next_level = levels[rows, index], next_levels[rows, index]
        timesteps = trajectory.timesteps[rows, index]
        latents = trajectory.latents[rows, index].float()
        prev_sample = trajectory.latents[rows, index + 1].float()
        dtype = self.model.dtype
        cond = Conditioning.of(trajectory).repeat_interleave(num_columns).to(latents.device, dtype)
        sampler = self.sampler(trajectory.num_steps)
        if not sampler.stochastic:
            raise ValueError(f"the {sampler.name} sampler is deterministic: it has no log-probability to train on (use a stochastic sampler)")

        def unflatten(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.reshape(batch, num_columns, *tensor.shape[1:])

        output = self.network_output(self.denoiser, latents.to(dtype), timesteps, cond, guidance=self.train_cfg).float()
        step = sampler.step(output, latents, level, next_level, prev_sample=prev_sample)
        prediction = StepPrediction(model_output=unflatten(output), mean=unflatten(step.mean), std=unflatten(step.std), log_prob=unflatten(step.log_prob))
        if trajectory.model_outputs is not None:  # the sampling policy's step, from its recorded output: no model call
            recorded = trajectory.model_outputs[rows, index].float()
            prediction.old_mean = unflatten(sampler.step(recorded, latents, level, next_level, prev_sample=prev_sample).mean)
        if reference:
            with torch.no_grad(), self.reference_model() as base:
                base_output = self.network_output(base, latents.to(dtype), timesteps, cond, guidance=self.train_cfg).float()
            prediction.reference_model_output = unflatten(base_output)
            prediction.reference_mean = unflatten(sampler.step(base_output, latents, level, next_level, prev_sample=prev_sample).mean)
        return prediction

    def log_prob(self, trajectory: Trajectory, step_indices: torch.Tensor) -> torch.Tensor:
        """log p(x_next | x, c) under the training sampler, with gradients: (B, K) fp32 (see `predict`)."""
        return self.predict(trajectory, step_indices).log_prob

    @torch.no_grad()
    def kl_to_base(self, trajectory: Trajectory) -> torch.Tensor:
        """KL between this policy and the base model (LoRA adapters disabled) along sampled chains.

        Sum over the T steps of KL(pi_theta(. | x_t, c) || pi_base(. | x_t, c)) at the trajectory's own states,
        per latent dimension (`gaussian_kl`), both guided as when sampling, under `kl_sampler`'s Gaussian step
        (defined for chains of any sampler, the ODE's included). Its expectation over chains drawn from pi_theta
        is the KL between the two chains' distributions (chain rule of KL).

        Returns:
            (B,) float32, 0 for an adapter that still equals the base model.

        Raises:
            ValueError: the policy trains all weights, so there is no base model left to compare with.
        """
        if not self.lora.enabled:
            raise ValueError("kl_to_base needs LoRA (model.use_lora=true): with full fine-tuning the base weights are gone")
        batch = len(trajectory)
        timesteps = trajectory.timesteps.to(self.device)
        levels, next_levels = self.step_levels(timesteps)
        sampler = self.kl_sampler(trajectory.num_steps)
        dtype = self.model.dtype
        cond = Conditioning.of(trajectory).to(self.device, dtype)
        total = torch.zeros(batch, device=self.device)
        for k in range(trajectory.num_steps):
            latents = trajectory.latents[:, k].to(self.device).float()
            output = self.network_output(self.model, latents.to(dtype), timesteps[:, k], cond, guidance=True).float()
            with self.reference_model() as base:
                base_output = self.network_output(base, latents.to(dtype), timesteps[:, k], cond, guidance=True).float()
            step = sampler.step(output, latents, levels[:, k], next_levels[:, k], prev_sample=latents)
            base_step = sampler.step(base_output, latents, levels[:, k], next_levels[:, k], prev_sample=latents)
            total += gaussian_kl(step.mean, base_step.mean, step.std)
        return total


def vae_scale_factor(pipeline) -> int:
    """Pixels per latent cell: the VAE halves the resolution once per block after the first."""
    return 2 ** (len(pipeline.vae.config.block_out_channels) - 1)


def encode_each(prompts: list[str], encode_one) -> Conditioning:
    """Conditioning of states and pooled states, each distinct prompt encoded on its own (`encode_each_distinct`:
    batch-independent floats); `encode_one(prompt)` returns ((1, L, D) states, (1, D) pooled states)."""
    embeds, pooled = encode_each_distinct(prompts, encode_one)
    return Conditioning(embeds=embeds.float(), pooled=pooled.float())


@torch.no_grad()
def vae_decode(pipeline, latents: torch.Tensor, output_type: str = "pil") -> list[Image.Image]:
    """Images of (B, C, H, W) latents as the pipeline decodes them: x / scaling_factor + shift_factor (SD: no shift;
    SD3, FLUX: a shift), or x * std / scaling_factor + mean for VAEs with per-channel `latents_mean`/`latents_std`;
    then the VAE and the pipeline's image processor."""
    vae, config = pipeline.vae, pipeline.vae.config
    if config.get("latents_mean") is not None and config.get("latents_std") is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor + (config.get("shift_factor") or 0.0)
    images = vae.decode(latents.to(vae.dtype)).sample
    return pipeline.image_processor.postprocess(images.float(), output_type=output_type)


def wan_vae_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) latents -> what a Wan-style VAE (Wan, Qwen-Image) decodes: per channel x / (1 / std) + mean,
    in the VAE's dtype, written as their pipelines write it (so that the floats are equal)."""
    config = vae.config
    latents = latents.to(vae.dtype)
    mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    return latents / inverse_std + mean


def classifier_free_guidance(call, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning, scale: float, guidance: bool) -> torch.Tensor:
    """uncond + w (cond - uncond) (Ho & Salimans 2022) with both halves in one batch, or the conditional output
    alone when `guidance` is off or w = 1. `call(latents, timesteps, embeds, pooled, mask)` runs the network."""
    if guidance and scale != 1.0:

        def both(positive, negative):
            return None if positive is None else torch.cat([negative, positive])

        c = conditioning
        uncond, cond = call(
            torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), both(c.embeds, c.negative),
            both(c.pooled, c.negative_pooled), both(c.mask, c.negative_mask),
        ).chunk(2)  # fmt: skip
        return uncond + scale * (cond - uncond)
    return call(latents, timesteps, conditioning.embeds, conditioning.pooled, conditioning.mask)


def draw(generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(B, *shape) standard normal noise, sample i from `generators[i]` (advancing it)."""
    return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generators]).to(device)


def draw_window_starts(generators: Sequence[torch.Generator], num_starts: int, device: torch.device) -> torch.Tensor:
    """(B,) int64 SDE-window starts, uniform in [0, num_starts), sample i from `generators[i]` (advancing it)."""
    return torch.cat([torch.randint(num_starts, (1,), generator=g, device=g.device) for g in generators]).to(device)
