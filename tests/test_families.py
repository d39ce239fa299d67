"""Every family against its own diffusers pipeline (issue 19): full-chain parity, on-policy log-probs, LoRA round
trip. The checks are `family_checks`'; this file lists the families built into `ddpo.policy.tiny`."""

from __future__ import annotations

import pytest
from diffusers import DDIMScheduler

from ddpo.policy.flux import FluxPolicy
from ddpo.policy.sd3 import StableDiffusion3Policy
from ddpo.policy.stable_diffusion import StableDiffusionPolicy
from ddpo.policy.sdxl import StableDiffusionXLPolicy
from ddpo.policy.tiny import build_tiny_flux_pipeline, build_tiny_pipeline, build_tiny_sd3_pipeline, build_tiny_sdxl_pipeline
from family_checks import FamilyCase, check_full_chain_parity, check_lora_round_trip, check_on_policy_log_probs, check_real_architecture


def _sd(prediction_type: str):
    def build():
        pipe = build_tiny_pipeline(prediction_type=prediction_type)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the same scheduler on both sides
        return pipe

    return build


DDIM = {"deterministic": {"eta": 0.0}, "stochastic": {"eta": 1.0}, "pipeline_kwargs": lambda scale: {"guidance_scale": scale, "eta": 0.0}}
FLOW = {"deterministic": {"sampler": "ode"}, "stochastic": {"sampler": "sde"}}

CASES = [
    FamilyCase("sd-epsilon", _sd("epsilon"), StableDiffusionPolicy, **DDIM),
    FamilyCase("sd-v", _sd("v_prediction"), StableDiffusionPolicy, **DDIM),
    FamilyCase("sd3", build_tiny_sd3_pipeline, StableDiffusion3Policy, **FLOW, pipeline_kwargs=lambda scale: {"guidance_scale": scale, "max_sequence_length": 128}),
    FamilyCase("flux-dev", build_tiny_flux_pipeline, FluxPolicy, **FLOW, pipeline_kwargs=lambda scale: {"guidance_scale": scale, "max_sequence_length": 512}),
    FamilyCase(
        "flux-cfg", lambda: build_tiny_flux_pipeline(guidance_embeds=False), FluxPolicy, **FLOW,
        pipeline_kwargs=lambda scale: {"true_cfg_scale": scale, "negative_prompt": "", "max_sequence_length": 512},
    ),  # fmt: skip
]
IDS = [case.name for case in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_the_policy_samples_what_the_familys_own_pipeline_samples(case, batch_size):
    check_full_chain_parity(case, batch_size)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_recomputed_log_probs_equal_the_recorded_ones_until_the_weights_change(case):
    check_on_policy_log_probs(case)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_saved_lora_loads_into_the_pipeline_and_samples_what_the_policy_samples(case, tmp_path):
    check_lora_round_trip(case, tmp_path)


SDXL = FamilyCase("sdxl", build_tiny_sdxl_pipeline, StableDiffusionXLPolicy, **DDIM)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_sdxl_samples_what_its_own_pipeline_samples(batch_size):
    """Both text encoders' states, the pooled projection, the added time ids and the zeroed negative prompt."""
    check_full_chain_parity(SDXL, batch_size)


def test_sdxl_log_probs_and_lora_round_trip(tmp_path):
    check_on_policy_log_probs(SDXL)
    check_lora_round_trip(SDXL, tmp_path)


def _real_architectures():
    from ddpo.policy.families import FAMILIES

    return [(name, architecture) for family in FAMILIES for name, architecture in family.real_architectures().items()]


@pytest.mark.parametrize(("name", "architecture"), _real_architectures(), ids=[name for name, _ in _real_architectures()])
def test_the_real_architecture_has_its_published_size_and_every_lora_target(name, architecture):
    check_real_architecture(architecture)


# Families whose one-epoch CLI run is tested elsewhere, with their own algorithms and LoRA targets: SD and the flow
# twin (test_train_e2e, test_flow_e2e), SD3 and FLUX.1 (test_flow_e2e), Qwen-Image and Z-Image
# (test_families_qwen_zimage), FLUX.2 klein and Wan (test_families_flux2_wan).
CLI_TESTED_ELSEWHERE = {"sd", "sd-flow", "sd3", "flux", "qwen-image", "z-image", "flux2-klein", "wan"}


def _train_kinds():
    from ddpo.policy.tiny import TINY_PIPELINES

    return sorted(set(TINY_PIPELINES) - CLI_TESTED_ELSEWHERE)


@pytest.mark.slow
@pytest.mark.parametrize("kind", _train_kinds())
def test_one_epoch_of_ddpo_train_on_each_tiny_family_writes_the_run_directory(kind, tmp_path):
    """`ddpo train` through the CLI on every family's tiny pipeline saved as a diffusers directory: DDPO-IS on the
    denoising families (DDIM, eta 1), Flow-GRPO's SDE steps on the flow ones."""
    import json

    from click.testing import CliRunner
    from helpers import cli_args

    from ddpo.cli import main
    from ddpo.policy.tiny import save_tiny_pipeline

    model = save_tiny_pipeline(tmp_path / "model", kind=kind)
    overrides = {"train.epochs": 1, "sample.num_steps": 3, "sample.num_batches_per_epoch": 1}
    result = CliRunner().invoke(main, cli_args(model, tmp_path / "run", **overrides), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert record["epoch"] == 1 and record["samples"] == 4
    assert all(abs(record[key]) < float("inf") for key in ("reward_mean", "loss", "approx_kl"))
    assert (tmp_path / "run" / "checkpoints" / "epoch-0001" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "run" / "samples" / "epoch-0001.png").is_file() and (tmp_path / "run" / "config.toml").is_file()


def test_every_preset_validates():
    """Each family's preset (hub id, size, steps, guidance, LoRA) is a valid config; the weights cannot load here."""
    from ddpo.config import available_presets
    from ddpo.training.assemble import load_config

    for name in available_presets():
        config = load_config(name)
        assert config.model.pretrained and config.sample.height > 0
