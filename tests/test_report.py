"""`ddpo report`: a self-contained report.html that real headless Chromium renders completely."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from browser import inspect_page, require_chromium
from click.testing import CliRunner
from helpers import cli_args

from ddpo.cli import main
from ddpo.config import save_config
from ddpo.training.assemble import load_config
from ddpo.training.run_directory import RunDirectory

# Screenshots for people to look at, kept only where DDPO_TEST_ARTIFACTS names a folder (CI): tests write only under
# their temporary directories otherwise.
ARTIFACTS = Path(os.environ["DDPO_TEST_ARTIFACTS"]) if os.environ.get("DDPO_TEST_ARTIFACTS") else None
GRID_PROMPTS = ["a cat", "a dog"]
# Figures of a report with evaluations: reward; loss, approx_kl, clipfrac; training reward, held-out score, KL, diversity.
NUM_CHARTS = 8


@pytest.fixture(scope="session")
def chromium():
    return require_chromium("Chromium is not installed (`make test` runs `apt-get install -y chromium`)")


@pytest.fixture(scope="module")
def reported_run(tiny_pipeline_dir, tmp_path_factory):
    """Two epochs with an evaluation every epoch (held-out scorer and held-out prompts) and per-prompt rewards."""
    root = tmp_path_factory.mktemp("report-runs")
    heldout = root / "heldout.txt"
    heldout.write_text("an otter riding a bike\n")
    overrides = {
        "train.lr": 1e-2, "sample.num_steps": 4, "log.eval_every": 1, "log.eval_num_prompts": 2,
        "log.heldout_reward": '"jpeg_incompressibility"', "prompts.heldout_file": f'"{heldout}"',
    }  # fmt: skip
    result = CliRunner().invoke(main, cli_args(tiny_pipeline_dir, root / "run", **overrides), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return root / "run"


def save_artifact(path: Path, name: str) -> None:
    if ARTIFACTS is not None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, ARTIFACTS / name)


def assert_renders_cleanly(findings) -> None:
    assert findings.console == [], findings.console
    assert findings.broken_images == [], findings.broken_images
    assert findings.empty_charts == [], findings.empty_charts


def test_training_writes_a_report_that_chromium_renders_completely(reported_run, chromium, tmp_path):
    report = reported_run / "report.html"
    assert report.is_file()  # written by `ddpo train` itself
    findings = inspect_page(report, tmp_path / "report.png", chromium=chromium)
    save_artifact(tmp_path / "report.png", "report.png")
    assert_renders_cleanly(findings)
    # Every figure is there and drew data: one chart per curve, with points.
    assert len(findings.charts) == NUM_CHARTS and all(chart["marks"] > 0 for chart in findings.charts)
    # Sample strips: one image per grid prompt per epoch (0, 1, 2), then the first and last grids.
    alts = [image["alt"] for image in findings.images]
    assert alts == [f"{p}, epoch {e}" for p in GRID_PROMPTS for e in (0, 1, 2)] + ["sample grid, before training", "sample grid, epoch 2"]
    assert all(image["width"] > 0 and image["shown"] > 0 for image in findings.images)
    for prompt in {p for record in _jsonl(reported_run / "prompt_rewards.jsonl") for p in record["prompts"]}:
        assert prompt in findings.text  # the per-prompt table lists every prompt that was drawn
    assert 'model.pretrained' not in findings.text and "pretrained = " in findings.text  # the resolved config, verbatim
    assert findings.screenshot.stat().st_size > 10_000


def test_the_report_is_self_contained(reported_run):
    html = (reported_run / "report.html").read_text()
    assert "<script" not in html and "<link" not in html
    sources = re.findall(r'src="([^"]*)"', html)
    assert sources and all(src.startswith("data:image/png;base64,") for src in sources)
    assert not re.search(r"(?:src|href)=\"https?:", html)


def test_reward_chart_plots_each_epoch_with_its_std_band(reported_run):
    html = (reported_run / "report.html").read_text()
    reward_svg = html[html.index("reward mean ± std per epoch") :].split("</svg>")[0]
    assert reward_svg.count("<circle") == len(_jsonl(reported_run / "metrics.jsonl")) == 2
    assert "<polygon" in reward_svg  # the mean +- std band


def test_the_report_is_refreshed_at_each_checkpoint(tiny_pipeline_dir, tmp_path):
    """A run that dies in its second epoch still has the report of its first (written with its checkpoint)."""
    import helpers

    helpers.first_epoch_calls.clear()
    out = tmp_path / "run"
    args = cli_args(tiny_pipeline_dir, out, **{"sample.num_steps": 2, "reward.name": '"helpers:fails_after_first_epoch"'})
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "the scorer went away" in result.stderr
    html = (out / "report.html").read_text()
    assert "1 of 2" in html and "epoch 1" in html and "epoch 2" not in html


def test_report_of_a_run_with_no_finished_epoch_says_so(tiny_pipeline_dir, tmp_path, chromium):
    run = RunDirectory.create(tmp_path / "fresh")
    save_config(load_config("sd_compressibility", [f'model.pretrained="{tiny_pipeline_dir}"']), run.config_path)
    result = CliRunner().invoke(main, ["report", str(run.path)])
    assert result.exit_code == 0, result.output
    findings = inspect_page(run.report_path, tmp_path / "fresh.png", chromium=chromium)
    save_artifact(tmp_path / "fresh.png", "report-no-epoch.png")
    assert_renders_cleanly(findings)
    assert "No finished epoch yet" in findings.text and "no sample grid yet" in findings.text
    assert findings.images == []


def test_report_without_a_samples_folder_says_so(reported_run, tmp_path, chromium):
    run = tmp_path / "run"
    shutil.copytree(reported_run, run)
    shutil.rmtree(run / "samples")
    assert CliRunner().invoke(main, ["report", str(run)]).exit_code == 0
    findings = inspect_page(run / "report.html", chromium=chromium)
    assert_renders_cleanly(findings)
    assert "No samples folder" in findings.text and findings.images == []
    assert len(findings.charts) == NUM_CHARTS  # the curves do not depend on the images


def test_report_flags_the_epoch_where_the_heldout_score_peaks_while_the_reward_rises(reported_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reported_run, run)
    records = [{"epoch": e, "train_reward": r, "heldout_score": h, "reward_name": "r", "heldout_reward": "judge"}
               for e, r, h in [(0, 0.1, 0.30), (5, 0.3, 0.60), (10, 0.5, 0.45), (15, 0.7, 0.20)]]  # fmt: skip
    (run / "monitor.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    CliRunner().invoke(main, ["report", str(run)], catch_exceptions=False)
    html = (run / "report.html").read_text()
    assert "the held-out score peaked at epoch 5 (0.6) and fell to 0.2 by epoch 15" in html
    assert "held-out peak, epoch 5" in html  # the marker on the charts


def test_report_survives_a_half_written_metrics_line(reported_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reported_run, run)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 3, "samp')  # a crash in the middle of an append
    assert CliRunner().invoke(main, ["report", str(run)]).exit_code == 0
    assert "2 of 2" in (run / "report.html").read_text()


def test_report_of_a_directory_that_is_not_a_run_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"ddpo: error: {tmp_path}: not a ddpo run directory (no config.toml, no metrics.jsonl)"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
