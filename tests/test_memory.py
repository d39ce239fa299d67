"""Training memory does not grow with epochs: the resident memory `ddpo train` records after each epoch
(`rss_mb` in metrics.jsonl) is flat once the first epochs have allocated what the run needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli_args

EPOCHS = 10


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="rss_mb is read from /proc (Linux)")
def test_resident_memory_after_epoch_10_is_within_5_percent_of_epoch_2(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "run"
    # Its own process, so that nothing earlier tests left in this interpreter counts; one torch thread, as on a
    # shared machine. Everything an epoch does runs: sampling, reward thread, update, grid, report, checkpoints
    # (every 3 epochs, keeping 2, so old checkpoints are deleted along the way).
    args = cli_args(tiny_pipeline_dir, out, **{"train.epochs": EPOCHS, "log.save_every": 3, "log.keep_last": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "ddpo.cli", *args], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rss = {record["epoch"]: record["rss_mb"] for record in metrics}
    assert sorted(rss) == list(range(1, EPOCHS + 1))
    print("rss_mb by epoch:", rss)
    assert abs(rss[EPOCHS] - rss[2]) <= 0.05 * rss[2], f"resident memory grew from {rss[2]} MiB after epoch 2 to {rss[EPOCHS]} MiB after epoch {EPOCHS}: {rss}"
