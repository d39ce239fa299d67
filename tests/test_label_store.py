"""The label store: durable labels, undo, the order pairs are shown in, JSONL export and a merging import, and
one-line errors for bad input."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ddpo.cli import main
from ddpo.preference.store import LabelStore, LabelStoreError
from ddpo.shapes.labeller import rendered_pairs


@pytest.fixture
def store(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    pairs = rendered_pairs(6, seed=0)
    store.ids = store.add_pairs([(p.prompt, p.image_a, p.image_b) for p in pairs], source="test")
    store.token = store.add_labeller("ann")
    store.add_labeller("ben")
    yield store
    store.close()


def test_the_store_is_sqlite_in_wal_mode_and_adding_a_pair_twice_adds_it_once(store):
    assert sqlite3.connect(store.path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    pair = store.pair(store.ids[0])
    again = store.add_pairs([(pair.prompt, store.image(pair.image_a), store.image(pair.image_b))], source="again")
    assert again == [pair.id] and store.num_pairs() == 6


def test_a_label_is_committed_before_record_returns(store, tmp_path):
    """Another process sees the label at once, and a process killed right after `record` keeps it."""
    label = store.record("ann", store.ids[0], "1")
    seen = sqlite3.connect(store.path).execute("SELECT labeller, choice, image_a FROM labels WHERE id = ?", (label.id,)).fetchone()
    assert seen == ("ann", "1", store.pair(store.ids[0]).image_a)
    script = (
        "import os, signal; from ddpo.preference.store import LabelStore; "
        f"s = LabelStore({str(store.path)!r}); s.record('ben', {store.ids[1]!r}, 'tie'); os.kill(os.getpid(), signal.SIGKILL)"
    )
    assert subprocess.run([sys.executable, "-c", script]).returncode == -9
    assert [(label.labeller, label.choice) for label in LabelStore(store.path).labels()] == [("ann", "1"), ("ben", "tie")]


def test_undo_marks_the_last_label_undone_and_the_pair_comes_back(store):
    store.record("ann", store.ids[0], "1")
    store.record("ann", store.ids[1], "2")
    assert store.next_pair("ann").id == store.ids[2]
    undone = store.undo("ann")
    assert (undone.pair, undone.choice) == (store.ids[1], "2")
    assert store.next_pair("ann").id == store.ids[1]
    assert [label.pair for label in store.labels()] == [store.ids[0]]
    assert len(store.labels(include_undone=True)) == 2
    assert store.undo("ben") is None
    # Labelling a pair again replaces one's own earlier label.
    store.record("ann", store.ids[0], "tie")
    assert store.choices([store.ids[0]]) == {store.ids[0]: ["tie"]}


def test_pairs_are_shown_by_priority_then_fewest_labels_then_age(store):
    store.record("ben", store.ids[0], "1")
    assert store.next_pair("ann").id == store.ids[1]  # ids[0] already has a label from someone
    extra = rendered_pairs(1, seed=9)[0]
    urgent = store.add_pairs([("circles", extra.image_a, extra.image_b)], source="online", priority=1)
    assert store.next_pair("ann").id == urgent[0]


def test_progress_counts_labels_per_labeller(store):
    store.record("ann", store.ids[0], "1")
    store.record("ann", store.ids[1], "skip")
    store.record("ben", store.ids[0], "2")
    progress = store.progress("ann")
    assert progress["labels_per_labeller"] == {"ann": 2, "ben": 1}
    assert (progress["pairs"], progress["labelled_pairs"], progress["yours"], progress["remaining"]) == (6, 2, 2, 4)
    assert [c.choice for c in store.comparisons()] == ["1", "2"]  # skips carry no preference


def test_tokens_are_stored_hashed_and_identify_their_labeller(store):
    assert store.labeller_for_token(store.token) == "ann"
    assert store.labeller_for_token("guess") is None and store.labeller_for_token("") is None
    hashes = [row[0] for row in sqlite3.connect(store.path).execute("SELECT token_hash FROM labellers")]
    assert store.token not in hashes
    with pytest.raises(LabelStoreError, match="already exists"):
        store.add_labeller("ann")
    new = store.add_labeller("ann", replace=True)
    assert store.labeller_for_token(new) == "ann" and store.labeller_for_token(store.token) is None


def test_export_then_import_merges_without_duplicates(store, tmp_path):
    store.record("ann", store.ids[0], "1")
    store.record("ann", store.ids[1], "2")
    store.record("ben", store.ids[1], "tie")
    store.export_jsonl(tmp_path / "a.jsonl")

    other = LabelStore(tmp_path / "other.db")
    other.add_labeller("cat")
    extra = rendered_pairs(1, seed=5)[0]
    cat_pair = other.add_pairs([("circles", extra.image_a, extra.image_b)], source="cat")[0]
    other.record("cat", cat_pair, "2")
    assert other.import_jsonl(tmp_path / "a.jsonl") == {"added": 3, "already_present": 0}
    assert other.import_jsonl(tmp_path / "a.jsonl") == {"added": 0, "already_present": 3}
    assert sorted((l.labeller, l.choice) for l in other.labels()) == [("ann", "1"), ("ann", "2"), ("ben", "tie"), ("cat", "2")]
    assert other.labeller_for_token(store.token) is None  # imported labellers cannot log in with the old tokens

    # An undo made after the export reaches the merged store on the next import.
    store.undo("ben")
    store.export_jsonl(tmp_path / "b.jsonl")
    assert other.import_jsonl(tmp_path / "b.jsonl") == {"added": 0, "already_present": 3}
    assert sorted((l.labeller, l.choice) for l in other.labels()) == [("ann", "1"), ("ann", "2"), ("cat", "2")]
    # The images travel in the export: the merged store can train a preference model.
    assert {c.png_a for c in other.comparisons()} >= {c.png_a for c in store.comparisons()}


def test_import_checks_every_line_and_changes_nothing_on_error(store, tmp_path):
    store.record("ann", store.ids[0], "1")
    store.export_jsonl(tmp_path / "good.jsonl", images=False)
    record = json.loads((tmp_path / "good.jsonl").read_text())
    fresh = LabelStore(tmp_path / "fresh.db")
    with pytest.raises(LabelStoreError, match=r"good.jsonl:1: image .* neither in the file \(exported with --no-images\?\)"):
        fresh.import_jsonl(tmp_path / "good.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**record, "id": "new"}) + "\n" + json.dumps({**record, "choice": "3"}) + "\n")
    with pytest.raises(LabelStoreError, match=r"bad.jsonl:2: choice '3' is not one of 1, 2, tie, skip"):
        store.import_jsonl(bad)
    bad.write_text("{not json\n")
    with pytest.raises(LabelStoreError, match=r"bad.jsonl:1: not JSON"):
        store.import_jsonl(bad)
    assert len(store.labels(include_undone=True)) == 1


def test_bad_labels_are_refused_with_the_reason(store):
    with pytest.raises(LabelStoreError, match="choice 'left' is not one of"):
        store.record("ann", store.ids[0], "left")
    with pytest.raises(LabelStoreError, match="no pair 'nope'"):
        store.record("ann", "nope", "1")
    with pytest.raises(LabelStoreError, match="unknown labeller 'zed'"):
        store.record("zed", store.ids[0], "1")
    with pytest.raises(LabelStoreError, match="must be 1-64 characters without spaces"):
        store.add_labeller("two words")


def test_cli_label_commands_and_their_one_line_errors(store, tmp_path):
    runner = CliRunner()
    out = tmp_path / "export.jsonl"
    store.record("ann", store.ids[0], "1")
    result = runner.invoke(main, ["label", "export", str(store.path), str(out)])
    assert result.exit_code == 0 and "1 labels" in result.output and len(out.read_text().splitlines()) == 1
    result = runner.invoke(main, ["label", "import", str(tmp_path / "merged.db"), str(out)])
    assert result.exit_code == 0 and json.loads(result.output) == {"added": 1, "already_present": 0}
    result = runner.invoke(main, ["label", "status", str(store.path)])
    assert json.loads(result.output)["labels_per_labeller"] == {"ann": 1}
    result = runner.invoke(main, ["label", "add-labeller", str(tmp_path / "new.db"), "dee", "--port", "9000"])
    assert result.exit_code == 0 and result.output.startswith("http://127.0.0.1:9000/#token=")

    for args, message in [
        (["label", "export", str(tmp_path / "missing.db"), str(out)], "no label store at"),
        (["label", "serve", str(tmp_path / "missing.db")], "no label store at"),
        (["label", "import", str(store.path), str(tmp_path / "missing.jsonl")], "no file"),
        (["label", "add-pairs", str(store.path)], "exactly one of --run RUN_DIR and --file"),
        (["label", "add-pairs", str(store.path), "--run", str(tmp_path)], "has no samples/grid.json"),
        (["label", "add-labeller", str(tmp_path), "x"], "is a directory"),
    ]:
        result = runner.invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ddpo: error: ") and message in lines[0], result.output


def test_pairs_from_a_file_and_from_a_run_grid(store, tmp_path):
    from PIL import Image

    from ddpo.preference.pairs import pairs_from_run

    pair = rendered_pairs(1, seed=1)[0]
    pair.image_a.save(tmp_path / "a.png")
    pair.image_b.save(tmp_path / "b.png")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "a red circle", "image_a": "a.png", "image_b": "b.png"}) + "\n")
    result = CliRunner().invoke(main, ["label", "add-pairs", str(store.path), "--file", str(tmp_path / "pairs.jsonl")])
    assert result.exit_code == 0 and store.num_pairs() == 7

    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "samples" / "grid.json").write_text(json.dumps({"prompts": ["a cat", "a dog"], "seeds": 4, "cell_width": 8, "cell_height": 8}))
    grid = Image.new("RGB", (32, 16))
    for column in range(4):
        for row in range(2):
            grid.paste((10 * column, 100 * row, 0), (8 * column, 8 * row, 8 * column + 8, 8 * row + 8))
    grid.save(run / "samples" / "epoch-0003.png")
    pairs, metadata = pairs_from_run(run)
    assert [p[0] for p in pairs] == ["a cat", "a cat", "a dog", "a dog"]
    assert pairs[3][1].getpixel((0, 0)) == (20, 100, 0) and pairs[3][2].getpixel((0, 0)) == (30, 100, 0)
    assert metadata[3] == {"run": str(run), "grid": "epoch-0003.png", "seeds": [2, 3]}
