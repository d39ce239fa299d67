"""The Bradley-Terry preference model: from at most 500 labels of a scripted labeller with a hidden preference it
ranks fresh pairs as the labeller would (>= 90%), random labels teach it nothing, and it works as the reward
`preference:PATH`."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from click.testing import CliRunner

from ddpo.cli import main
from ddpo.preference.model import PreferenceModel, PreferenceModelError, pairwise_accuracy, train_preference_model
from ddpo.preference.store import Comparison, LabelStore, png_bytes
from ddpo.rewards import RewardError, build_reward, check_reward
from ddpo.shapes.labeller import FewerObjects, PrefersColor, ScriptedLabeller, rendered_pairs
from ddpo.shapes.render import Scene, render

NUM_LABELS = 500


def label_rendered_pairs(store_path, labeller, num_pairs: int, seed: int) -> LabelStore:
    """Rendered Shapes pairs, each labelled once in the store by `labeller` from the renderer's ground truth."""
    store = LabelStore(store_path)
    store.add_labeller("scripted")
    pairs = rendered_pairs(num_pairs, seed=seed)
    ids = store.add_pairs([(p.prompt, p.image_a, p.image_b) for p in pairs], source="rendered")
    for pair_id, pair in zip(ids, pairs):
        store.record("scripted", pair_id, labeller(pair))
    return store


def fresh_comparisons(labeller, num_pairs: int, seed: int) -> list[Comparison]:
    pairs = rendered_pairs(num_pairs, seed=seed)
    return [Comparison(str(i), p.prompt, png_bytes(p.image_a), png_bytes(p.image_b), labeller(p), "scripted") for i, p in enumerate(pairs)]


@pytest.mark.parametrize("preference", [FewerObjects(), PrefersColor("red")], ids=["fewer-objects", "prefers-red"])
def test_500_labels_teach_the_hidden_preference(tmp_path, preference):
    labeller = ScriptedLabeller(preference)
    choose = lambda pair: labeller.choose_scenes(pair.scene_a, pair.scene_b)  # noqa: E731
    store = label_rendered_pairs(tmp_path / "labels.db", choose, NUM_LABELS, seed=1)
    model_path = tmp_path / "preference.safetensors"
    result = CliRunner().invoke(main, ["preference", "train", str(store.path), "--out", str(model_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["comparisons"] <= NUM_LABELS and report["train_comparisons"] + report["heldout_comparisons"] == report["comparisons"]
    assert report["reward"] == f"preference:{model_path}"
    assert report["heldout_decided"] > 0 and report["heldout_accuracy"] >= 0.9, report

    # Fresh pairs from other seeds, never labelled: the model ranks them as the labeller does.
    accuracy, decided = pairwise_accuracy(PreferenceModel(model_path), fresh_comparisons(choose, 1000, seed=99))
    print(f"{preference.name}: held-out {report['heldout_accuracy']:.3f} of {report['heldout_decided']}, fresh {accuracy:.3f} of {decided}")
    assert decided > 100 and accuracy >= 0.9  # ties (neither or both red) are undecided: 120 of 1,000 for prefers-red


def test_random_labels_give_chance_accuracy(tmp_path):
    """The accuracy is not an artefact of the split or the features: labels that follow no preference."""
    coin = random.Random(0)
    store = label_rendered_pairs(tmp_path / "labels.db", lambda pair: coin.choice(["1", "2"]), 300, seed=2)
    _, _, report = train_preference_model(store.comparisons(), heldout_fraction=0.3)
    assert report.heldout_decided == 90 and 0.3 < report.heldout_accuracy < 0.7, report


def test_the_preference_reward_scores_what_the_labeller_prefers(tmp_path):
    labeller = ScriptedLabeller(FewerObjects())
    store = label_rendered_pairs(tmp_path / "labels.db", lambda p: labeller.choose_scenes(p.scene_a, p.scene_b), 200, seed=4)
    model, _, report = train_preference_model(store.comparisons())
    from ddpo.preference.model import save_preference_model

    path = save_preference_model(model, report, tmp_path / "model.safetensors")
    reward = build_reward(f"preference:{path}")
    assert reward.name == f"preference:{path}"
    rng = random.Random(0)
    one = [render(Scene(1, "blue", "square"), rng) for _ in range(20)]
    three = [render(Scene(3, "blue", "square"), rng) for _ in range(20)]
    scores = reward(one + three, ["blue squares"] * 40, [{}] * 40).scores
    assert scores.dtype == np.float32 and scores.shape == (40,)
    assert scores[:20].mean() > scores[20:].mean() and np.mean(scores[:20, None] > scores[None, 20:]) > 0.9


def test_clip_features_train_save_and_score(tmp_path):
    """Real models use a CLIP checkpoint's embeddings: the whole path on a tiny random CLIP."""
    from ddpo.preference.model import save_preference_model
    from ddpo.rewards.tiny import save_tiny_clip

    clip_dir = save_tiny_clip(tmp_path / "clip")
    comparisons = fresh_comparisons(lambda p: "1" if p.scene_a.count < p.scene_b.count else "2", 40, seed=0)
    model, extractor, report = train_preference_model(comparisons, f"clip:{clip_dir}", steps=20)
    assert report.features == f"clip:{clip_dir}" and report.comparisons == 40
    path = save_preference_model(model, report, tmp_path / "clip-preference.safetensors")
    pairs = rendered_pairs(3, seed=1)
    scores = build_reward(f"preference:{path}")([p.image_a for p in pairs], ["red circles", "a cat", "two"], [{}] * 3).scores
    assert scores.shape == (3,) and np.isfinite(scores).all()


def test_bad_input_is_one_clear_message(tmp_path):
    with pytest.raises(ValueError, match="needs a path after 'preference:'"):
        check_reward("preference:", {})
    with pytest.raises(FileNotFoundError, match="preference model .*missing.safetensors not found"):
        build_reward(f"preference:{tmp_path / 'missing.safetensors'}")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(RewardError, match="reward preference:.*junk.safetensors: .*is not a safetensors file"):
        build_reward(f"preference:{tmp_path / 'junk.safetensors'}")
    with pytest.raises(PreferenceModelError, match="at least 10 labelled comparisons"):
        train_preference_model(fresh_comparisons(lambda p: "skip", 30, seed=0))

    store = LabelStore(tmp_path / "few.db")
    result = CliRunner().invoke(main, ["preference", "train", str(store.path), "--out", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 2 and result.output.strip() == "ddpo: error: a preference model needs at least 10 labelled comparisons (1, 2 or tie); got 0"
    labelled = label_rendered_pairs(tmp_path / "labelled.db", lambda pair: "1", 20, seed=0)
    result = CliRunner().invoke(main, ["preference", "train", str(labelled.path), "--out", str(tmp_path / "m.safetensors"), "--features", "vgg"])
    assert result.exit_code == 2 and "unknown preference features 'vgg'" in result.output
