"""The Shapes world: renderer ground truth, tokenizer, and a short pretraining run."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ddpo.shapes.render import (
    COLORS, COMMON, COUNTS, SHAPES, UNUSUAL, UNUSUAL_HELDOUT, UNUSUAL_PRETRAIN_FRACTION, UNUSUAL_TRAIN,
    Scene, caption, parse_caption, random_scene, render,
)  # fmt: skip


def object_mask(image, scene_color) -> np.ndarray:
    """Pixels within a small distance of the object colour (the background is dark grey, far from all colours)."""
    pixels = np.asarray(image, dtype=float)
    return np.linalg.norm(pixels - np.array(COLORS[scene_color]), axis=-1) < 60


def connected_components(mask: np.ndarray, min_pixels: int = 3) -> int:
    """4-connected components of at least `min_pixels` (an antialiased triangle tip can leave a stray pixel)."""
    seen = np.zeros_like(mask, dtype=bool)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        size, stack = 0, [start]
        while stack:
            y, x = stack.pop()
            if 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and mask[y, x] and not seen[y, x]:
                seen[y, x] = True
                size += 1
                stack += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]
        count += size >= min_pixels
    return count


def test_captions_round_trip_for_every_scene():
    for count in COUNTS:
        for color in COLORS:
            for shape in SHAPES:
                text = caption(count, color, shape)
                assert parse_caption(text) == Scene(count, color, shape)
    assert caption(1, "red", "cross") == "a red cross"
    assert caption(3, "blue", "cross") == "three blue crosses"
    assert parse_caption("two red circle") is None and parse_caption("a pink circle") is None


@pytest.mark.parametrize("seed", range(40))
def test_rendered_images_show_their_caption(seed):
    """The named colour is there, in as many separate (never touching) objects as the caption counts."""
    scene = random_scene(random.Random(seed), unusual_fraction=0.5)
    image = render(scene, random.Random(seed))
    assert image.size == (32, 32) and image.mode == "RGB"
    assert connected_components(object_mask(image, scene.color)) == scene.count
    for other in COLORS:
        if other != scene.color:
            assert object_mask(image, other).sum() < 3, (scene, other)


def test_rendering_is_deterministic_and_has_a_64_pixel_option():
    scene = Scene(2, "green", "triangle")
    assert np.array_equal(np.asarray(render(scene, random.Random(5))), np.asarray(render(scene, random.Random(5))))
    assert render(scene, random.Random(5), size=64).size == (64, 64)


def test_unusual_pairs_are_split_and_rare_in_pretraining():
    from ddpo.shapes.pretrain import PretrainConfig, Pretrainer

    assert not set(UNUSUAL_TRAIN) & set(UNUSUAL_HELDOUT)
    assert not set(UNUSUAL) & set(COMMON)
    assert PretrainConfig().unusual_fraction == UNUSUAL_PRETRAIN_FRACTION
    pretrainer = Pretrainer.__new__(Pretrainer)  # only its scene list, no work directory
    pretrainer.config = PretrainConfig()  # the shipped model's pretraining set
    pairs = [(s.color, s.shape) for s in pretrainer.scenes()]
    # Every non-home pair is drawn with probability UNUSUAL_PRETRAIN_FRACTION (1%; 1.01% of this set, 608 images);
    # the five pairs of the RL experiment are 0.15% of it (92 images, 15-24 each).
    unusual = set(UNUSUAL)
    assert abs(np.mean([pair in unusual for pair in pairs]) - UNUSUAL_PRETRAIN_FRACTION) < 0.001
    experiment = set(UNUSUAL_TRAIN + UNUSUAL_HELDOUT)
    assert 0 < np.mean([pair in experiment for pair in pairs]) <= 0.01
    assert experiment <= set(pairs)
    # The halves are one shape (the "activity") in colours whose home is another shape, and share no colour: a
    # change keyed on a trained colour word cannot reach a held-out prompt, one keyed on the shape word can.
    assert {shape for _, shape in UNUSUAL_TRAIN} == {shape for _, shape in UNUSUAL_HELDOUT}
    assert not {color for color, _ in UNUSUAL_TRAIN} & {color for color, _ in UNUSUAL_HELDOUT}
    home = dict(COMMON)
    assert all(home[color] != shape for color, shape in UNUSUAL_TRAIN + UNUSUAL_HELDOUT)


def test_tokenizer_has_one_token_per_caption_word(tmp_path):
    from ddpo.shapes.render import vocabulary
    from ddpo.shapes.tokenizer import write_tokenizer

    tokenizer = write_tokenizer(tmp_path)
    for word in vocabulary():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    ids = tokenizer("three magenta crosses", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert ids[0] == tokenizer.bos_token_id and len(ids) == tokenizer.model_max_length


@pytest.mark.slow
def test_short_pretraining_reduces_loss_and_writes_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    from ddpo.shapes.pretrain import PretrainConfig, Pretrainer

    config = PretrainConfig(
        dataset_size=512, recognizer_steps=5, recognizer_images=256, vae_steps=40, vae_batch_size=16, unet_steps=60, unet_batch_size=32,
        warmup_steps=5, checkpoint_every=30, eval_every=0, flow_steps=40, flow_lr=2e-3,
    )  # fmt: skip
    pretrainer = Pretrainer(tmp_path / "work", config, log=lambda message: None)
    pipeline_dir = pretrainer.run()
    metrics = pretrainer.metrics
    assert metrics["vae_loss_end"] < 0.7 * metrics["vae_loss_start"]
    assert metrics["unet_loss_end"] < 0.7 * metrics["unet_loss_start"]
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("two red circles", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    # the flow-matching twin: same VAE and text encoder, a velocity UNet, a flow-matching scheduler
    assert metrics["flow_loss_end"] < metrics["flow_loss_start"]
    flow = StableDiffusionPipeline.from_pretrained(pipeline_dir.with_name("pipeline-flow"), local_files_only=True)
    assert type(flow.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert flow.unet.dtype == torch.float32  # stored in float16, loaded as float32
    for name in ("vae", "text_encoder"):
        for a, b in zip(getattr(flow, name).parameters(), getattr(pipe, name).parameters()):
            assert torch.equal(a, b)
    from ddpo.policy import SamplingOptions, sampling_policy

    sampling = SamplingOptions(num_steps=2, guidance_scale=3.0, height=32, width=32)
    [flow_image] = sampling_policy(flow, sampling).sample(["two red circles"], [torch.Generator().manual_seed(0)]).images
    assert flow_image.size == (32, 32)
