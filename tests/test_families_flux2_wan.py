"""FLUX.2 (dev and klein) and Wan 2.1 text-to-video against their own diffusers pipelines (issue 19): full-chain
parity, on-policy log-probs, LoRA round trip through `load_lora_weights`, the real architectures on the meta device,
one epoch through the CLI, the presets, and video rewards scored frame by frame."""

from __future__ import annotations

import ast
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from family_checks import (
    FamilyCase, check_full_chain_parity, check_lora_round_trip, check_on_policy_log_probs, check_real_architecture, save_tiny_dirs,
)  # fmt: skip
from helpers import cli_args
from PIL import Image

from ddpo.policy import flux2, wan
from ddpo.policy.flux2 import Flux2Policy
from ddpo.policy.tiny_flux2_wan import build_tiny_flux2_klein_pipeline, build_tiny_flux2_pipeline, build_tiny_wan_pipeline
from ddpo.policy.wan import WanPolicy

SEQUENCE = 64  # text tokens (the pipelines' 512 would only pad); FLUX.2 dev's system message takes 23 words of them


def unpack(noise: torch.Tensor) -> torch.Tensor:
    """The policy's packed tokens (B, h * w, C) -> the (B, C, h, w) grid FLUX.2's pipelines take as `latents`."""
    batch, tokens, channels = noise.shape
    side = int(tokens**0.5)
    return noise.permute(0, 2, 1).reshape(batch, channels, side, side)


FLOW = {"deterministic": {"sampler": "ode"}, "stochastic": {"sampler": "sde"}}
FLUX2 = dict(
    **FLOW, pipeline_kwargs=lambda scale: {"guidance_scale": scale, "max_sequence_length": SEQUENCE}, pipeline_latents=unpack,
    policy_kwargs={"max_sequence_length": SEQUENCE}, lora_targets=[*flux2.LORA_TARGETS, *flux2.single_lora_targets(1)],
)  # fmt: skip
FRAMES = 5  # (5 - 1) / 4 + 1 = 2 latent frames
CASES = [
    FamilyCase("flux2-dev", build_tiny_flux2_pipeline, Flux2Policy, **FLUX2),
    # klein returns the VAE's latents (de-normalised, unpatchified) for output_type="latent"
    FamilyCase("flux2-klein", build_tiny_flux2_klein_pipeline, Flux2Policy, **FLUX2, output_latents=lambda policy, latents: policy.vae_latents(latents)),
    FamilyCase(
        "wan", build_tiny_wan_pipeline, WanPolicy, {"sampler": "ode", "num_frames": FRAMES}, {"sampler": "sde", "num_frames": FRAMES},
        pipeline_kwargs=lambda scale: {"guidance_scale": scale, "num_frames": FRAMES, "max_sequence_length": SEQUENCE},
        policy_kwargs={"max_sequence_length": SEQUENCE}, lora_targets=list(wan.LORA_TARGETS),
    ),
]  # fmt: skip
IDS = [case.name for case in CASES]
# A step-distilled klein (`is_distilled`): the pipeline ignores the guidance scale, and so must the policy.
DISTILLED = FamilyCase(
    "flux2-klein-distilled", lambda: build_tiny_flux2_klein_pipeline(is_distilled=True), Flux2Policy, **FLUX2,
    output_latents=lambda policy, latents: policy.vae_latents(latents),
)  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_the_policy_samples_what_the_familys_own_pipeline_samples(case, batch_size):
    print(case.name, "batch", batch_size, "max |difference|", check_full_chain_parity(case, batch_size))


def test_a_step_distilled_klein_samples_without_guidance_as_its_pipeline():
    print(DISTILLED.name, "max |difference|", check_full_chain_parity(DISTILLED, 2))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_recomputed_log_probs_equal_the_recorded_ones_until_the_weights_change(case):
    print(case.name, "max |ratio - 1|", check_on_policy_log_probs(case))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_saved_lora_loads_into_the_pipeline_and_samples_what_the_policy_samples(case, tmp_path):
    print(case.name, "round trip max |difference|", check_lora_round_trip(case, tmp_path))


def _with(case: FamilyCase, **changes) -> FamilyCase:
    return FamilyCase(**{**case.__dict__, **changes})


@pytest.mark.parametrize(
    ("case", "mismatch"),
    [
        # the guidance embedding carries the scale: a pipeline guided at another scale draws other images
        (_with(CASES[0], pipeline_kwargs=lambda scale: {"guidance_scale": scale + 1.0, "max_sequence_length": SEQUENCE}), "guidance scale"),
        # klein's latents are normalised by the VAE's batch-norm statistics: decoding without them is caught
        (_with(CASES[1], output_latents=lambda policy, latents: policy.pipeline._unpatchify_latents(unpack(latents))), "batch norm"),
        # Wan's flow shift: a pipeline sampling with another shift is caught
        (_with(CASES[2], build=lambda: build_tiny_wan_pipeline(shift=5.0), policy_class=lambda pipe, *args, **kwargs: WanPolicy(_reshifted(pipe, 3.0), *args, **kwargs)), "flow shift"),
    ],
    ids=["flux2-dev-guidance", "flux2-klein-batch-norm", "wan-shift"],
)
def test_a_wrong_detail_fails_the_parity_check(case, mismatch):
    with pytest.raises(AssertionError, match=r"^\([0-9]") as failure:  # the gaps' assertion, not another one
        check_full_chain_parity(case, 1)
    assert max(ast.literal_eval(str(failure.value).splitlines()[0])) > 1e-3, mismatch


def _reshifted(pipe, shift: float):
    """A copy of `pipe` whose scheduler has flow shift `shift` (the policy's side of the shift mismatch)."""
    import copy

    from diffusers import FlowMatchEulerDiscreteScheduler

    other = copy.copy(pipe)
    other.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    return other


@pytest.mark.parametrize(("preset", "family"), [("flux2_klein_flow_grpo", "flux2"), ("wan_t2v_flow_grpo", "wan")])
def test_the_presets_validate_and_name_existing_lora_targets(preset, family):
    from ddpo.training.assemble import load_config

    config = load_config(preset)
    module = {"flux2": flux2, "wan": wan}[family]
    real = next(iter(module.REAL_ARCHITECTURES.values()))  # klein 4B, Wan 1.3B
    check_real_architecture({**real, "lora_targets": config.model.lora_target_modules})
    if family == "wan":
        assert (config.sample.num_frames - 1) % 4 == 0


def test_a_video_reward_is_the_mean_of_its_frames_scores():
    from ddpo.rewards.base import score

    def brightness(images, prompts, metadata):
        return [float(np.asarray(image).mean()) for image in images]

    videos = [[Image.new("RGB", (4, 4), (v, v, v)) for v in values] for values in ([0, 100], [30, 60, 90])]
    output = score(brightness, "brightness", videos, ["a cat", "a dog"], [{}, {}])
    assert np.allclose(output.scores, [50.0, 60.0])


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return save_tiny_dirs(tmp_path_factory, ("flux2-klein", "wan"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flux2-klein", "wan"])
def test_one_epoch_of_flow_grpo_through_the_cli_writes_the_run_directory(tiny_dirs, tmp_path, kind):
    from ddpo.cli import main

    run = tmp_path / "run"
    values = {
        "train.algorithm": '"flow_grpo"', "train.epochs": 1, "train.lr": 1e-2, "train.kl_weight": 0.04, "sample.num_steps": 3,
        "sample.eval_num_steps": 3, "sample.samples_per_prompt": 2, "sample.batch_size": 2, "train.batch_size": 2,
        "model.lora_target_modules": json.dumps(list(wan.LORA_TARGETS) if kind == "wan" else [*flux2.LORA_TARGETS, *flux2.single_lora_targets(1)]),
        **({"sample.num_frames": FRAMES} if kind == "wan" else {}),
    }  # fmt: skip
    result = CliRunner().invoke(main, cli_args(tiny_dirs[kind], run, **values), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert record["epoch"] == 1 and all(np.isfinite(record[key]) for key in ("reward_mean", "loss", "approx_kl", "grad_norm"))
    assert (run / "checkpoints" / "epoch-0001" / "pytorch_lora_weights.safetensors").is_file()
    grid = Image.open(next((run / "samples").glob("*.png")))
    frames = FRAMES if kind == "wan" else 1  # a video's cell is the strip of its frames
    assert grid.size == (2 * frames * 32, 2 * 32)  # log.num_eval_seeds x frames of 32 px, by 2 grid prompts
