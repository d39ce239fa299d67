"""`ddpo eval`: base vs checkpoints on fixed prompts x fixed seeds, trained vs held-out prompts, deterministic."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers import cli_args

from ddpo.cli import main


def run_cli(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def trained_run(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-runs") / "run"
    overrides = {"train.lr": 1e-2, "sample.num_steps": 4, "prompts.eval_prompts": '["a cat", "a dog"]'}
    result = run_cli(cli_args(tiny_pipeline_dir, out, **overrides))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def heldout_file(tmp_path):
    path = tmp_path / "heldout.txt"
    path.write_text("a cat\nan otter riding a bike\na horse playing chess\n")
    return path


def test_eval_splits_trained_and_heldout_prompts_and_repeats_exactly(trained_run, heldout_file, tmp_path):
    first = run_cli(["eval", str(trained_run), "--prompts", str(heldout_file), "--seeds", "2"])
    assert first.exit_code == 0, first.output
    report = json.loads(first.output)
    assert json.loads((trained_run / "eval.json").read_text()) == report  # printed and written
    assert report["prompts"] == {"trained": ["a cat", "a dog"], "heldout": ["an otter riding a bike", "a horse playing chess"]}
    assert report["rewards"] == ["jpeg_compressibility"]
    assert set(report["models"]) == {"base", "epoch-0002"}
    for result in report["models"].values():
        assert set(result["groups"]) == {"all", "trained", "heldout"}
        assert result["groups"]["heldout"]["num_samples"] == 4 and result["groups"]["trained"]["num_prompts"] == 2
        assert result["per_prompt"]["an otter riding a bike"]["group"] == "heldout"
    base, tuned = report["models"]["base"]["groups"], report["models"]["epoch-0002"]["groups"]
    assert base["trained"]["jpeg_compressibility"] != tuned["trained"]["jpeg_compressibility"]  # the LoRA is applied
    gain = report["gain_over_base"]["epoch-0002"]["heldout"]["jpeg_compressibility"]
    assert gain == pytest.approx(tuned["heldout"]["jpeg_compressibility"] - base["heldout"]["jpeg_compressibility"], abs=1e-5)

    again = run_cli(["eval", str(trained_run), "--prompts", str(heldout_file), "--seeds", "2", "--out", str(tmp_path / "again.json")])
    assert json.loads(again.output)["models"] == report["models"]  # the same numbers for the same seeds


def test_eval_scores_with_any_set_of_rewards(trained_run, tmp_path):
    result = run_cli(["eval", str(trained_run / "checkpoints" / "epoch-0001"), "--seeds", "1", "--no-base",
                      "--reward", "jpeg_compressibility", "--reward", "jpeg_incompressibility"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert list(report["models"]) == ["epoch-0001"]
    assert (trained_run / "checkpoints" / "epoch-0001" / "eval.json").is_file()
    # Two independent scorers of the same images: incompressibility is minus compressibility, image by image.
    for scores in report["models"]["epoch-0001"]["per_prompt"].values():
        assert scores["jpeg_incompressibility"] == pytest.approx(-scores["jpeg_compressibility"], abs=1e-5)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--checkpoint", "7"], "no checkpoint of epoch 7 (have 1, 2)"),
        (["--checkpoint", "best"], "no best.json"),
        (["--prompts", "missing.txt"], "--prompts: prompt file 'missing.txt' does not exist"),
        (["--reward", "jpeg_compresibility"], "did you mean 'jpeg_compressibility'"),
    ],
)
def test_eval_bad_input_is_one_line(trained_run, args, fragment):
    result = CliRunner().invoke(main, ["eval", str(trained_run), *args])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1].startswith("ddpo: error: ") and fragment in result.stderr


def test_eval_of_a_directory_that_is_not_a_run(tmp_path):
    result = CliRunner().invoke(main, ["eval", str(tmp_path)])
    assert result.exit_code == 2 and "not a run directory nor a checkpoint inside one" in result.stderr


@pytest.mark.slow
def test_eval_on_a_shapes_run_reports_the_judge_on_trained_and_heldout_prompts(tmp_path):
    out = tmp_path / "shapes"
    small = ["sample.batch_size=4", "sample.num_batches_per_epoch=1", "sample.samples_per_prompt=4", "train.batch_size=4", "train.epochs=1",
             "sample.num_steps=10", "log.num_eval_seeds=1", "log.eval_every=0"]  # fmt: skip
    result = run_cli(["train", "--out", str(out), "--no-progress", *[a for o in small for a in ("--set", o)]])
    assert result.exit_code == 0, result.output
    outputs = [run_cli(["eval", str(out), "--seeds", "1", "--out", str(tmp_path / f"eval-{i}.json")]) for i in range(2)]
    assert all(o.exit_code == 0 for o in outputs), outputs[0].output
    first, second = (json.loads(o.output) for o in outputs)
    assert first["models"] == second["models"]
    assert first["rewards"] == ["shapes_alignment_soft", "shapes_judge"]  # the training reward, then the judge
    assert (len(first["prompts"]["trained"]), len(first["prompts"]["heldout"])) == (9, 6)
    for model in ("base", "epoch-0001"):
        groups = first["models"][model]["groups"]
        assert 0.0 <= groups["heldout"]["shapes_judge"] <= 1.0 and 0.0 <= groups["trained"]["shapes_judge"] <= 1.0
