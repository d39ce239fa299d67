"""Rules about the suite itself: CI fails, rather than skips, when its browser is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def run_browser_test(ci: bool) -> subprocess.CompletedProcess:
    """One browser test of test_label_app.py, with no Chromium on PATH (only the interpreter's directory)."""
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    env["PATH"] = str(Path(sys.executable).parent)
    if ci:
        env["CI"] = "true"
    test = f"{TESTS / 'test_label_app.py'}::test_labels_made_by_keyboard_in_chromium_survive_a_killed_server"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", test],
                          env=env, capture_output=True, text=True, timeout=600, cwd=TESTS.parent)  # fmt: skip


def test_browser_tests_fail_in_ci_without_chromium_and_skip_elsewhere():
    outside = run_browser_test(ci=False)
    assert outside.returncode == 0 and "1 skipped" in outside.stdout, outside.stdout[-2000:]
    inside = run_browser_test(ci=True)
    assert inside.returncode != 0, inside.stdout[-2000:]
    assert "CI is set and Chromium is missing" in inside.stdout
