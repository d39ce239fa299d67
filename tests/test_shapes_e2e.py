"""End to end on the shipped Shapes model: the embedded default and the paper's JPEG task in miniature."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ddpo.cli import main

pytestmark = pytest.mark.slow


def metrics_of(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_embedded_default_runs_one_epoch(tmp_path):
    out = tmp_path / "default"
    result = CliRunner().invoke(main, ["train", "--out", str(out), "--no-progress", "--set", "train.epochs=1"])
    assert result.exit_code == 0, result.output + (result.stderr or "")
    [record] = metrics_of(out)
    assert record["samples"] == 32
    assert 0.0 < record["reward_mean"] <= 1.0  # BERTScore recall of the describer's captions
    assert 0.0 <= record["reward_exact"] <= 1.0
    assert (out / "checkpoints" / "epoch-0001" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.xfail(
    strict=True,
    reason="open (issue 2): on the Shapes model the JPEG reward does not rise within 8 epochs at lr 1e-3 "
    "(-1.141 -> -1.147 kB) and falls at lr 2e-2 (-1.14 -> -1.34 kB); not yet explained",
)
def test_ddpo_is_on_jpeg_compressibility_raises_the_reward(tmp_path):
    """A fixed seed and a clear margin: the last epochs' mean JPEG reward beats the first epoch's by > 2 std errors."""
    out = tmp_path / "compressibility"
    args = ["train", "--config", "shapes/compressibility", "--out", str(out), "--no-progress",
            "--set", "train.epochs=8", "--set", "log.save_every=8", "--set", "log.num_eval_seeds=1"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + (result.stderr or "")
    records = metrics_of(out)
    first, last = records[0], records[-2:]
    last_mean = sum(r["reward_mean"] for r in last) / len(last)
    standard_error = first["reward_std"] / (first["samples"] ** 0.5)
    assert last_mean - first["reward_mean"] > 2 * standard_error, [r["reward_mean"] for r in records]
