"""Two processes (accelerate + gloo on CPU) against one: synchronised LoRA, advantages over the global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
WORKER = Path(__file__).with_name("distributed_worker.py")
# The CPU launch recipe of docs/scaling.md: these tests are what checks that it launches.
CPU_CONFIG = Path(__file__).parents[1] / "src" / "ddpo" / "configs" / "accelerate" / "cpu_2proc.yaml"


ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}


def accelerate_launch(num_processes: int, port: int | None = None) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG),
            "--num_processes", str(num_processes), "--main_process_port", str(port or free_port())]  # fmt: skip


def launch(num_processes: int, model_dir, prompt_file, out: Path, batch_size: int) -> None:
    out.mkdir(parents=True)
    prefix = accelerate_launch(num_processes) if num_processes > 1 else [sys.executable]
    env = ENV
    result = subprocess.run([*prefix, str(WORKER), str(model_dir), str(prompt_file), str(out), str(batch_size)],
                            env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tiny_pipeline_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    prompt_file = root / "prompts.txt"
    prompt_file.write_text("a cat\na dog\n")  # two prompts: each one's samples land on both ranks
    launch(2, tiny_pipeline_dir, prompt_file, root / "two", batch_size=2)
    launch(1, tiny_pipeline_dir, prompt_file, root / "one", batch_size=4)
    return root


def test_both_ranks_end_with_identical_lora_weights(runs):
    rank0 = load_file(runs / "two" / "lora-rank0.safetensors")
    rank1 = load_file(runs / "two" / "lora-rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert all((rank0[k] == rank1[k]).all() for k in rank0)
    assert max(v.abs().max().item() for k, v in rank0.items() if "lora_B" in k) > 0  # it trained


def test_advantages_are_normalised_over_the_gathered_global_batch(runs):
    two = {**json.loads((runs / "two" / "advantages-rank0.json").read_text()), **json.loads((runs / "two" / "advantages-rank1.json").read_text())}
    one = json.loads((runs / "one" / "advantages-rank0.json").read_text())
    assert two.keys() == one.keys() and len(one) == 16  # 2 epochs x 8 samples, the same global indices
    for key in ("1", "2"):  # each prompt has samples on both ranks in each epoch
        ranks_of = {}
        for rank in (0, 1):
            for sample in json.loads((runs / "two" / f"advantages-rank{rank}.json").read_text()):
                if sample.startswith(key + "/"):
                    ranks_of.setdefault(two[sample]["prompt"], set()).add(rank)
        assert all(ranks == {0, 1} for ranks in ranks_of.values()), ranks_of
    # Both epochs: the same samples, rewards and advantages (epoch 2 starts from the weights epoch 1 trained).
    for key in one:
        assert two[key]["prompt"] == one[key]["prompt"]
        assert abs(two[key]["advantage"] - one[key]["advantage"]) < 1e-5, key


def test_two_processes_train_the_same_weights_as_one_with_the_same_global_batch(runs):
    # 2 processes x batch 2 vs 1 process x batch 4: the same global samples, minibatches and timesteps.
    two = load_file(runs / "two" / "lora-rank0.safetensors")
    one = load_file(runs / "one" / "lora-rank0.safetensors")
    assert two.keys() == one.keys()
    assert max((two[k] - one[k]).abs().max().item() for k in one) <= 1e-5


def test_a_reward_failing_on_one_rank_stops_both_instead_of_hanging(tiny_pipeline_dir, tmp_path):
    from helpers import cli_args

    out = tmp_path / "run"
    args = cli_args(tiny_pipeline_dir, out, **{"sample.num_steps": 2, "sample.batch_size": 2, "train.batch_size": 2, "reward.name": '"helpers:raising_on_rank_one"'})
    # Without agreement, rank 0 would wait in the reward gather until the timeout.
    result = subprocess.run([*accelerate_launch(2), "-m", "ddpo.cli", *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "helpers:raising_on_rank_one" in result.stderr and "rank 1 scorer is offline" in result.stderr
    assert "failed on another process" in result.stderr  # rank 0's own message
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())


def test_two_machines_of_one_process_each_train_the_same_weights_as_one_process(runs, tiny_pipeline_dir, tmp_path):
    """2 "machines" x 1 process, rendezvous on 127.0.0.1 (docs/scaling.md section 2's launch, both ends here)."""
    prompt_file = runs / "prompts.txt"
    out = tmp_path / "machines"
    out.mkdir()
    port = free_port()
    machines = [
        subprocess.Popen([*accelerate_launch(2, port), "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                          str(WORKER), str(tiny_pipeline_dir), str(prompt_file), str(out), "2"],
                         env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        for rank in (0, 1)
    ]
    for machine in machines:
        _, stderr = machine.communicate(timeout=900)
        assert machine.returncode == 0, stderr[-4000:]
    rank0, rank1 = load_file(out / "lora-rank0.safetensors"), load_file(out / "lora-rank1.safetensors")
    assert all((rank0[k] == rank1[k]).all() for k in rank0)
    one = load_file(runs / "one" / "lora-rank0.safetensors")
    assert rank0.keys() == one.keys()
    assert max((rank0[k] - one[k]).abs().max().item() for k in one) <= 1e-5
    # The same global samples on both machines as in the 1-process run, with the same advantages.
    two = {**json.loads((out / "advantages-rank0.json").read_text()), **json.loads((out / "advantages-rank1.json").read_text())}
    single = json.loads((runs / "one" / "advantages-rank0.json").read_text())
    assert two.keys() == single.keys()
    assert max(abs(two[k]["advantage"] - single[k]["advantage"]) for k in single) < 1e-5
