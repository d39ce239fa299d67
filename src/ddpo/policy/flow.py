"""The flow-matching parametrisation (every rectified-flow family: the Shapes flow twin, SD3/SD3.5, FLUX, Qwen-Image,
Z-Image, Wan) and the Shapes flow twin's adapter (a `StableDiffusionPipeline` whose UNet predicts velocity).

The model predicts the velocity v = noise - x_0 of x_sigma = (1 - sigma) x_0 + sigma noise, and the plain
sampler integrates the ODE x' = v from sigma = 1 to 0 (`ddpo.core.flow`). Three samplers run the same loop:

- "sde": Flow-GRPO's SDE with the same marginals (Liu et al. 2025, arXiv 2505.05470, Sec. 4.2), whose
  every step is a Gaussian policy with an exact log-prob; noise level a = `noise_level`.
- "churn": FDFO's churned Euler step (McAllister et al. 2026, arXiv 2603.12893) with churn gamma = `churn`,
  the initial noise churned too; the velocities are kept in the trajectory (FDFO's v_ref).
- "ode": the deterministic Euler sampler, for evaluation (no log-prob), and for training the algorithms that
  train on the forward process instead of the sampler's steps (DiffusionNFT, AWM: `velocity`).

With `sde_window` = k > 0 the SDE sampler is Flow-GRPO-Fast's mix (Liu et al. 2025; flow_grpo
`sd3_pipeline_with_logprob_fast`): each sample takes SDE steps only inside a window of k consecutive steps and
deterministic Euler steps elsewhere, so only those k steps have a log-prob to train on. The window's start is
uniform over the starts that keep it inside the first half of the chain, [0, max(T // 2, k) - k] (flow_grpo's
`sde_window_range = (0, num_steps // 2)`): the early, high-noise steps, where the SDE's noise changes the image
most (the last steps have tiny stds, whose log-probs are numerically fragile); a window longer than half the
chain starts at step 0. MixGRPO instead puts every sample's window at one step that its algorithm moves over
training (`sampling.sde_window_start`, set before each epoch).

Training samples with `sampler` and `num_steps`; inside `policy.evaluation()` the policy samples with the
ODE and `eval_num_steps` (Flow-GRPO trains on 10 steps and evaluates on 40). The loop itself is
`ddpo.policy.diffusion`'s; families supply the text encoding, the network call, the latent shape and decoding.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ..core.samplers import FLOW_SAMPLERS, Sampler, flow_sampler
from .base import LoraOptions
from ..core.trajectory import Trajectory
from .diffusion import Conditioning, DiffusionPolicy, FlowSamplingOptions, SamplingOptions, Schedule
from .stable_diffusion import StableDiffusionText

__all__ = ["Conditioning", "FlowMatchingPolicy", "FlowSamplingOptions", "UNetFlowPolicy"]


class FlowMatchingPolicy(DiffusionPolicy):
    """Velocity networks over sigma in [0, 1]: the pipeline's own flow-matching schedule (shift, dynamic
    shift), Flow-GRPO's SDE / FDFO's churned / Euler ODE steps; evaluation with the ODE and `eval_num_steps`."""

    def __init__(self, pipeline, sampling: SamplingOptions, lora: LoraOptions | None = None, **kwargs) -> None:
        if sampling.sampler not in FLOW_SAMPLERS:
            raise ValueError(f"unknown flow sampler {sampling.sampler!r}; one of {', '.join(FLOW_SAMPLERS)}")
        if not 0 <= sampling.sde_window <= sampling.num_steps:
            raise ValueError(f"sde_window={sampling.sde_window} must be in [0, num_steps={sampling.num_steps}]")
        if sampling.sde_window and sampling.sampler == "churn":
            raise ValueError("sde_window mixes SDE and ODE steps; the churn sampler has no SDE steps (use sde_window=0)")
        if not isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(f"a flow-matching policy needs a FlowMatchEulerDiscreteScheduler, not {type(pipeline.scheduler).__name__}")
        super().__init__(pipeline, sampling, lora, **kwargs)

    def schedule_kwargs(self, num_steps: int) -> dict:
        """Arguments of the scheduler's `set_timesteps` for `num_steps` (FLUX adds its resolution-dependent shift)."""
        return {"num_inference_steps": num_steps}

    def make_schedule(self, num_steps: int) -> Schedule:
        """The pipeline's own scheduler's num_steps sigmas (from 1 down), each step ending at the next (the last at 0)."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)
        scheduler.set_timesteps(**self.schedule_kwargs(num_steps))
        sigmas = scheduler.sigmas.float().cpu()
        return Schedule(timesteps=sigmas[:-1], levels=sigmas[:-1], next_levels=sigmas[1:])

    def step_levels(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The recorded sigmas and each step's next sigma (the following column; 0 after the last)."""
        sigmas = timesteps.float()
        return sigmas, torch.cat([sigmas[:, 1:], sigmas.new_zeros(sigmas.shape[0], 1)], dim=1)

    def _flow_sampler(self, name: str, num_steps: int) -> Sampler:
        sigma_max = self.schedule(num_steps).levels[1].item() if num_steps > 1 else 0.0
        window = self.sampling.sde_window if name == "sde" else 0
        return flow_sampler(name, noise_level=self.sampling.noise_level, sigma_max=sigma_max, churn=self.sampling.churn, window=window)

    def sampler(self, num_steps: int, *, evaluation: bool = False) -> Sampler:
        return self._flow_sampler("ode" if evaluation else self.sampling.sampler, num_steps)

    def kl_sampler(self, num_steps: int) -> Sampler:
        """Flow-GRPO's SDE step (noise level `noise_level`): defined whatever sampler drew the chain."""
        return self._flow_sampler("sde", num_steps)


    def velocity(self, trajectory: Trajectory, noisy_latents: torch.Tensor, levels: torch.Tensor, *, reference: bool = False) -> torch.Tensor:
        """The conditional velocity v(x_sigma, sigma, c) at given noised latents, without classifier-free guidance.

        For sample b of `trajectory` (its prompt's conditioning) and each of its K noise levels sigma = levels[b, k],
        the network's velocity at noisy_latents[b, k]: what the forward-process algorithms (DiffusionNFT, AWM) train
        by flow matching on noised copies of the epoch's clean samples. All B*K pairs go through the network as one
        batch, through `denoiser` (with gradients unless the caller disables them), or with `reference` through the
        reference model (adapters disabled, no gradients).

        Args:
            trajectory: B samples (their prompt conditioning).
            noisy_latents: (B, K, ...) latents as the network sees them (packed for FLUX-like families).
            levels: (B, K) noise levels sigma in [0, 1].

        Returns:
            (B, K, ...) float32.
        """
        batch, columns = levels.shape
        latents = noisy_latents.reshape(batch * columns, *noisy_latents.shape[2:]).to(self.device)
        sigmas = levels.reshape(-1).to(self.device).float()
        dtype = self.model.dtype
        cond = Conditioning.of(trajectory).repeat_interleave(columns).to(self.device, dtype)
        if reference:
            with torch.no_grad(), self.reference_model() as base:
                output = self.network_output(base, latents.to(dtype), sigmas, cond, guidance=False)
        else:
            output = self.network_output(self.denoiser, latents.to(dtype), sigmas, cond, guidance=False)
        return output.float().reshape(batch, columns, *output.shape[1:])



class UNetFlowPolicy(StableDiffusionText, FlowMatchingPolicy):
    """A `StableDiffusionPipeline` whose UNet predicts velocity and whose scheduler is the flow-matching Euler one
    (the Shapes flow twin): CLIP text states, timestep input 1000 * sigma, CFG with the empty prompt."""

    def __init__(self, pipeline, sampling: SamplingOptions, lora: LoraOptions | None = None, **kwargs) -> None:
        super().__init__(pipeline, sampling, lora, frozen=self._set_components(pipeline), **kwargs)

    def network_output(self, model, latents, sigmas, conditioning: Conditioning, guidance: bool) -> torch.Tensor:
        return self.unet_output(model, latents, sigmas * 1000, conditioning, guidance)
