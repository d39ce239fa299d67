"""`ddpo export`: the pipeline directory loads offline with `DiffusionPipeline.from_pretrained`, samples what the
run's policy samples with the same noise (merged and unmerged), and carries a hub model card with the run's numbers."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import cli_args
from safetensors.torch import load_file

from ddpo.cli import main

PROMPTS = ["a cat", "a dog riding a bike"]


@pytest.fixture(scope="module")
def trained_run(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    # lr high enough that the LoRA moves the samples visibly (the test below checks it does)
    result = CliRunner().invoke(main, cli_args(tiny_pipeline_dir, out, **{"train.epochs": 1, "train.lr": 3e-2, "train.clip_range": 1.0, "log.eval_every": 1}), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def _export(run, out, *extra):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return CliRunner().invoke(main, ["export", str(run), "--out", str(out), *extra])


def _run_policy(run):
    """The policy exactly as the trainer held it: base + a fresh adapter + the checkpoint's trainable tensors."""
    from ddpo.training.assemble import load_config
    from ddpo.policy import build_policy

    config = load_config(run / "config.toml")
    policy = build_policy(config)
    policy.load_trainable_state_dict(load_file(str(run / "checkpoints" / "epoch-0001" / "trainable.safetensors")))
    return policy, config


def _sample_latents(policy, seed=7):
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(PROMPTS))]
    return policy.sample(PROMPTS, generators, decode=False).latents[:, -1]


@torch.no_grad()
def _images(pipe, latents):
    """The images the latents decode to, as floats in [0, 1] (before 8-bit rounding)."""
    return (pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_exported_pipeline_loads_offline_and_samples_what_the_run_samples(trained_run, tmp_path, merge, monkeypatch):
    from diffusers import DiffusionPipeline

    from ddpo.policy import LoraOptions, SamplingOptions, StableDiffusionPolicy

    out = tmp_path / "exported"
    result = _export(trained_run, out, *(["--merge"] if merge else []))
    assert result.exit_code == 0, result.output
    assert (out / "pytorch_lora_weights.safetensors").is_file() == (not merge)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = DiffusionPipeline.from_pretrained(out)
    if not merge:
        pipe.load_lora_weights(out)
    run_policy, config = _run_policy(trained_run)
    sampling = SamplingOptions(num_steps=config.sample.num_steps, eta=config.sample.eta, guidance_scale=config.sample.guidance_scale, height=32, width=32)
    exported = StableDiffusionPolicy(pipe, sampling, LoraOptions(enabled=False))
    expected, got = _sample_latents(run_policy), _sample_latents(exported)
    # Fusing adds B @ A into W once instead of at every call: the float rounding differs. Measured on this tiny
    # random pipeline (latents of magnitude ~10): 2.2e-5 absolute in x_0 merged, 0 unmerged; in the images < 1e-6.
    assert ((expected - got).abs().max() / expected.abs().max()) < 1e-5
    assert (_images(pipe, expected) - _images(pipe, got)).abs().max() < 1e-5
    with run_policy.reference_model():  # the LoRA matters: the base model samples something else
        base = _sample_latents(run_policy)
    assert (expected - base).abs().max() > 1e-3



def test_model_card_parses_as_hub_metadata_and_carries_the_runs_numbers(trained_run, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "card"
    assert _export(trained_run, out, "--merge").exit_code == 0
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    assert {"ddpo", "ddpo-is"} <= set(data["tags"])
    before, after = (json.loads(line) for line in (trained_run / "monitor.jsonl").read_text().splitlines())
    row = f"| reward jpeg_compressibility | {before['train_reward']:.4f} | {after['train_reward']:.4f} |"
    assert row in card.text
    metrics = json.loads((trained_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"reward queries: {metrics['samples']}" in card.text
    assert (out / "images" / "before-after.png").is_file() and "images/before-after.png" in card.text


def test_export_refuses_bad_input_in_one_line_and_writes_nothing(trained_run, tmp_path):
    result = _export(trained_run, tmp_path / "x", "--checkpoint", "7")
    assert result.exit_code == 2 and "no checkpoint of epoch 7" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    result = _export(trained_run, tmp_path / "full")
    assert result.exit_code == 2 and "not empty" in result.output
    result = _export(tmp_path, tmp_path / "y")
    assert result.exit_code == 2 and "not a run directory" in result.output


def test_push_uploads_the_exported_folder(trained_run, tmp_path, monkeypatch):
    """Up to the upload call (no hub access in the suite): the folder and repo id reach huggingface_hub."""
    import huggingface_hub

    calls = []
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id)) or f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw["repo_id"], kw["folder_path"])))
    out = tmp_path / "pushed"
    result = _export(trained_run, out, "--push", "me/shapes-ddpo")
    assert result.exit_code == 0, result.output
    assert calls == [("create", "me/shapes-ddpo"), ("upload", "me/shapes-ddpo", str(out))]
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-token-home"))
    result = _export(trained_run, tmp_path / "pushed2", "--push", "me/shapes-ddpo")
    assert result.exit_code == 2 and "token" in result.output
