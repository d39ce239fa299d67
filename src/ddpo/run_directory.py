"""The run directory contract (DESIGN.md): config, metrics, sample grids, atomic checkpoints.

    RUN_DIR/config.toml               the fully resolved config
    RUN_DIR/metrics.jsonl             one JSON object per finished epoch
    RUN_DIR/samples/epoch-NNNN.png    fixed prompts x fixed seeds (epoch-0000 is the model before training)
    RUN_DIR/checkpoints/epoch-NNNN/   adapter weights in diffusers format + trainer state
    RUN_DIR/tb/                       TensorBoard events
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

CHECKPOINT_PATTERN = re.compile(r"^epoch-(\d{4,})$")
TRAINER_STATE = "trainer_state.pt"


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
        if run.latest_checkpoint() is None:
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

    def write_checkpoint(self, epoch: int, write: Callable[[Path], None], keep_last: int = 0) -> Path:
        """Write into a temporary directory, then rename: a crash leaves the previous checkpoints intact."""
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints_dir / epoch_name(epoch)
        tmp = self.checkpoints_dir / f".{epoch_name(epoch)}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        write(tmp)
        os.replace(tmp, final)
        if keep_last > 0:
            for _, old in self.checkpoints()[:-keep_last]:
                # Rename first: a crash mid-deletion then leaves a temporary, never a checkpoint missing files.
                doomed = self.checkpoints_dir / f".{old.name}.tmp-{os.getpid()}-pruned"
                os.replace(old, doomed)
                shutil.rmtree(doomed)
        return final

    def remove_stale_temporaries(self) -> None:
        if self.checkpoints_dir.is_dir():
            for child in self.checkpoints_dir.glob(".epoch-*.tmp-*"):
                shutil.rmtree(child, ignore_errors=True)

    # ---- metrics ----------------------------------------------------------------------------------------
    def append_metrics(self, record: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drop records of epochs after `last_epoch` (written before a crash, not covered by a checkpoint)."""
        kept = [r for r in self.read_metrics() if r["epoch"] <= last_epoch]
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.metrics_path)

    def sample_grid_path(self, epoch: int) -> Path:
        return self.samples_dir / f"{epoch_name(epoch)}.png"


def resolve_adapter_dir(path: str | Path) -> Path:
    """A run directory (-> its latest checkpoint) or a checkpoint directory holding LoRA weights."""
    path = Path(path)
    run = RunDirectory(path)
    if run.config_path.is_file():
        latest = run.latest_checkpoint()
        if latest is None:
            raise RunDirectoryError(f"{path}: the run has no checkpoint yet")
        path = latest[1]
    if not (path / "pytorch_lora_weights.safetensors").is_file():
        raise RunDirectoryError(f"{path}: no pytorch_lora_weights.safetensors there (not a run or a LoRA checkpoint)")
    return path
