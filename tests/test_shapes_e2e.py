"""End to end on the shipped Shapes model: the embedded default and the paper's JPEG task in miniature."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ddpo.cli import main

pytestmark = pytest.mark.slow


def metrics_of(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_embedded_default_runs_one_epoch(tmp_path):
    out = tmp_path / "default"
    result = CliRunner().invoke(main, ["train", "--out", str(out), "--no-progress", "--set", "train.epochs=1"])
    assert result.exit_code == 0, result.output + (result.stderr or "")
    [record] = metrics_of(out)
    assert record["samples"] == 32
    assert 0.0 < record["reward_mean"] <= 1.0  # BERTScore recall of the describer's captions
    assert 0.0 <= record["reward_exact"] <= 1.0
    assert (out / "checkpoints" / "epoch-0001" / "pytorch_lora_weights.safetensors").is_file()


JPEG_EPOCHS = 15  # measured on the shipped model: compressibility -1.162 -> -1.095 kB, a paired gain of 9.8 standard errors
JPEG_PROMPTS = ["a red circle", "two green squares", "three blue triangles", "a yellow cross"]


def paired_rewards(run, reward_name: str, prompts: list[str], seeds: int):
    """Scores of the base model and of the run's last checkpoint on the same prompts x the same seeds."""
    import numpy as np

    from ddpo.training.assemble import load_config
    from ddpo.training.evaluate import EvalPrompts, sample_eval_set, score_eval_set
    from ddpo.policy import LoraOptions, SamplingOptions, StableDiffusionPolicy, load_pipeline, resolve_model
    from ddpo.rewards import build_reward
    from ddpo.training.run_directory import load_checkpoint_into, resolve_adapter_dir

    config = load_config(run / "config.toml")
    sampling = SamplingOptions(
        num_steps=config.sample.num_steps, eta=config.sample.eta, guidance_scale=config.sample.guidance_scale,
        height=config.sample.height, width=config.sample.width,
    )  # fmt: skip
    eval_prompts = EvalPrompts(prompts, ["trained"] * len(prompts))
    reward = {reward_name: build_reward(reward_name)}
    scores = []
    for checkpoint in (None, resolve_adapter_dir(run, "latest")):
        pipe = load_pipeline(resolve_model(config.model.pretrained))
        if checkpoint is not None:
            load_checkpoint_into(pipe, checkpoint)
        policy = StableDiffusionPolicy(pipe, sampling, LoraOptions(enabled=False))
        samples = sample_eval_set(policy, eval_prompts, seeds, batch_size=32)
        scores.append(np.asarray(score_eval_set(samples, reward)[reward_name], dtype=np.float64))
    return scores


@pytest.mark.parametrize("task", ["compressibility", "incompressibility"])
def test_ddpo_is_on_jpeg_moves_the_file_size_the_right_way(tmp_path, task):
    """DDPO-IS makes the Shapes model's images more (less) compressible with the JPEG (in)compressibility preset:
    base and trained model are compared on the same 4 prompts x 8 seeds (paired), and the mean reward gain must
    exceed 3 standard errors of the paired differences."""
    reward_name = f"jpeg_{task}"
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(JPEG_PROMPTS) + "\n")
    out = tmp_path / task
    args = ["train", "--config", f"shapes/{task}", "--out", str(out), "--no-progress",
            "--set", "prompts.source=file", "--set", f"prompts.file={prompt_file}", "--set", f"train.epochs={JPEG_EPOCHS}",
            "--set", f"log.save_every={JPEG_EPOCHS}", "--set", "log.eval_every=0"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + (result.stderr or "")
    base, trained = paired_rewards(out, reward_name, JPEG_PROMPTS, seeds=8)
    gain = trained - base
    standard_error = gain.std(ddof=1) / len(gain) ** 0.5
    print(f"{reward_name} base {base.mean():.4f} trained {trained.mean():.4f} gain {gain.mean():.4f} = {gain.mean() / standard_error:.1f} SE")
    assert gain.mean() > 3 * standard_error, (base.mean(), trained.mean(), standard_error)
