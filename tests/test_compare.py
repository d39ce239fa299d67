"""`ddpo compare`: two algorithms x two seeds at an equal budget on a tiny Shapes config, its page in real headless
Chromium, a killed comparison continued by the same command, and bad input refused in one line."""

from __future__ import annotations

import json
import math
import shutil
import statistics

import pytest
from browser import inspect_page, require_chromium
from click.testing import CliRunner

from ddpo.cli import main
from ddpo.compare import CompareError, mean_interval, parse_algorithms, plan_comparison, queries_to_reach, t_quantile_975
from ddpo.training.run_directory import read_jsonl

GRID_PROMPTS = ["a red circle", "a yellow cross"]
# The JPEG task on the shipped Shapes model, shrunk to seconds: 4 samples per epoch in pairs of a prompt, 4 steps,
# an evaluation every epoch of 2 trained and 2 held-out prompts (the unusual prompts have an unseen half).
TINY = [
    "sample.num_steps=4", "sample.batch_size=4", "sample.num_batches_per_epoch=1", "sample.samples_per_prompt=2",
    "train.batch_size=4", "log.eval_every=1", "log.eval_num_prompts=2", "log.num_eval_seeds=2", "log.save_every=1",
    f"log.grid_prompts={json.dumps(GRID_PROMPTS)}", "prompts.source=shapes_unusual_train",
]  # fmt: skip
ALGORITHMS, BUDGET, EPOCHS = ["ddpo_is", "rwr"], 8, 2
RUNS = [f"{algorithm}-seed{seed}" for algorithm in ALGORITHMS for seed in (0, 1)]


def compare_args(out, *, config: str = "shapes/compressibility", algorithms: str = ",".join(ALGORITHMS), budget: int = BUDGET, extra: tuple[str, ...] = ()) -> list[str]:
    args = ["compare", config, "--algorithms", algorithms, "--budget", str(budget), "--seeds", "2", "--out", str(out), "--no-progress"]
    for override in (*TINY, *extra):
        args += ["--set", override]
    return args


def without_timing(result: dict) -> dict:
    return {key: value for key, value in result.items() if key != "timing"}


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "comparison"
    result = CliRunner().invoke(main, compare_args(out), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(out / "comparison.html")
    return out


@pytest.fixture(scope="session")
def chromium():
    return require_chromium("Chromium is not installed (`make test` runs `apt-get install -y chromium`)")


# ------------------------------------------------------------------------------------------------ statistics


def test_t_quantiles_are_students():
    assert t_quantile_975(1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile_975(4) == pytest.approx(2.7764, abs=1e-4)
    assert t_quantile_975(120) == pytest.approx(1.97993, abs=1e-4)  # beyond the table: the expansion
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 200):
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4), df


def test_mean_interval_by_hand():
    # 1, 2, 3: mean 2, sample std 1, half-width t(2) x 1 / sqrt(3) = 4.3027 / 1.7321 = 2.4842.
    assert mean_interval([1.0, 2.0, 3.0]) == {"mean": 2.0, "low": pytest.approx(-0.4842, abs=1e-4), "high": pytest.approx(4.4842, abs=1e-4), "n": 3}
    assert mean_interval([0.5]) == {"mean": 0.5, "low": None, "high": None, "n": 1}  # one seed: no interval


def test_queries_to_reach_is_the_first_crossing():
    assert queries_to_reach([32, 64, 96, 128], [0.1, 0.5, 0.4, 0.9], 0.45) == 64
    assert queries_to_reach([32, 64], [0.1, 0.2], 0.45) is None


# ------------------------------------------------------------------------------------------------ end to end


def test_every_algorithm_and_seed_trains_at_the_same_budget(comparison):
    for name in RUNS:
        run = comparison / "runs" / name
        algorithm, seed = name.split("-seed")
        config = (run / "config.toml").read_text()
        assert f'algorithm = "{algorithm}"' in config and f"seed = {seed}\n" in config and f"epochs = {EPOCHS}\n" in config
        assert [r["samples"] for r in read_jsonl(run / "metrics.jsonl")] == [4, 8]
        assert [r["epoch"] for r in read_jsonl(run / "monitor.jsonl")] == [0, 1, 2]  # the base model, then each epoch
    result = json.loads((comparison / "comparison.json").read_text())
    assert (result["budget"], result["epochs"], result["samples_per_epoch"], result["seeds"]) == (BUDGET, EPOCHS, 4, 2)
    assert result["heldout_reward"] == "shapes_judge" and result["reward"] == "jpeg_compressibility"
    assert sorted(result["runs"]) == sorted(RUNS)


def test_the_numbers_are_the_runs_own_records(comparison):
    """Each figure is read back from the runs and averaged with its t-interval over the two seeds."""
    result = json.loads((comparison / "comparison.json").read_text())
    t1 = 12.7062
    for algorithm in ALGORITHMS:
        last = [read_jsonl(comparison / "runs" / f"{algorithm}-seed{seed}" / "monitor.jsonl")[-1] for seed in (0, 1)]
        for name, key in (("heldout_on_trained", "heldout_score_on_trained"), ("heldout_on_unseen", "heldout_score_on_heldout"),
                          ("eval_reward", "train_reward"), ("diversity", "diversity"), ("kl", "kl")):  # fmt: skip
            values = [record[key] for record in last]
            half = t1 * statistics.stdev(values) / math.sqrt(2)
            final = result["final"][algorithm][name]
            assert final["mean"] == pytest.approx(statistics.mean(values), abs=1e-6), name
            assert (final["low"], final["high"]) == (pytest.approx(statistics.mean(values) - half, abs=1e-5), pytest.approx(statistics.mean(values) + half, abs=1e-5)), name
        rewards = [[r["reward_mean"] for r in read_jsonl(comparison / "runs" / f"{algorithm}-seed{seed}" / "metrics.jsonl")] for seed in (0, 1)]
        curve = result["curves"][algorithm]["reward"]
        assert curve["queries"] == [4, 8]
        assert curve["mean"] == pytest.approx([statistics.mean(pair) for pair in zip(*rewards)], abs=1e-6)
        assert result["curves"][algorithm]["heldout_on_unseen"]["queries"] == [0, 4, 8]
        assert result["final"][algorithm]["kl"]["mean"] > 0  # LoRA runs measure how far they moved from the base
    base = read_jsonl(comparison / "runs" / "rwr-seed1" / "monitor.jsonl")[0]
    assert result["final"]["base"]["heldout_on_unseen"] == pytest.approx(base["heldout_score_on_heldout"]) and result["final"]["base"]["kl"] == 0
    reach = result["queries_to_fraction"]
    starts = [read_jsonl(comparison / "runs" / name / "metrics.jsonl")[0]["reward_mean"] for name in RUNS]
    assert reach["start"] == pytest.approx(statistics.mean(starts), abs=1e-6)
    for algorithm in ALGORITHMS:
        assert result["timing"][algorithm]["seconds_per_query"]["mean"] > 0


def test_the_page_renders_completely_in_chromium(comparison, chromium, tmp_path):
    findings = inspect_page(comparison / "comparison.html", tmp_path / "comparison.png", chromium=chromium)
    assert findings.console == [], findings.console
    assert findings.broken_images == [] and findings.empty_charts == []
    # Reward, eval-set reward, held-out on trained and on unseen prompts, KL, diversity: one line per algorithm each.
    assert len(findings.charts) == 6 and all(chart["marks"] > 0 for chart in findings.charts)
    assert [image["alt"] for image in findings.images] == [f"{p}, {column}" for p in GRID_PROMPTS for column in ("base model", *ALGORITHMS)]
    for algorithm in ALGORITHMS:
        assert algorithm in findings.text
    page = (comparison / "comparison.html").read_text()
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page


def test_a_killed_comparison_continues_to_the_same_numbers(comparison):
    """The same command after a kill: a finished run is read as it is, a run with a checkpoint resumes, a run killed
    before its first checkpoint and a run never started train from the start; the JSON equals the uninterrupted one's."""
    uninterrupted = json.loads((comparison / "comparison.json").read_text())
    finished_metrics = (comparison / "runs" / "ddpo_is-seed0" / "metrics.jsonl").stat().st_mtime_ns
    shutil.rmtree(comparison / "runs" / "ddpo_is-seed1" / "checkpoints" / "epoch-0002")  # killed in epoch 2's record
    shutil.rmtree(comparison / "runs" / "rwr-seed0" / "checkpoints")  # killed before its first checkpoint
    shutil.rmtree(comparison / "runs" / "rwr-seed1")  # never started
    for name in ("comparison.json", "comparison.html"):
        (comparison / name).unlink()

    result = CliRunner().invoke(main, compare_args(comparison), catch_exceptions=False)

    assert result.exit_code == 0, result.output
    states = [line.split(": ", 2)[-1] for line in result.output.splitlines() if line.startswith("ddpo compare: [")]
    assert states == ["finished, read as it is", "resuming", "training", "training"]
    assert (comparison / "runs" / "ddpo_is-seed0" / "metrics.jsonl").stat().st_mtime_ns == finished_metrics
    continued = json.loads((comparison / "comparison.json").read_text())
    assert without_timing(continued) == without_timing(uninterrupted)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"algorithms": "ddpo_is,ppo"}, ["unknown algorithm 'ppo'", "ddpo_is, ddpo_sf, rwr"]),
        ({"budget": 6}, ["--budget 6 is not a whole number of epochs", "4 reward queries per epoch", "use 4 or 8"]),
        ({"budget": 3}, ["--budget 3", "use 4 or more"]),
        ({"config": "shapes/no-such-preset"}, ["'shapes/no-such-preset' is neither a file nor a preset"]),
        ({"algorithms": "ddpo_is,fdfo"}, ["fdfo cannot run this config", "flow-matching model"]),
        ({"extra": ("seed=3",)}, ["--set seed", "sets it itself"]),
    ],
)
def test_bad_input_is_refused_in_one_line_before_anything_runs(tmp_path, changes, fragments):
    out = tmp_path / "comparison"
    result = CliRunner().invoke(main, compare_args(out, **changes))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ddpo: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output and not out.exists()


def test_a_launcher_with_several_processes_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what accelerate launch and torchrun set
    result = CliRunner().invoke(main, compare_args(tmp_path / "comparison"))
    assert result.exit_code == 2 and "start it without a launcher" in result.stderr


def test_a_directory_trained_with_another_config_is_not_mixed_in(comparison):
    result = CliRunner().invoke(main, compare_args(comparison, extra=("train.lr=1e-2",)))
    assert result.exit_code == 2
    assert "was trained with train.lr = 0.003, this comparison asks for 0.01; give another --out" in result.stderr


# ------------------------------------------------------------------------------------------------ entries with their own config


@pytest.fixture(scope="module")
def own_config_comparison(tmp_path_factory):
    """ddpo_is on CONFIG beside LABEL=CONFIG2: DDPO-SF at another learning rate and without CFG, one epoch, 2 seeds."""
    from importlib import resources

    folder = tmp_path_factory.mktemp("own")
    text = resources.files("ddpo").joinpath("configs", "shapes", "compressibility.toml").read_text()
    text = text.replace('algorithm = "ddpo_is"', 'algorithm = "ddpo_sf"').replace("lr = 3e-3", "lr = 2e-3").replace("guidance_scale = 3.0", "guidance_scale = 1.0")
    (folder / "sf.toml").write_text(text)
    out = folder / "comparison"
    result = CliRunner().invoke(main, compare_args(out, algorithms=f"ddpo_is,sf_no_cfg={folder / 'sf.toml'}", budget=4), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, folder


def test_an_entry_trains_its_own_config_under_its_label(own_config_comparison):
    out, folder = own_config_comparison
    config = (out / "runs" / "sf_no_cfg-seed1" / "config.toml").read_text()
    assert 'algorithm = "ddpo_sf"' in config and "lr = 0.002\n" in config and "guidance_scale = 1.0\n" in config and "seed = 1\n" in config
    assert "num_steps = 4\n" in config  # the --set overrides apply to every entry
    result = json.loads((out / "comparison.json").read_text())
    assert result["algorithms"] == ["ddpo_is", "sf_no_cfg"] and f"sf_no_cfg={folder / 'sf.toml'}" in result["command"]
    # Without CFG the base model is evaluated differently: one base row per way, each the runs' own first record.
    assert [group["algorithms"] for group in result["bases"]] == [["ddpo_is"], ["sf_no_cfg"]] and "base" not in result["final"]
    for group in result["bases"]:
        first = [read_jsonl(out / "runs" / f"{group['algorithms'][0]}-seed{seed}" / "monitor.jsonl")[0] for seed in (0, 1)]
        assert group["scores"]["eval_reward"] == pytest.approx(statistics.mean(r["train_reward"] for r in first), abs=1e-6)
    # Sampled differently, the entries start from different rewards: each one's range starts at its own.
    starts = result["queries_to_fraction"]["start_by_algorithm"]
    for algorithm in ("ddpo_is", "sf_no_cfg"):
        first = [read_jsonl(out / "runs" / f"{algorithm}-seed{seed}" / "metrics.jsonl")[0]["reward_mean"] for seed in (0, 1)]
        assert starts[algorithm] == pytest.approx(statistics.mean(first), abs=1e-6)
    assert starts["ddpo_is"] != pytest.approx(starts["sf_no_cfg"], abs=1e-6)


def test_changes_from_the_base_are_paired_per_seed(own_config_comparison):
    out, _ = own_config_comparison
    result = json.loads((out / "comparison.json").read_text())
    for algorithm in result["algorithms"]:
        records = [read_jsonl(out / "runs" / f"{algorithm}-seed{seed}" / "monitor.jsonl") for seed in (0, 1)]
        deltas = [r[-1]["kl"] - r[0]["kl"] for r in records]
        change = result["final"][algorithm]["change_from_base"]["kl"]
        assert change["mean"] == pytest.approx(statistics.mean(deltas), abs=1e-6) and change["n"] == 2 and change["mean"] > 0
    markdown = (out / "comparison.md").read_text()
    assert "| base model (as ddpo_is) |" in markdown and "| base model (as sf_no_cfg) |" in markdown
    assert markdown.count("(n=2)") >= 2 * 2 * 5 and "Change from the base model" in markdown


def test_an_entry_on_another_task_is_refused(tmp_path):
    from importlib import resources

    text = resources.files("ddpo").joinpath("configs", "shapes", "compressibility.toml").read_text()
    (tmp_path / "other.toml").write_text(text.replace('name = "jpeg_compressibility"', 'name = "jpeg_incompressibility"'))
    out = tmp_path / "comparison"
    result = CliRunner().invoke(main, compare_args(out, algorithms=f"ddpo_is,other={tmp_path / 'other.toml'}"))
    assert result.exit_code == 2, result.output
    assert "sets reward.name = 'jpeg_incompressibility' where shapes/compressibility has 'jpeg_compressibility'" in result.stderr
    assert "Traceback" not in result.output and not out.exists()
    (tmp_path / "fewer.toml").write_text(text.replace("num_batches_per_epoch = 2", "num_batches_per_epoch = 1"))
    with pytest.raises(CompareError, match=r"fewer=.*fewer.toml draws 16 reward queries per epoch, shapes/compressibility 32"):
        plan_comparison("shapes/compressibility", parse_algorithms(f"ddpo_is,fewer={tmp_path / 'fewer.toml'}"), 64, 1, out=out)
    for bad in ("ddpo_is,=x.toml", "ddpo_is,a b=x.toml", "a=x.toml,a=y.toml"):
        with pytest.raises(CompareError, match="--algorithms"):
            parse_algorithms(bad)
