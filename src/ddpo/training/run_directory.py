"""The run directory contract (DESIGN.md): config, metrics, sample grids, atomic checkpoints.

    RUN_DIR/config.toml               the fully resolved config
    RUN_DIR/metrics.jsonl             one JSON object per finished epoch
    RUN_DIR/prompt_rewards.jsonl      per epoch, each prompt's reward mean, std and count
    RUN_DIR/monitor.jsonl             per evaluation (log.eval_every): held-out score, KL to the base, diversity
    RUN_DIR/samples/epoch-NNNN.png    fixed prompts x fixed seeds (epoch-0000 is the model before training)
    RUN_DIR/samples/grid.json         the grid's prompts (rows) and seeds (columns)
    RUN_DIR/checkpoints/epoch-NNNN/   adapter weights in diffusers format + trainer state + checksums.json
    RUN_DIR/checkpoints/epoch-NNNN-partial/  written when a run is preempted inside epoch NNNN (SIGTERM/SIGUSR1):
                                      the weights after its last optimizer step and the epoch's samples, so that
                                      a resume finishes the epoch exactly; removed once a later whole one exists
    RUN_DIR/best.json                 the checkpoint with the best held-out score (train.early_stop_on_heldout)
    RUN_DIR/report.html               the run's report (`ddpo report`)
    RUN_DIR/tb/                       TensorBoard events
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from ddpo.training.checksums import checkpoint_problem, write_checksums

CHECKPOINT_PATTERN = re.compile(r"^epoch-(\d{4,})$")
PARTIAL_PATTERN = re.compile(r"^epoch-(\d{4,})-partial$")
TRAINER_STATE = "trainer_state.pt"
CHECKPOINT_CHOICES = ("auto", "latest", "best")
"""How a run directory names one of its checkpoints (besides an epoch number); "auto" is best, else latest."""


class RunDirectoryError(ValueError):
    """A path given as a run directory is not one, or cannot be created."""


def epoch_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


class RunDirectory:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config_path = self.path / "config.toml"
        self.metrics_path = self.path / "metrics.jsonl"
        self.samples_dir = self.path / "samples"
        self.checkpoints_dir = self.path / "checkpoints"
        self.tb_dir = self.path / "tb"
        self.prompt_rewards_path = self.path / "prompt_rewards.jsonl"
        self.monitor_path = self.path / "monitor.jsonl"
        self.best_path = self.path / "best.json"
        self.grid_layout_path = self.samples_dir / "grid.json"
        self.report_path = self.path / "report.html"

    @classmethod
    def create(cls, path: str | Path) -> "RunDirectory":
        """A new run directory; refuses to write into an existing run (that is what --resume is for)."""
        run = cls(path)
        if run.config_path.exists():
            raise RunDirectoryError(f"{run.path} already holds a run; continue it with --resume {run.path} or choose another --out")
        if run.path.exists() and not run.path.is_dir():
            raise RunDirectoryError(f"--out {run.path} exists and is not a directory")
        for directory in (run.path, run.samples_dir, run.checkpoints_dir):
            directory.mkdir(parents=True, exist_ok=True)
        return run

    @classmethod
    def open(cls, path: str | Path) -> "RunDirectory":
        """An existing run, checked: a config and at least one complete checkpoint."""
        run = cls(path)
        if not run.path.is_dir():
            raise RunDirectoryError(f"--resume {run.path}: no such directory")
        if not run.config_path.is_file():
            raise RunDirectoryError(f"--resume {run.path}: not a ddpo run directory (no config.toml)")
        if not run.resume_candidates():
            raise RunDirectoryError(f"--resume {run.path}: the run has no complete checkpoint to resume from")
        return run

    # ---- checkpoints ------------------------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints (epoch, path), oldest first; temporary directories are ignored."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = []
        for child in self.checkpoints_dir.iterdir():
            match = CHECKPOINT_PATTERN.match(child.name)
            if match and (child / TRAINER_STATE).is_file():
                found.append((int(match.group(1)), child))
        return sorted(found)

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def partial_checkpoints(self) -> list[tuple[int, Path]]:
        """Checkpoints written inside an epoch by a preempted run (epoch in progress, path), oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = []
        for child in self.checkpoints_dir.iterdir():
            match = PARTIAL_PATTERN.match(child.name)
            if match and (child / TRAINER_STATE).is_file():
                found.append((int(match.group(1)), child))
        return sorted(found)

    def resume_candidates(self) -> list[tuple[int, Path]]:
        """Every checkpoint a resume may start from, newest progress first: a partial checkpoint of epoch e
        (preempted inside it) comes after the whole checkpoint of epoch e - 1 and before that of epoch e."""
        ranked = [((epoch, 0), epoch, path) for epoch, path in self.checkpoints()]
        ranked += [((epoch - 1, 1), epoch, path) for epoch, path in self.partial_checkpoints()]
        return [(epoch, path) for _, epoch, path in sorted(ranked, key=lambda item: item[0], reverse=True)]

    @staticmethod
    def checkpoint_problem(path: Path) -> str | None:
        """What is damaged in a checkpoint directory (a file missing or not matching its checksum), or None."""
        return checkpoint_problem(path)

    def set_aside(self, path: Path) -> Path:
        """Rename a damaged checkpoint to `<name>.damaged[-k]`: kept for inspection, never loaded or overwritten."""
        for k in range(1000):
            target = path.with_name(f"{path.name}.damaged" + (f"-{k}" if k else ""))
            if not target.exists():
                os.replace(path, target)
                return target
        raise RunDirectoryError(f"{path}: too many damaged checkpoints set aside beside it")

    def write_checkpoint(self, epoch: int, write: Callable[[Path], None], keep_last: int = 0, *, partial: bool = False) -> Path:
        """Write into a temporary directory, record checksums, then rename: a crash or a full disk leaves the
        previous checkpoints intact.

        `keep_last` prunes the oldest checkpoints, never the one best.json names. A whole checkpoint removes the
        partial ones it supersedes; `partial` writes `epoch-NNNN-partial` (a preempted epoch NNNN).

        Raises:
            RunDirectoryError: the checkpoint could not be written (e.g. no space left), naming its path; the
                temporary directory is removed.
        """
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        name = epoch_name(epoch) + ("-partial" if partial else "")
        final = self.checkpoints_dir / name
        tmp = self.checkpoints_dir / f".{name}.tmp-{os.getpid()}"
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            write(tmp)
            write_checksums(tmp)
            if final.exists():  # a partial checkpoint of the same epoch written by an earlier preemption
                shutil.rmtree(final)
            os.replace(tmp, final)
        except (OSError, RuntimeError) as error:  # torch.save reports a failed write as RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
            raise RunDirectoryError(f"could not write checkpoint {final}: {reason}; the previous checkpoints are untouched") from error
        if not partial:
            for old_epoch, old in self.partial_checkpoints():
                if old_epoch <= epoch:
                    shutil.rmtree(old, ignore_errors=True)
        if keep_last > 0 and not partial:
            best = self.best_epoch()
            for old_epoch, old in self.checkpoints()[:-keep_last]:
                if old_epoch == best:
                    continue
                # Rename first: a crash mid-deletion then leaves a temporary, never a checkpoint missing files.
                doomed = self.checkpoints_dir / f".{old.name}.tmp-{os.getpid()}-pruned"
                os.replace(old, doomed)
                shutil.rmtree(doomed)
        return final

    def remove_stale_temporaries(self) -> None:
        if self.checkpoints_dir.is_dir():
            for child in self.checkpoints_dir.glob(".epoch-*.tmp-*"):
                shutil.rmtree(child, ignore_errors=True)

    def best_epoch(self) -> int | None:
        """The epoch best.json names, or None."""
        try:
            return int(json.loads(self.best_path.read_text())["epoch"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write_best(self, record: dict) -> None:
        """best.json: {"epoch", "checkpoint", "metric", "value", ...}, written atomically."""
        write_text_atomic(self.best_path, json.dumps(record, indent=2) + "\n")

    def checkpoint(self, which: str | int = "auto") -> tuple[int, Path]:
        """The checkpoint `which` names: an epoch, "latest", "best" (best.json), or "auto" (best, else latest).

        Raises:
            RunDirectoryError: naming what is missing.
        """
        found = dict(self.checkpoints())
        if not found:
            raise RunDirectoryError(f"{self.path}: the run has no checkpoint yet")
        best = self.best_epoch()
        if which == "auto":
            which = "best" if best is not None and best in found else "latest"
        if which == "latest":
            epoch = max(found)
        elif which == "best":
            if best is None:
                raise RunDirectoryError(f"{self.path}: no best.json (only runs with train.early_stop_on_heldout=true mark a best checkpoint)")
            epoch = best
        else:
            try:
                epoch = int(which)
            except ValueError:
                raise RunDirectoryError(f"checkpoint {which!r}: give an epoch number or one of {', '.join(CHECKPOINT_CHOICES)}") from None
        if epoch not in found:
            raise RunDirectoryError(f"{self.path}: no checkpoint of epoch {epoch} (have {', '.join(map(str, sorted(found)))})")
        return epoch, found[epoch]

    # ---- metrics ----------------------------------------------------------------------------------------
    def append_metrics(self, record: dict) -> None:
        append_jsonl(self.metrics_path, record)

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_path)

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drop records of epochs after `last_epoch` (written before a crash, not covered by a checkpoint),
        from metrics.jsonl and the other per-epoch logs."""
        for path in (self.metrics_path, self.prompt_rewards_path, self.monitor_path):
            if path.exists() or path == self.metrics_path:
                kept = [r for r in read_jsonl(path) if r["epoch"] <= last_epoch]
                write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))

    def sample_grid_path(self, epoch: int) -> Path:
        return self.samples_dir / f"{epoch_name(epoch)}.png"


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path, *, tolerant: bool = False) -> list[dict]:
    """One dict per non-blank line; `tolerant` skips lines that do not parse (a crash mid-append) instead of raising."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if not tolerant:
                raise
    return records


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def run_of_checkpoint(path: str | Path) -> RunDirectory | None:
    """The run a path belongs to: the run directory itself, or RUN_DIR/checkpoints/epoch-NNNN; else None."""
    path = Path(path)
    for candidate in (path, path.parent.parent):
        if RunDirectory(candidate).config_path.is_file() and (candidate == path or path.parent.name == "checkpoints"):
            return RunDirectory(candidate)
    return None


def resolve_adapter_dir(path: str | Path, which: str | int = "auto") -> Path:
    """A run directory (-> its checkpoint `which`, see `RunDirectory.checkpoint`) or a checkpoint directory
    holding LoRA weights (`pytorch_lora_weights.safetensors`) or full UNet weights (`unet/`)."""
    path = Path(path)
    run = RunDirectory(path)
    if run.config_path.is_file():
        path = run.checkpoint(which)[1]
    if not (path / "pytorch_lora_weights.safetensors").is_file() and not (path / "unet").is_dir() and not (path / "transformer").is_dir():
        raise RunDirectoryError(f"{path}: neither pytorch_lora_weights.safetensors nor unet/ (or transformer/) there (not a run or a checkpoint)")
    return path


def load_checkpoint_into(pipeline, checkpoint_dir: Path) -> None:
    """Apply a checkpoint to a loaded pipeline: its LoRA (diffusers' `load_lora_weights`) or its full UNet
    (or transformer, for SD3 and FLUX)."""
    if (checkpoint_dir / "pytorch_lora_weights.safetensors").is_file():
        pipeline.load_lora_weights(str(checkpoint_dir))
    elif (checkpoint_dir / "transformer").is_dir():
        pipeline.transformer = type(pipeline.transformer).from_pretrained(checkpoint_dir / "transformer")
    else:
        from diffusers import UNet2DConditionModel

        pipeline.unet = UNet2DConditionModel.from_pretrained(checkpoint_dir / "unet")
