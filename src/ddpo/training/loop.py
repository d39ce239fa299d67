"""The DDPO epoch loop on accelerate: sample -> score -> advantages -> update -> record.

Every random draw is seeded from what it is for: the noise of sample i of epoch e from (seed, "noise", e, i),
its prompt from (seed, "prompt", e, i), the training shuffles from (seed, "shuffle", e, inner epoch, rank)
(`ddpo.training.batches`). A resumed run therefore replays exactly the draws the uninterrupted run would have made.
The algorithm owns its loss, regularizers included (`Algorithm.micro_step`); the loop only accumulates, clips
and steps.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from tqdm.auto import tqdm

from ddpo.algorithms import MicroBatch, build_algorithm_from_config, check_on_policy
from ddpo.config import Config, ConfigError, save_config
from ddpo.core.trajectory import Trajectory
from ddpo.policy import TrainablePolicy, build_policy
from ddpo.prompts import build_prompt_source
from ddpo.rewards import RewardError, RewardOutput, build_reward_from_config
from ddpo.rewards.remote import RemoteRewardError
from ddpo.training import batches
from ddpo.training.assemble import derived_batch_sizes, validate
from ddpo.training.batches import EpochSamples, merge_reward_info
from ddpo.training.checkpoint import Checkpoints
from ddpo.training.memory import ActivationMeter, choose_timestep_chunk
from ddpo.training.monitor import Monitor
from ddpo.training.preemption import Preempted, PreemptionWatch
from ddpo.training.record import Recorder, flat_hyperparameters, trackers_for
from ddpo.training.run_directory import RunDirectory, epoch_name, read_jsonl
from ddpo.training.sharding import any_process, build_accelerator, check_and_configure, end_training, is_fsdp, main_process_decision
from ddpo.utils import derive_seed, generators_for


class Trainer:
    """Holds the pieces of a run; `run()` is the loop. Everything that can fail on bad input (model, reward,
    prompts) is built before the run directory."""

    def __init__(self, config: Config, run_dir: str | Path, *, resume: bool = False, progress: bool = True) -> None:
        validate(config)
        if config.model.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("model.mixed_precision='fp16' needs a CUDA GPU; use 'no' (or 'bf16') on this machine")
        self.config = config
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.model.allow_tf32
        self.accelerator = build_accelerator(
            mixed_precision=config.model.mixed_precision, log_with=trackers_for(config, run_dir),
            project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
        )  # fmt: skip
        check_and_configure(self.accelerator, config)  # DeepSpeed / FSDP: refuse what cannot run, fill DeepSpeed's config
        # Under FSDP every call of the network is a collective (its weights are sharded): grids and evaluations,
        # which only the main process keeps, are sampled by every process.
        self.collective_forward = is_fsdp(self.accelerator)
        self.sizes = derived_batch_sizes(config, self.accelerator.num_processes)
        self.progress = progress and self.accelerator.is_local_main_process
        self.resumed = resume
        self._build_components()
        self.start_epoch = self.last_epoch = 0  # the last finished epoch
        self.preemption = PreemptionWatch(announce=self.accelerator.print)
        self._partial: dict | None = None  # a preempted epoch to finish (resumed from a partial checkpoint)
        self._open_run_dir(run_dir, resume)
        # Timesteps per model call of the update: the config's, a resumed run's, or measured at the first micro-step.
        self._chunk: int | None = config.train.timestep_chunk or self.checkpoints.timestep_chunk
        self.accelerator.init_trackers(
            config.run_name or "ddpo", config=flat_hyperparameters(config),
            init_kwargs={"wandb": {"name": self.run_dir.path.name, "dir": str(self.run_dir.path)}},
        )  # fmt: skip
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")

    def _build_components(self) -> None:
        config, device = self.config, self.accelerator.device
        # Frozen weights in half precision only where mixed precision runs (not on CPU).
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.model.mixed_precision, torch.float32) if device.type != "cpu" else torch.float32
        self.algorithm = build_algorithm_from_config(config.train)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(config.seed, "init"))  # LoRA's random init: the same on every rank and run
            self.policy: TrainablePolicy = build_policy(config, device, inference_dtype=dtype, sampler=self.algorithm.sampler)
        if config.model.init_lora and not self.resumed:  # RL from a LoRA, e.g. `ddpo sft`'s (a resumed run has its own)
            from ddpo.sft import load_initial_lora

            load_initial_lora(self.policy, config.model.init_lora)
        try:
            self.reward = build_reward_from_config(config.reward)  # checked: errors name the reward and the prompt
        except (ValueError, RemoteRewardError) as error:  # a plugin that does not import, a server that does not answer
            key = "reward.url" if config.reward.url else "reward.terms" if config.reward.terms else "reward.name"
            raise ConfigError(f"{key}: {error}") from error
        self.prompt_source = build_prompt_source(config.prompts.source, config.prompts.file)
        self.anchor_source = build_prompt_source(config.prompts.anchor_source) if config.prompts.anchor_source else None
        self.monitor = Monitor(config, self.reward)  # the evaluation prompts and the held-out scorer
        train = config.train
        self.optimizer = torch.optim.AdamW(
            self.policy.trainable_parameters(), lr=train.lr, betas=(train.adam_beta1, train.adam_beta2),
            weight_decay=train.adam_weight_decay, eps=train.adam_epsilon,
        )  # fmt: skip
        self.policy.denoiser, self.optimizer = self.accelerator.prepare(self.policy.model, self.optimizer)

    def _open_run_dir(self, run_dir: str | Path, resume: bool) -> None:
        self.created_run_dir = not resume and not Path(run_dir).exists()
        self.run_dir = RunDirectory.open(run_dir) if resume else RunDirectory(run_dir)
        self.checkpoints = Checkpoints(self.accelerator, self.run_dir, self.policy, self.optimizer, self.algorithm, self.config)
        damaged = self._resume() if resume else []
        if not resume and self.accelerator.is_main_process:
            RunDirectory.create(run_dir)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save_config(self.config, self.run_dir.config_path)
            self.run_dir.remove_stale_temporaries()
            for directory in damaged:
                self.accelerator.print(f"ddpo: the damaged checkpoint is kept as {self.run_dir.set_aside(directory)}")
        self.recorder = Recorder(
            accelerator=self.accelerator, config=self.config, sizes=self.sizes, run_dir=self.run_dir, policy=self.policy,
            prompts=self.prompt_source.prompts, monitor=self.monitor, checkpoints=self.checkpoints, collective_forward=self.collective_forward,
        )  # fmt: skip

    def _resume(self) -> list[Path]:
        """Load the newest undamaged checkpoint; returns the damaged ones it skipped."""
        point = self.checkpoints.load_latest(self.accelerator.print)
        self.start_epoch = point.epoch
        self._partial = point.partial
        self.monitor.restore([r for r in read_jsonl(self.run_dir.monitor_path, tolerant=True) if r["epoch"] <= point.epoch])
        if self.accelerator.is_main_process:
            self.run_dir.truncate_metrics(point.epoch)
            inside = f", inside epoch {point.partial['epoch']} after {point.partial['micro_step']} micro-steps" if point.partial else ""
            self.accelerator.print(f"resuming {self.run_dir.path} after epoch {point.epoch}{inside}")
        return point.damaged

    # ---- the loop ---------------------------------------------------------------------------------------
    def run(self) -> Path:
        self.recorder.describe(self.reward.name, self.policy.trainable_parameters())
        self.last_epoch = self.start_epoch
        if self.start_epoch == 0 and not self.resumed:  # a run resumed from epoch-0000 (preempted in epoch 1) has them
            self.recorder.save_sample_grid(0)
            if self.monitor.due(0):
                self._agree(self.recorder.evaluate(0))  # the baseline: the model before training
        finished = False
        try:
            with self.preemption:
                self._run_epochs()
            finished = True
        except BaseException:
            # A run that fails before its first checkpoint can be neither resumed nor re-run into the same
            # directory: remove what this invocation created, so nothing half-written stays behind.
            if self.created_run_dir and self.accelerator.is_main_process and not self.run_dir.resume_candidates():
                shutil.rmtree(self.run_dir.path, ignore_errors=True)
            raise
        finally:
            self._executor.shutdown(wait=True)
            self.checkpoints.close()  # the checkpoint written in the background, joined (its error raised)
            end_training(self.accelerator, settle=finished)  # every process finished: a barrier cannot hang
        if self.accelerator.is_main_process:
            self.recorder.save_before_after(self.last_epoch)
            self.recorder.write_report()
        return self.run_dir.path

    def _run_epochs(self) -> None:
        """The epochs left to run. On SIGTERM/SIGUSR1 (`ddpo.training.preemption`) each phase stops at its next safe
        point with a whole checkpoint and raises `Preempted`: sampling after its current batch (the weights are
        still the last epoch's), training after its current optimizer step (a partial checkpoint with the epoch's
        samples), the epoch's end after its record."""
        for epoch in range(self.start_epoch + 1, self.config.train.epochs + 1):
            set_seed(derive_seed(self.config.seed, "epoch", epoch) % 2**32)  # for rewards that draw random numbers
            self.algorithm.begin_epoch(epoch, self.policy)
            partial, self._partial = (self._partial, None) if self._partial and self._partial["epoch"] == epoch else (None, self._partial)
            if partial is not None:  # resumed inside this epoch
                samples, advantages = partial["samples"], partial["advantages"]
            else:
                samples = self.sample_epoch(epoch)
                if samples is None:  # preempted while sampling: nothing of this epoch reached the weights
                    raise self._preempted(epoch - 1, "while sampling", self.checkpoints.save_if_missing(epoch - 1))
                advantages = self.advantages(samples)
            train_metrics, train_seconds = self.update(epoch, samples, advantages, resume=partial)
            new_best = self.monitor.due(epoch) and self._agree(self.recorder.evaluate(epoch))
            stop = self._agree(self.monitor.should_stop(epoch))
            preempted = self._any_process(self.preemption.received is not None)
            self.record(epoch, samples, train_metrics, train_seconds, background=True, new_best=new_best, stop=stop, force_save=preempted)
            self.last_epoch = epoch
            if preempted and epoch < self.config.train.epochs and not stop:
                self.checkpoints.wait()
                raise self._preempted(epoch, "at the end of the epoch", self.run_dir.checkpoints_dir / epoch_name(epoch))
            if stop:
                if self.accelerator.is_main_process:
                    self.accelerator.print(self.recorder.early_stop_message(epoch))
                break

    def sample_epoch(self, epoch: int) -> EpochSamples | None:
        """Sample this process's share of the epoch; rewards are scored in a thread while the next batch samples.
        None when a preemption signal arrived (on any process) before the last batch: the epoch is abandoned."""
        sample, rank, world = self.config.sample, self.accelerator.process_index, self.accelerator.num_processes
        started = time.perf_counter()
        trajectories, futures, all_indices = [], [], []
        num_batches = sample.num_batches_per_epoch + sample.anchor_batches_per_epoch
        for b in tqdm(range(num_batches), desc=f"epoch {epoch} sampling", disable=not self.progress, leave=False):
            indices = batches.global_indices(self.config, b, rank, world)
            anchor = b >= sample.num_batches_per_epoch
            trajectory = self._sample_batch(epoch, indices, anchor)
            if anchor:  # never scored: anchors carry only the KL to the base model
                futures.append(Future())
                futures[-1].set_result(RewardOutput(scores=np.full(len(indices), np.nan, dtype=np.float32)))
            else:
                futures.append(self._executor.submit(self.reward, trajectory.images, trajectory.prompts, trajectory.metadata))
            trajectories.append(trajectory)
            all_indices += indices
            if b + 1 < num_batches and self._any_process(self.preemption.received is not None):
                return None
        sampled = time.perf_counter()
        outputs = self._rewards(futures)
        waited = time.perf_counter() - sampled
        trajectory = Trajectory.concatenate(trajectories)
        self.algorithm.prepare(trajectory)
        device = self.accelerator.device
        return EpochSamples(
            trajectory=trajectory, indices=torch.tensor(all_indices, device=device),
            rewards=torch.from_numpy(np.concatenate([o.scores for o in outputs])).to(device),
            reward_info=merge_reward_info([o.info for o in outputs]),
            sample_seconds=sampled - started, reward_wait_seconds=waited,
        )  # fmt: skip

    def _sample_batch(self, epoch: int, indices: list[int], anchor: bool) -> Trajectory:
        """One sampling batch: each sample's prompt and noise from its global index."""
        config = self.config
        group = 1 if anchor else config.sample.samples_per_prompt
        source, purpose = (self.anchor_source, "anchor") if anchor else (self.prompt_source, "prompt")
        prompts, metadata = zip(*(source(random.Random(derive_seed(config.seed, purpose, epoch, i // group if group > 1 else i))) for i in indices))
        # Algorithms whose groups share the initial noise (FDFO's pairs) draw it from the group's generator.
        initial = generators_for(config.seed, "initial-noise", epoch, [i // group for i in indices]) if self.algorithm.shared_initial_noise else None
        return self.policy.sample(list(prompts), generators_for(config.seed, "noise", epoch, indices), list(metadata), initial_noise_generators=initial)

    def _rewards(self, futures: list[Future]) -> list[RewardOutput]:
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
        return outputs

    def advantages(self, samples: EpochSamples) -> torch.Tensor:
        """Advantages over the gathered global batch, in global sample order; returns this process's share."""
        indices = self.accelerator.gather(samples.indices)
        rewards = self.accelerator.gather(samples.rewards)
        prompts = gather_object(samples.trajectory.prompts) if self.accelerator.num_processes > 1 else samples.trajectory.prompts
        order = torch.argsort(indices)
        scored = int((~batches.is_anchor(self.config, indices, self.accelerator.num_processes)).sum())  # anchors sort last
        global_advantages = torch.zeros(len(order))  # anchors have no reward: their advantage is 0
        global_advantages[:scored] = self.algorithm.advantages(rewards[order[:scored]].float().cpu(), [prompts[i] for i in order[:scored].tolist()])
        position = {int(index): k for k, index in enumerate(indices[order].tolist())}
        local = [position[int(i)] for i in samples.indices.tolist()]
        return global_advantages[local].to(self.accelerator.device)

    def update(self, epoch: int, samples: EpochSamples, advantages: torch.Tensor, resume: dict | None = None) -> tuple[dict[str, float], float]:
        """Inner epochs over shuffled minibatches and shuffled timesteps, `train.timestep_chunk` steps per
        micro-step, with gradient accumulation.

        `resume` (from a partial checkpoint) skips the micro-steps a preempted run already took. A preemption
        signal stops the update after its current optimizer step: a partial checkpoint, then `Preempted`."""
        config, device = self.config, self.accelerator.device
        self._started = time.perf_counter() - (resume["train_seconds"] if resume else 0.0)
        self._totals = {name: list(values.to(device).unbind()) for name, values in resume["totals"].items()} if resume else {}
        self._micro_step, skip = 0, resume["micro_step"] if resume else 0
        # The first optimizer step of an epoch is on-policy: its importance ratios must be 1 (train.on_policy_check).
        self._ratio_error = torch.zeros((), device=device) if config.train.on_policy_check and self.algorithm.uses_importance_ratio and skip == 0 else None
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        num_trained = int((~batches.is_anchor(config, samples.indices, world)).sum())  # this process's scored samples come first
        for inner in range(config.train.inner_epochs):
            minibatches = batches.minibatches(config, epoch, inner, num_trained, rank)
            anchor_parts = batches.anchor_parts(config, epoch, inner, num_trained, len(samples.trajectory), len(minibatches), rank)
            steps = batches.trained_steps(config, self.sizes, epoch, inner, samples)
            for minibatch, anchor_part in tqdm(zip(minibatches, anchor_parts), total=len(minibatches), desc=f"epoch {epoch}.{inner} training", disable=not self.progress, leave=False):
                part = samples.trajectory.select(minibatch)
                part_steps, anchor_steps = steps[minibatch].to(part.latents.device), steps[anchor_part].to(part.latents.device)
                anchor = samples.trajectory.select(anchor_part) if len(anchor_part) else None
                start = 0
                while start < part_steps.shape[1]:  # the run's first micro-step: one timestep, measured (training/memory.py)
                    end = start + (self._chunk or 1)
                    batch = MicroBatch(part, part_steps[:, start:end], advantages[minibatch.to(advantages.device)], anchor, anchor_steps[:, start:end])
                    self._take_micro_step(epoch, batch, skip, samples, advantages)
                    start = end
        self.accelerator.sync_gradients = True
        means = {name: torch.stack(values).to(device).mean() for name, values in self._totals.items()}
        reduced = {name: float(self.accelerator.reduce(value.to(device), reduction="mean")) for name, value in means.items()}
        return reduced, time.perf_counter() - self._started

    def _take_micro_step(self, epoch: int, batch: MicroBatch, skip: int, samples: EpochSamples, advantages: torch.Tensor) -> None:
        """Backpropagate one micro-batch's loss; step the optimizer where an accumulation ends.

        The loss of a micro-batch of c timesteps is the mean over its b*c (sample, timestep) pairs, so scaling it
        by c / (micro-steps per optimizer step) gives the gradient of the per-timestep losses' mean."""
        width = batch.steps.shape[1]
        per_step = self.sizes.accumulation_steps * self.sizes.num_train_timesteps
        self._micro_step += width
        if self._micro_step <= skip:  # taken before the preemption this run resumed from
            return
        sync = self._micro_step % per_step == 0
        self.accelerator.sync_gradients = sync  # DeepSpeed's engine steps at the micro-step accelerate marks
        with nullcontext() if sync else self.accelerator.no_sync(self.policy.denoiser):
            with ActivationMeter(self.policy.model) if self._chunk is None else nullcontext() as meter:
                output = self.algorithm.micro_step(self.policy, batch)
            if self._chunk is None:
                self._chunk = self.checkpoints.timestep_chunk = choose_timestep_chunk(
                    self.accelerator, meter.bytes // width, self.sizes.num_train_timesteps, self.config.train.activation_memory_mb)
            if self._ratio_error is not None and output.ratio_error is not None:
                self._ratio_error = torch.maximum(self._ratio_error, output.ratio_error)
            finite = bool(torch.isfinite(output.loss.detach()))
            if self._any_process(not finite):  # every process stops, or the others hang in backward
                value = f"is {output.loss.item()}" if not finite else "is not finite on another process"
                raise FloatingPointError(f"epoch {epoch}: the {self.algorithm.name} loss {value}; stopping before it reaches the weights")
            self.accelerator.backward(output.loss * width / per_step)
        for name, value in output.metrics.items():
            self._totals.setdefault(name, []).extend([value.detach().float()] * width)
        if sync:
            self._optimizer_step(epoch)
            total = self.sizes.optimizer_steps_per_epoch * per_step
            if self._micro_step < total and self._any_process(self.preemption.received is not None):
                self.accelerator.sync_gradients = True
                progress = {"micro_step": self._micro_step, "totals": self._totals, "train_seconds": time.perf_counter() - self._started}
                raise self._preempted(epoch - 1, "while training", self.checkpoints.save_partial(epoch, samples, advantages, progress))

    def _optimizer_step(self, epoch: int) -> None:
        device = self.accelerator.device
        if self._ratio_error is not None:  # the first step of the epoch, before it reaches the weights
            error = float(self.accelerator.reduce(self._ratio_error, reduction="max")) if self.accelerator.num_processes > 1 else float(self._ratio_error)
            self._ratio_error = None
            self._totals["first_step_ratio_error"] = [torch.tensor(error, device=device)]
            check_on_policy(self.algorithm, epoch, error)
        grad_norm = self.accelerator.clip_grad_norm_(self.policy.trainable_parameters(), self.config.train.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        grad_norm = math.nan if grad_norm is None else grad_norm
        self._totals.setdefault("grad_norm", []).append(torch.as_tensor(grad_norm, dtype=torch.float32, device=device))
        self.optimizer.step()  # under DeepSpeed, the engine stepped in backward
        self.optimizer.zero_grad(set_to_none=True)

    def record(self, epoch: int, samples: EpochSamples, train_metrics: dict[str, float], train_seconds: float, *, background: bool = False, **when: bool) -> None:
        """The epoch's record (`ddpo.training.record.Recorder.record`), its checkpoint written when this returns, or
        with `background` (as `run()` does) while the next epoch samples."""
        self.recorder.record(epoch, samples, train_metrics, train_seconds, **when)
        if not background:
            self.checkpoints.wait()

    def save_sample_grid(self, epoch: int) -> None:
        self.recorder.save_sample_grid(epoch)

    def _preempted(self, epoch: int, where: str, checkpoint: Path) -> Preempted:
        return Preempted(self.preemption.received or "a signal on another process", str(checkpoint), epoch, where)

    def _any_process(self, flag: bool) -> bool:
        return any_process(self.accelerator, flag)

    def _agree(self, flag: bool) -> bool:
        return main_process_decision(self.accelerator, flag)


def train(config: Config, run_dir: str | Path, *, resume: bool = False, progress: bool = True) -> Path:
    """Run (or resume) a training run; returns the run directory."""
    return Trainer(config, run_dir, resume=resume, progress=progress).run()
