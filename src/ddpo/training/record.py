"""The record of a run, epoch by epoch: the metrics line, each prompt's rewards, the fixed-seed sample grid,
checkpoints on their schedule, the periodic evaluation, the best checkpoint, trackers and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.tracking import TensorBoardTracker, get_available_trackers
from accelerate.utils import gather_object
from PIL import Image

from ddpo.config import BatchSizes, Config, ConfigError, config_to_dict
from ddpo.training.batches import EpochSamples
from ddpo.training.checkpoint import Checkpoints
from ddpo.training.monitor import EARLY_STOP_METRIC, Monitor, tracker_metrics
from ddpo.training.run_directory import RunDirectory, append_jsonl, epoch_name, write_text_atomic
from ddpo.utils import derive_seed, image_grid

GRID_PROMPTS = 4


class Recorder:
    """Writes what a run leaves behind; every process calls it (the main one writes)."""

    def __init__(self, *, accelerator: Any, config: Config, sizes: BatchSizes, run_dir: RunDirectory, policy: Any,
                 prompts: list[str], monitor: Monitor, checkpoints: Checkpoints, collective_forward: bool) -> None:  # fmt: skip
        self.accelerator, self.config, self.sizes, self.run_dir, self.policy = accelerator, config, sizes, run_dir, policy
        self.monitor, self.checkpoints, self.collective_forward = monitor, checkpoints, collective_forward
        self.grid_prompts = list(config.log.grid_prompts) or prompts[:GRID_PROMPTS]
        self.grid_epochs = grid_epochs(config.train.epochs, config.log.grid_every, config.log.eval_every)

    def describe(self, reward_name: str, parameters: list[torch.nn.Parameter]) -> None:
        """One line at start: what trains on what, the batch arithmetic, the trained weights, the run directory."""
        if self.accelerator.is_main_process:
            s, sample = self.sizes, self.config.sample
            anchors = f" (+ {s.anchor_samples_per_epoch} unscored anchors)" if s.anchor_samples_per_epoch else ""
            window = f" (from a window of {sample.sde_window} SDE steps)" if sample.sde_window else ""
            self.accelerator.print(
                f"ddpo: {self.config.train.algorithm} on {self.config.model.pretrained} with reward {reward_name}; "
                f"{s.num_processes} process(es) x {s.samples_per_process} samples = {s.samples_per_epoch} samples/epoch{anchors}; "
                f"{s.num_train_timesteps} of {sample.num_steps} steps trained per sample{window}; "
                f"{s.optimizer_steps_per_epoch} optimizer steps/epoch of {s.samples_per_optimizer_step} samples; "
                f"{len(parameters)} trainable tensors ({sum(p.numel() for p in parameters):,} weights); run dir {self.run_dir.path}"
            )

    def record(self, epoch: int, samples: EpochSamples, train_metrics: dict[str, float], train_seconds: float, *,
               new_best: bool = False, stop: bool = False, force_save: bool = False) -> None:  # fmt: skip
        """The epoch's metrics line, prompt rewards, grid and (on schedule, a new best, a stop or a preemption)
        checkpoint."""
        record = self._metrics(epoch, samples, train_metrics, train_seconds)
        save = epoch % self.config.log.save_every == 0 or epoch == self.config.train.epochs or new_best or stop or force_save
        prompt_rewards = self._prompt_rewards(samples)
        state = self.checkpoints.gather() if save else None
        if epoch in self.grid_epochs or stop or force_save:  # a stopped or preempted run's last epoch too
            self.save_sample_grid(epoch)
        if self.accelerator.is_main_process:
            self.run_dir.append_metrics(record)
            append_jsonl(self.run_dir.prompt_rewards_path, {"epoch": epoch, "prompts": prompt_rewards})
            if save:  # best.json and the report follow the checkpoint they name, on its writer's thread
                self.checkpoints.save(epoch, state, then=lambda: self._after_checkpoint(epoch, new_best, stop))
            else:
                self._after_checkpoint(epoch, new_best, stop, report=False)
            self.accelerator.print(
                f"epoch {epoch}: reward {record['reward_mean']:.4f} +- {record['reward_std']:.4f}  loss {record['loss']:.4g}  "
                f"kl {record['approx_kl']:.3g}  clipfrac {record['clipfrac']:.3f}  "
                f"sample {record['sample_seconds']:.1f}s train {record['train_seconds']:.1f}s"
            )
        self.accelerator.log(namespaced_metrics(record), step=epoch)
        self.accelerator.wait_for_everyone()

    def _metrics(self, epoch: int, samples: EpochSamples, train_metrics: dict[str, float], train_seconds: float) -> dict:
        rewards = self.accelerator.gather(samples.rewards).float().cpu()
        rewards = rewards[~rewards.isnan()]  # anchor samples are not scored
        record = {
            "epoch": epoch,
            "samples": epoch * self.sizes.samples_per_epoch,
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
        return record

    def evaluate(self, epoch: int) -> bool:
        """The periodic evaluation (`ddpo.training.monitor`) on the main process; True (on the main process) when
        its held-out score is a new best and early stopping keeps best checkpoints."""
        new_best = False
        if self.accelerator.is_main_process or self.collective_forward:  # under FSDP the others join the network's calls
            with self.policy.evaluation():
                record = self.monitor.evaluate(self.policy, epoch, epoch * self.sizes.samples_per_epoch)
        if self.accelerator.is_main_process:
            append_jsonl(self.run_dir.monitor_path, record)
            self.accelerator.log(tracker_metrics(record), step=epoch)
            new_best = self.monitor.observe(record) and self.config.train.early_stop_on_heldout
            heldout = f"  held-out {record['heldout_score']:.4f}" if "heldout_score" in record else ""
            kl = f"  kl-to-base {record['kl']:.4g}" if "kl" in record else ""
            diversity = f"  diversity {record['diversity']:.4f}" if "diversity" in record else ""
            self.accelerator.print(f"eval {epoch}: reward {record['train_reward']:.4f}{heldout}{kl}{diversity}  ({record['seconds']:.1f}s)")
        return new_best

    def early_stop_message(self, epoch: int) -> str:
        best = self.monitor.best
        return (
            f"early stop after epoch {epoch}: the held-out score peaked at epoch {best.epoch} ({best.score:.4f}) and has "
            f"not improved for {epoch - best.epoch} epochs; best checkpoint {self.run_dir.checkpoints_dir / epoch_name(best.epoch)}"
        )

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

    def _after_checkpoint(self, epoch: int, new_best: bool, stop: bool, *, report: bool = True) -> None:
        if new_best:
            self._write_best(epoch)
        if stop:
            self._write_best(self.monitor.best.epoch, stopped_after=epoch)
        if report:
            self.write_report()

    def _write_best(self, epoch: int, stopped_after: int | None = None) -> None:
        record = {
            "epoch": epoch,
            "checkpoint": f"{self.run_dir.checkpoints_dir.name}/{epoch_name(epoch)}",
            "metric": EARLY_STOP_METRIC,
            "heldout_reward": self.monitor.heldout_reward.name,
            "value": self.monitor.best.score,
        }
        if stopped_after is not None:
            record["stopped_after_epoch"] = stopped_after
        self.run_dir.write_best(record)

    def write_report(self) -> None:
        """Refresh RUN_DIR/report.html; a report that fails is a warning, never the end of a run."""
        from ddpo.report import write_report

        try:
            write_report(self.run_dir.path)
        except Exception as error:  # noqa: BLE001 - the run matters more than its report
            self.accelerator.print(f"ddpo: warning: report.html not written: {type(error).__name__}: {error}")

    def save_sample_grid(self, epoch: int) -> None:
        """Fixed prompts x fixed seeds, the same every epoch, so images can be compared across epochs."""
        if not self.accelerator.is_main_process and not self.collective_forward:
            return
        prompts, seeds = self.grid_prompts, self.config.log.num_eval_seeds
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

    def save_before_after(self, last_epoch: int) -> None:
        """samples/before-after.png: the grid before training next to the last epoch's (same prompts, same seeds)."""
        first, last = self.run_dir.sample_grid_path(0), self.run_dir.sample_grid_path(last_epoch)
        if first.is_file() and last.is_file() and first != last:
            before, after = Image.open(first), Image.open(last)
            gap = before.width // 16
            canvas = Image.new("RGB", (before.width + gap + after.width, before.height), "white")
            canvas.paste(before, (0, 0))
            canvas.paste(after, (before.width + gap, 0))
            canvas.save(self.run_dir.samples_dir / "before-after.png")


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


def namespaced_metrics(record: dict) -> dict[str, float]:
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


def trackers_for(config: Config, run_dir: str | Path) -> list:
    """TensorBoard, always (into RUN_DIR/tb, created only when started), and `log.with`'s others, checked:
    known to accelerate and installed."""
    extra = [name for name in dict.fromkeys(config.log.with_) if name != "tensorboard"]
    available = {str(t) for t in get_available_trackers()}
    for name in extra:
        if name not in available:
            raise ConfigError(f"log.with: tracker {name!r} is not available here (install its package, e.g. pip install {name})")
    return [TensorBoardTracker("", str(Path(run_dir) / "tb")), *extra]


def grid_epochs(epochs: int, every: int, eval_every: int = 0) -> frozenset[int]:
    """The epochs whose sample grid a run of `epochs` epochs saves: every `every`-th (`log.grid_every`), or with 0
    those of the evaluation (`log.eval_every`; none between with 0); 0 and the last always."""
    step = every or eval_every
    return frozenset({0, epochs, *(range(0, epochs + 1, step) if step else ())})


def flat_hyperparameters(config: Config) -> dict:
    """The config as `section.key` -> a scalar, for trackers' hyper-parameter tables."""
    flat = {}
    for section, values in config_to_dict(config).items():
        if isinstance(values, dict):
            for key, value in values.items():
                flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
        else:
            flat[section] = values
    return flat
