"""BERTScore against the reference implementation, the `bert-score` package, on the bundled MiniLM encoder."""

import numpy as np
import pytest

from ddpo.rewards.bertscore import BERTScorer, minilm_path

bert_score = pytest.importorskip("bert_score", reason="the bert-score package is the reference (pip install --no-deps bert-score)")

CANDIDATES = [
    "a cat sitting on a red sofa", "two dogs playing in the snow", "an old man reading a newspaper",
    "a bowl of fruit on a wooden table", "three red circles", "a blue square on a dark background",
    "the image shows a horse riding a bike", "a monkey washing the dishes", "a lighthouse at sunset",
    "a child flying a kite on the beach", "an empty street at night", "a bicycle leaning against a wall",
    "a plate of spaghetti with tomato sauce", "a snowy mountain under a clear sky", "two green crosses",
    "a robot painting a portrait", "a squirrel eating a nut", "a crowded market with colourful stalls",
    "an astronaut on the moon", "a yellow taxi in the rain",
]
REFERENCES = [
    "The image contains a cat on a sofa", "The image contains dogs in the snow", "a man with a newspaper",
    "fruit in a bowl", "two red circles", "a blue square", "The image contains a horse riding a bike",
    "The image contains a monkey doing dishes", "a lighthouse", "a kid with a kite at the seaside",
    "a busy street in daylight", "a bike", "pasta", "a mountain covered in snow", "three magenta triangles",
    "a robot that paints", "a squirrel", "a market", "a man on the moon", "a taxi",
]
MINILM_LAYERS = 6


def reference_scores(**kwargs) -> np.ndarray:
    scorer = bert_score.BERTScorer(model_type=str(minilm_path()), num_layers=MINILM_LAYERS, lang="en", nthreads=0, **kwargs)
    return np.stack([values.numpy() for values in scorer.score(CANDIDATES, REFERENCES, batch_size=7)])


def ours(**kwargs) -> np.ndarray:
    return np.stack(BERTScorer(minilm_path(), match_special_tokens=True, batch_size=7, **kwargs).score(CANDIDATES, REFERENCES))


def test_equals_bert_score_on_20_pairs():
    expected = reference_scores()
    assert len(set(np.round(expected[1], 3))) > 10  # the pairs are not all alike
    np.testing.assert_allclose(ours(), expected, atol=1e-4, rtol=0)


def test_equals_bert_score_with_idf_weighting_on_20_pairs():
    scorer = BERTScorer(minilm_path(), match_special_tokens=True)
    expected = reference_scores(idf=True, idf_sents=REFERENCES)
    got = ours(idf=scorer.compute_idf(REFERENCES))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert np.abs(got - ours()).max() > 1e-3  # the weighting matters on these pairs


def test_equals_bert_score_with_baseline_rescaling_on_20_pairs(tmp_path):
    baseline = (0.31, 0.27, 0.29)
    table = tmp_path / "baseline.tsv"  # bert-score reads row `num_layers` of a LAYER,P,R,F table
    table.write_text("LAYER,P,R,F\n" + "".join(f"{layer},{baseline[0]},{baseline[1]},{baseline[2]}\n" for layer in range(MINILM_LAYERS + 1)))
    expected = reference_scores(rescale_with_baseline=True, baseline_path=str(table))
    np.testing.assert_allclose(ours(baseline=baseline), expected, atol=1e-4, rtol=0)


def test_the_default_drops_special_tokens_and_so_differs_from_bert_score():
    plain = np.stack(BERTScorer(minilm_path()).score(CANDIDATES, REFERENCES))
    assert np.abs(plain - reference_scores()).max() > 1e-3
