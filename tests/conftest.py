"""Shared fixtures: a tiny random Stable Diffusion pipeline on disk and overrides that size runs for it."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    from ddpo.policy.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipeline")


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one global state per process; in-process CLI runs must not inherit each other's."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


_IGNORED = {"__pycache__", ".pytest_cache", ".coverage", ".hypothesis"}


def _checkout_entries() -> set[str]:
    """Names directly inside the checkout and inside tests/ (what a test writing outside its tmp_path would add)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    return {f"{folder.name}/{child.name}" for folder in (root, root / "tests") for child in folder.iterdir() if child.name not in _IGNORED}


@pytest.fixture(scope="session", autouse=True)
def tests_write_only_under_temporary_directories():
    """Fails the session's last test when the suite left a new file or folder in the checkout (runs/,
    test-artifacts/, ...): tests write under their tmp_path, the CLI's defaults included."""
    before = _checkout_entries()
    yield
    added = sorted(_checkout_entries() - before)
    assert not added, f"tests wrote into the checkout: {added}"
