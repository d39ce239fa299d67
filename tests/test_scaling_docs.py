"""The launch recipes of docs/scaling.md: every accelerate config file loads with accelerate's own loader, its
nested keys are options `accelerate launch` knows, FSDP wraps block classes the models really have, and the
docs name only files that exist. (That the CPU recipe launches and trains is tests/test_distributed.py, which
launches through `cpu_2proc.yaml`.) Also: benchmarks/gpu_scale.py runs, on tiny configs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
CONFIG_DIR = ROOT / "src" / "ddpo" / "configs" / "accelerate"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
DOC = ROOT / "docs" / "scaling.md"


def load(path: Path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(path))  # raises on keys accelerate does not know
    assert isinstance(config, ClusterConfig), path.name
    return config


def test_there_are_recipes_for_each_launch_the_docs_describe():
    assert {p.name for p in CONFIGS} >= {"cpu_2proc.yaml", "multi_gpu.yaml", "multi_node.yaml", "deepspeed_zero2.yaml", "fsdp_sd3.yaml", "fsdp_flux.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_with_accelerates_loader_and_its_nested_keys_are_launch_options(path):
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType

    config = load(path)
    assert config.compute_environment == "LOCAL_MACHINE"
    assert config.num_processes >= config.num_machines >= 1
    assert config.num_processes % config.num_machines == 0, "each machine runs the same number of processes"
    if config.num_machines > 1:
        assert config.main_process_ip and config.main_process_port, "a multi-node run needs the main machine's address and port"
    # `accelerate launch` copies deepspeed_config keys to its options as they are and fsdp_config keys with an
    # "fsdp_" prefix, silently: a misspelt key would be ignored, so check each is a real option.
    options = {action.dest for action in launch_command_parser()._actions}
    nested = list((config.deepspeed_config or {}).keys())
    nested += [key if key.startswith("fsdp_") else f"fsdp_{key}" for key in (config.fsdp_config or {})]
    unknown = [key for key in nested if key not in options]
    assert not unknown, f"{path.name}: keys accelerate launch does not know: {unknown}"
    if config.distributed_type == DistributedType.DEEPSPEED:
        assert config.deepspeed_config["zero_stage"] == 2
    if config.distributed_type == DistributedType.FSDP:
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


@pytest.mark.parametrize(
    "name, build",
    [("fsdp_sd3.yaml", "build_tiny_sd3_pipeline"), ("fsdp_flux.yaml", "build_tiny_flux_pipeline")],
)
def test_fsdp_wraps_block_classes_the_transformer_has(name, build):
    # accelerate refuses a class name it cannot find in the model ("Could not find the transformer layer class").
    import ddpo.policy.tiny as tiny

    wrapped = load(CONFIG_DIR / name).fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")
    transformer = getattr(tiny, build)().transformer
    present = {type(module).__name__ for module in transformer.modules()}
    assert set(wrapped) <= present, f"{name}: {set(wrapped) - present} not among {sorted(present)}"


def test_docs_name_every_recipe_and_only_files_that_exist():
    text = DOC.read_text(encoding="utf-8")
    for path in CONFIGS:
        assert f"src/ddpo/configs/accelerate/{path.name}" in text, f"docs/scaling.md does not mention {path.name}"
    sources = [text, *(p.read_text(encoding="utf-8") for p in CONFIGS)]
    named = {match for source in sources for match in re.findall(r"src/ddpo/configs/accelerate/[\w.-]+\.yaml", source)}
    assert named and all((ROOT / n).is_file() for n in named), sorted(n for n in named if not (ROOT / n).is_file())
    presets = set(re.findall(r"--config (sd\w+)", "\n".join(sources)))
    from ddpo.config import available_presets

    assert presets <= set(available_presets()), presets - set(available_presets())


def test_readme_links_the_scaling_guide():
    assert "docs/scaling.md" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_gpu_scale_benchmark_runs_on_tiny_configs():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_scale.py"), "--tiny", "--steps", "2", "--batch", "2", "--train-batch", "1", "--repeats", "1", "--device", "cpu"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert [r["model"] for r in report["results"]] == ["sd15", "sd35"]
    for r in report["results"]:
        assert r["sample_images_per_second"] > 0 and r["train_timesteps_per_second"] > 0
        # A training step's forward alone (batch 1, CFG: 2) is half a sampling call's (batch 2, CFG: 4); the backward is counted too.
        assert r["sample_tflop_per_call"] > 0 and r["train_tflop_per_step"] > 0.5 * r["sample_tflop_per_call"]
        assert r["lora_parameters"] > 0
        assert r["peak_gib"] is None and r["sample_mfu"] is None  # no GPU, no peak: not measured, not invented
