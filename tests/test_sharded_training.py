"""The sharded launch recipes on CPU: FSDP2 (a full fine-tune) and DeepSpeed ZeRO-2 (LoRA), each over 2 processes
(gloo), against one plain process with the same global batch.

After one epoch (4 accumulated backward passes, one optimizer step) the sharded run's checkpoint must hold the
same whole tensors as the one-process run's (1e-5): the shards were gathered, and the sharded gradients and
optimizer step are those of one process. A sharded run stopped after epoch 1 and resumed (`ddpo train --resume`)
under the same launch must end epoch 2 where the same launch run straight through ends: the sharded optimizer
state was restored. (Epoch 2 is not compared with the one-process run: its samples come from weights that differ
by ~1e-6, the rewards of 8 samples normalised by their spread amplify that, measured up to 2e-5 in the weights.)
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import cli_args, free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
CONFIG_DIR = Path(__file__).parents[1] / "src" / "ddpo" / "configs" / "accelerate"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}


def _has_fully_shard() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401 - torch >= 2.6
    except ImportError:
        return False
    return True


def train(model_dir: Path, prompt_file: Path, out: Path, *, batch_size: int, use_lora: bool, launch_config: str | None = None, resume: bool = False, epochs: int = 1, port: int = 29541) -> None:
    """`ddpo train` (`epochs` epochs, or `--resume` for a second) as one plain process or under an accelerate launch config."""
    if resume:
        args = ["train", "--resume", str(out), "--set", "train.epochs=2", "--no-progress"]
    else:
        args = cli_args(
            model_dir, out,
            **{
                "model.use_lora": str(use_lora).lower(),
                "sample.batch_size": batch_size,
                "train.batch_size": batch_size,
                "train.epochs": epochs,
                "prompts.source": '"file"',
                "prompts.file": f'"{prompt_file}"',
                "train.stat_min_count": 3,
                "reward.name": '"helpers:mean_brightness"',  # smooth: JPEG's whole bytes would amplify rounding
                # 4 backward passes per optimizer step (2 minibatches x 2 chunks of 3 timesteps): the sharded runs
                # must accumulate like the plain one (DeepSpeed's engine steps only at the boundary ddpo marks).
                "train.gradient_accumulation_steps": 2,
                "train.timestep_chunk": 3,
                "train.lr": 1e-2 if use_lora else 1e-3,
                "train.adam_epsilon": 1e-4,  # see tests/distributed_worker.py: keeps rounding noise out of Adam's first steps
                "log.save_every": 1,
                "log.eval_every": 1,  # under FSDP every process samples the main process's evaluation too
            },
        )  # fmt: skip
    prefix = [sys.executable]
    if launch_config is not None:
        prefix += ["-m", "accelerate.commands.launch", "--config_file", str(CONFIG_DIR / launch_config), "--num_processes", "2", "--main_process_port", str(port)]
    result = subprocess.run([*prefix, "-m", "ddpo.cli", *args], env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sharded") / "prompts.txt"
    path.write_text("a cat\na dog\n")  # two prompts: each one's samples land on both ranks
    return path


def reference_run(model_dir, prompt_file, out: Path, *, use_lora: bool) -> Path:
    """One plain process, batch 4, one epoch."""
    train(model_dir, prompt_file, out, batch_size=4, use_lora=use_lora)
    return out


def sharded_runs(model_dir, prompt_file, root: Path, *, use_lora: bool, launch_config: str, port: int) -> tuple[Path, Path]:
    """2 processes x batch 2 under `launch_config`: one epoch then resumed for a second, and two epochs straight."""
    resumed, straight = root / "resumed", root / "straight"
    train(model_dir, prompt_file, resumed, batch_size=2, use_lora=use_lora, launch_config=launch_config, port=port)
    train(model_dir, prompt_file, resumed, batch_size=2, use_lora=use_lora, launch_config=launch_config, resume=True, port=port)
    train(model_dir, prompt_file, straight, batch_size=2, use_lora=use_lora, launch_config=launch_config, epochs=2, port=port)
    return resumed, straight


def assert_same_tensors(a: dict, b: dict, tolerance: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name  # whole tensors, not one process's shard
        assert (a[name] - b[name]).abs().max().item() <= tolerance, name


def checkpoint(run: Path, epoch: int) -> Path:
    return run / "checkpoints" / f"epoch-{epoch:04d}"


@pytest.mark.skipif(not _has_fully_shard(), reason="FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6")
def test_fsdp_full_fine_tune_checkpoints_whole_weights_and_resumes_like_one_process(tiny_pipeline_dir, prompt_file, tmp_path):
    from diffusers import UNet2DConditionModel

    one = reference_run(tiny_pipeline_dir, prompt_file, tmp_path / "one", use_lora=False)
    resumed, straight = sharded_runs(tiny_pipeline_dir, prompt_file, tmp_path, use_lora=False, launch_config="fsdp_cpu_2proc.yaml", port=free_port())
    expected = load_file(checkpoint(one, 1) / "trainable.safetensors")
    assert len(expected) > 100  # every UNet weight trains
    assert_same_tensors(load_file(checkpoint(resumed, 1) / "trainable.safetensors"), expected)
    # The diffusers-format network: whole weights, loadable as the UNet it was.
    network = checkpoint(resumed, 1) / "unet"
    assert_same_tensors(load_file(network / "diffusion_pytorch_model.safetensors"), load_file(checkpoint(one, 1) / "unet" / "diffusion_pytorch_model.safetensors"))
    UNet2DConditionModel.from_pretrained(network)
    assert_same_tensors(load_file(checkpoint(resumed, 2) / "trainable.safetensors"), load_file(checkpoint(straight, 2) / "trainable.safetensors"), tolerance=0)
    base = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet").state_dict()
    trained = load_file(checkpoint(resumed, 2) / "trainable.safetensors")
    assert max((trained[k] - base[k]).abs().max().item() for k in trained) > 1e-4  # it trained


def test_fsdp_refuses_lora(tiny_pipeline_dir, prompt_file, tmp_path):
    args = cli_args(tiny_pipeline_dir, tmp_path / "run", **{"sample.num_steps": 2, "sample.batch_size": 2, "train.batch_size": 2})
    prefix = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG_DIR / "fsdp_cpu_2proc.yaml"), "--main_process_port", "29543"]
    result = subprocess.run([*prefix, "-m", "ddpo.cli", *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "model.use_lora=true under FSDP" in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (pip install deepspeed)")
def test_deepspeed_zero2_lora_trains_and_resumes_like_one_process(tiny_pipeline_dir, prompt_file, tmp_path):
    one = reference_run(tiny_pipeline_dir, prompt_file, tmp_path / "one", use_lora=True)
    resumed, straight = sharded_runs(tiny_pipeline_dir, prompt_file, tmp_path, use_lora=True, launch_config="deepspeed_zero2_cpu_2proc.yaml", port=free_port())
    assert_same_tensors(load_file(checkpoint(resumed, 1) / "trainable.safetensors"), load_file(checkpoint(one, 1) / "trainable.safetensors"))
    assert (checkpoint(resumed, 1) / "deepspeed_optimizer.pt").is_file()  # ZeRO's partitioned optimizer state
    assert_same_tensors(load_file(checkpoint(resumed, 2) / "trainable.safetensors"), load_file(checkpoint(straight, 2) / "trainable.safetensors"), tolerance=0)
    trained = load_file(checkpoint(resumed, 2) / "trainable.safetensors")
    assert max(v.abs().max().item() for k, v in trained.items() if "lora_B" in k) > 0  # it trained


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (pip install deepspeed)")
@pytest.mark.parametrize(
    ("flag", "message"),
    [(["--zero_stage", "3"], "DeepSpeed ZeRO stage 3 partitions the weights"), (["--gradient_accumulation_steps", "2"], "gradient_accumulation_steps=2; set it to 1")],
)
def test_deepspeed_refuses_what_it_cannot_run(tiny_pipeline_dir, tmp_path, flag, message):
    args = cli_args(tiny_pipeline_dir, tmp_path / "run", **{"sample.num_steps": 2, "sample.batch_size": 2, "train.batch_size": 2})
    prefix = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG_DIR / "deepspeed_zero2_cpu_2proc.yaml"), *flag, "--main_process_port", "29544"]
    result = subprocess.run([*prefix, "-m", "ddpo.cli", *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-3000:]
