"""Rewards: the paper's JPEG rewards, references, weighted sums, and errors that name reward and prompt."""

import io

import numpy as np
import pytest
from PIL import Image

from ddpo.config import RewardConfig
from ddpo.rewards import (
    RewardError,
    RewardOutput,
    build_reward,
    build_reward_from_config,
    checked_reward,
    score,
)


def flat_image(colour=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (64, 64), colour)


def noise_image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def constant_reward(images, prompts, metadata):
    """A reward defined outside the package, referenced as "module:function"."""
    return [1.0] * len(images)


def nan_reward(images, prompts, metadata):
    """A broken reward: NaN for every image."""
    return RewardOutput(np.full(len(images), np.nan))


def test_flat_colour_is_more_compressible_than_noise():
    scores = build_reward("jpeg_compressibility")([flat_image(), noise_image()], ["a", "b"], [{}, {}]).scores
    assert scores.dtype == np.float32 and scores.shape == (2,)
    assert scores[0] > scores[1]


def test_incompressibility_is_minus_compressibility():
    images = [flat_image(), noise_image(1), noise_image(2)]
    args = (images, ["a"] * 3, [{}] * 3)
    compressibility = build_reward("jpeg_compressibility")(*args).scores
    np.testing.assert_array_equal(build_reward("jpeg_incompressibility")(*args).scores, -compressibility)


def test_value_is_jpeg_size_in_kilobytes_at_quality_95():
    image = noise_image(3)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    expected = len(buffer.getvalue()) / 1000
    size = build_reward("jpeg_incompressibility")([image], ["a"], [{}]).scores[0]
    assert size == pytest.approx(expected, rel=1e-6)


def test_module_function_reference():
    reward = build_reward(f"{__name__}:constant_reward")
    output = reward([flat_image()] * 2, ["a", "b"], [{}, {}])
    np.testing.assert_array_equal(output.scores, np.ones(2, dtype=np.float32))
    assert output.scores.dtype == np.float32  # a list became a float32 array


def test_bad_references_name_the_reference():
    with pytest.raises(ValueError, match="cannot import module 'no_such_module' of reward 'no_such_module:f'"):
        build_reward("no_such_module:f")
    with pytest.raises(ValueError, match=f"has no attribute 'missing' \\(reward '{__name__}:missing'\\)"):
        build_reward(f"{__name__}:missing")
    with pytest.raises(ValueError, match="did you mean 'jpeg_compressibility'"):
        build_reward("jpeg_compressability")


def test_weighted_terms_sum_and_log_each_term():
    reference = f"{__name__}:constant_reward"
    config = RewardConfig(
        terms=[{"name": "jpeg_incompressibility", "weight": 2.0}, {"name": reference, "weight": -0.5}]
    )
    images = [flat_image(), noise_image()]
    output = build_reward_from_config(config)(images, ["a", "b"], [{}, {}])
    size = build_reward("jpeg_incompressibility")(images, ["a", "b"], [{}, {}]).scores
    np.testing.assert_allclose(output.scores, 2.0 * size - 0.5, rtol=1e-6)
    np.testing.assert_array_equal(output.info["jpeg_incompressibility"], size)
    np.testing.assert_array_equal(output.info[reference], np.ones(2, dtype=np.float32))


def test_a_failing_term_is_named_by_itself():
    broken = f"{__name__}:nan_reward"
    config = RewardConfig(terms=[{"name": "jpeg_compressibility", "weight": 1.0}, {"name": broken, "weight": 1.0}])
    with pytest.raises(RewardError) as error:  # not re-wrapped by the sum
        build_reward_from_config(config)([flat_image()], ["a cat"], [{}])
    assert str(error.value) == f"reward '{broken}' returned a non-finite score (nan) for prompt 'a cat'"


def test_single_reward_from_config_gets_its_kwargs():
    image = noise_image(4)
    low = build_reward_from_config(RewardConfig(name="jpeg_incompressibility", kwargs={"quality": 10}))
    high = build_reward_from_config(RewardConfig(name="jpeg_incompressibility"))
    assert low([image], ["a"], [{}]).scores[0] < high([image], ["a"], [{}]).scores[0]


def test_raising_reward_names_reward_and_first_prompt():
    def broken(images, prompts, metadata):
        raise ValueError("model not loaded")

    with pytest.raises(RewardError, match="^reward 'x' raised ValueError: model not loaded on prompt 'a cat'$"):
        score(broken, "x", [flat_image()] * 2, ["a cat", "a dog"], [{}, {}])


def test_wrong_number_of_scores():
    with pytest.raises(RewardError, match="^reward 'x' returned 3 scores for 4 images$"):
        score(lambda *_: RewardOutput(np.zeros(3)), "x", [flat_image()] * 4, ["a"] * 4, [{}] * 4)


def test_non_finite_score_names_the_prompt():
    def half_nan(images, prompts, metadata):
        return RewardOutput(np.array([1.0, np.nan]), {})

    with pytest.raises(RewardError, match=r"^reward 'x' returned a non-finite score \(nan\) for prompt 'a dog'$"):
        score(half_nan, "x", [flat_image()] * 2, ["a cat", "a dog"], [{}, {}])


def test_checked_reward_reports_under_its_name():
    reward = checked_reward("mine", lambda images, prompts, metadata: [float("inf")] * len(images))
    with pytest.raises(RewardError, match=r"^reward 'mine' returned a non-finite score \(inf\) for prompt 'a cat'"):
        reward([flat_image()], ["a cat"], [{}])
