"""benchmarks/flow_comparison.py's tables and figure from finished runs (fake monitor records; no training)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "flow_comparison.py"


def load_script():
    spec = importlib.util.spec_from_file_location("flow_comparison", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_monitor(directory: Path, judge: list[float]) -> None:
    directory.mkdir(parents=True)
    lines = [
        json.dumps({"epoch": 10 * k, "samples": 320 * k, "train_reward_on_trained": 0.5 + 0.1 * k, "heldout_score_on_trained": value, "heldout_score_on_heldout": value / 2})
        for k, value in enumerate(judge)
    ]
    (directory / "monitor.jsonl").write_text("\n".join(lines) + "\n")


def test_the_report_averages_seeds_and_finds_the_queries_each_method_needs(tmp_path, capsys):
    script = load_script()
    out, docs = tmp_path / "runs", tmp_path / "docs"
    write_monitor(out / "ddpo_is-seed0", [0.2, 0.3, 0.4])
    write_monitor(out / "ddpo_is-seed1", [0.2, 0.5, 0.6])  # mean 0.2, 0.4, 0.5
    write_monitor(out / "fdfo-seed0", [0.2, 0.6, 0.8])
    write_monitor(out / "fdfo-seed1", [0.2, 0.6, 0.8])
    script.main(["--out", str(out), "--docs", str(docs), "--report", "--skip-cfg", "--seeds", "0", "1", "--methods", "ddpo_is", "fdfo"])
    text = capsys.readouterr().out
    assert "| 320 | 0.400 ± 0.100 (n=2) | 0.600 ± 0.000 (n=2) |" in text
    # levels between the common start (0.2) and the best final mean (0.8): 50% = 0.5 -> DDPO-IS at 640, FDFO at 320
    assert "| 50%: 0.500 | 640 | 320 |" in text
    assert "| 100%: 0.800 | not reached | 640 |" in text
    svg = (docs / "flow-comparison.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 4  # 2 charts x 2 methods
    saved = json.loads((out / "flow-comparison.json").read_text())
    assert saved["curves"]["fdfo"]["heldout_score_on_trained"]["640"] == [0.8, 0.8]
