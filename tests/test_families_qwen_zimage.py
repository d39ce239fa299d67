"""Qwen-Image and Z-Image against their own diffusers pipelines (issue 19): full-chain parity with guidance,
on-policy log-probs, LoRA round trip through `load_lora_weights`, one CLI epoch, and the real architectures on the
meta device. The checks are `family_checks`'; the tiny pipelines are `ddpo.policy.tiny_qwen_zimage`'s."""

from __future__ import annotations

import dataclasses

import pytest

from ddpo.policy import qwen_image, z_image
from ddpo.policy.qwen_image import QwenImagePolicy
from ddpo.policy.tiny_qwen_zimage import build_tiny_qwen_image_pipeline, build_tiny_z_image_pipeline
from ddpo.policy.z_image import ZImagePolicy
from family_checks import FamilyCase, check_full_chain_parity, check_lora_round_trip, check_on_policy_log_probs, save_tiny_dirs

FLOW = {"deterministic": {"sampler": "ode"}, "stochastic": {"sampler": "sde"}}


def with_lora_targets(policy_class, targets):
    """`policy_class` whose LoRA (when on) targets the family's default modules, `targets`."""

    def build(pipe, sampling, lora, **kwargs):
        return policy_class(pipe, sampling, dataclasses.replace(lora, target_modules=list(targets)) if lora.enabled else lora, **kwargs)

    return build


QWEN_IMAGE = with_lora_targets(QwenImagePolicy, qwen_image.LORA_TARGETS)
Z_IMAGE = with_lora_targets(ZImagePolicy, z_image.LORA_TARGETS)

CASES = [
    FamilyCase(
        "qwen-image", build_tiny_qwen_image_pipeline, QWEN_IMAGE, **FLOW,
        pipeline_kwargs=lambda scale: {"true_cfg_scale": scale, "negative_prompt": " "},
    ),  # fmt: skip
    FamilyCase("z-image", build_tiny_z_image_pipeline, Z_IMAGE, **FLOW),
    FamilyCase(
        "z-image-cfg-normalized-truncated", build_tiny_z_image_pipeline, Z_IMAGE, **FLOW,
        policy_kwargs={"cfg_normalization": 1.0, "cfg_truncation": 0.2},
        pipeline_kwargs=lambda scale: {"guidance_scale": scale, "cfg_normalization": 1.0, "cfg_truncation": 0.2},
    ),  # fmt: skip
]
IDS = [case.name for case in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_the_policy_samples_what_the_familys_own_pipeline_samples(case, batch_size):
    print(case.name, batch_size, check_full_chain_parity(case, batch_size))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_recomputed_log_probs_equal_the_recorded_ones_until_the_weights_change(case):
    print(case.name, check_on_policy_log_probs(case))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_saved_lora_loads_into_the_pipeline_and_samples_what_the_policy_samples(case, tmp_path):
    print(case.name, check_lora_round_trip(case, tmp_path))


# ---- a deliberate mismatch in one pipeline detail is caught ---------------------------------------------------------
MISMATCHES = [
    FamilyCase(
        "qwen-image-empty-negative-prompt", build_tiny_qwen_image_pipeline, QwenImagePolicy, **FLOW,
        pipeline_kwargs=lambda scale: {"true_cfg_scale": scale, "negative_prompt": ""},
    ),  # the policy contrasts with " ", the model card's negative prompt
    FamilyCase(
        "z-image-unnormalized-pipeline", build_tiny_z_image_pipeline, ZImagePolicy, **FLOW, policy_kwargs={"cfg_normalization": 1.0},
    ),  # fmt: skip
    FamilyCase(
        "z-image-untruncated-pipeline", build_tiny_z_image_pipeline, ZImagePolicy, **FLOW, policy_kwargs={"cfg_truncation": 0.2},
    ),  # fmt: skip
]


@pytest.mark.parametrize("case", MISMATCHES, ids=[case.name for case in MISMATCHES])
def test_the_parity_check_catches_a_policy_that_differs_from_the_pipeline_in_one_detail(case):
    with pytest.raises(AssertionError, match=r"^\(\d\S*, \d"):  # the gap assertion "(latents, images)", the chain having moved
        check_full_chain_parity(case, 2)


# ---- the presets ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("preset", "module"), [("qwen_image_flow_grpo", qwen_image), ("z_image_flow_grpo", z_image)])
def test_the_preset_validates_and_trains_the_familys_lora_targets(preset, module):
    from ddpo.training.assemble import load_config

    config = load_config(preset)
    assert config.model.pretrained == module.HUB_ID
    assert tuple(config.model.lora_target_modules) == module.LORA_TARGETS
    assert config.train.algorithm == "flow_grpo"


# ---- through the CLI --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return save_tiny_dirs(tmp_path_factory, ("qwen-image", "z-image"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen-image", "z-image"])
def test_one_epoch_of_ddpo_train_writes_a_run_whose_lora_the_pipeline_loads(tiny_dirs, tmp_path, kind):
    import numpy as np
    import torch
    from test_flow_e2e import train_one_epoch

    from ddpo.policy import load_pipeline

    run = tmp_path / "run"
    (record,) = train_one_epoch(tiny_dirs[kind], run, "flow_grpo")
    assert record["epoch"] == 1 and record["samples"] == 8
    assert all(np.isfinite(record[key]) for key in ("reward_mean", "loss", "approx_kl", "grad_norm", "kl_to_reference"))
    checkpoint = run / "checkpoints" / "epoch-0001"
    assert (checkpoint / "pytorch_lora_weights.safetensors").is_file()

    def images(pipe):
        guidance = {"true_cfg_scale": 2.0, "negative_prompt": " "} if kind == "qwen-image" else {"guidance_scale": 2.0}
        return pipe(["a cat"], num_inference_steps=3, height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="np", **guidance).images

    pipe = load_pipeline(str(tiny_dirs[kind]))
    before = images(pipe)
    pipe.load_lora_weights(checkpoint)
    assert np.abs(images(pipe) - before).max() > 1e-4
