"""The DDPO policy over a diffusers `StableDiffusionPipeline`, and loading any supported pipeline.

Each DDIM step with eta > 0 is a Gaussian policy pi(x_{t-1} | x_t, c) = N(mu_theta(x_t, t, c), sigma_t^2 I)
(DDPO, Black et al. 2023, Sec. 4.2). `sample` runs the chain with classifier-free guidance and records the
trajectory with each step's log-probability; `log_prob` recomputes those log-probabilities with gradients
through the trainable weights (LoRA via peft, or the whole UNet).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import diffusers
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from ..core.ddim import StepOutput, ddim_alphas, ddim_step, ddpm_step, gaussian_kl
from .base import DEFAULT_LORA_TARGETS, DiffusersPolicy, LoraOptions, encode_each_distinct
from .trajectory import StepPrediction, Trajectory

__all__ = ["DEFAULT_LORA_TARGETS", "LoraOptions", "PolicyLoadError", "SamplingOptions", "StableDiffusionPolicy", "load_pipeline"]

# The pipelines a policy exists for, by the `_class_name` of their model_index.json (imported when used:
# importing SD3's pipeline makes transformers print warnings about optional image processors).
PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusion3Pipeline", "FluxPipeline")


class PolicyLoadError(RuntimeError):
    """The model named in `model.pretrained` could not be loaded."""


@dataclass
class SamplingOptions:
    num_steps: int = 50
    eta: float = 1.0
    guidance_scale: float = 5.0
    height: int = 512
    width: int = 512
    scheduler: str = "ddim"  # "ddim" or "ddpm" (the same posterior at eta = 1; kept for users who think in DDPM)


def load_pipeline(pretrained: str, revision: str | None = None) -> DiffusionPipeline:
    """Load a supported pipeline from a hub id or a local directory, with a clear error.

    Stable Diffusion 1.x/2.x (and the Shapes models, DDIM or flow-matching), SD3/SD3.5 and FLUX, told apart by
    the `_class_name` of the pipeline's model_index.json. Weights load in their stored precision; the policy
    casts frozen modules to its inference dtype.
    """
    local = Path(pretrained).expanduser()
    looks_local = pretrained.startswith((".", "/", "~")) or local.exists() or pretrained.count("/") != 1
    if looks_local and not local.is_dir():
        raise PolicyLoadError(f"model.pretrained={pretrained!r}: no such directory (and not a hub id of the form 'owner/name')")
    source, source_revision = (str(local), None) if looks_local else (pretrained, revision)
    try:
        class_name = DiffusionPipeline.load_config(source, revision=source_revision).get("_class_name", "StableDiffusionPipeline")
    except Exception as error:  # diffusers raises many types (OSError, ValueError, HTTP errors)
        raise PolicyLoadError(f"model.pretrained={pretrained!r} could not be loaded as a diffusers pipeline: {_first_line(error)}") from error
    if class_name not in PIPELINE_CLASSES:
        raise PolicyLoadError(f"model.pretrained={pretrained!r} is a {class_name}; supported pipelines: {', '.join(PIPELINE_CLASSES)}")
    extra = {"safety_checker": None, "requires_safety_checker": False} if class_name == "StableDiffusionPipeline" else {}
    try:
        pipe = getattr(diffusers, class_name).from_pretrained(source, revision=source_revision, **extra)
    except Exception as error:
        raise PolicyLoadError(f"model.pretrained={pretrained!r} could not be loaded as a {class_name}: {_first_line(error)}") from error
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def ddim_scheduler_for_policy(config) -> DDIMScheduler:
    """DDIM with the pipeline's noise schedule, in the form whose every step is a Gaussian policy.

    `set_alpha_to_one` is forced off: with it, the last step has sigma = 0, is deterministic, and has no
    log-probability (SD 1.x ships it off; DDIM's default, used for configs that omit it, is on). Sample
    clipping and dynamic thresholding would make x_{t-1} a non-Gaussian function of the model output, so
    pipelines that use them are refused rather than silently sampled differently.
    """
    scheduler = DDIMScheduler.from_config(config, set_alpha_to_one=False)
    for key in ("clip_sample", "thresholding"):
        if scheduler.config.get(key):
            raise PolicyLoadError(f"the pipeline's scheduler uses {key}=True, which makes a denoising step non-Gaussian; DDPO needs it off")
    return scheduler


def vae_scale_factor(pipeline) -> int:
    """Pixels per latent cell: the VAE halves the resolution once per block after the first."""
    return 2 ** (len(pipeline.vae.config.block_out_channels) - 1)


def native_image_size(pipeline) -> int:
    """The image size (pixels) the denoising network was trained at."""
    if getattr(pipeline, "unet", None) is not None:
        return pipeline.unet.config.sample_size * vae_scale_factor(pipeline)
    return pipeline.default_sample_size * vae_scale_factor(pipeline)  # SD3, FLUX


class StableDiffusionText:
    """Text encoding, latent shape and decoding of `StableDiffusionPipeline`s (the DDIM policy and the UNet flow twin)."""

    pipeline: StableDiffusionPipeline
    device: torch.device
    _negative_embeds: torch.Tensor | None = None

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(B, L, D) last hidden states of the text encoder, padded to the tokenizer's max length; each distinct
        prompt encoded on its own (`encode_each_distinct`)."""

        def encode_one(prompt: str) -> tuple[torch.Tensor]:
            ids = self.tokenizer(
                [prompt], padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids.to(self.device)
            return (self.text_encoder(ids)[0].float(),)

        return encode_each_distinct(prompts, encode_one)[0]

    def negative_embeds(self, batch_size: int) -> torch.Tensor:
        if self._negative_embeds is None:
            self._negative_embeds = self.encode_prompts([""])
        return self._negative_embeds.expand(batch_size, -1, -1)

    def latent_shape(self) -> tuple[int, int, int]:
        factor = vae_scale_factor(self.pipeline)
        return (self.unet.config.in_channels, self.sampling.height // factor, self.sampling.width // factor)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return self.pipeline.image_processor.postprocess(images.float(), output_type="pil")


class StableDiffusionPolicy(StableDiffusionText, DiffusersPolicy):
    """Sampling with trajectories and differentiable log-probs over a `StableDiffusionPipeline` (DDIM / DDPM).

    The UNet is frozen except for LoRA adapters (or fully trainable when `lora.enabled` is False); the VAE
    and the text encoder are always frozen (see `DiffusersPolicy`).
    """

    def __init__(
        self,
        pipeline: StableDiffusionPipeline,
        sampling: SamplingOptions,
        lora: LoraOptions | None = None,
        *,
        train_cfg: bool = True,
        gradient_checkpointing: bool = False,
        device: torch.device | str = "cpu",
        inference_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.sampling = sampling
        self.train_cfg = train_cfg
        self.scheduler = ddim_scheduler_for_policy(pipeline.scheduler.config)
        self.scheduler.set_timesteps(sampling.num_steps, device=torch.device(device))
        self.prediction_type: str = self.scheduler.config.prediction_type
        self.vae, self.text_encoder, self.tokenizer, self.unet = pipeline.vae, pipeline.text_encoder, pipeline.tokenizer, pipeline.unet
        super().__init__(
            pipeline, lora, frozen=(self.vae, self.text_encoder), gradient_checkpointing=gradient_checkpointing,
            device=device, inference_dtype=inference_dtype,
        )  # fmt: skip
        self._negative_embeds: torch.Tensor | None = None

    @classmethod
    def from_pretrained(cls, pretrained: str, sampling: SamplingOptions, lora: LoraOptions | None = None, *, revision: str | None = None, **kwargs) -> "StableDiffusionPolicy":
        return cls(load_pipeline(pretrained, revision), sampling, lora, **kwargs)

    # ---- the policy -------------------------------------------------------------------------------------
    def _noise_prediction(self, model, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor, negative: torch.Tensor, guidance: bool) -> torch.Tensor:
        """epsilon (or v) with classifier-free guidance: uncond + w (cond - uncond) (Ho & Salimans 2022)."""
        scale = self.sampling.guidance_scale
        if guidance and scale != 1.0:
            both = model(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), torch.cat([negative, embeds])).sample
            uncond, cond = both.chunk(2)
            return uncond + scale * (cond - uncond)
        return model(latents, timesteps, embeds).sample

    def _step(self, model_output: torch.Tensor, latents: torch.Tensor, timesteps: torch.Tensor, *, prev_sample=None, noise=None) -> StepOutput:
        alpha_t, alpha_prev = ddim_alphas(
            self.scheduler.alphas_cumprod.to(latents.device),
            timesteps,
            self.scheduler.config.num_train_timesteps // self.sampling.num_steps,
            self.scheduler.final_alpha_cumprod.to(latents.device),
        )
        if self.sampling.scheduler == "ddpm":
            return ddpm_step(model_output, latents, alpha_t, alpha_prev, prediction_type=self.prediction_type, prev_sample=prev_sample, noise=noise)
        return ddim_step(
            model_output, latents, alpha_t, alpha_prev, eta=self.sampling.eta,
            prediction_type=self.prediction_type, prev_sample=prev_sample, noise=noise,
        )  # fmt: skip

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
        """Run the DDIM chain for each prompt; all randomness of sample i comes from `generators[i]`.

        Drawing the initial noise and every step's noise per sample (not per batch) makes a sample depend
        only on its own generator, so results do not change with batch size or the number of processes.
        With `initial_noise_generators`, x_T of sample i is drawn from `initial_noise_generators[i]` instead
        (samples given equal generators start from the same noise).
        """
        batch = len(prompts)
        if len(generators) != batch:
            raise ValueError(f"sample() got {len(generators)} generators for {batch} prompts")
        shape = self.latent_shape()
        T = self.sampling.num_steps
        # One draw per sample of everything the chain needs: x_T and the noise of each of the T steps.
        noise = torch.stack([torch.randn((T + 1, *shape), generator=g, device=g.device) for g in generators]).to(self.device)
        embeds = self.encode_prompts(prompts)
        negative = self.negative_embeds(batch)
        initial = noise[:, 0] if initial_noise_generators is None else _draw_initial(initial_noise_generators, shape, self.device)
        latents = initial * self.scheduler.init_noise_sigma
        all_latents, all_log_probs = [latents], []
        timesteps = self.scheduler.timesteps
        dtype = self.unet.dtype  # read once: diffusers walks every submodule to answer it
        embeds_in, negative_in = embeds.to(dtype), negative.to(dtype)
        for i, t in enumerate(tqdm(timesteps, desc="sampling", leave=False, disable=not progress)):
            t_batch = t.expand(batch).to(self.device)
            model_output = self._noise_prediction(self.unet, latents.to(dtype), t_batch, embeds_in, negative_in, guidance=True).float()
            step = self._step(model_output, latents, t_batch, noise=noise[:, i + 1])
            latents = step.prev_sample
            all_latents.append(latents)
            all_log_probs.append(step.log_prob)
        images = self.decode(latents) if decode else []
        return Trajectory(
            latents=torch.stack(all_latents, dim=1),
            timesteps=timesteps.expand(batch, -1).clone(),
            log_probs=torch.stack(all_log_probs, dim=1),
            prompt_embeds=embeds,
            negative_embeds=negative.clone(),
            prompts=list(prompts),
            metadata=list(metadata) if metadata is not None else [{} for _ in prompts],
            images=images,
        )

    def predict(self, trajectory: Trajectory, step_indices: torch.Tensor, *, reference: bool = False) -> StepPrediction:
        """The policy at the chosen steps, in one model call, with gradients through the trainable weights.

        The K chosen steps of the B samples (and both classifier-free-guidance halves) go through the UNet
        as one batch of B*K (2*B*K with CFG); per-timestep calls give the same values, only slower. Callers
        that must bound memory pass fewer columns at a time (the trainer's `train.timestep_chunk`). With
        `reference`, the base model (adapters disabled) is evaluated too, without gradients.

        step_indices: (B, K) step positions per sample (or (K,) shared by all).
        """
        batch = len(trajectory)
        step_indices = step_indices.to(trajectory.latents.device)
        if step_indices.dim() == 1:
            step_indices = step_indices.expand(batch, -1)
        num_columns = step_indices.shape[1]
        rows = torch.arange(batch, device=step_indices.device)[:, None].expand(-1, num_columns).reshape(-1)
        index = step_indices.reshape(-1)  # sample-major: row b's K steps are consecutive
        dtype = self.unet.dtype
        latents = trajectory.latents[rows, index]
        timesteps = trajectory.timesteps[rows, index]
        prev_sample = trajectory.latents[rows, index + 1].float()
        embeds = trajectory.prompt_embeds.repeat_interleave(num_columns, dim=0).to(dtype)
        negative = trajectory.negative_embeds.repeat_interleave(num_columns, dim=0).to(dtype)

        def unflatten(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.reshape(batch, num_columns, *tensor.shape[1:])

        model_output = self._noise_prediction(self.denoiser, latents.to(dtype), timesteps, embeds, negative, guidance=self.train_cfg).float()
        step = self._step(model_output, latents.float(), timesteps, prev_sample=prev_sample)
        prediction = StepPrediction(model_output=unflatten(model_output), mean=unflatten(step.mean), std=unflatten(step.std), log_prob=unflatten(step.log_prob))
        if reference:
            with torch.no_grad(), self.reference_model() as base:
                base_output = self._noise_prediction(base, latents.to(dtype), timesteps, embeds, negative, guidance=self.train_cfg).float()
            prediction.reference_model_output = unflatten(base_output)
            prediction.reference_mean = unflatten(self._step(base_output, latents.float(), timesteps, prev_sample=prev_sample).mean)
        return prediction

    def log_prob(self, trajectory: Trajectory, step_indices: torch.Tensor) -> torch.Tensor:
        """Recompute log p(x_{t-1} | x_t, c) with gradients for the chosen steps (see `predict`).

        step_indices: (B, K) step positions per sample (or (K,) shared by all); returns (B, K) fp32.
        """
        return self.predict(trajectory, step_indices).log_prob

    @torch.no_grad()
    def kl_to_base(self, trajectory: Trajectory) -> torch.Tensor:
        """KL between this policy and the base model (LoRA adapters disabled) along sampled chains.

        Sum over the T steps of KL(pi_theta(. | x_t, c) || pi_base(. | x_t, c)) at the trajectory's own states,
        per latent dimension (`gaussian_kl`); both policies guided as when sampling. Its expectation over
        chains drawn from pi_theta is the KL between the two chains' distributions (chain rule of KL), the
        quantity KL-regularised fine-tuning bounds.

        Returns:
            (B,) float32, 0 for an adapter that still equals the base model.

        Raises:
            ValueError: the policy trains all UNet weights, so there is no base model left to compare with.
        """
        if not self.lora.enabled:
            raise ValueError("kl_to_base needs LoRA (model.use_lora=true): with full fine-tuning the base weights are gone")
        batch, rows = len(trajectory), torch.arange(len(trajectory))
        dtype = self.unet.dtype
        embeds, negative = trajectory.prompt_embeds.to(self.device, dtype), trajectory.negative_embeds.to(self.device, dtype)
        total = torch.zeros(batch, device=self.device)
        for k in range(trajectory.num_steps):
            latents = trajectory.latents[rows, k].to(self.device)
            timesteps = trajectory.timesteps[rows, k].to(self.device)
            prev_sample = trajectory.latents[rows, k + 1].to(self.device).float()
            output = self._noise_prediction(self.unet, latents.to(dtype), timesteps, embeds, negative, guidance=True).float()
            step = self._step(output, latents.float(), timesteps, prev_sample=prev_sample)
            with self.reference_model() as base:
                base_output = self._noise_prediction(base, latents.to(dtype), timesteps, embeds, negative, guidance=True).float()
            base_step = self._step(base_output, latents.float(), timesteps, prev_sample=prev_sample)
            total += gaussian_kl(step.mean, base_step.mean, step.std)
        return total


def _draw_initial(generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(B, *shape) standard normal noise, sample i from `generators[i]`."""
    return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generators]).to(device)
