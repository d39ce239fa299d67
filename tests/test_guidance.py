"""RL guidance (base + s * (fine-tuned - base)) and `ddpo sweep`: s = 0 is the base model and s = 1 the run's
checkpoint, number for number with the same seeds; the sweep page renders in headless Chromium."""

from __future__ import annotations

import json

import pytest
import torch
from browser import find_chromium, inspect_page
from click.testing import CliRunner
from helpers import cli_args

import ddpo
from ddpo.cli import main


@pytest.fixture(scope="module")
def lora_run(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("guidance") / "run"
    overrides = {"train.epochs": 1, "train.lr": 3e-2, "train.clip_range": 1.0, "reward.name": '"helpers:mean_brightness"'}
    result = CliRunner().invoke(main, cli_args(tiny_pipeline_dir, out, **overrides), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def _reset():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def test_guided_network_mixes_base_and_fine_tuned_predictions(lora_run):
    from ddpo.guidance import GuidedNetwork

    from ddpo.training.evaluate import policy_for_checkpoint
    from ddpo.policy import SamplingOptions
    from ddpo.training.run_directory import resolve_adapter_dir

    policy = policy_for_checkpoint(str(ddpo.load_config(lora_run / "config.toml").model.pretrained), resolve_adapter_dir(lora_run), SamplingOptions(num_steps=3, height=32, width=32))
    unet = policy.unet
    x, t, c = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 500]), torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tuned = unet(x, t, c).sample
        unet.disable_adapters()
        base = unet(x, t, c).sample
        unet.enable_adapters()
        assert (tuned - base).abs().max() > 1e-4  # the LoRA changes the prediction
        for scale in (0.0, 0.5, 1.0, 1.5):
            mixed = GuidedNetwork(unet, scale)(x, t, c).sample
            assert torch.allclose(mixed, base + scale * (tuned - base), atol=1e-6)
        assert torch.equal(GuidedNetwork(unet, 0.0)(x, t, c).sample, base) and torch.equal(GuidedNetwork(unet, 1.0)(x, t, c).sample, tuned)


def test_sample_rl_scale_zero_is_the_base_model_and_one_the_checkpoint(lora_run, tiny_pipeline_dir):
    images = {s: ddpo.sample(lora_run, ["a cat"], n=2, rl_scale=s) for s in (0.0, 1.0)}
    base = ddpo.sample(str(tiny_pipeline_dir), ["a cat"], n=2, num_steps=6, guidance_scale=5.0)
    tuned = ddpo.sample(lora_run, ["a cat"], n=2)
    as_bytes = lambda images: [image.tobytes() for image in images]  # noqa: E731
    assert as_bytes(images[0.0]) == as_bytes(base) and as_bytes(images[1.0]) == as_bytes(tuned)
    assert as_bytes(base) != as_bytes(tuned)
    result = CliRunner().invoke(main, ["sample", "--prompt", "a cat", "--rl-scale", "0.5", "--out", "x.png"])
    assert result.exit_code == 2 and "--rl-scale mixes a base model with a fine-tuned LoRA" in result.output


def test_sweep_page_renders_and_its_ends_are_the_base_and_the_checkpoint(lora_run, tmp_path):
    page = tmp_path / "sweep.html"
    result = CliRunner().invoke(main, ["sweep", str(lora_run), "--cfg", "1,5", "--rl-scale", "0,1,1.5", "--seeds", "2", "--prompts-per-group", "2", "--out", str(page)])
    assert result.exit_code == 0, result.output
    numbers = json.loads(page.with_suffix(".json").read_text())
    cells = {(c["cfg"], c["rl_scale"]): c["groups"] for c in numbers["cells"]}
    assert len(cells) == 6
    _reset()
    evaluated = ddpo.evaluate(lora_run, seeds=2, prompts_per_group=2)  # the run's CFG (5), the sweep's prompts and seeds
    assert cells[(5.0, 0.0)] == evaluated["base"]["groups"]
    assert cells[(5.0, 1.0)] == evaluated["epoch-0001"]["groups"]
    assert cells[(5.0, 1.5)] != cells[(5.0, 1.0)] and cells[(1.0, 1.0)] != cells[(5.0, 1.0)]
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed (`make test` installs it)")
    findings = inspect_page(page, tmp_path / "sweep.png", chromium=chromium)
    assert not findings.console and not findings.broken_images, findings
    assert len(findings.images) == 6 and "RL scale 1.5" in findings.text and "CFG 5" in findings.text


def test_sweep_refuses_bad_scales_in_one_line(lora_run):
    for args, message in [(["--cfg", "1,x"], "--cfg '1,x': give numbers"), (["--cfg", "0.5"], "CFG scales start at 1"), (["--seeds", "1"], "--seeds must be at least 2")]:
        result = CliRunner().invoke(main, ["sweep", str(lora_run), *args])
        assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1, result.output
