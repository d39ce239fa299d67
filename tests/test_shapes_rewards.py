"""Shapes world rewards (describer + BERTScore, describer attributes) and prompt sources."""

import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from ddpo.prompts import build_prompt_source
from ddpo.rewards import RewardError, build_reward
from ddpo.shapes.render import COMMON, UNUSUAL, Scene, caption, parse_caption, render_batch
from ddpo.shapes.rewards import SHIPPED_DESCRIBER

SCENES = [
    Scene(2, "red", "circle"),
    Scene(1, "blue", "square"),
    Scene(3, "green", "triangle"),
    Scene(1, "magenta", "cross"),
    Scene(3, "yellow", "circle"),
]


@pytest.fixture(scope="module")
def describer() -> str:
    if not SHIPPED_DESCRIBER.is_file():
        pytest.skip(f"no shipped describer at {SHIPPED_DESCRIBER} yet (written by Shapes pretraining)")
    return str(SHIPPED_DESCRIBER)


@pytest.fixture(scope="module")
def images() -> list:
    return render_batch(SCENES, seed=7)


def test_alignment_prefers_the_prompt_the_image_shows(describer, images):
    reward = build_reward("shapes_alignment", describer=describer)
    matching = [scene.caption for scene in SCENES]
    mismatching = [caption(s.count % 3 + 1, "cyan", "cross" if s.shape != "cross" else "square") for s in SCENES]
    right = reward(images, matching, [{}] * len(SCENES))
    wrong = reward(images, mismatching, [{}] * len(SCENES))
    assert right.scores.dtype == np.float32 and right.scores.shape == (len(SCENES),)
    assert right.info["captions"] == matching  # the describer reads rendered images correctly
    assert right.scores == pytest.approx(1.0, abs=1e-5)  # caption == prompt: BERTScore recall of identical text
    assert np.all(wrong.scores < right.scores - 0.1)
    assert right.info["exact"].tolist() == [1.0] * len(SCENES)
    assert wrong.info["exact"].tolist() == [0.0] * len(SCENES)


def test_alignment_gives_partial_credit_for_a_partly_right_prompt(describer, images):
    reward = build_reward("shapes_alignment", describer=describer)
    prompts = ["two red circles", "three red circles", "three cyan crosses"]  # image 0 shows two red circles
    scores = reward([images[0]] * 3, prompts, [{}] * 3).scores
    assert scores[0] > scores[1] > scores[2]


def test_alignment_is_bertscore_recall_of_the_caption_against_the_prompt(describer, images):
    from ddpo.rewards.bertscore import BERTScorer, minilm_path

    prompt = "two red circles on a dark textured background"  # any text; image 0 shows two red circles
    output = build_reward("shapes_alignment", describer=describer)([images[0]], [prompt], [{}])
    precision, recall, _ = BERTScorer(minilm_path()).score(["two red circles"], [prompt])
    assert output.scores[0] == pytest.approx(recall[0], abs=1e-6)
    assert recall[0] < precision[0] - 0.1  # the prompt asks for more words than the caption has
    assert output.info["exact"].tolist() == [0.0]  # not a template caption: never an exact match


def test_soft_alignment_is_the_expected_recall_over_the_describers_probabilities(describer, images):
    import torch

    from ddpo.rewards.bertscore import BERTScorer, minilm_path
    from ddpo.shapes.recognizers import COLOR_NAMES, images_to_tensor
    from ddpo.shapes.render import SHAPES
    from ddpo.shapes.rewards import load_describer

    # A blend of two rendered scenes: the describer is unsure, so the expectation differs from the arg-max's.
    blend = Image.blend(images[0], images[1], 0.5)
    prompt = "two red circles"
    soft = build_reward("shapes_alignment_soft", describer=describer)([blend], [prompt], [{}])
    hard = build_reward("shapes_alignment", describer=describer)([blend], [prompt], [{}])
    with torch.no_grad():
        logits = load_describer(describer)(images_to_tensor([blend]))
    p = {name: value.softmax(-1)[0] for name, value in logits.items()}
    scenes = [(n, c, s) for n in range(3) for c in range(len(COLOR_NAMES)) for s in range(len(SHAPES))]
    captions = [caption(n + 1, COLOR_NAMES[c], SHAPES[s]) for n, c, s in scenes]
    _, recall, _ = BERTScorer(minilm_path()).score(captions, [prompt] * len(captions))
    expected = sum(float(p["count"][n] * p["color"][c] * p["shape"][s]) * float(r) for (n, c, s), r in zip(scenes, recall))
    assert soft.scores[0] == pytest.approx(expected, abs=1e-5)
    assert abs(soft.scores[0] - hard.scores[0]) > 1e-3  # not the arg-max caption's score
    assert soft.info["p_prompt"][0] == pytest.approx(float(p["count"][1] * p["color"][0] * p["shape"][0]), rel=1e-4)


def test_soft_alignment_agrees_with_alignment_on_clear_images(describer, images):
    matching = [scene.caption for scene in SCENES]
    mismatching = [caption(s.count % 3 + 1, "cyan", "cross" if s.shape != "cross" else "square") for s in SCENES]
    soft = build_reward("shapes_alignment_soft", describer=describer)
    hard = build_reward("shapes_alignment", describer=describer)
    for prompts in (matching, mismatching):
        assert soft(images, prompts, [{}] * len(SCENES)).scores == pytest.approx(hard(images, prompts, [{}] * len(SCENES)).scores, abs=0.05)
    assert soft(images, matching, [{}] * len(SCENES)).info["p_prompt"].min() > 0.5


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("two red circles", 1.0), ("three red circles", 2 / 3), ("two blue squares", 1 / 3), ("a green cross", 0.0)],
)
def test_attributes_count_matching_count_colour_and_shape(describer, images, prompt, expected):
    reward = build_reward("shapes_attributes", describer=describer)
    output = reward([images[0]], [prompt], [{}])  # image 0 shows two red circles
    assert output.scores[0] == pytest.approx(expected, abs=1e-6)
    assert output.info["captions"] == ["two red circles"]


def test_attributes_of_several_scenes_at_once(describer, images):
    reward = build_reward("shapes_attributes", describer=describer)
    prompts = [
        SCENES[0].caption,  # all right
        caption(2, "blue", "square"),  # count wrong
        caption(1, "red", "triangle"),  # count and colour wrong
        caption(3, "yellow", "circle"),  # all wrong
        caption(3, "yellow", "circle"),  # all right
    ]
    output = reward(images, prompts, [{}] * len(prompts))
    assert output.scores == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0, 1.0], abs=1e-6)
    assert output.info["count"].tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_attributes_reject_prompts_that_are_not_shapes_captions(describer, images):
    reward = build_reward("shapes_attributes", describer=describer)
    with pytest.raises(RewardError, match="'a photo of a cat'"):
        reward(images[:2], ["two red circles", "a photo of a cat"], [{}, {}])


@pytest.mark.parametrize("name", ["shapes_alignment", "shapes_alignment_soft", "shapes_attributes"])
def test_missing_describer_weights_are_named(tmp_path, name):
    missing = tmp_path / "describer.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(f"describer weights not found at {missing}")):
        build_reward(name, describer=str(missing))


def test_registered_from_a_fresh_interpreter_without_loading_models():
    script = textwrap.dedent(
        """
        import sys
        from ddpo.prompts import build_prompt_source
        from ddpo.rewards import check_reward
        check_reward("shapes_alignment", {"describer": "x"})
        check_reward("shapes_attributes", {})
        check_reward("shapes_alignment_soft", {})
        assert len(build_prompt_source("shapes_unusual_train").prompts) == 9
        assert "torch" not in sys.modules and "transformers" not in sys.modules, "registering imported torch"
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("name", "size", "groups"),
    [
        ("shapes_unusual_train", 9, {"unusual_train"}),
        ("shapes_unusual_heldout", 6, {"unusual_heldout"}),
        ("shapes_common", len(COMMON) * 3, {"common"}),
        ("shapes_all", (len(COMMON) + len(UNUSUAL)) * 3, {"common", "unusual_train", "unusual_heldout", "unusual_other"}),
    ],
)
def test_prompt_sources_hold_every_caption_of_their_groups_with_metadata(name, size, groups):
    source = build_prompt_source(name)
    assert len(source.prompts) == len(set(source.prompts)) == size
    assert {entry["group"] for entry in source.metadata} == groups
    for prompt, entry in zip(source.prompts, source.metadata):
        assert set(entry) == {"count", "color", "shape", "group"}
        assert parse_caption(prompt) == Scene(entry["count"], entry["color"], entry["shape"])
        assert ((entry["color"], entry["shape"]) in UNUSUAL) == entry["group"].startswith("unusual")


def test_heldout_prompts_are_disjoint_from_training_prompts():
    train = build_prompt_source("shapes_unusual_train")
    heldout = build_prompt_source("shapes_unusual_heldout")
    pairs = lambda source: {(entry["color"], entry["shape"]) for entry in source.metadata}  # noqa: E731
    assert not pairs(train) & pairs(heldout)
    assert (len(pairs(train)), len(pairs(heldout))) == (3, 2)
    common, everything = build_prompt_source("shapes_common"), build_prompt_source("shapes_all")
    assert set(train.prompts) | set(heldout.prompts) | set(common.prompts) < set(everything.prompts)
