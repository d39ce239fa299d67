"""Anchor prompts (`sample.anchor_batches_per_epoch`): unscored samples that only carry a KL to the base model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
import helpers
from helpers import cli_args, tiny_overrides
from PIL import Image

from ddpo.cli import main
from ddpo.config import ConfigError
from ddpo.training.assemble import load_config
from ddpo.prompts import build_prompt_source

ANCHORS = {"sample.anchor_batches_per_epoch": 1, "prompts.anchor_source": '"shapes_common"', "train.anchor_kl_weight": 1e4}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sample.anchor_batches_per_epoch=1"], "anchors need all three"),
        (["prompts.anchor_source=shapes_common", "train.anchor_kl_weight=1"], "anchors need all three"),
        (["sample.anchor_batches_per_epoch=1", "prompts.anchor_source=shapes_comon", "train.anchor_kl_weight=1"], "prompts.anchor_source: unknown prompt source .*'shapes_common'"),
        (["sample.anchor_batches_per_epoch=1", "prompts.anchor_source=file", "train.anchor_kl_weight=1"], "prompts.anchor_source='file' reads a file"),
        (["sample.anchor_batches_per_epoch=1", "prompts.anchor_source=shapes_common", "train.anchor_kl_weight=1", "model.use_lora=false"], "need model.use_lora=true"),
    ],
)
def test_incomplete_or_bad_anchor_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("sd_compressibility", overrides)


def test_every_minibatch_gets_its_share_of_the_anchors(tiny_pipeline_dir, tmp_path):
    from ddpo.training import batches
    from ddpo.training.loop import Trainer

    config = load_config("sd_compressibility", tiny_overrides(tiny_pipeline_dir, **ANCHORS, **{"sample.batch_size": 8, "train.batch_size": 4}))
    trainer = Trainer(config, tmp_path / "run", progress=False)
    assert batches.is_anchor(trainer.config, torch.arange(24), 1).tolist() == [False] * 16 + [True] * 8  # 2 scored batches of 8, then 1 of anchors
    assert trainer.sizes.samples_per_epoch == 16 and trainer.sizes.anchor_samples_per_epoch == 8
    minibatches = batches.minibatches(trainer.config, 1, 0, 16, 0)
    parts = batches.anchor_parts(trainer.config, 1, 0, 16, 24, len(minibatches), 0)
    assert sorted(torch.cat(minibatches).tolist()) == list(range(16)) and [len(m) for m in minibatches] == [4] * 4
    assert sorted(torch.cat(parts).tolist()) == list(range(16, 24)) and [len(p) for p in parts] == [2] * 4


def _sample(model_dir, out, lora=None) -> np.ndarray:
    args = ["sample", "--model", str(model_dir), "--prompt", "a red circle", "-n", "4", "--seed", "0", "--steps", "6", "--out", str(out)]
    if lora is not None:
        args += ["--lora", str(lora)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(out), dtype=float)


@pytest.mark.slow  # measured 157-201 s here (2 shared cores): `make test-fast` leaves it out
def test_anchors_are_never_scored_and_their_kl_holds_their_prompts_near_the_base_model(tiny_pipeline_dir, tmp_path):
    """The same run with a negligible and a large anchor weight: the anchors' prompts are never sent to the
    reward, the reward queries counted are the scored samples only, and the large weight keeps the anchors' KL
    to the base model, and the anchor prompt's images, closer to the base's."""
    common = {"train.lr": 1e-2, "train.epochs": 3, "reward.name": '"helpers:recording_brightness"'}
    runs, final_kl = {}, {}
    for name, weight in {"weak": 1e-8, "strong": 1e4}.items():
        helpers.scored_prompts.clear()
        out = tmp_path / name
        result = CliRunner().invoke(main, cli_args(tiny_pipeline_dir, out, **common, **{**ANCHORS, "train.anchor_kl_weight": weight}), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        runs[name] = out
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["samples"] for r in records] == [8, 16, 24]  # reward queries: 2 batches of 4 per epoch, anchors not counted
        assert len(helpers.scored_prompts) == 24 and set(helpers.scored_prompts) <= set(build_prompt_source("simple_animals").prompts)
        final_kl[name] = records[-1]["anchor_kl"]
    assert 0 < final_kl["strong"] < 0.5 * final_kl["weak"], final_kl
    base = _sample(tiny_pipeline_dir, tmp_path / "base.png")
    moved = {name: np.abs(_sample(tiny_pipeline_dir, tmp_path / f"{name}.png", run) - base).mean() for name, run in runs.items()}
    assert 0 < moved["strong"] < moved["weak"], moved
