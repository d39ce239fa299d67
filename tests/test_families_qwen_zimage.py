"""Qwen-Image and Z-Image against their own diffusers pipelines (issue 19): full-chain parity with guidance,
on-policy log-probs, LoRA round trip through `load_lora_weights`, one CLI epoch, and the real architectures on the
meta device. The checks are `family_checks`'; the tiny pipelines are `ddpo.policy.tiny_qwen_zimage`'s."""

from __future__ import annotations

import pytest

from ddpo.policy.qwen_image import QwenImagePolicy
from ddpo.policy.tiny_qwen_zimage import build_tiny_qwen_image_pipeline, build_tiny_z_image_pipeline
from ddpo.policy.z_image import ZImagePolicy
from family_checks import FamilyCase, check_full_chain_parity, check_lora_round_trip, check_on_policy_log_probs

FLOW = {"deterministic": {"sampler": "ode"}, "stochastic": {"sampler": "sde"}}

CASES = [
    FamilyCase(
        "qwen-image", build_tiny_qwen_image_pipeline, QwenImagePolicy, **FLOW,
        pipeline_kwargs=lambda scale: {"true_cfg_scale": scale, "negative_prompt": " "},
    ),  # fmt: skip
    FamilyCase("z-image", build_tiny_z_image_pipeline, ZImagePolicy, **FLOW),
    FamilyCase(
        "z-image-cfg-normalized-truncated", build_tiny_z_image_pipeline, ZImagePolicy, **FLOW,
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
