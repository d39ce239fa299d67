"""The DDPO epoch loop on accelerate: sample -> score -> advantages -> update -> record.

Every random draw is seeded from what it is for: the noise of sample i of epoch e from (seed, "noise", e, i),
its prompt from (seed, "prompt", e, i), the training shuffles from (seed, "shuffle", e, inner epoch, rank).
A resumed run therefore replays exactly the draws the uninterrupted run would have made.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.tracking import TensorBoardTracker, get_available_trackers
from accelerate.utils import ProjectConfiguration, broadcast_object_list, gather_object, set_seed
from safetensors.torch import load_file, save_file
from PIL import Image
from tqdm.auto import tqdm

from .algorithms import MicroBatch, build_algorithm_from_config
from .config import Config, ConfigError, config_to_dict, derived_batch_sizes, save_config, validate
from .monitor import EARLY_STOP_METRIC, Monitor, tracker_metrics
from .core.trajectory import SampleData
from .policy import DiffusersPolicy, Trajectory, build_policy
from .preemption import Preempted, PreemptionWatch
from .prompts import build_prompt_source
from .rewards import RewardError, RewardOutput, build_reward_from_config
from .rewards.remote import RemoteRewardError
from .sharding import CheckpointState, build_accelerator, check_and_configure, gather_checkpoint_state, is_fsdp, load_checkpoint_state
from .run_directory import TRAINER_STATE, RunDirectory, RunDirectoryError, append_jsonl, epoch_name, read_jsonl, write_text_atomic
from .utils import derive_seed, generators_for, image_grid

GRID_PROMPTS = 4
DEEPSPEED_OPTIMIZER_STATE = "deepspeed_optimizer.pt"  # in a checkpoint directory: ZeRO's optimizer state, one entry per process
EPOCH_SAMPLES = "epoch_samples.pt"  # in a partial checkpoint: every process's samples, rewards and advantages of the epoch


class OffPolicyError(ValueError):
    """The first update of an epoch found importance ratios the clip range clips: training would be off-policy."""


@dataclass
class EpochSamples:
    """This process's samples of one epoch, with their global indices and rewards."""

    trajectory: Trajectory
    indices: torch.Tensor  # (n,) global sample index of each local sample
    rewards: torch.Tensor  # (n,)
    reward_info: dict
    sample_seconds: float
    reward_wait_seconds: float


class Trainer:
    """Holds the pieces of a run; `run()` is the loop. Build it with a validated config."""

    def __init__(self, config: Config, run_dir: str | Path, *, resume: bool = False, progress: bool = True) -> None:
        validate(config)
        if config.model.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("model.mixed_precision='fp16' needs a CUDA GPU; use 'no' (or 'bf16') on this machine")
        self.config = config
        torch.backends.cuda.matmul.allow_tf32 = config.model.allow_tf32
        torch.backends.cudnn.allow_tf32 = config.model.allow_tf32
        # TensorBoard always logs, into RUN_DIR/tb itself (the tracker creates it only when started).
        trackers = [TensorBoardTracker("", str(Path(run_dir) / "tb")), *_extra_trackers(config)]
        self.accelerator = build_accelerator(
            mixed_precision=config.model.mixed_precision,
            log_with=trackers,
            project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
        )
        check_and_configure(self.accelerator, config)  # DeepSpeed / FSDP: refuse what cannot run, fill DeepSpeed's config
        # Under FSDP every call of the network is a collective (its weights are sharded): grids and evaluations,
        # which only the main process keeps, are sampled by every process.
        self.collective_forward = is_fsdp(self.accelerator)
        self.sizes = derived_batch_sizes(config, self.accelerator.num_processes)
        self.progress = progress and self.accelerator.is_local_main_process
        device = self.accelerator.device
        # Frozen weights in half precision only where mixed precision runs (not on CPU).
        inference_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.model.mixed_precision, torch.float32)
        if device.type == "cpu":
            inference_dtype = torch.float32
        # Everything that can fail on bad input (model, reward, prompts) is built before the run directory.
        self.algorithm = build_algorithm_from_config(config.train)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(config.seed, "init"))  # LoRA's random init: the same on every rank and run
            self.policy: DiffusersPolicy = build_policy(config, device, inference_dtype=inference_dtype, sampler=self.algorithm.sampler)
        if config.model.init_lora and not resume:  # RL from a LoRA, e.g. `ddpo sft`'s (a resumed run has its own)
            from .sft import load_initial_lora

            load_initial_lora(self.policy, config.model.init_lora)
        try:
            self.reward = build_reward_from_config(config.reward)  # checked: errors name the reward and the prompt
        except (ValueError, RemoteRewardError) as error:  # a plugin that does not import, a server that does not answer
            key = "reward.url" if config.reward.url else "reward.terms" if config.reward.terms else "reward.name"
            raise ConfigError(f"{key}: {error}") from error
        self.prompt_source = build_prompt_source(config.prompts.source, config.prompts.file)
        self.anchor_source = build_prompt_source(config.prompts.anchor_source) if config.prompts.anchor_source else None
        self.monitor = Monitor(config, self.reward)  # the evaluation prompts and the held-out scorer
        self.optimizer = torch.optim.AdamW(
            self.policy.trainable_parameters(),
            lr=config.train.lr,
            betas=(config.train.adam_beta1, config.train.adam_beta2),
            weight_decay=config.train.adam_weight_decay,
            eps=config.train.adam_epsilon,
        )
        self.policy.denoiser, self.optimizer = self.accelerator.prepare(self.policy.model, self.optimizer)
        self.start_epoch = 0
        self.last_epoch = 0  # the last finished epoch
        self.resumed = resume
        self.preemption = PreemptionWatch(announce=self.accelerator.print)
        self._partial: dict | None = None  # a preempted epoch to finish (resumed from a partial checkpoint)
        self._damaged: list[Path] = []  # damaged checkpoints the resume skipped, set aside once every process loaded
        self.created_run_dir = not resume and not Path(run_dir).exists()
        if resume:
            self.run_dir = RunDirectory.open(run_dir)
            self._load_latest_checkpoint()
        else:
            self.run_dir = RunDirectory(run_dir)
            if self.accelerator.is_main_process:
                RunDirectory.create(run_dir)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save_config(config, self.run_dir.config_path)
            self.run_dir.remove_stale_temporaries()
            for damaged in self._damaged:
                self.accelerator.print(f"ddpo: the damaged checkpoint is kept as {self.run_dir.set_aside(damaged)}")
        self.accelerator.init_trackers(
            config.run_name or "ddpo", config=_flat_hparams(config),
            init_kwargs={"wandb": {"name": self.run_dir.path.name, "dir": str(self.run_dir.path)}},
        )  # fmt: skip
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")

    # ---- the loop ---------------------------------------------------------------------------------------
    def run(self) -> Path:
        self.describe()
        self.last_epoch = self.start_epoch
        if self.start_epoch == 0 and not self.resumed:  # a run resumed from epoch-0000 (preempted in epoch 1) has them
            self.save_sample_grid(0)
            if self.monitor.due(0):
                self.evaluate(0)  # the baseline: the model before training
        try:
            with self.preemption:
                self._run_epochs()
        except BaseException:
            # A run that fails before its first checkpoint can be neither resumed nor re-run into the same
            # directory: remove what this invocation created, so nothing half-written stays behind.
            if self.created_run_dir and self.accelerator.is_main_process and not self.run_dir.resume_candidates():
                shutil.rmtree(self.run_dir.path, ignore_errors=True)
            raise
        finally:
            self._executor.shutdown(wait=True)
            self.accelerator.end_training()
        if self.accelerator.is_main_process:
            self.save_before_after()
            self.write_report()
        return self.run_dir.path

    def _run_epochs(self) -> None:
        """The epochs left to run. On SIGTERM/SIGUSR1 (`ddpo.preemption`) each phase stops at its next safe point
        with a whole checkpoint and raises `Preempted`: sampling after its current batch (the weights are still
        the last epoch's), training after its current optimizer step (a partial checkpoint with the epoch's
        samples), the epoch's end after its record."""
        for epoch in range(self.start_epoch + 1, self.config.train.epochs + 1):
            set_seed(derive_seed(self.config.seed, "epoch", epoch) % 2**32)  # for rewards that draw random numbers
            self.algorithm.begin_epoch(epoch, self.policy)
            if self._partial is not None and self._partial["epoch"] == epoch:  # resumed inside this epoch
                partial, self._partial = self._partial, None
                samples, advantages = partial["samples"], partial["advantages"]
            else:
                partial = None
                samples = self.sample_epoch(epoch)
                if samples is None:  # preempted while sampling: nothing of this epoch reached the weights
                    raise self._preempted(epoch - 1, "while sampling", self._save_whole_checkpoint(epoch - 1))
                advantages = self.advantages(samples)
            train_metrics, train_seconds = self.update(epoch, samples, advantages, resume=partial)
            new_best = self.monitor.due(epoch) and self.evaluate(epoch)
            stop = self._agree(self.monitor.should_stop(epoch))
            preempted = self._any_process(self.preemption.received is not None)
            self.record(epoch, samples, train_metrics, train_seconds, new_best=new_best, stop=stop, force_save=preempted)
            self.last_epoch = epoch
            if preempted and epoch < self.config.train.epochs and not stop:
                raise self._preempted(epoch, "at the end of the epoch", self.run_dir.checkpoints_dir / epoch_name(epoch))
            if stop:
                if self.accelerator.is_main_process:
                    self.accelerator.print(self._early_stop_message(epoch))
                break

    def _preempted(self, epoch: int, where: str, checkpoint: Path) -> Preempted:
        return Preempted(self.preemption.received or "a signal on another process", str(checkpoint), epoch, where)

    def describe(self) -> None:
        if self.accelerator.is_main_process:
            s = self.sizes
            anchors = f" (+ {s['anchor_samples_per_epoch']} unscored anchors)" if s["anchor_samples_per_epoch"] else ""
            window = f" (from a window of {self.config.sample.sde_window} SDE steps)" if self.config.sample.sde_window else ""
            self.accelerator.print(
                f"ddpo: {self.config.train.algorithm} on {self.config.model.pretrained} with reward {self.reward.name}; "
                f"{s['num_processes']} process(es) x {s['samples_per_process']} samples = {s['samples_per_epoch']} samples/epoch{anchors}; "
                f"{s['num_train_timesteps']} of {self.config.sample.num_steps} steps trained per sample{window}; "
                f"{s['optimizer_steps_per_epoch']} optimizer steps/epoch of {s['samples_per_optimizer_step']} samples; "
                f"{len(self.policy.trainable_parameters())} trainable tensors "
                f"({sum(p.numel() for p in self.policy.trainable_parameters()):,} weights); run dir {self.run_dir.path}"
            )

    def sample_epoch(self, epoch: int) -> EpochSamples | None:
        """Sample this process's share of the epoch; rewards are scored in a thread while the next batch samples.
        None when a preemption signal arrived (on any process) before the last batch: the epoch is abandoned."""
        config, rank, world = self.config, self.accelerator.process_index, self.accelerator.num_processes
        batch = config.sample.batch_size
        started = time.perf_counter()
        trajectories, futures, all_indices = [], [], []
        num_batches = config.sample.num_batches_per_epoch + config.sample.anchor_batches_per_epoch
        for b in tqdm(range(num_batches), desc=f"epoch {epoch} sampling", disable=not self.progress, leave=False):
            # Global sample index: batch-major, then process, then position, so that a 1-process run with the
            # same global batch sees the same samples in the same order. Anchor batches come last.
            indices = [(b * world + rank) * batch + i for i in range(batch)]
            anchor = b >= config.sample.num_batches_per_epoch
            group = 1 if anchor else config.sample.samples_per_prompt
            source, purpose = (self.anchor_source, "anchor") if anchor else (self.prompt_source, "prompt")
            prompts, metadata = zip(*(source(random.Random(derive_seed(config.seed, purpose, epoch, i // group if group > 1 else i))) for i in indices))
            # Algorithms whose groups share the initial noise (FDFO's pairs) draw it from the group's generator.
            initial = generators_for(config.seed, "initial-noise", epoch, [i // group for i in indices]) if self.algorithm.shared_initial_noise else None
            trajectory = self.policy.sample(list(prompts), generators_for(config.seed, "noise", epoch, indices), list(metadata), initial_noise_generators=initial)
            if anchor:  # never scored: anchors carry only the KL to the base model
                futures.append(Future())
                futures[-1].set_result(RewardOutput(scores=np.full(batch, np.nan, dtype=np.float32)))
            else:
                futures.append(self._executor.submit(self.reward, trajectory.images, trajectory.prompts, trajectory.metadata))
            trajectories.append(trajectory)
            all_indices += indices
            if b + 1 < num_batches and self._any_process(self.preemption.received is not None):
                return None
        sampled = time.perf_counter()
        try:
            outputs: list[RewardOutput] = [f.result() for f in futures]
            error = None
        except Exception as exc:  # noqa: BLE001 - re-raised below, once every process knows
            error = exc
        # A reward that fails on one process must stop all of them: the others would wait forever in the gather.
        if self._any_process(error is not None):
            if error is not None:
                raise error
            raise RewardError(f"reward {self.reward.name!r} failed on another process (its message names the prompt); stopping this one too")
        waited = time.perf_counter() - sampled
        info = _merge_info([o.info for o in outputs])
        device = self.accelerator.device
        trajectory = Trajectory.concatenate(trajectories)
        self.algorithm.prepare(trajectory)
        return EpochSamples(
            trajectory=trajectory,
            indices=torch.tensor(all_indices, device=device),
            rewards=torch.from_numpy(np.concatenate([o.scores for o in outputs])).to(device),
            reward_info=info,
            sample_seconds=sampled - started,
            reward_wait_seconds=waited,
        )

    def advantages(self, samples: EpochSamples) -> torch.Tensor:
        """Advantages over the gathered global batch, in global sample order; returns this process's share."""
        indices = self.accelerator.gather(samples.indices)
        rewards = self.accelerator.gather(samples.rewards)
        prompts = gather_object(samples.trajectory.prompts) if self.accelerator.num_processes > 1 else samples.trajectory.prompts
        order = torch.argsort(indices)
        scored = int((~self.is_anchor(indices)).sum())  # anchors have the largest indices: they sort last
        global_advantages = torch.zeros(len(order))  # anchors have no reward: their advantage is 0
        global_advantages[:scored] = self.algorithm.advantages(rewards[order[:scored]].float().cpu(), [prompts[i] for i in order[:scored].tolist()])
        position = {int(index): k for k, index in enumerate(indices[order].tolist())}
        local = [position[int(i)] for i in samples.indices.tolist()]
        return global_advantages[local].to(self.accelerator.device)

    def is_anchor(self, indices: torch.Tensor) -> torch.Tensor:
        """Which global sample indices are of anchor batches (they follow the trained batches)."""
        return indices >= self.config.sample.num_batches_per_epoch * self.accelerator.num_processes * self.config.sample.batch_size

    def update(self, epoch: int, samples: EpochSamples, advantages: torch.Tensor, resume: dict | None = None) -> tuple[dict[str, float], float]:
        """Inner epochs over shuffled minibatches and shuffled timesteps, with gradient accumulation.

        `resume` (from a partial checkpoint) skips the micro-steps a preempted run already took. A preemption
        signal stops the update after its current optimizer step: a partial checkpoint, then `Preempted`.
        The first optimizer step of an epoch is on-policy: its importance ratios must be 1; where the clip range
        would clip some of them the run stops (`train.on_policy_check`) before the step reaches the weights."""
        config, sizes = self.config, self.sizes
        started = time.perf_counter() - (resume["train_seconds"] if resume else 0.0)
        trajectory = samples.trajectory
        micro_steps_per_optimizer_step = sizes["accumulation_steps"] * sizes["num_train_timesteps"]
        totals: dict[str, list[torch.Tensor]] = {name: list(values.to(self.accelerator.device).unbind()) for name, values in resume["totals"].items()} if resume else {}
        skip = resume["micro_step"] if resume else 0
        check_ratios = config.train.on_policy_check and self.algorithm.uses_importance_ratio and skip == 0
        first_step_ratio_error = torch.zeros((), device=self.accelerator.device)
        micro_step = 0
        micro_steps_total = sizes["optimizer_steps_per_epoch"] * micro_steps_per_optimizer_step
        chunk = config.train.timestep_chunk or sizes["num_train_timesteps"]
        num_trained = int((~self.is_anchor(samples.indices)).sum())  # this process's scored samples come first
        for inner in range(config.train.inner_epochs):
            minibatches = self._minibatches(epoch, inner, num_trained)
            anchor_parts = self._anchor_parts(epoch, inner, num_trained, len(trajectory), len(minibatches))
            steps = self._trained_steps(epoch, inner, samples)
            for minibatch, anchor_part in tqdm(zip(minibatches, anchor_parts), total=len(minibatches), desc=f"epoch {epoch}.{inner} training", disable=not self.progress, leave=False):
                part = trajectory.select(minibatch)
                part_steps = steps[minibatch].to(part.latents.device)
                part_advantages = advantages[minibatch.to(advantages.device)]
                anchor = trajectory.select(anchor_part) if len(anchor_part) else None
                anchor_steps = steps[anchor_part].to(part.latents.device)
                # `timestep_chunk` timesteps per model call; the loss of a chunk of c timesteps is the mean over
                # its b*c (sample, timestep) pairs, so scaling it by c gives the gradient of c per-timestep losses.
                for start in range(0, part_steps.shape[1], chunk):
                    columns = part_steps[:, start : start + chunk]
                    width = columns.shape[1]
                    micro_step += width
                    if micro_step <= skip:  # taken before the preemption this run resumed from
                        continue
                    sync = micro_step % micro_steps_per_optimizer_step == 0
                    self.accelerator.sync_gradients = sync  # DeepSpeed's engine steps at the micro-step accelerate marks
                    with nullcontext() if sync else self.accelerator.no_sync(self.policy.denoiser):
                        batch = MicroBatch(part, columns, part_advantages, anchor, anchor_steps[:, start : start + chunk])
                        output = self.algorithm.micro_step(self.policy, batch)
                        if check_ratios and output.ratio_error is not None:
                            first_step_ratio_error = torch.maximum(first_step_ratio_error, output.ratio_error)
                        loss = output.loss
                        finite = bool(torch.isfinite(loss.detach()))
                        if self._any_process(not finite):  # every process stops, or the others hang in backward
                            value = f"is {loss.item()}" if not finite else "is not finite on another process"
                            raise FloatingPointError(f"epoch {epoch}: the {self.algorithm.name} loss {value}; stopping before it reaches the weights")
                        self.accelerator.backward(loss * width / micro_steps_per_optimizer_step)
                    for name, value in output.metrics.items():
                        totals.setdefault(name, []).extend([value.detach().float()] * width)
                    if sync:
                        if check_ratios:  # before the first step reaches the weights
                            check_ratios = False
                            error = float(self.accelerator.reduce(first_step_ratio_error, reduction="max")) if self.accelerator.num_processes > 1 else float(first_step_ratio_error)
                            totals["first_step_ratio_error"] = [torch.tensor(error, device=self.accelerator.device)]
                            self._check_on_policy(epoch, error)
                        grad_norm = self.accelerator.clip_grad_norm_(self.policy.trainable_parameters(), config.train.max_grad_norm)
                        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                            grad_norm = grad_norm.full_tensor()
                        grad_norm = math.nan if grad_norm is None else grad_norm
                        totals.setdefault("grad_norm", []).append(torch.as_tensor(grad_norm, dtype=torch.float32, device=self.accelerator.device))
                        self.optimizer.step()  # under DeepSpeed, the engine stepped in backward
                        self.optimizer.zero_grad(set_to_none=True)
                        if micro_step < micro_steps_total and self._any_process(self.preemption.received is not None):
                            self.accelerator.sync_gradients = True
                            progress = {"micro_step": micro_step, "totals": totals, "train_seconds": time.perf_counter() - started}
                            raise self._preempted(epoch - 1, "while training", self._save_partial_checkpoint(epoch, samples, advantages, progress))
        self.accelerator.sync_gradients = True
        means = {name: torch.stack(values).to(self.accelerator.device).mean() for name, values in totals.items()}
        reduced = {name: float(self.accelerator.reduce(value.to(self.accelerator.device), reduction="mean")) for name, value in means.items()}
        return reduced, time.perf_counter() - started

    def _trained_steps(self, epoch: int, inner: int, samples: EpochSamples) -> torch.Tensor:
        """(n, num_train_timesteps) step indices each local sample trains on in one inner epoch.

        Each sample trains on its own random subset of its steps (`train.timestep_fraction`), as in ddpo-pytorch,
        drawn from its global index so that it does not depend on the number of processes. With
        `sample.sde_window` the subset is of its SDE window only (Flow-GRPO-Fast): its other steps are ODE steps,
        with no log-prob.
        """
        config, trajectory = self.config, samples.trajectory
        generators = generators_for(config.seed, f"timesteps/{inner}", epoch, samples.indices.tolist())
        window = config.sample.sde_window
        if window:
            offsets = torch.stack([torch.randperm(window, generator=g) for g in generators])
            steps = trajectory.sde_window_start.cpu()[:, None] + offsets
        else:
            steps = torch.stack([torch.randperm(trajectory.num_steps, generator=g) for g in generators])
        return steps[:, : self.sizes["num_train_timesteps"]]

    def _minibatches(self, epoch: int, inner: int, num_samples: int) -> list[torch.Tensor]:
        """This process's minibatches (positions into its first `num_samples` samples, the scored ones) for one
        inner epoch.

        When a minibatch is a whole sampling batch (`train.batch_size == sample.batch_size`), minibatches are
        the sampling batches in an order shared by every process, so the k-th optimizer step of a W-process run
        averages exactly the samples of the k-th step of a 1-process run with W times the batch: the run does not
        depend on the number of processes. Otherwise samples are shuffled within each process.
        """
        config = self.config
        batch = config.sample.batch_size
        if config.train.batch_size == batch and num_samples % batch == 0:
            generator = torch.Generator().manual_seed(derive_seed(config.seed, "shuffle-batches", epoch, inner))
            return [torch.arange(k * batch, (k + 1) * batch) for k in torch.randperm(num_samples // batch, generator=generator).tolist()]
        generator = torch.Generator().manual_seed(derive_seed(config.seed, "shuffle", epoch, inner, self.accelerator.process_index))
        return list(torch.randperm(num_samples, generator=generator).split(config.train.batch_size))

    def _anchor_parts(self, epoch: int, inner: int, start: int, stop: int, num_minibatches: int) -> list[torch.Tensor]:
        """The anchor samples (positions `start`..`stop`) shuffled and dealt out to the minibatches as evenly as
        they go: each minibatch's loss adds the KL of its share, so the weight is felt within every gradient."""
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, "shuffle-anchors", epoch, inner, self.accelerator.process_index))
        return list((start + torch.randperm(stop - start, generator=generator)).tensor_split(num_minibatches))

    def evaluate(self, epoch: int) -> bool:
        """The periodic evaluation (`ddpo.monitor`) on the main process; True on every process when its
        held-out score is a new best and early stopping keeps best checkpoints."""
        new_best = False
        if self.accelerator.is_main_process or self.collective_forward:  # under FSDP the others join the network's calls
            with self.policy.evaluation():
                record = self.monitor.evaluate(self.policy, epoch, epoch * self.sizes["samples_per_epoch"])
        if self.accelerator.is_main_process:
            append_jsonl(self.run_dir.monitor_path, record)
            self.accelerator.log(tracker_metrics(record), step=epoch)
            new_best = self.monitor.observe(record) and self.config.train.early_stop_on_heldout
            heldout = f"  held-out {record['heldout_score']:.4f}" if "heldout_score" in record else ""
            kl = f"  kl-to-base {record['kl']:.4g}" if "kl" in record else ""
            diversity = f"  diversity {record['diversity']:.4f}" if "diversity" in record else ""
            self.accelerator.print(f"eval {epoch}: reward {record['train_reward']:.4f}{heldout}{kl}{diversity}  ({record['seconds']:.1f}s)")
        return self._agree(new_best)

    def _any_process(self, flag: bool) -> bool:
        """True on every process when `flag` is true on any of them (a collective: every process must call it)."""
        if self.accelerator.num_processes == 1:
            return flag
        flags = self.accelerator.gather(torch.tensor([float(flag)], device=self.accelerator.device))
        return bool(flags.sum() > 0)

    def _agree(self, flag: bool) -> bool:
        """The main process's decision, on every process."""
        if self.accelerator.num_processes == 1:
            return flag
        return bool(broadcast_object_list([flag], from_process=0)[0])

    def _early_stop_message(self, epoch: int) -> str:
        best = self.monitor.best
        return (
            f"early stop after epoch {epoch}: the held-out score peaked at epoch {best.epoch} ({best.score:.4f}) and has "
            f"not improved for {epoch - best.epoch} epochs; best checkpoint {self.run_dir.checkpoints_dir / epoch_name(best.epoch)}"
        )

    def record(self, epoch: int, samples: EpochSamples, train_metrics: dict[str, float], train_seconds: float, *, new_best: bool = False, stop: bool = False, force_save: bool = False) -> None:
        rewards = self.accelerator.gather(samples.rewards).float().cpu()
        rewards = rewards[~rewards.isnan()]  # anchor samples are not scored
        record = {
            "epoch": epoch,
            "samples": epoch * self.sizes["samples_per_epoch"],
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std(unbiased=False)),
            "loss": train_metrics.get("loss", math.nan),
            "approx_kl": train_metrics.get("approx_kl", math.nan),
            "clipfrac": train_metrics.get("clipfrac", math.nan),
            "sample_seconds": samples.sample_seconds,
            "reward_wait_seconds": samples.reward_wait_seconds,
            "train_seconds": train_seconds,
        }
        rss = resident_memory_mb()
        if rss is not None:
            record["rss_mb"] = rss  # this process's resident memory after the epoch: a leak shows as a rising line
        record.update({k: v for k, v in train_metrics.items() if k not in record})
        record.update({f"reward_{k}": v for k, v in samples.reward_info.items()})
        save = epoch % self.config.log.save_every == 0 or epoch == self.config.train.epochs or new_best or stop or force_save
        prompt_rewards = self._prompt_rewards(samples)
        # The network's and optimizer's state on the main process (gathered from every process where sharded).
        checkpoint = gather_checkpoint_state(self.accelerator, self.policy, self.optimizer) if save else None
        self.save_sample_grid(epoch)
        if self.accelerator.is_main_process:
            self.run_dir.append_metrics(record)
            append_jsonl(self.run_dir.prompt_rewards_path, {"epoch": epoch, "prompts": prompt_rewards})
            if save:
                self.run_dir.write_checkpoint(epoch, lambda d: self._write_checkpoint(d, epoch, checkpoint), keep_last=self.config.log.keep_last)
            if new_best:
                self._write_best(epoch)
            if stop:
                self._write_best(self.monitor.best.epoch, stopped_after=epoch)
            if save:
                self.write_report()
            self.accelerator.print(
                f"epoch {epoch}: reward {record['reward_mean']:.4f} +- {record['reward_std']:.4f}  loss {record['loss']:.4g}  "
                f"kl {record['approx_kl']:.3g}  clipfrac {record['clipfrac']:.3f}  "
                f"sample {record['sample_seconds']:.1f}s train {record['train_seconds']:.1f}s"
            )
        self.accelerator.log(_tracker_metrics(record), step=epoch)
        self.accelerator.wait_for_everyone()

    def _prompt_rewards(self, samples: EpochSamples) -> dict[str, dict[str, float]]:
        """Each prompt's reward mean, std and count over this epoch's global batch."""
        pairs = [(p, r) for p, r in zip(samples.trajectory.prompts, samples.rewards.float().cpu().tolist()) if not math.isnan(r)]
        if self.accelerator.num_processes > 1:
            pairs = gather_object(pairs)
        by_prompt: dict[str, list[float]] = {}
        for prompt, reward in pairs:
            by_prompt.setdefault(prompt, []).append(reward)
        return {
            prompt: {"mean": round(float(np.mean(values)), 6), "std": round(float(np.std(values)), 6), "n": len(values)}
            for prompt, values in sorted(by_prompt.items())
        }

    def _write_best(self, epoch: int, stopped_after: int | None = None) -> None:
        best = self.monitor.best
        record = {
            "epoch": epoch,
            "checkpoint": f"{self.run_dir.checkpoints_dir.name}/{epoch_name(epoch)}",
            "metric": EARLY_STOP_METRIC,
            "heldout_reward": self.monitor.heldout_reward.name,
            "value": best.score,
        }
        if stopped_after is not None:
            record["stopped_after_epoch"] = stopped_after
        self.run_dir.write_best(record)

    def write_report(self) -> None:
        """Refresh RUN_DIR/report.html; a report that fails is a warning, never the end of a run."""
        from .report import write_report

        try:
            write_report(self.run_dir.path)
        except Exception as error:  # noqa: BLE001 - the run matters more than its report
            self.accelerator.print(f"ddpo: warning: report.html not written: {type(error).__name__}: {error}")

    # ---- grids and checkpoints --------------------------------------------------------------------------
    def grid_prompts(self) -> list[str]:
        return list(self.config.log.grid_prompts) or self.prompt_source.prompts[:GRID_PROMPTS]

    def save_sample_grid(self, epoch: int) -> None:
        """Fixed prompts x fixed seeds, the same every epoch, so images can be compared across epochs."""
        if not self.accelerator.is_main_process and not self.collective_forward:
            return
        prompts = self.grid_prompts()
        seeds = self.config.log.num_eval_seeds
        cells = [(row, prompt, s) for row, prompt in enumerate(prompts) for s in range(seeds)]
        generators = [torch.Generator().manual_seed(derive_seed(self.config.seed, "grid", row, s)) for row, _, s in cells]
        with self.policy.evaluation():
            images = self.policy.sample([prompt for _, prompt, _ in cells], generators).images  # one batch, row by row
        if not self.accelerator.is_main_process:
            return
        grid = image_grid(images, len(prompts), seeds)  # a video's cell is the strip of its frames
        grid.save(self.run_dir.sample_grid_path(epoch))
        if epoch == 0 or not self.run_dir.grid_layout_path.is_file():
            layout = {"prompts": prompts, "seeds": seeds, "cell_width": grid.width // seeds, "cell_height": grid.height // len(prompts)}
            write_text_atomic(self.run_dir.grid_layout_path, json.dumps(layout) + "\n")

    def save_before_after(self) -> None:
        """samples/before-after.png: the grid before training next to the last epoch's (same prompts, same seeds)."""
        first, last = self.run_dir.sample_grid_path(0), self.run_dir.sample_grid_path(self.last_epoch)
        if first.is_file() and last.is_file() and first != last:
            before, after = Image.open(first), Image.open(last)
            gap = before.width // 16
            canvas = Image.new("RGB", (before.width + gap + after.width, before.height), "white")
            canvas.paste(before, (0, 0))
            canvas.paste(after, (before.width + gap, 0))
            canvas.save(self.run_dir.samples_dir / "before-after.png")

    def _save_whole_checkpoint(self, epoch: int) -> Path:
        """The checkpoint of finished epoch `epoch` (0: the weights before training), written if it is not there
        yet: what a run preempted while sampling the next epoch resumes from (its state is still that epoch's)."""
        path = self.run_dir.checkpoints_dir / epoch_name(epoch)
        if any(e == epoch for e, _ in self.run_dir.checkpoints()):
            return path
        checkpoint = gather_checkpoint_state(self.accelerator, self.policy, self.optimizer)
        if self.accelerator.is_main_process:
            self.run_dir.write_checkpoint(epoch, lambda d: self._write_checkpoint(d, epoch, checkpoint), keep_last=self.config.log.keep_last)
        self.accelerator.wait_for_everyone()
        return path

    def _save_partial_checkpoint(self, epoch: int, samples: EpochSamples, advantages: torch.Tensor, progress: dict) -> Path:
        """checkpoints/epoch-NNNN-partial: the state after an optimizer step inside epoch `epoch`, with what the
        rest of the epoch needs (every process's samples, rewards and advantages, and how far the update got)."""
        checkpoint = gather_checkpoint_state(self.accelerator, self.policy, self.optimizer)
        local = _epoch_samples_state(samples, advantages)
        shares = gather_object([local]) if self.accelerator.num_processes > 1 else [local]
        partial = {
            "epoch": epoch,
            "micro_step": progress["micro_step"],
            "train_seconds": progress["train_seconds"],
            "totals": {name: torch.stack(values).cpu() for name, values in progress["totals"].items()},
            "num_processes": self.accelerator.num_processes,
        }

        def write(directory: Path) -> None:
            self._write_checkpoint(directory, epoch - 1, checkpoint, partial=partial)
            torch.save(shares, directory / EPOCH_SAMPLES)

        path = self.run_dir.checkpoints_dir / f"{epoch_name(epoch)}-partial"
        if self.accelerator.is_main_process:
            path = self.run_dir.write_checkpoint(epoch, write, partial=True)
        self.accelerator.wait_for_everyone()
        return path

    def _check_on_policy(self, epoch: int, ratio_error: float) -> None:
        """Stop before the first optimizer step of an epoch when its ratios pi_theta / pi_old, which must be 1
        (the weights that sampled are the weights that recompute), are off by more than the clip range."""
        clip_range = self.config.train.clip_range
        if ratio_error > clip_range:
            raise OffPolicyError(
                f"epoch {epoch}: off-policy at the first update: max |ratio - 1| = {ratio_error:.3g} exceeds "
                f"train.clip_range={clip_range:g}, so the first step already clips; the log-probs recomputed in training "
                f"differ from the sampler's (precision or batch-dependent kernels): set model.mixed_precision=\"no\" "
                f"and model.allow_tf32=false, or raise train.clip_range; `ddpo doctor` measures it; "
                f"train.on_policy_check=false trains anyway"
            )

    def _write_checkpoint(self, directory: Path, epoch: int, state: CheckpointState, partial: dict | None = None) -> None:
        self.policy.save_adapter(directory, network_state=state.network)
        save_file(state.trainable, str(directory / "trainable.safetensors"))
        optimizer_state = state.optimizer
        if state.optimizer_layout == "deepspeed-zero":  # not loadable with weights_only: a file of its own
            torch.save(optimizer_state, directory / DEEPSPEED_OPTIMIZER_STATE)
            optimizer_state = None
        torch.save(
            {
                "epoch": epoch,
                "optimizer": optimizer_state,
                "optimizer_layout": state.optimizer_layout,
                "algorithm": self.algorithm.state_dict(),
                "grad_scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
                "config": config_to_dict(self.config),
                "partial": partial,
            },
            directory / TRAINER_STATE,
        )

    def _load_latest_checkpoint(self) -> None:
        """Load the newest whole checkpoint (a partial one included); a damaged one (a file that does not match
        its checksum, or does not load) is reported and the previous one used."""
        problems = []
        for epoch, directory in self.run_dir.resume_candidates():
            problem = self.run_dir.checkpoint_problem(directory)
            if problem is None:
                try:
                    self._load_checkpoint(directory)
                    break
                except RunDirectoryError:  # whole, but not resumable by this launch: say so, do not fall back
                    raise
                except Exception as error:  # noqa: BLE001 - any file that does not load makes the checkpoint damaged
                    problem = f"it does not load ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
            problems.append((directory, problem))
            if self.accelerator.is_main_process:
                self.accelerator.print(f"ddpo: warning: checkpoint {directory} is damaged: {problem}; trying the previous one")
        else:
            raise RunDirectoryError(f"--resume {self.run_dir.path}: no whole checkpoint to resume from ({'; '.join(f'{d.name}: {p}' for d, p in problems)})")
        self._damaged = [directory for directory, _ in problems]

    def _load_checkpoint(self, directory: Path) -> None:
        state = torch.load(directory / TRAINER_STATE, map_location="cpu", weights_only=True)
        partial = state.get("partial")
        if partial is not None:
            if partial["num_processes"] != self.accelerator.num_processes:
                raise RunDirectoryError(
                    f"{directory} was written inside epoch {partial['epoch']} by {partial['num_processes']} process(es); "
                    f"resume it with as many (this launch has {self.accelerator.num_processes})"
                )
            shares = torch.load(directory / EPOCH_SAMPLES, map_location="cpu", weights_only=True)
            samples, advantages = _epoch_samples_from_state(shares[self.accelerator.process_index], self.accelerator.device)
        layout = state.get("optimizer_layout", "torch")
        optimizer_state = state["optimizer"]
        if layout == "deepspeed-zero":  # ZeRO's state holds objects (its loss scaler) that only a full unpickle restores
            optimizer_state = torch.load(directory / DEEPSPEED_OPTIMIZER_STATE, map_location="cpu", weights_only=False)
        trainable = load_file(str(directory / "trainable.safetensors"))
        load_checkpoint_state(self.accelerator, self.policy, self.optimizer, trainable, optimizer_state, layout)
        self.algorithm.load_state_dict(state["algorithm"])
        if self.accelerator.scaler is not None and state.get("grad_scaler"):
            self.accelerator.scaler.load_state_dict(state["grad_scaler"])
        self.start_epoch = epoch = state["epoch"]
        self._partial = {**partial, "samples": samples, "advantages": advantages} if partial is not None else None
        self.monitor.restore([r for r in read_jsonl(self.run_dir.monitor_path, tolerant=True) if r["epoch"] <= self.start_epoch])
        if self.accelerator.is_main_process:
            self.run_dir.truncate_metrics(self.start_epoch)
            inside = f", inside epoch {partial['epoch']} after {partial['micro_step']} micro-steps" if partial else ""
            self.accelerator.print(f"resuming {self.run_dir.path} after epoch {epoch}{inside}")


def _epoch_samples_state(samples: EpochSamples, advantages: torch.Tensor) -> dict:
    """One process's samples of an epoch as plain tensors, lists and strings (loadable with weights_only); the
    decoded images are left out (already scored)."""
    trajectory = {}
    for item in dataclasses.fields(samples.trajectory):
        value = getattr(samples.trajectory, item.name)
        if isinstance(value, torch.Tensor):
            trajectory[item.name] = value.detach().cpu()
        elif item.name == "prepared" and value is not None:
            trajectory[item.name] = value.to_state()
        elif item.name == "metadata":
            trajectory[item.name] = json.dumps(value, default=repr)
        elif item.name == "prompts":
            trajectory[item.name] = list(value)
    return {
        "trajectory": trajectory,
        "on_cpu": [name for name, value in trajectory.items() if isinstance(value, torch.Tensor) and getattr(samples.trajectory, name).device.type == "cpu"],
        "indices": samples.indices.cpu(),
        "rewards": samples.rewards.cpu(),
        "advantages": advantages.cpu(),
        "reward_info": json.dumps(samples.reward_info),
        "seconds": [samples.sample_seconds, samples.reward_wait_seconds],
    }


def _epoch_samples_from_state(state: dict, device: torch.device) -> tuple[EpochSamples, torch.Tensor]:
    fields = dict(state["trajectory"])
    fields["metadata"] = json.loads(fields["metadata"])
    for name, value in fields.items():
        if isinstance(value, torch.Tensor):
            fields[name] = value if name in state["on_cpu"] else value.to(device)
        elif name == "prepared":
            fields[name] = SampleData.from_state(value).to(device)
    samples = EpochSamples(
        trajectory=Trajectory(**fields),
        indices=state["indices"].to(device),
        rewards=state["rewards"].to(device),
        reward_info=json.loads(state["reward_info"]),
        sample_seconds=state["seconds"][0],
        reward_wait_seconds=state["seconds"][1],
    )
    return samples, state["advantages"].to(device)


def _merge_info(infos: list[dict]) -> dict[str, float]:
    """Mean of each numeric per-sample array a reward reported (e.g. each term of a weighted sum)."""
    merged: dict[str, list] = {}
    for info in infos:
        for key, value in info.items():
            array = np.asarray(value)
            if array.dtype.kind in "fiub":
                merged.setdefault(key, []).append(array.reshape(-1))
    return {key: float(np.concatenate(values).mean()) for key, values in merged.items()}


def resident_memory_mb() -> float | None:
    """This process's resident set size (VmRSS) in MiB, from /proc; None where there is no /proc (macOS, Windows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)  # reported in kB
    except OSError:
        pass
    return None


def _tracker_metrics(record: dict) -> dict[str, float]:
    """Namespaced names for trackers: reward/..., losses/..., time/..., memory/..."""
    names = {"reward_mean": "reward/mean", "reward_std": "reward/std", "samples": "charts/samples", "rss_mb": "memory/rss_mb"}
    out = {}
    for key, value in record.items():
        if key == "epoch" or not isinstance(value, (int, float)):
            continue
        if key in names:
            out[names[key]] = value
        elif key.endswith("_seconds"):
            out[f"time/{key[: -len('_seconds')]}"] = value
        elif key.startswith("reward_"):
            out[f"reward/{key[len('reward_'):]}"] = value
        else:
            out[f"losses/{key}"] = value
    return out


def _extra_trackers(config: Config) -> list[str]:
    """`log.with` besides TensorBoard, checked: known to accelerate and installed."""
    extra = [name for name in dict.fromkeys(config.log.with_) if name != "tensorboard"]
    available = {str(t) for t in get_available_trackers()}
    for name in extra:
        if name not in available:
            raise ConfigError(f"log.with: tracker {name!r} is not available here (install its package, e.g. pip install {name})")
    return extra


def _flat_hparams(config: Config) -> dict:
    flat = {}
    for section, values in config_to_dict(config).items():
        if isinstance(values, dict):
            for key, value in values.items():
                flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
        else:
            flat[section] = values
    return flat


def train(config: Config, run_dir: str | Path, *, resume: bool = False, progress: bool = True) -> Path:
    """Run (or resume) a training run; returns the run directory."""
    return Trainer(config, run_dir, resume=resume, progress=progress).run()
