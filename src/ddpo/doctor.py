"""`ddpo doctor`: will this run train on-policy on this model and this hardware, and how long will it take?

It builds exactly what `ddpo train` builds (a `Trainer` over a temporary run directory: the same accelerator,
precision, policy, LoRA, reward and prompts), draws one sampling batch and measures:

- on_policy: the importance ratio pi_theta / pi_old at the first update, per denoising step, recomputed as
  training recomputes it (a minibatch of `train.batch_size`, `train.timestep_chunk` steps per call, with
  gradients). The weights that sampled are the weights that recompute, so every ratio must be 1; where
  max |ratio - 1| exceeds `train.clip_range` the first step already clips (bf16/fp16 recomputation, TF32,
  batch-dependent kernels, a sampler that differs from the recomputation);
- batch_invariance: a sample drawn alone and inside its batch (same noise): its latents and log-probs;
- zero_noise_step: the sampler's step with its noise set to zero (the Gaussian's mean the log-prob is taken
  around) against diffusers' own `DDIMScheduler.step(..., variance_noise=0)` on the same model output;
- precision: the precision in use against fp32 on the same chain (log-prob and latent drift);
- reward: deterministic (the same images scored twice), batch-invariant (one image alone), finite, one score
  per image, seconds per image;
- forecast: seconds per epoch (sample / reward / train), reward queries per hour, peak memory.

Each failed check names the config keys that change it. `ddpo train` itself runs the cheapest check for free:
the ratios of each epoch's first optimizer step (`train.on_policy_check`).
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .config import Config
from .utils import generators_for

PASS, FAIL, SKIP = "pass", "FAIL", "skip"
ON_POLICY_KEYS = ["model.mixed_precision", "model.allow_tf32", "train.clip_range"]


@dataclass
class Check:
    name: str
    status: str  # PASS, FAIL or SKIP
    measured: str  # what was measured, in words and numbers
    change: list[str] = field(default_factory=list)  # config keys to change when it fails
    values: dict = field(default_factory=dict)  # the numbers, for --json


@dataclass
class DoctorReport:
    checks: list[Check]
    forecast: dict
    setup: dict

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    def to_json(self) -> dict:
        return {"ok": not self.failed, "setup": self.setup, "checks": [asdict(c) for c in self.checks], "forecast": self.forecast}

    def table(self) -> str:
        width = max(len(c.name) for c in self.checks)
        lines = [f"{'check':<{width}}  status  measured"]
        for c in self.checks:
            lines.append(f"{c.name:<{width}}  {c.status:<6}  {c.measured}")
            if c.status == FAIL and c.change:
                lines.append(f"{'':<{width}}          change: {', '.join(c.change)}")
        f = self.forecast
        lines.append("")
        lines.append(
            f"forecast: {f['seconds_per_epoch']:.1f} s/epoch (sample {f['sample_seconds']:.1f} s, reward {f['reward_seconds']:.1f} s, "
            f"train {f['train_seconds']:.1f} s); {f['reward_queries_per_hour']:,.0f} reward queries/hour; "
            f"{f['epochs']} epochs ~ {f['run_hours']:.2f} h; peak memory {f['peak_memory']}"
        )
        lines.append("doctor: " + ("all checks passed" if not self.failed else f"{len(self.failed)} check(s) failed: {', '.join(c.name for c in self.failed)}"))
        return "\n".join(lines)


def run_doctor(config: Config, *, num_prompts: int | None = None) -> DoctorReport:
    """Build the run `config` describes and check it (see the module docstring). Raises what `Trainer` raises
    on bad input (ConfigError, RewardError, ...)."""
    from .training.loop import Trainer
    from .training.record import resident_memory_mb

    with tempfile.TemporaryDirectory(prefix="ddpo-doctor-") as work:
        trainer = Trainer(config, f"{work}/run", progress=False)
        try:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            policy, algorithm, sizes = trainer.policy, trainer.algorithm, trainer.sizes
            batch = min(config.sample.batch_size, num_prompts or config.sample.batch_size)
            indices = list(range(batch))
            prompts, metadata = _prompts(trainer, indices)
            # Sample 0 alone first: the batch-invariance check's reference, and the warm-up of the timed batch.
            alone = policy.sample(prompts[:1], generators_for(config.seed, "doctor", 0, [0]), metadata[:1], initial_noise_generators=_initial(trainer, [0]), decode=False)
            started = time.perf_counter()
            trajectory = policy.sample(prompts, generators_for(config.seed, "doctor", 0, indices), metadata, initial_noise_generators=_initial(trainer, indices))
            sample_seconds = time.perf_counter() - started
            algorithm.prepare(trajectory)

            checks = []
            on_policy, train_seconds_per_micro_step = _check_on_policy(trainer, trajectory)
            checks.append(on_policy)
            checks.append(_check_batch_invariance(trainer, trajectory, alone))
            checks.append(_check_zero_noise_step(trainer, trajectory))
            checks.append(_check_precision(trainer, trajectory))
            reward_check, reward_seconds_per_image = _check_reward(trainer, trajectory)
            checks.append(reward_check)

            num_batches = config.sample.num_batches_per_epoch + config.sample.anchor_batches_per_epoch
            sample_epoch = sample_seconds * num_batches * config.sample.batch_size / batch
            reward_epoch = reward_seconds_per_image * sizes.samples_per_process
            chunk = config.train.timestep_chunk or sizes.num_train_timesteps
            calls = config.train.inner_epochs * sizes.minibatches_per_epoch * math.ceil(sizes.num_train_timesteps / chunk)
            train_epoch = train_seconds_per_micro_step * calls
            # The reward scores each batch in a thread while the next one samples: only what it adds beyond is waited for.
            epoch_seconds = sample_epoch + max(0.0, reward_epoch - sample_epoch * (num_batches - 1) / max(num_batches, 1)) + train_epoch
            if torch.cuda.is_available():
                peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB on the GPU"
            else:
                rss = resident_memory_mb()
                peak = f"{rss:.0f} MiB resident (CPU)" if rss is not None else "unknown (CPU)"
            forecast = {
                "seconds_per_epoch": round(epoch_seconds, 3),
                "sample_seconds": round(sample_epoch, 3),
                "reward_seconds": round(reward_epoch, 3),
                "train_seconds": round(train_epoch, 3),
                "reward_queries_per_hour": round(sizes.samples_per_epoch / epoch_seconds * 3600, 1) if epoch_seconds > 0 else None,
                "epochs": config.train.epochs,
                "run_hours": round(epoch_seconds * config.train.epochs / 3600, 3),
                "peak_memory": peak,
                "measured_on": f"{sizes.num_processes} process(es); {trainer.accelerator.device}; one batch of {batch} timed after a warm-up sample; the fastest of 3+ training calls after a warm-up call",
            }
            setup = {
                "model": config.model.pretrained, "algorithm": config.train.algorithm, "reward": trainer.reward.name,
                "device": str(trainer.accelerator.device), "mixed_precision": config.model.mixed_precision,
                "samples_per_epoch": sizes.samples_per_epoch, "num_steps": config.sample.num_steps,
            }  # fmt: skip
            return DoctorReport(checks, forecast, setup)
        finally:
            trainer._executor.shutdown(wait=True)
            trainer.accelerator.end_training()


def _prompts(trainer, indices: list[int]) -> tuple[list[str], list[dict]]:
    import random

    from .utils import derive_seed

    group = trainer.config.sample.samples_per_prompt
    drawn = [trainer.prompt_source(random.Random(derive_seed(trainer.config.seed, "doctor-prompt", i // group))) for i in indices]
    return [p for p, _ in drawn], [m for _, m in drawn]


def _initial(trainer, indices: list[int]):
    if not trainer.algorithm.shared_initial_noise:
        return None
    group = trainer.config.sample.samples_per_prompt
    return generators_for(trainer.config.seed, "doctor-initial", 0, [i // group for i in indices])


def _steps_with_log_probs(trajectory) -> torch.Tensor:
    """The step positions whose recorded log-prob is defined (not an ODE step or the last churned step)."""
    defined = ~torch.isnan(trajectory.log_probs).any(dim=0)
    return torch.nonzero(defined).flatten().cpu()


def _check_on_policy(trainer, trajectory) -> tuple[Check, float]:
    """Recompute the log-probs of a training minibatch as `Trainer.update` does (with gradients), per step."""
    config, policy, algorithm = trainer.config, trainer.policy, trainer.algorithm
    tolerance, key = algorithm.trust_region if algorithm.uses_importance_ratio else (config.train.clip_range, "train.clip_range")
    part = trajectory.select(list(range(min(config.train.batch_size, len(trajectory)))))
    steps = _steps_with_log_probs(part)
    chunk = config.train.timestep_chunk or trainer.sizes.num_train_timesteps
    rows = torch.arange(len(part), device=part.latents.device)[:, None]
    errors, clipped, timings = [], [], []
    # A warm-up call first (its forward and backward pay for allocations and kernel choices), then two more timed
    # calls: the forecast takes the fastest call per step, which other jobs on the machine slow the least.
    warm_up = steps[:chunk].expand(len(part), -1).to(part.latents.device)
    for repeat in range(3):
        began = time.perf_counter()
        algorithm.log_likelihoods(policy.predict(part, warm_up), part, rows, warm_up)[0].float().mean().backward()
        if repeat:
            timings.append((time.perf_counter() - began) / warm_up.shape[1])
    trainer.optimizer.zero_grad(set_to_none=True)
    for start in range(0, len(steps), chunk):
        columns = steps[start : start + chunk].expand(len(part), -1).to(part.latents.device)
        began = time.perf_counter()
        prediction = policy.predict(part, columns, reference=config.train.kl_weight > 0)
        log_prob, old_log_prob = algorithm.log_likelihoods(prediction, part, rows, columns)
        log_prob.float().mean().backward()  # as training does; the timing is of a forward and a backward
        timings.append((time.perf_counter() - began) / columns.shape[1])
        # ratio - 1 in float64: an fp32 ratio rounds deviations under 1.2e-7 to exactly 1
        ratio_minus_1 = (log_prob.detach().double() - old_log_prob.double()).expm1()
        errors.append(ratio_minus_1.abs().amax(dim=0).cpu())
        clipped.append((ratio_minus_1.abs() > tolerance).float().mean(dim=0).cpu())
    trainer.optimizer.zero_grad(set_to_none=True)
    per_step = torch.cat(errors)
    clip_fraction = torch.cat(clipped)
    micro_step_seconds = float(np.min(timings)) * min(chunk, len(steps))
    worst = float(per_step.max())
    values = {
        "max_abs_ratio_minus_1": worst,
        "per_step_max_abs_ratio_minus_1": [float(v) for v in per_step],
        "clip_fraction": float(clip_fraction.mean()),
        "per_step_clip_fraction": [float(v) for v in clip_fraction],
        "clip_range": tolerance,
        "steps": [int(s) for s in steps],
    }
    measured = f"max |ratio-1| {worst:.3g} over {len(steps)} steps (worst step {int(steps[int(per_step.argmax())])}); {float(clip_fraction.mean()):.1%} clipped at {key}={tolerance:g}"
    if not algorithm.uses_importance_ratio:
        return Check("on_policy", SKIP, measured + f" ({algorithm.name} uses no importance ratio)", values=values), micro_step_seconds
    status = FAIL if worst > tolerance else PASS
    return Check("on_policy", status, measured, ON_POLICY_KEYS, values), micro_step_seconds


def _check_batch_invariance(trainer, trajectory, alone) -> Check:
    config = trainer.config
    if len(trajectory) < 2:
        return Check("batch_invariance", SKIP, "sample.batch_size is 1: no batch to compare with")
    latent_drift = float((alone.latents[0] - trajectory.latents[0]).abs().max())
    steps = _steps_with_log_probs(alone)
    log_prob_drift = float((alone.log_probs[0, steps].double() - trajectory.log_probs[0, steps].double()).abs().max()) if len(steps) else 0.0
    scale = float(trajectory.latents[0].abs().max())
    values = {"latent_max_abs_difference": latent_drift, "log_prob_max_abs_difference": log_prob_drift, "latent_scale": scale}
    measured = f"sample 0 alone vs in a batch of {len(trajectory)}: latents differ by {latent_drift:.3g} (of {scale:.3g}), log-probs by {log_prob_drift:.3g}"
    # A log-prob that moves by d with the batch moves the first update's ratio by about d.
    status = FAIL if log_prob_drift > config.train.clip_range or latent_drift > 1e-3 * max(scale, 1.0) else PASS
    return Check("batch_invariance", status, measured, ["model.allow_tf32", "model.mixed_precision", "train.batch_size (= sample.batch_size)"], values)


def _check_zero_noise_step(trainer, trajectory) -> Check:
    policy = trainer.policy
    scheduler = getattr(policy, "scheduler", None)
    from diffusers import DDIMScheduler

    if not isinstance(scheduler, DDIMScheduler) or getattr(policy, "sampling", None) is None or not hasattr(policy.sampling, "eta"):
        return Check("zero_noise_step", SKIP, "flow sampler: its SDE's zero-noise step carries the score term, so it is not the ODE's (nothing independent to compare)")
    eta = policy.sampling.eta if policy.sampling.scheduler == "ddim" else 1.0
    part = trajectory.select([0])
    steps = torch.arange(part.num_steps)
    with torch.no_grad():
        prediction = policy.predict(part, steps[None].to(part.latents.device))
    worst = 0.0
    for k in steps.tolist():
        x_t = part.latents[:, k].float()
        reference = scheduler.step(prediction.model_output[:, k].float(), part.timesteps[0, k], x_t, eta=eta, variance_noise=torch.zeros_like(x_t)).prev_sample
        worst = max(worst, float((reference - prediction.mean[:, k]).abs().max()))
    scale = float(part.latents.abs().max())
    status = FAIL if worst > 1e-4 * max(scale, 1.0) else PASS
    measured = f"the sampler's step with zero noise vs diffusers' DDIMScheduler.step(eta={eta:g}, variance_noise=0): max difference {worst:.3g} over {part.num_steps} steps"
    return Check("zero_noise_step", status, measured, ["sample.scheduler", "sample.eta"], {"max_abs_difference": worst, "eta": eta})


def _check_precision(trainer, trajectory) -> Check:
    """Mixed precision against fp32: the same chain's log-probs recomputed by an fp32 twin of the policy."""
    config, policy = trainer.config, trainer.policy
    in_use = next(policy.model.parameters()).dtype
    if config.model.mixed_precision == "no":
        return Check("precision", SKIP, "fp32 in use: nothing to compare", values={"dtype": str(in_use)})
    # On a GPU the frozen weights are half precision and the forward autocast; on a CPU (bf16 only) the weights stay
    # fp32 and accelerate autocasts the prepared network's forward to bf16 (AMX matrix units where the CPU has them).
    from .policy import build_policy

    twin = build_policy(config, trainer.accelerator.device, inference_dtype=torch.float32, sampler=trainer.algorithm.sampler)
    twin.load_trainable_state_dict(policy.trainable_state_dict())
    part = trajectory.select([0])
    steps = _steps_with_log_probs(part)
    with torch.no_grad():
        mixed = policy.predict(part, steps[None].to(part.latents.device)).log_prob
        full = twin.predict(part, steps[None].to(part.latents.device)).log_prob
    generators = generators_for(config.seed, "doctor", 0, [0])
    fp32_chain = twin.sample(part.prompts, generators, part.metadata, initial_noise_generators=_initial(trainer, [0]), decode=False)
    log_prob_drift = float((mixed - full).abs().max())
    latent_drift = float((fp32_chain.latents[0, -1] - part.latents[0, -1]).abs().max())
    values = {"log_prob_max_abs_difference": log_prob_drift, "final_latent_max_abs_difference": latent_drift}
    status = FAIL if log_prob_drift > config.train.clip_range else PASS
    measured = f"{config.model.mixed_precision} vs fp32: log-probs differ by {log_prob_drift:.3g}, final latents by {latent_drift:.3g}"
    return Check("precision", status, measured, ["model.mixed_precision", "train.clip_range"], values)


def _check_reward(trainer, trajectory) -> tuple[Check, float]:
    from .rewards import RewardError

    reward, images, prompts, metadata = trainer.reward, trajectory.images, trajectory.prompts, trajectory.metadata
    keys = ["reward.name", "reward.kwargs"]
    try:
        first = np.asarray(reward(images, prompts, metadata).scores, dtype=np.float64)  # also the warm-up (a model loads)
        started = time.perf_counter()
        second = np.asarray(reward(images, prompts, metadata).scores, dtype=np.float64)
        seconds_per_image = (time.perf_counter() - started) / len(images)
        alone = np.asarray(reward(images[:1], prompts[:1], metadata[:1]).scores, dtype=np.float64)
    except RewardError as error:  # non-finite, wrong length or raised: the checked reward names it
        return Check("reward", FAIL, str(error), keys), math.nan
    problems = []
    if len(first) != len(images):
        problems.append(f"{len(first)} scores for {len(images)} images")
    if not np.isfinite(first).all():
        problems.append("non-finite scores")
    repeat = float(np.abs(first - second).max()) if len(first) == len(second) else math.inf
    batch = float(abs(alone[0] - first[0])) if len(alone) and len(first) else math.inf
    if repeat > 1e-5:
        problems.append(f"not deterministic (the same images scored {repeat:.3g} apart)")
    if batch > 1e-4:
        problems.append(f"not batch-invariant (image 0 alone scored {batch:.3g} from in its batch)")
    values = {"repeat_max_abs_difference": repeat, "alone_vs_batch_difference": batch, "seconds_per_image": seconds_per_image, "mean": float(np.mean(first))}
    measured = f"{reward.name}: {seconds_per_image * 1000:.1f} ms/image; repeat differs by {repeat:.3g}, alone vs batch by {batch:.3g}; finite, {len(first)} scores"
    if problems:
        return Check("reward", FAIL, f"{reward.name}: " + "; ".join(problems), keys, values), seconds_per_image
    return Check("reward", PASS, measured, keys, values), seconds_per_image
