"""Writing and reading a run's checkpoints, sharded or not: whole ones (after an epoch), partial ones (inside a
preempted epoch, with the epoch's samples), and the resume that picks the newest undamaged one.

A checkpoint directory holds the adapter (or full) weights in diffusers format, `trainable.safetensors` (the
trained tensors by name), `trainer_state.pt` (optimizer, algorithm state, grad scaler, config, the epoch) and
`checksums.json` (`ddpo.training.checksums`); `RunDirectory.write_checkpoint` writes it atomically and prunes.
A whole checkpoint of a LoRA run is written by a background thread from copies of the state taken at the end of
its epoch, so training goes on while it is serialized; `wait()` joins it (before the next checkpoint, a partial
one, the end of the run), and re-raises what failed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file

from ddpo.config import Config, config_to_dict
from ddpo.core.trajectory import SampleData, Trajectory
from ddpo.training.batches import EpochSamples
from ddpo.training.run_directory import TRAINER_STATE, RunDirectory, RunDirectoryError, epoch_name
from ddpo.training.sharding import CheckpointState, gather_checkpoint_state, load_checkpoint_state

DEEPSPEED_OPTIMIZER_STATE = "deepspeed_optimizer.pt"  # in a checkpoint directory: ZeRO's optimizer state, one entry per process
EPOCH_SAMPLES = "epoch_samples.pt"  # in a partial checkpoint: every process's samples, rewards and advantages of the epoch


@dataclass
class ResumePoint:
    """Where a resumed run continues: after `epoch`, or inside epoch `partial["epoch"]` with its samples."""

    epoch: int
    partial: dict | None
    damaged: list[Path]  # damaged checkpoints skipped on the way, set aside once every process loaded


class Checkpoints:
    """The checkpoints of one run, for every process (the main one writes; all of them gather and load)."""

    def __init__(self, accelerator: Any, run_dir: RunDirectory, policy: Any, optimizer: Any, algorithm: Any, config: Config) -> None:
        self.accelerator, self.run_dir, self.policy, self.optimizer = accelerator, run_dir, policy, optimizer
        self.algorithm, self.config = algorithm, config
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.timestep_chunk: int | None = None  # the update's chunk chosen from memory (`ddpo.training.memory`), kept for resumes
        self._pending: Future | None = None

    def gather(self) -> CheckpointState | None:
        """The network's and optimizer's state on the main process (gathered from every process where sharded)."""
        return gather_checkpoint_state(self.accelerator, self.policy, self.optimizer)

    def save(self, epoch: int, state: CheckpointState | None, then: Callable[[], None] | None = None, *, background: bool = True) -> None:
        """The whole checkpoint of finished epoch `epoch` from a gathered `state` (main process only), then `then`
        (what must follow the checkpoint: best.json, the report). A LoRA's is written in the background from
        copies; a full network's (read from the live model) in the foreground."""
        self.wait()
        frozen = self._frozen(state)
        job = lambda: (self.run_dir.write_checkpoint(epoch, lambda d: self._write(d, epoch, state, frozen=frozen), keep_last=self.config.log.keep_last), then and then())  # noqa: E731
        if background and self.policy.lora.enabled and state.network is None:
            self._pending = self._writer.submit(job)
        else:
            job()

    def wait(self) -> None:
        """Join the checkpoint being written in the background, re-raising its error (e.g. a full disk)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._writer.shutdown(wait=True)

    def _frozen(self, state: CheckpointState) -> dict:
        """Copies of everything a checkpoint reads that training goes on changing."""
        return {
            "optimizer": copy.deepcopy(state.optimizer),
            "algorithm": copy.deepcopy(self.algorithm.state_dict()),
            "grad_scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
        }

    def save_if_missing(self, epoch: int) -> Path:
        """The checkpoint of finished epoch `epoch` (0: the weights before training), written if it is not there
        yet: what a run preempted while sampling the next epoch resumes from (its state is still that epoch's)."""
        self.wait()
        path = self.run_dir.checkpoints_dir / epoch_name(epoch)
        if any(e == epoch for e, _ in self.run_dir.checkpoints()):
            return path
        state = self.gather()
        if self.accelerator.is_main_process:
            self.save(epoch, state, background=False)
        self.accelerator.wait_for_everyone()
        return path

    def save_partial(self, epoch: int, samples: EpochSamples, advantages: torch.Tensor, progress: dict) -> Path:
        """checkpoints/epoch-NNNN-partial: the state after an optimizer step inside epoch `epoch`, with what the
        rest of the epoch needs (every process's samples, rewards and advantages, and how far the update got)."""
        self.wait()
        state = self.gather()
        local = epoch_samples_state(samples, advantages)
        shares = gather_object([local]) if self.accelerator.num_processes > 1 else [local]
        partial = {
            "epoch": epoch,
            "micro_step": progress["micro_step"],
            "train_seconds": progress["train_seconds"],
            "totals": {name: torch.stack(values).cpu() for name, values in progress["totals"].items()},
            "num_processes": self.accelerator.num_processes,
        }

        def write(directory: Path) -> None:
            self._write(directory, epoch - 1, state, partial=partial)
            torch.save(shares, directory / EPOCH_SAMPLES)

        path = self.run_dir.checkpoints_dir / f"{epoch_name(epoch)}-partial"
        if self.accelerator.is_main_process:
            path = self.run_dir.write_checkpoint(epoch, write, partial=True)
        self.accelerator.wait_for_everyone()
        return path

    def _write(self, directory: Path, epoch: int, state: CheckpointState, partial: dict | None = None, frozen: dict | None = None) -> None:
        frozen = frozen or self._frozen(state)
        if self.policy.lora.enabled and state.network is None:
            self.policy.save_adapter(directory, adapter_state=state.trainable)  # the copies, not the live weights
        else:
            self.policy.save_adapter(directory, network_state=state.network)
        save_file(state.trainable, str(directory / "trainable.safetensors"))
        optimizer_state = frozen["optimizer"]
        if state.optimizer_layout == "deepspeed-zero":  # not loadable with weights_only: a file of its own
            torch.save(optimizer_state, directory / DEEPSPEED_OPTIMIZER_STATE)
            optimizer_state = None
        torch.save(
            {
                "epoch": epoch,
                "optimizer": optimizer_state,
                "optimizer_layout": state.optimizer_layout,
                "algorithm": frozen["algorithm"],
                "grad_scaler": frozen["grad_scaler"],
                "config": config_to_dict(self.config),
                "partial": partial,
                "timestep_chunk": self.timestep_chunk,
            },
            directory / TRAINER_STATE,
        )

    def load_latest(self, announce: Callable[[str], None]) -> ResumePoint:
        """Load the newest whole checkpoint (a partial one included); a damaged one (a file that does not match
        its checksum, or does not load) is reported and the previous one used."""
        problems = []
        for _, directory in self.run_dir.resume_candidates():
            problem = self.run_dir.checkpoint_problem(directory)
            if problem is None:
                try:
                    epoch, partial = self._load(directory)
                    return ResumePoint(epoch, partial, [d for d, _ in problems])
                except RunDirectoryError:  # whole, but not resumable by this launch: say so, do not fall back
                    raise
                except Exception as error:  # noqa: BLE001 - any file that does not load makes the checkpoint damaged
                    problem = f"it does not load ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
            problems.append((directory, problem))
            if self.accelerator.is_main_process:
                announce(f"ddpo: warning: checkpoint {directory} is damaged: {problem}; trying the previous one")
        raise RunDirectoryError(f"--resume {self.run_dir.path}: no whole checkpoint to resume from ({'; '.join(f'{d.name}: {p}' for d, p in problems)})")

    def _load(self, directory: Path) -> tuple[int, dict | None]:
        state = torch.load(directory / TRAINER_STATE, map_location="cpu", weights_only=True)
        partial = state.get("partial")
        if partial is not None:
            if partial["num_processes"] != self.accelerator.num_processes:
                raise RunDirectoryError(
                    f"{directory} was written inside epoch {partial['epoch']} by {partial['num_processes']} process(es); "
                    f"resume it with as many (this launch has {self.accelerator.num_processes})"
                )
            shares = torch.load(directory / EPOCH_SAMPLES, map_location="cpu", weights_only=True)
            samples, advantages = epoch_samples_from_state(shares[self.accelerator.process_index], self.accelerator.device)
            partial = {**partial, "samples": samples, "advantages": advantages}
        layout = state.get("optimizer_layout", "torch")
        optimizer_state = state["optimizer"]
        if layout == "deepspeed-zero":  # ZeRO's state holds objects (its loss scaler) that only a full unpickle restores
            optimizer_state = torch.load(directory / DEEPSPEED_OPTIMIZER_STATE, map_location="cpu", weights_only=False)
        trainable = load_file(str(directory / "trainable.safetensors"))
        load_checkpoint_state(self.accelerator, self.policy, self.optimizer, trainable, optimizer_state, layout)
        self.algorithm.load_state_dict(state["algorithm"])
        self.timestep_chunk = state.get("timestep_chunk")
        if self.accelerator.scaler is not None and state.get("grad_scaler"):
            self.accelerator.scaler.load_state_dict(state["grad_scaler"])
        return state["epoch"], partial


def epoch_samples_state(samples: EpochSamples, advantages: torch.Tensor) -> dict:
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


def epoch_samples_from_state(state: dict, device: torch.device) -> tuple[EpochSamples, torch.Tensor]:
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
