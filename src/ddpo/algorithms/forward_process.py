"""What the forward-process algorithms (DiffusionNFT, AWM) share: they train a flow model's velocity by flow
matching on noised copies of the epoch's clean samples, never on the sampler's steps.

For sample b and each step k of its chain, the noise level is the chain's own sigma_k (`trajectory.timesteps`,
so the trainer's choice of steps, chunks and accumulation works unchanged) and the noised latent is
x = (1 - sigma_k) x_0 + sigma_k eps_bk, with x_0 the sample's final latent (`ddpo.core.forward_process`).

Before training (`prepare`, no gradients) each sample gets its fresh noise eps_b (one per step) and the sampling
("old") policy's velocity v_old at those noised latents: the weights that sampled the epoch are gone after the
first optimizer step, and both papers' losses compare the trained velocity with theirs. Both are stored in
`trajectory.prepared`, so a run resumed inside an epoch reuses them. The noise is drawn from a generator seeded
by the sample's own initial noise x_T (itself drawn from (run seed, epoch, sample index), see `ddpo.training.loop`), so a
run resumed at an epoch boundary draws the same noise again, whatever the batch size or number of processes.

The policy must be a flow-matching one (`FlowMatchingPolicy.velocity`, no classifier-free guidance: both papers
train the conditional model); `begin_epoch` receives it and `prepare` uses it. Sampling is the deterministic
Euler ODE ("ode"): both papers' point is that any solver may sample.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from ddpo.algorithms.base import LossOutput, MicroBatch, Regularizer, TrajectoryStepAlgorithm, add_regularizers, check_groups
from ddpo.core import clip_advantages, flow_matching_target, group_normalize, noised, velocity_divergence
from ddpo.core.trajectory import SampleData
from ddpo.utils import derive_seed

if TYPE_CHECKING:
    from ddpo.core.trajectory import Trajectory


class VelocityPredictor(Protocol):
    """What a forward-process algorithm asks of the policy (`ddpo.policy.flow.FlowMatchingPolicy.velocity`)."""

    def velocity(self, trajectory: Trajectory, noisy_latents: Tensor, levels: Tensor, *, reference: bool = False) -> Tensor:
        """The conditional velocity at (B, K, ...) noised latents and (B, K) noise levels of `trajectory`'s prompts."""
        ...


@dataclass
class ForwardProcessData(SampleData):
    """noise: (B, T, ...) the fresh noise eps of each sample's forward process at each of its T noise levels;
    old_velocity: (B, T, ...) the sampling policy's velocity at those noised latents (fp32, no CFG)."""

    noise: Tensor
    old_velocity: Tensor


@dataclass
class ForwardPrediction:
    """The policy on the forward process at K steps of B samples.

    sigma: (B, K) noise levels; target: (B, K, ...) the flow-matching target eps - x_0; velocity: (B, K, ...) with
    grad; old_velocity: (B, K, ...) the sampling policy's; reference_velocity: (B, K, ...) the reference model's,
    where a regularizer asks for it, else None.
    """

    sigma: Tensor
    target: Tensor
    velocity: Tensor
    old_velocity: Tensor
    reference_velocity: Tensor | None = None


class ForwardProcessAlgorithm:
    """Group-normalised advantages, prepared noise and old velocities, a loss on the forward process (`loss`)."""

    name: str
    uses_importance_ratio: bool
    one_step_per_epoch = False
    sampler = "ode"
    shared_initial_noise = False
    regularizers: tuple[Regularizer, ...] = ()

    def __init__(self, *, adv_clip_max: float, global_std: bool, prediction_batch_size: int) -> None:
        self.adv_clip_max = adv_clip_max
        self.global_std = global_std
        self.prediction_batch_size = prediction_batch_size  # samples per no-grad model call of `prepare`
        self._policy: VelocityPredictor | None = None

    @classmethod
    def check_config(cls, config: Any) -> None:
        check_groups(cls.name, config)
        if config.train.anchor_kl_weight > 0:
            raise ValueError(
                f"train.anchor_kl_weight={config.train.anchor_kl_weight:g}: the anchors' KL is taken on the sampler's steps, "
                f"which {cls.name} does not train on; use train.kl_weight (the KL to the reference model on the forward process)"
            )

    trust_region = TrajectoryStepAlgorithm.trust_region  # PPO's clip range where the algorithm clips (AWM)

    def begin_epoch(self, epoch: int, policy: Any) -> None:
        """Keep the policy: `prepare` evaluates the sampling policy's velocity with it."""
        if not callable(getattr(policy, "velocity", None)):
            raise ValueError(f"{self.name} trains a flow-matching model's velocity; {type(policy).__name__} is not a flow-matching policy")
        self._policy = policy

    def advantages(self, rewards: Tensor, prompts: list[str]) -> Tensor:
        """(n,) rewards -> (n,) advantages standardised within each prompt's samples of the epoch (or by the whole
        epoch's std with `train.global_std`), clipped to +-adv_clip_max (both papers' per-prompt statistics)."""
        return clip_advantages(group_normalize(rewards, prompts, global_std=self.global_std), self.adv_clip_max)

    def _noise_generator(self, initial_noise: Tensor) -> torch.Generator:
        """A generator seeded by the bytes of one sample's initial noise x_T (see the module docstring)."""
        digest = hashlib.sha256(initial_noise.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
        return torch.Generator().manual_seed(derive_seed(self.name, "forward-noise", digest))

    @torch.no_grad()
    def prepare(self, trajectory: Trajectory) -> None:
        """Attach each sample's forward-process noise at its T noise levels and the sampling policy's velocity there."""
        if self._policy is None:
            raise RuntimeError(f"{self.name}.prepare needs the policy: begin_epoch(epoch, policy) first")
        clean = trajectory.latents[:, -1].float()
        steps = trajectory.num_steps
        noise = torch.stack([torch.randn((steps, *clean.shape[1:]), generator=self._noise_generator(trajectory.latents[b, 0])) for b in range(len(trajectory))])
        noise = noise.to(clean.device)
        old_velocity = torch.empty_like(noise)
        for start in range(0, len(trajectory), self.prediction_batch_size):
            part = list(range(start, min(start + self.prediction_batch_size, len(trajectory))))
            sigma = trajectory.timesteps[part].float()
            noisy = noised(clean[part][:, None], noise[part], sigma)
            old_velocity[part] = self._policy.velocity(trajectory.select(part), noisy, sigma).to(noise.device)
        trajectory.prepared = ForwardProcessData(noise=noise, old_velocity=old_velocity)

    def loss(self, prediction: ForwardPrediction, advantages: Tensor) -> LossOutput:
        """The loss over the B*K pairs of `prediction`, (B,) advantages of its samples."""
        raise NotImplementedError

    def kl_to_reference(self, prediction: ForwardPrediction) -> Tensor:
        """(B, K) mean((v - v_ref)^2): both papers' KL to the reference model, in velocity space."""
        return velocity_divergence(prediction.velocity, prediction.reference_velocity)

    def micro_step(self, policy: VelocityPredictor, batch: MicroBatch) -> LossOutput:
        """The velocity at the forward-process latents of the batch's steps, the loss, then the regularizers."""
        trajectory, columns = batch.trajectory, batch.steps.to(batch.trajectory.latents.device)
        if not isinstance(trajectory.prepared, ForwardProcessData):
            raise ValueError(f"{self.name} trains on prepared forward-process data: call prepare(trajectory) after sampling")
        rows = torch.arange(len(trajectory), device=columns.device)[:, None]
        sigma = trajectory.timesteps[rows, columns].float()
        clean = trajectory.latents[:, -1, None].float()
        noise = trajectory.prepared.noise[rows, columns].float()
        noisy = noised(clean, noise, sigma)
        reference = any(r.needs_reference and r.weight > 0 for r in self.regularizers)
        prediction = ForwardPrediction(
            sigma=sigma, target=flow_matching_target(clean, noise), velocity=policy.velocity(trajectory, noisy, sigma),
            old_velocity=trajectory.prepared.old_velocity[rows, columns].float(),
            reference_velocity=policy.velocity(trajectory, noisy, sigma, reference=True) if reference else None,
        )  # fmt: skip
        return add_regularizers(self.loss(prediction, batch.advantages), self.regularizers, self.kl_to_reference, policy, batch, prediction)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
