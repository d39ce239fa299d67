"""`ddpo.compat.trl`: TRL 0.23.1's own DDPO example script (tests/data/trl_0_23_1_ddpo_example.py, verbatim from
the trl-0.23.1 wheel, Apache-2.0) runs with only its `from trl import ...` line changed; unsupported options are
refused by name in one line; docs/migrating-from-trl.md maps every DDPOConfig field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "data" / "trl_0_23_1_ddpo_example.py"
TRL_IMPORT = "from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline"
# The fields of trl 0.23.1's DDPOConfig (trl/trainer/ddpo_config.py), in its order.
TRL_FIELDS = [
    "exp_name", "run_name", "seed", "log_with", "tracker_kwargs", "accelerator_kwargs", "project_kwargs", "tracker_project_name",
    "logdir", "num_epochs", "save_freq", "num_checkpoint_limit", "mixed_precision", "allow_tf32", "resume_from", "sample_num_steps",
    "sample_eta", "sample_guidance_scale", "sample_batch_size", "sample_num_batches_per_epoch", "train_batch_size",
    "train_use_8bit_adam", "train_learning_rate", "train_adam_beta1", "train_adam_beta2", "train_adam_weight_decay",
    "train_adam_epsilon", "train_gradient_accumulation_steps", "train_max_grad_norm", "train_num_inner_epochs", "train_cfg",
    "train_adv_clip_max", "train_clip_range", "train_timestep_fraction", "per_prompt_stat_tracking",
    "per_prompt_stat_tracking_buffer_size", "per_prompt_stat_tracking_min_count", "async_reward_computation", "max_workers",
    "negative_prompts", "push_to_hub",
]  # fmt: skip


def _cache_repo(cache: Path, repo_id: str) -> Path:
    """A snapshot directory in a hub cache laid out as huggingface_hub writes it, for offline loading."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return snapshot


def _fake_hub_cache(cache: Path) -> None:
    """The two models the script downloads, tiny and random: CLIP ViT-L/14's place (projection 768, as the
    aesthetic MLP expects) and the aesthetic predictor's weights."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from ddpo.shapes.tokenizer import write_tokenizer

    clip = _cache_repo(cache, "openai/clip-vit-large-patch14")
    tokenizer = write_tokenizer(clip, ["a", "cat", "dog"])
    tokenizer.save_pretrained(clip)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config={**small, "vocab_size": len(tokenizer)}, vision_config={**small, "image_size": 32, "patch_size": 16}, projection_dim=768)).save_pretrained(clip)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip)
    mlp = torch.nn.Sequential(torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, _cache_repo(cache, "trl-lib/ddpo-aesthetic-predictor") / "aesthetic-model.pth")


def _run_script(script: Path, cwd: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    # Two shims for the machine, not for ddpo: the script's scorer calls .cuda() (it assumes a GPU), made a no-op
    # on this CPU-only machine; and it was written for transformers 4, whose CLIPModel.get_image_features returned
    # the embeddings tensor (transformers 5 returns an output object, on which the script's own scorer fails).
    runner = (
        "import sys, runpy, torch, transformers; torch.nn.Module.cuda = lambda self, *a, **k: self; "
        "get = transformers.CLIPModel.get_image_features; "
        "transformers.CLIPModel.get_image_features = lambda self, *a, **k: (lambda o: o if isinstance(o, torch.Tensor) else o.pooler_output)(get(self, *a, **k)); "
        f"sys.argv = [{str(script)!r}, *sys.argv[1:]]; runpy.run_path({str(script)!r}, run_name='__main__')"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", runner, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def ported_script(tmp_path_factory):
    text = SCRIPT.read_text()
    assert text.count(TRL_IMPORT) == 1
    ported = text.replace(TRL_IMPORT, TRL_IMPORT.replace("from trl import", "from ddpo.compat.trl import"))
    changed = [(a, b) for a, b in zip(text.splitlines(), ported.splitlines()) if a != b]
    assert len(changed) == 1  # only the import line
    directory = tmp_path_factory.mktemp("trl-script")
    path = directory / "ddpo.py"
    path.write_text(ported)
    _fake_hub_cache(directory / "hub")
    return path


def test_trl_example_script_runs_with_only_its_import_changed(ported_script, tiny_pipeline_dir, tmp_path):
    result = _run_script(
        ported_script, tmp_path, ported_script.parent / "hub",
        "--pretrained_model", str(tiny_pipeline_dir), "--num_epochs", "2", "--sample_num_steps", "3", "--sample_batch_size", "2",
        "--train_batch_size", "2", "--sample_num_batches_per_epoch", "1", "--per_prompt_stat_tracking", "True",
        "--per_prompt_stat_tracking_buffer_size", "32", "--per_prompt_stat_tracking_min_count", "1", "--output_dir", str(tmp_path / "model"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "save").iterdir())  # project_kwargs["project_dir"] = "./save", as the script sets it
    assert len(runs) == 1 and runs[0].name.startswith("ddpo-")
    metrics = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and metrics[-1]["samples"] == 4
    config = (runs[0] / "config.toml").read_text()
    assert 'num_steps = 3' in config and "batch_size = 2" in config and 'source = "python:' in config
    # image_outputs_logger logged images through the tracker the trainer handed it (TensorBoard)
    events = [p for p in (runs[0] / "tb").rglob("events.out.tfevents*")]
    assert events and any(b"|" in p.read_bytes() for p in events)
    # trainer.save_model(training_args.output_dir): a pipeline directory with the LoRA and a model card
    assert (tmp_path / "model" / "model_index.json").is_file() and (tmp_path / "model" / "pytorch_lora_weights.safetensors").is_file()
    assert "mixed_precision='fp16' needs a CUDA GPU" in result.stderr  # TRL's default on a CPU-only machine, said once


def test_unsupported_option_is_refused_in_one_line_naming_it(ported_script, tiny_pipeline_dir, tmp_path):
    result = _run_script(ported_script, tmp_path, ported_script.parent / "hub", "--pretrained_model", str(tiny_pipeline_dir), "--negative_prompts", "blurry")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("ddpo: error: DDPOConfig option negative_prompts='blurry' is not supported")
    assert "Traceback" not in result.stderr and not (tmp_path / "save").exists()


def test_every_trl_field_is_mapped_and_documented():
    from dataclasses import MISSING, fields

    from ddpo.compat.trl import ACCEPTED, FIELD_MAP, UNSUPPORTED, DDPOConfig, UnsupportedOptionError, migration_table

    ours = [f.name for f in fields(DDPOConfig)]
    assert ours[: len(TRL_FIELDS)] == TRL_FIELDS and ours[len(TRL_FIELDS) :] == ["output_dir"]
    for name in ours:
        assert (name in FIELD_MAP) + (name in UNSUPPORTED) + (name in ACCEPTED) == 1, name
    doc = (ROOT / "docs" / "migrating-from-trl.md").read_text()
    assert migration_table() in doc  # the table in the doc is the code's, every field once
    for name in TRL_FIELDS:
        assert doc.count(f"| `{name}` |") == 1, name
    # TRL's defaults kept (spot checks of values a user relies on)
    defaults = {f.name: f.default for f in fields(DDPOConfig) if f.default is not MISSING}
    assert (defaults["sample_num_steps"], defaults["train_clip_range"], defaults["train_learning_rate"], defaults["mixed_precision"]) == (50, 1e-4, 3e-4, "fp16")
    for name, value in [("train_use_8bit_adam", True), ("accelerator_kwargs", {"cpu": True}), ("log_with", "comet_ml")]:
        with pytest.raises(UnsupportedOptionError, match=name):
            DDPOConfig(**{name: value})
