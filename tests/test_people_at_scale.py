"""People in the loop at scale: ties (Davidson, Rao-Kupper) and the Laplace uncertainty as hand-checked math,
active pair selection, person-like scripted labellers, per-labeller agreement and the flag in `ddpo label
status`, and the queue order a pair selection writes into the store."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ddpo.cli import main
from ddpo.preference.agreement import labeller_agreement, wilson_interval
from ddpo.preference.bradley_terry import (
    davidson_log_probabilities,
    davidson_nll,
    greedy_most_uncertain,
    laplace_covariance,
    margin_variance,
    outcome_index,
    rao_kupper_probabilities,
)
from ddpo.preference.model import BradleyTerryModel, margin_jacobian
from ddpo.preference.store import Label, LabelStore
from ddpo.shapes.labeller import ByPromptColour, FewerObjects, PersonLikeLabeller, rendered_pairs
from ddpo.shapes.render import Scene


def test_davidson_probabilities_by_hand():
    # d = 0, nu = 1: pi_a = pi_b = 1, each outcome 1 / (1 + 1 + 1).
    assert torch.allclose(davidson_log_probabilities(torch.tensor([0.0]), 0.0).exp(), torch.full((1, 3), 1 / 3))
    # pi_a = 4, pi_b = 1 (d = ln 4), nu = 1/2: denominators 4 + 1 + 0.5 * 2 = 6 -> 4/6, 1/6, 1/6.
    p = davidson_log_probabilities(torch.tensor([math.log(4.0)]), math.log(0.5)).exp()
    assert torch.allclose(p, torch.tensor([[4 / 6, 1 / 6, 1 / 6]]), atol=1e-6)
    # nu -> 0 is Bradley-Terry: P(a) = sigmoid(d).
    d = torch.tensor([-1.3, 0.2, 2.0])
    assert torch.allclose(davidson_log_probabilities(d, -30.0).exp()[:, 0], torch.sigmoid(d), atol=1e-6)
    # The likelihood of outcomes "1", "tie" at d = ln 4, nu = 1/2: -(ln 4/6 + ln 1/6) / 2.
    nll = davidson_nll(torch.tensor([math.log(4.0)] * 2), outcome_index(["1", "tie"]), math.log(0.5))
    assert math.isclose(float(nll), -(math.log(4 / 6) + math.log(1 / 6)) / 2, rel_tol=1e-6)


def test_rao_kupper_probabilities_by_hand():
    # theta = 3, d = 0: P(a) = 1 / (1 + 3), P(b) the same, a tie the remaining half.
    assert torch.allclose(rao_kupper_probabilities(torch.tensor([0.0]), math.log(3.0)), torch.tensor([[0.25, 0.25, 0.5]]))
    # pi_a = 3, pi_b = 1, theta = 2: P(a) = 3 / (3 + 2) = 0.6, P(b) = 1 / (1 + 6) = 1/7.
    p = rao_kupper_probabilities(torch.tensor([math.log(3.0)]), math.log(2.0))
    assert torch.allclose(p, torch.tensor([[0.6, 1 / 7, 1 - 0.6 - 1 / 7]]), atol=1e-6)
    with pytest.raises(ValueError, match="theta >= 1"):
        rao_kupper_probabilities(torch.tensor([0.0]), -0.1)


def test_fitting_davidson_recovers_the_tie_rate():
    """Equal-strength items tied a third of the time: nu / (2 + nu) = 1/3 -> nu = 1, log nu = 0."""
    from ddpo.preference.model import _Data, fit

    n = 300
    features = torch.zeros(n, 4)
    choices = torch.tensor([1.0, 0.0, 0.5] * (n // 3))
    model = BradleyTerryModel(4, 2, rank=1)
    log_nu = fit(model, _Data(features, features, torch.zeros(n, 2), choices), steps=300, lr=5e-2, l2=1e-3, ties="davidson")
    assert abs(log_nu) < 0.05


def test_laplace_covariance_and_greedy_selection_by_hand():
    # One parameter, two training pairs with j = 1 and 2, curvature 0.25 each, prior precision 1:
    # precision = 0.25 * (1 + 4) + 1 = 2.25 -> variance 1 / 2.25; a candidate with j = 3 has Var[d] = 9 / 2.25 = 4.
    covariance = laplace_covariance(torch.tensor([[1.0], [2.0]]), torch.tensor([0.25, 0.25]), 1.0)
    assert torch.allclose(covariance, torch.tensor([[1 / 2.25]]))
    assert torch.allclose(margin_variance(torch.tensor([[3.0]]), covariance), torch.tensor([4.0]))
    # Two directions: a candidate along x1 (j = (2, 0)), one along x2 (j = (0, 1.5)) and a near-copy of the first.
    # Greedy takes the largest variance (x1, 4), and then x2 (2.25) rather than the copy, whose variance the first
    # answer has shrunk: 4 - c 16 / (1 + 4c) = 4 - 4 / 2 = 2 for c = 0.25 ... the copy has 3.61 * (1 - ...) < 2.25.
    candidates = torch.tensor([[2.0, 0.0], [0.0, 1.5], [1.9, 0.0]])
    picked = greedy_most_uncertain(candidates, torch.eye(2), torch.full((3,), 0.25), 2)
    assert picked == [0, 1]
    # Without the update it would have asked the copy second (3.61 > 2.25): the greedy update is what diversifies.
    assert margin_variance(candidates, torch.eye(2)).argsort(descending=True).tolist()[:2] == [0, 2]
    # After asking j = (2, 0) with c = 1/4: the copy's variance is 3.61 - 0.25 * (2 * 1.9)^2 / (1 + 0.25 * 4) = 1.805.
    sigma = torch.eye(2) - 0.25 * torch.outer(torch.tensor([2.0, 0]), torch.tensor([2.0, 0])) / 2
    assert math.isclose(float(margin_variance(candidates[2:], sigma)), 1.805, rel_tol=1e-6)


def test_margin_jacobian_matches_autograd():
    torch.manual_seed(0)
    model = BradleyTerryModel(5, 3, rank=2)
    model.image_std.copy_(torch.rand(5) + 0.5)
    image_a, image_b, prompt = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 3)
    jacobian = margin_jacobian(model, image_a, image_b, prompt)
    for row in range(4):
        model.zero_grad()
        (model(image_a[row : row + 1], prompt[row : row + 1]) - model(image_b[row : row + 1], prompt[row : row + 1])).sum().backward()
        expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert torch.allclose(jacobian[row], expected, atol=1e-6)


def test_person_like_labeller_flips_ties_and_coins():
    pairs = [(Scene(1, "red", "circle"), Scene(3, "red", "circle"))] * 2000
    careful = PersonLikeLabeller(FewerObjects(), flip_rate=0.15, seed=0)
    answers = [careful.choose_scenes(a, b) for a, b in pairs]
    assert 0.13 < answers.count("2") / len(answers) < 0.17  # the flipped share
    assert careful.choose_scenes(Scene(2, "red", "circle"), Scene(2, "blue", "cross")) == "tie"  # same count
    coin = PersonLikeLabeller(FewerObjects(), answers_at_random=True, seed=1)
    assert 0.45 < [coin.choose_scenes(a, b) for a, b in pairs].count("1") / len(pairs) < 0.55
    # The prompt-dependent taste: fewer objects when a warm colour is asked for, more otherwise.
    taste = PersonLikeLabeller(ByPromptColour())
    assert taste.choose_scenes(Scene(1, "red", "circle"), Scene(3, "red", "circle"), "red circles") == "1"
    assert taste.choose_scenes(Scene(1, "blue", "circle"), Scene(3, "blue", "circle"), "blue circles") == "2"
    slow = PersonLikeLabeller(FewerObjects(), response_seconds=2.0)
    assert all(1.0 <= slow.response_time() <= 3.0 for _ in range(50))
    with pytest.raises(ValueError, match="flip_rate must be in"):
        PersonLikeLabeller(FewerObjects(), flip_rate=0.7)


def test_wilson_interval_by_hand():
    # 8 of 10 at z = 1.96: centre 0.8 + 3.8416 / 20 = 0.99208, half-width 1.96 sqrt(0.016 + 3.8416 / 400) = 0.31362,
    # denominator 1 + 3.8416 / 10 = 1.38416 -> (0.49016, 0.94331): 8 of 10 is not yet clearly better than a coin.
    low, high = wilson_interval(8, 10)
    assert math.isclose(low, 0.49016, abs_tol=1e-4) and math.isclose(high, 0.94331, abs_tol=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def three_labellers(num_pairs: int = 300, seed: int = 0) -> list[Label]:
    """Two careful labellers (15% flips, ties on equal counts) and one who answers at random, on the same pairs."""
    pairs = rendered_pairs(num_pairs, seed=seed)
    labellers = {
        "ann": PersonLikeLabeller(FewerObjects(), flip_rate=0.15, seed=seed + 1),
        "bob": PersonLikeLabeller(FewerObjects(), flip_rate=0.15, seed=seed + 2),
        "coin": PersonLikeLabeller(FewerObjects(), answers_at_random=True, seed=seed + 3),
    }
    return [Label(f"{name}-{i}", f"pair-{i}", name, labeller.choose_scenes(p.scene_a, p.scene_b), float(i), "a", "b") for i, p in enumerate(pairs) for name, labeller in labellers.items()]


def test_agreement_flags_the_labeller_who_answers_at_random():
    labels = three_labellers()
    truth = {f"pair-{i}": float(p.scene_b.count - p.scene_a.count) for i, p in enumerate(rendered_pairs(300, seed=0))}  # fewer is better
    agreement = {a.labeller: a for a in labeller_agreement(labels, truth)}
    print({name: a.as_dict() for name, a in agreement.items()})
    assert [name for name, a in agreement.items() if a.at_chance] == ["coin"]
    # Careful labellers: 15% flips each -> with the other careful one 0.85^2 + 0.15^2 = 0.745 (the coin splits the
    # vote otherwise); with the truth 0.85. The coin: 1/2 with both.
    assert 0.65 < agreement["ann"].majority_agreement < 0.85 and 0.78 < agreement["ann"].model_agreement < 0.92
    assert 0.38 < agreement["coin"].majority_agreement < 0.62 and 0.38 < agreement["coin"].model_agreement < 0.62
    assert agreement["ann"].tie_share > 0.2 and agreement["coin"].tie_share == 0.0
    # Too few answers compared: nobody is flagged.
    assert not any(a.at_chance for a in labeller_agreement(labels[:30]))


def test_label_status_flags_a_chance_level_labeller(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    pairs = rendered_pairs(150, seed=3)
    ids = store.add_pairs([(p.prompt, p.image_a, p.image_b) for p in pairs], source="rendered")
    labellers = {"ann": PersonLikeLabeller(FewerObjects(), flip_rate=0.15, seed=1), "bob": PersonLikeLabeller(FewerObjects(), flip_rate=0.15, seed=2), "coin": PersonLikeLabeller(FewerObjects(), answers_at_random=True, seed=3)}
    for name, labeller in labellers.items():
        store.add_labeller(name)
        for identifier, p in zip(ids, pairs):
            store.record(name, identifier, labeller.choose_scenes(p.scene_a, p.scene_b))
    result = CliRunner().invoke(main, ["label", "status", str(store.path)])
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert status["labels_per_labeller"] == {"ann": 150, "bob": 150, "coin": 150}
    assert {entry["labeller"]: entry["at_chance"] for entry in status["labellers"]} == {"ann": False, "bob": False, "coin": True}
    assert result.stderr.count("warning") == 1 and "coin agrees with the others' majority" in result.stderr
    result = CliRunner().invoke(main, ["label", "status", str(store.path), "--model", str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 2 and result.output.strip().startswith("ddpo: error: preference model") and len(result.output.strip().splitlines()) == 1


def test_the_queue_orders_what_the_app_shows_and_keeps_random_tags(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    store.add_labeller("ann")
    pairs = rendered_pairs(5, seed=0)
    ids = store.add_pairs([(p.prompt, p.image_a, p.image_b) for p in pairs], source="rendered")
    assert store.next_pair("ann").id == ids[0]  # no queue: oldest first
    store.set_queue([(ids[3], "active"), (ids[1], "random")])
    assert store.next_pair("ann").id == ids[3]
    store.record("ann", ids[3], "1")
    assert store.next_pair("ann").id == ids[1]
    # A reselection that calls the random pair "active" keeps it random (it belongs to the unbiased sample).
    store.set_queue([(ids[4], "active"), (ids[1], "active")])
    assert store.next_pair("ann").id == ids[4] and store.selections() == {ids[3]: "active", ids[1]: "random", ids[4]: "active"}
    # Training's pairs (priority) still come first.
    online = store.add_pairs([(pairs[0].prompt, pairs[1].image_a, pairs[0].image_b)], source="online", priority=1)
    assert store.next_pair("ann").id == online[0]
    assert [p.id for p in store.unlabelled_pairs()] == [ids[0], ids[1], ids[2], ids[4], online[0]]
    from ddpo.preference.store import LabelStoreError

    with pytest.raises(LabelStoreError, match="no pair 'nope'"):
        store.set_queue([("nope", "active")])


def test_people_and_model_never_waits_refits_in_the_background_and_prefers_people(tmp_path):
    from ddpo.rewards import RewardError, build_reward

    store_path = tmp_path / "labels.db"
    reward = build_reward("people_and_model", store=str(store_path), refit_seconds=0.2, min_labels=10)
    batch = [p for p in rendered_pairs(40, seed=7) if p.scene_a.count != p.scene_b.count][:8]
    images = [image for p in batch for image in (p.image_a, p.image_b)]
    prompts = [p.prompt for p in batch for _ in range(2)]
    started = time.monotonic()
    output = reward(images, prompts, [{}] * len(images))
    assert time.monotonic() - started < 5  # nobody labels, and it does not wait for them
    assert output.scores.tolist() == [0.0] * len(images)  # no labels yet: no model, no preference
    assert output.info["people_share"].sum() == 0 and output.info["model_refits"] == 0
    store = LabelStore(store_path)
    assert [p.priority for p in store.unlabelled_pairs()] == [1] * len(batch)  # queued ahead of everything else

    # A labeller who prefers fewer objects labels 60 other pairs; the background thread refits on them.
    store.add_labeller("ann")
    labeller = PersonLikeLabeller(FewerObjects(), seed=0)
    others = rendered_pairs(60, seed=8)
    for identifier, pair in zip(store.add_pairs([(p.prompt, p.image_a, p.image_b) for p in others], source="rendered"), others):
        store.record("ann", identifier, labeller.choose_scenes(pair.scene_a, pair.scene_b))
    deadline = time.monotonic() + 60
    while reward.reward.model_labels < 60:  # the PeopleAndModel inside the checked reward
        assert time.monotonic() < deadline, "the preference model was not refitted in the background"
        time.sleep(0.1)
    # People's choice replaces the model's where it exists: ann answers against her taste on the first pair.
    first = store.unlabelled_pairs()[0]
    store.record("ann", first.id, "2" if batch[0].scene_a.count < batch[0].scene_b.count else "1")
    output = reward(images, prompts, [{}] * len(images))
    dr = output.scores[0::2]
    wanted = np.array([1.0 if p.scene_a.count < p.scene_b.count else -1.0 for p in batch])
    assert dr[0] == -wanted[0] and output.info["people_share"].tolist() == [1.0, 1.0] + [0.0] * (len(images) - 2)
    assert np.mean(dr[1:] == wanted[1:]) >= 6 / 7  # the refitted model's choices follow ann's taste
    assert output.info["model_labels"] >= 60 and output.info["model_refits"] >= 1 and output.info["labels_new"] >= 1
    reward.reward.close()

    with pytest.raises(RewardError, match="people_weight 2 must be in"):
        build_reward("people_and_model", store=str(store_path), people_weight=2)
    with pytest.raises(RewardError, match="ask 'all' is not one of fdfo, cross"):
        build_reward("people_and_model", store=str(store_path), ask="all")


def test_label_select_queues_uncertain_pairs_and_keeps_a_random_share(tmp_path):
    """`ddpo label select`: with too few labels it queues at random and says so; with labels, the queue it writes
    is what the app shows next, a share of it tagged random, and `preference train --heldout-random-only` holds
    out only those."""
    store = LabelStore(tmp_path / "labels.db")
    store.add_labeller("ann")
    pool = rendered_pairs(80, seed=11)
    ids = store.add_pairs([(p.prompt, p.image_a, p.image_b) for p in pool], source="rendered")
    runner = CliRunner()
    result = runner.invoke(main, ["label", "select", str(store.path), "--count", "10"])
    assert result.exit_code == 0, result.output
    reply = json.loads(result.output)
    assert reply["strategy"] == "random" and reply["queued"] == 10 and "fewer than 10 labels" in reply["note"]

    labeller = PersonLikeLabeller(FewerObjects(), seed=0)
    for identifier, pair in list(zip(ids, pool))[:30]:
        store.record("ann", identifier, labeller.choose_scenes(pair.scene_a, pair.scene_b))
    result = runner.invoke(main, ["label", "select", str(store.path), "--count", "20", "--random-share", "0.25", "--strategy", "bald"])
    assert result.exit_code == 0, result.output
    reply = json.loads(result.output)
    assert reply["strategy"] == "bald" and reply["queued"] == 20 and reply["unlabelled"] == 50 and reply["active"] + reply["random"] == 20 and reply["active"] >= 10
    selections = store.selections()
    shown = store.next_pair("ann")
    assert shown.id in selections and shown.id not in ids[:30]
    by_id = dict(zip(ids, pool))

    # Label the random ones too; held-out pairs then come only from them.
    for identifier in [i for i, s in selections.items() if s == "random"]:
        store.record("ann", identifier, labeller.choose_scenes(by_id[identifier].scene_a, by_id[identifier].scene_b))
    result = runner.invoke(main, ["preference", "train", str(store.path), "--out", str(tmp_path / "m.safetensors"), "--heldout-random-only", "--heldout", "0.5", "--ties", "davidson"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    random_labelled = sum(1 for s in store.selections().values() if s == "random")
    assert report["heldout_comparisons"] == round(0.5 * random_labelled) and report["ties"] == "davidson" and report["tie_log_nu"] is not None

    for args, message in [
        (["label", "select", str(tmp_path / "missing.db")], "no label store at"),
        (["label", "select", str(store.path), "--count", "0"], "count must be at least 1"),
        (["label", "select", str(store.path), "--strategy", "smart"], "pair selection 'smart' is not one of random, uncertainty, bald"),
        (["label", "serve", str(store.path), "--select", "smart"], "--select 'smart' is not one of"),
        (["preference", "train", str(store.path), "--out", str(tmp_path / "x.safetensors"), "--ties", "maybe"], "ties 'maybe' is not one of half, davidson"),
    ]:
        result = runner.invoke(main, args)
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1 and result.output.startswith("ddpo: error: ") and message in result.output, result.output


def test_people_and_model_asks_across_noise_with_ask_cross(tmp_path):
    """ask = "cross": the second batch's questions pit a new sample against the last earlier one of its prompt,
    and an answer to such a question is never taken as the FDFO pair's reward."""
    from ddpo.preference.store import image_hash, png_bytes
    from ddpo.rewards import build_reward

    store_path = tmp_path / "labels.db"
    reward = build_reward("people_and_model", store=str(store_path), ask="cross", refit_seconds=600)
    first, second = rendered_pairs(2, seed=1), rendered_pairs(2, seed=2)
    prompts = ["red circles"] * 2 + ["blue squares"] * 2
    reward([first[0].image_a, first[0].image_b, first[1].image_a, first[1].image_b], prompts, [{}] * 4)
    store = LabelStore(store_path)
    assert store.num_pairs() == 2  # prompts not seen before: the FDFO pairs themselves
    new_images = [second[0].image_a, second[0].image_b, second[1].image_a, second[1].image_b]
    store.add_labeller("ann")
    output = reward(new_images, prompts, [{}] * 4)
    cross = [p for p in store.unlabelled_pairs() if p.priority == 1]
    assert len(cross) == 2 and {p.image_b for p in cross} == {image_hash(png_bytes(first[0].image_b)), image_hash(png_bytes(first[1].image_b))}
    for pair in cross:
        store.record("ann", pair.id, "1")
    output = reward(new_images, prompts, [{}] * 4)
    assert output.info["people_share"].sum() == 0 and output.scores.tolist() == [0.0] * 4
    reward.reward.close()


def test_the_report_shows_labels_per_epoch_latency_and_the_share_from_people(tmp_path):
    from ddpo.report import build_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('[reward]\nname = "people_and_model"\n')
    records = [{"epoch": e, "samples": 32 * e, "reward_mean": 0.0, "reward_std": 1.0, "reward_labels_new": 10.0 + e, "reward_people_share": 0.25,
                "reward_model_labels": 10.0 * e, "reward_wait_seconds": 0.02, **({"reward_label_latency_seconds": 8.0} if e > 1 else {})} for e in (1, 2, 3)]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    page = build_report(run)
    assert "People in the loop" in page and "labels per epoch" in page and "label latency" in page and "share of pairs whose reward came from people" in page
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "reward_mean": 0.0}) + "\n")
    assert "People in the loop" not in build_report(run)  # other runs: no such section


def test_serve_with_select_rechooses_the_queue_as_labels_come_in(tmp_path):
    from ddpo.cli_people import _start_reselection

    store = LabelStore(tmp_path / "labels.db")
    store.add_labeller("ann")
    pool = rendered_pairs(30, seed=5)
    ids = store.add_pairs([(p.prompt, p.image_a, p.image_b) for p in pool], source="rendered")
    stop = _start_reselection(str(store.path), "random", 3)
    try:
        deadline = time.monotonic() + 30
        while len(store.queue()) != 30:
            assert time.monotonic() < deadline, "no queue chosen at the start"
            time.sleep(0.1)
        assert store.next_pair("ann").id == store.queue()[0][0]
        for identifier in ids[:3]:
            store.record("ann", identifier, "1")
        while len(store.queue()) != 27:  # three new labels: chosen again, from the 27 unlabelled pairs
            assert time.monotonic() < deadline, "the queue was not re-chosen after 3 new labels"
            time.sleep(0.1)
        assert not {pair for pair, _ in store.queue()} & set(ids[:3])
    finally:
        stop.set()
    result = CliRunner().invoke(main, ["label", "serve", str(store.path), "--select", "bald", "--reselect-every", "0"])
    assert result.exit_code == 2 and "--reselect-every must be at least 1" in result.output
