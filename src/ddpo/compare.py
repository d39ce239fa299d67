"""`ddpo compare CONFIG --algorithms A,B --budget QUERIES --seeds K`: algorithms at an equal budget of reward queries.

Every algorithm trains the same model on the same reward and prompts (CONFIG with the `--set` overrides) for the
same number of reward queries (the budget divided by the config's samples per epoch gives the epochs), with seeds
0..K-1, each run in its own run directory DIR/runs/<algorithm>-seed<k>, through the trainer (`ddpo.api.train`).
An entry LABEL=CONFIG2 of `--algorithms` trains CONFIG2 instead (its own algorithm and settings, e.g. a preset with
its paper's defaults, the same `--set` overrides) under the name LABEL: it must share CONFIG's model, reward,
prompts, evaluation set and samples per epoch, so that only the algorithm and its settings differ.
The trainer's periodic evaluation (`ddpo.monitor`: fixed prompts x fixed seeds, RUN_DIR/monitor.jsonl) scores
them with the held-out judge that no algorithm trains on (`log.heldout_reward`; the Shapes presets' judge); its
period `log.eval_every` is shortened to a divisor of the epochs where need be, so that the last epoch is evaluated.

DIR/comparison.json holds the numbers, DIR/comparison.html (self-contained, like report.html) shows them and
DIR/comparison.md holds the tables in Markdown:
- reward and held-out score against reward queries: the mean over seeds and its 95% t-interval;
- the change of each evaluation figure from the base model, paired per seed (last evaluation minus the run's own
  evaluation before training), with its interval;
- reward queries to reach 50% and 90% of the reward range, from the untrained policy's reward (the first epoch's
  samples, mean of every run) to the best seed-mean reward any algorithm reached;
- at the last evaluation, against the base model's: the reward on the evaluation set, the held-out score on
  trained and on unseen prompts, the diversity among a prompt's samples and the KL to the base model (LoRA runs);
- wall time per reward query: sampling and training seconds of the runs' epochs (evaluation excluded);
- the seed-0 runs' last sample grids side by side: the same prompts from the same noise.

The same command re-run continues a killed comparison: finished runs are read as they are, a run with a checkpoint
resumes from it (bit for bit, so the numbers equal an uninterrupted comparison's), a run killed before its first
checkpoint starts again. Only `timing` in the JSON differs between two such comparisons.
"""

from __future__ import annotations

import html
import json
import math
import os
import shlex
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .config import Config, ConfigError, config_to_dict, flatten_config
from .training.assemble import derived_batch_sizes, heldout_reward_name, load_config
from .training.run_directory import RunDirectory, epoch_name, read_jsonl, write_text_atomic

FRACTIONS = (0.5, 0.9)
"""Fractions of the reward range whose reward queries the comparison reports."""
T_QUANTILE_975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604, 2.1448,
    2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484,
    2.0452, 2.0423,
)  # fmt: skip
"""The 97.5% quantile of Student's t with 1..30 degrees of freedom (Abramowitz & Stegun, Table 26.10)."""
SET_BY_COMPARISON = ("seed", "run_name", "train.algorithm", "train.epochs")
SHARED_KEYS = ("model.pretrained", "model.revision", "model.variant", "reward.", "prompts.", "log.heldout_reward", "log.eval_num_prompts",
               "log.num_eval_seeds", "log.grid_prompts", "sample.height", "sample.width", "sample.num_frames")  # fmt: skip
"""Config keys (or prefixes) that every entry LABEL=CONFIG2 of a comparison must share with CONFIG: what is compared
is the algorithm and its settings, on the same task and the same evaluation."""
LABEL_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
CURVE_KEYS = {
    "eval_reward": "train_reward",
    "heldout_on_trained": "heldout_score_on_trained",
    "heldout_on_unseen": "heldout_score_on_heldout",
    "kl": "kl",
    "diversity": "diversity",
}
"""Curves read from the runs' monitor.jsonl records: comparison name -> monitor key (`ddpo.monitor`)."""
FINAL_COLUMNS = (("eval_reward", "reward, eval set"), ("heldout_on_trained", "held-out, trained prompts"), ("heldout_on_unseen", "held-out, unseen prompts"),
                 ("diversity", "diversity"), ("kl", "KL to base"))  # fmt: skip
"""The last evaluation's columns of the page's and the Markdown's first table: name in `final` -> heading."""


class CompareError(ValueError):
    """A comparison that cannot run as asked; the message names the option or the algorithm."""


# ------------------------------------------------------------------------------------------------ statistics


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t: the table up to 30 degrees of freedom, then the Cornish-Fisher expansion
    of Abramowitz & Stegun 26.7.5 (within 1e-4 there)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    if df <= len(T_QUANTILE_975):
        return T_QUANTILE_975[df - 1]
    z = 1.959963985
    terms = (
        (z**3 + z) / 4,
        (5 * z**5 + 16 * z**3 + 3 * z) / 96,
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
        (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160,
    )
    return z + sum(term / df ** (k + 1) for k, term in enumerate(terms))


def mean_interval(values: Sequence[float]) -> dict:
    """{"mean", "low", "high", "n"}: the mean and its 95% t-interval, mean +- t(n-1) s / sqrt(n) with s the sample
    std; low and high are None below two values (no spread to estimate)."""
    n = len(values)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = sum(values) / n
    if n < 2:
        return {"mean": _round(mean), "low": None, "high": None, "n": 1}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return {"mean": _round(mean), "low": _round(mean - half), "high": _round(mean + half), "n": n}


def queries_to_reach(queries: Sequence[int], rewards: Sequence[float], target: float) -> int | None:
    """The first number of reward queries whose reward is at least `target`, or None if it never is."""
    return next((q for q, r in zip(queries, rewards) if r >= target), None)


def _round(value: float) -> float:
    return round(float(value), 6)


# ------------------------------------------------------------------------------------------------ the plan


@dataclass
class Plan:
    """What a comparison runs: one validated config per (algorithm, seed)."""

    config: str
    overrides: list[str]
    algorithms: list[str]
    seeds: int
    budget: int
    samples_per_epoch: int
    epochs: int
    eval_every: int
    out: Path
    base: Config
    configs: dict[tuple[str, int], Config] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    own_configs: dict[str, str] = field(default_factory=dict)
    """label -> the config an entry LABEL=CONFIG2 trains instead of CONFIG."""

    def cells(self) -> list[tuple[str, int]]:
        return [(algorithm, seed) for algorithm in self.algorithms for seed in range(self.seeds)]

    def run_dir(self, algorithm: str, seed: int) -> Path:
        return self.out / "runs" / f"{algorithm}-seed{seed}"

    def command(self) -> str:
        entries = [f"{a}={self.own_configs[a]}" if a in self.own_configs else a for a in self.algorithms]
        words = ["ddpo", "compare", self.config, "--algorithms", ",".join(entries), "--budget", str(self.budget), "--seeds", str(self.seeds), "--out", str(self.out)]
        for override in self.overrides:
            words += ["--set", override]
        return shlex.join(words)


def parse_algorithms(text: str) -> list[tuple[str, str | None]]:
    """"a,b,c=shapes/x" -> [("a", None), ("b", None), ("c", "shapes/x")]: registered algorithms
    (`ddpo.algorithms.ALGORITHMS`) trained with CONFIG, and labels trained with their own config; a plain name
    given twice counts once."""
    from .algorithms import ALGORITHMS

    entries: dict[str, str | None] = {}
    for part in (part.strip() for part in text.split(",")):
        if not part:
            continue
        label, has_config, own = (word.strip() for word in part.partition("="))
        if has_config:
            if not label or not own or not set(label) <= LABEL_CHARACTERS:
                raise CompareError(f"--algorithms {part!r}: write LABEL=CONFIG, LABEL of letters, digits, '_', '.', '-' (it names the runs' directories)")
        elif label not in ALGORITHMS:
            raise CompareError(f"--algorithms: unknown algorithm {label!r} (registered: {', '.join(ALGORITHMS)}; or LABEL=CONFIG)")
        if entries.get(label, own or None) != (own or None):
            raise CompareError(f"--algorithms: {label!r} is given twice with different configs")
        entries[label] = own or None
    if not entries:
        raise CompareError(f"--algorithms {text!r}: name at least one algorithm, e.g. ddpo_is,rwr")
    return list(entries.items())


def default_out(config: str) -> Path:
    """comparisons/<the config's name>: a file's stem, or a preset's name with '/' as '-'."""
    path = Path(config)
    name = path.stem if path.suffix == ".toml" else config.replace("/", "-")
    return Path("comparisons") / name


def plan_comparison(config: str, algorithms: Sequence[str | tuple[str, str | None]], budget: int, seeds: int, overrides: Sequence[str] = (), out: str | Path | None = None) -> Plan:
    """Check everything that can be checked before training: the config, the budget, each algorithm's config and,
    by building each sampler's policy once, the model.

    Raises:
        CompareError or ConfigError: naming the option, the key or the algorithm.
    """
    from .algorithms import ALGORITHMS

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CompareError("ddpo compare trains its runs one after another in one process: start it without a launcher (accelerate launch, torchrun)")
    if seeds < 1:
        raise CompareError(f"--seeds {seeds}: give at least 1 (2 or more for intervals)")
    for override in overrides:
        key = override.partition("=")[0].strip()
        if key in SET_BY_COMPARISON:
            raise CompareError(f"--set {key}: the comparison sets it itself (seeds 0..K-1, --algorithms, --budget)")
    base = load_config(config, overrides)
    if base.train.early_stop_on_heldout:
        raise CompareError("train.early_stop_on_heldout=true: a comparison spends the same budget on every run; leave early stopping off")
    per_epoch = derived_batch_sizes(base, num_processes=1).samples_per_epoch
    if budget < per_epoch or budget % per_epoch:
        lower, upper = budget // per_epoch * per_epoch, (budget // per_epoch + 1) * per_epoch
        choices = f"{lower} or {upper}" if lower else f"{upper} or more"
        raise CompareError(
            f"--budget {budget} is not a whole number of epochs: this config draws {per_epoch} reward queries per epoch "
            f"(sample.batch_size {base.sample.batch_size} x sample.num_batches_per_epoch {base.sample.num_batches_per_epoch}); use {choices}"
        )
    epochs = budget // per_epoch
    entries = [(entry, None) if isinstance(entry, str) else entry for entry in algorithms]
    plan = Plan(config, list(overrides), [label for label, _ in entries], seeds, budget, per_epoch, epochs, base.log.eval_every, Path(out) if out else default_out(config), base)
    plan.own_configs = {label: own for label, own in entries if own}
    if plan.eval_every == 0:
        plan.notes.append("log.eval_every = 0: no periodic evaluation, so no held-out score, KL or diversity (set log.eval_every).")
    elif epochs % plan.eval_every:
        plan.eval_every = max(d for d in range(1, plan.eval_every + 1) if epochs % d == 0)
        plan.notes.append(f"log.eval_every {base.log.eval_every} -> {plan.eval_every}, so that the last of the {epochs} epochs is evaluated.")
    for algorithm, seed in plan.cells():
        own = plan.own_configs.get(algorithm)
        fixed = [f"train.epochs={epochs}", f"log.eval_every={plan.eval_every}", f"seed={seed}", f'run_name="{algorithm}-seed{seed}"']
        try:
            plan.configs[(algorithm, seed)] = load_config(own, [*overrides, *fixed]) if own else load_config(config, [*overrides, f"train.algorithm={algorithm}", *fixed])
        except ConfigError as error:
            raise CompareError(f"{algorithm} cannot run {'its config ' + own if own else 'this config'}: {error}") from error
        if own and seed == 0:
            _check_shared(plan, algorithm, own)
    _check_models(plan, {ALGORITHMS[plan.configs[(a, 0)].train.algorithm].sampler: a for a in reversed(plan.algorithms)})
    return plan


def _check_shared(plan: Plan, label: str, own: str) -> None:
    """An entry LABEL=CONFIG2 compares an algorithm on CONFIG's task: the same model, reward, prompts, evaluation and
    reward queries per epoch."""
    config = plan.configs[(label, 0)]
    per_epoch = derived_batch_sizes(config, num_processes=1).samples_per_epoch
    if per_epoch != plan.samples_per_epoch:
        raise CompareError(f"{label}={own} draws {per_epoch} reward queries per epoch, {plan.config} {plan.samples_per_epoch}: entries must draw the same (sample.batch_size x sample.num_batches_per_epoch)")
    mine, theirs = flatten_config(config_to_dict(config)), flatten_config(config_to_dict(plan.base))
    for key in sorted(set(mine) | set(theirs)):
        if key.startswith(SHARED_KEYS) and mine.get(key) != theirs.get(key):
            raise CompareError(f"{label}={own} sets {key} = {mine.get(key)!r} where {plan.config} has {theirs.get(key)!r}: entries of a comparison share the model, reward, prompts and evaluation")


def _check_models(plan: Plan, algorithm_of_sampler: dict[str, str]) -> None:
    """Build the policy of one algorithm per sampler: what only the model can refuse (a flow-only sampler on a DDIM
    model, a model that does not load) is refused before any run starts."""
    from .utils import quiet_libraries
    from .policy import PolicyLoadError, build_policy

    quiet_libraries()
    for sampler, algorithm in algorithm_of_sampler.items():
        try:
            build_policy(plan.configs[(algorithm, 0)], sampler=sampler)
        except (PolicyLoadError, FileNotFoundError, OSError) as error:
            raise CompareError(f"{algorithm} cannot run this config: {str(error).strip()}") from error


# ------------------------------------------------------------------------------------------------ running


def _run_state(plan: Plan, algorithm: str, seed: int) -> str:
    """"done", "resume" or "start" for the run directory of (algorithm, seed); a run killed before its first
    checkpoint is removed (it has nothing to continue). Refuses a run trained with another config."""
    path = plan.run_dir(algorithm, seed)
    run = RunDirectory(path)
    if not run.config_path.is_file():
        shutil.rmtree(path, ignore_errors=True)  # created, killed before its config was written
        return "start"
    stored = flatten_config(config_to_dict(load_config(run.config_path)))
    for key, value in flatten_config(config_to_dict(plan.configs[(algorithm, seed)])).items():
        if stored.get(key) != value:
            raise CompareError(f"{path} was trained with {key} = {stored.get(key)!r}, this comparison asks for {value!r}; give another --out")
    latest = run.latest_checkpoint()
    if latest is not None and latest[0] >= plan.epochs:
        return "done"
    if run.resume_candidates():
        return "resume"
    shutil.rmtree(path)
    return "start"


def run_comparison(plan: Plan, *, progress: bool = False, log: Callable[[str], None] = print) -> Path:
    """Train (or continue) every run of the plan, then write DIR/comparison.json and DIR/comparison.html; returns
    the page's path."""
    from .api import train

    started = time.perf_counter()
    cells = plan.cells()
    for index, (algorithm, seed) in enumerate(cells, 1):
        path = plan.run_dir(algorithm, seed)
        state = _run_state(plan, algorithm, seed)
        log(f"ddpo compare: [{index}/{len(cells)}] {algorithm} seed {seed}: " + {"done": "finished, read as it is", "resume": "resuming", "start": "training"}[state])
        if state == "resume":
            train(resume=path, progress=progress)
        elif state == "start":
            train(plan.configs[(algorithm, seed)], out=path, progress=progress)
    result = collect(plan)
    result["timing"]["this_invocation_seconds"] = round(time.perf_counter() - started, 1)
    plan.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(plan.out / "comparison.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(plan.out / "comparison.md", build_markdown(result))
    page = plan.out / "comparison.html"
    write_text_atomic(page, build_page(result, plan))
    return page


# ------------------------------------------------------------------------------------------------ the numbers


def _curve(points: list[list[tuple[int, float]]]) -> dict:
    """Per-seed (queries, value) lists -> {"queries", "mean", "low", "high", "seeds"} at the queries every seed has."""
    shared = sorted(set.intersection(*(set(q for q, _ in seed) for seed in points))) if points else []
    by_seed = [dict(seed) for seed in points]
    intervals = [mean_interval([values[q] for values in by_seed]) for q in shared]
    return {
        "queries": shared,
        "mean": [i["mean"] for i in intervals],
        "low": [i["low"] for i in intervals],
        "high": [i["high"] for i in intervals],
        "seeds": [[_round(values[q]) for q in shared] for values in by_seed],
    }


def collect(plan: Plan) -> dict:
    """comparison.json's content, read from the finished runs (see the module docstring)."""
    base = plan.base
    metrics, monitor = {}, {}
    for algorithm, seed in plan.cells():
        run = RunDirectory(plan.run_dir(algorithm, seed))
        metrics[(algorithm, seed)] = [r for r in run.read_metrics() if r["epoch"] <= plan.epochs]
        monitor[(algorithm, seed)] = read_jsonl(run.monitor_path)
        if not metrics[(algorithm, seed)] or metrics[(algorithm, seed)][-1]["epoch"] != plan.epochs:
            raise CompareError(f"{run.path}: the run did not finish its {plan.epochs} epochs")
    curves: dict = {}
    final: dict = {}
    timing: dict = {}
    for algorithm in plan.algorithms:
        seeds = range(plan.seeds)
        curves[algorithm] = {"reward": _curve([[(r["samples"], r["reward_mean"]) for r in metrics[(algorithm, s)]] for s in seeds])}
        for name, key in CURVE_KEYS.items():
            points = [[(r["samples"], r[key]) for r in monitor[(algorithm, s)] if _number(r.get(key))] for s in seeds]
            if all(points):
                curves[algorithm][name] = _curve(points)
        last = {s: next((r for r in monitor[(algorithm, s)] if r["epoch"] == plan.epochs), {}) for s in seeds}
        final[algorithm] = {"reward_last_epoch": mean_interval([metrics[(algorithm, s)][-1]["reward_mean"] for s in seeds])}
        for name, key in CURVE_KEYS.items():
            values = [last[s].get(key) for s in seeds]
            if all(_number(v) for v in values):
                final[algorithm][name] = mean_interval(values)
        first = {s: next((r for r in monitor[(algorithm, s)] if r["epoch"] == 0), {}) for s in seeds}
        changes = {}
        for name, key in CURVE_KEYS.items():
            pairs = [(first[s].get(key), last[s].get(key)) for s in seeds]
            if all(_number(a) and _number(b) for a, b in pairs):
                changes[name] = mean_interval([b - a for a, b in pairs])
        final[algorithm]["change_from_base"] = changes
        per_query = [sum(r["sample_seconds"] + r["train_seconds"] for r in metrics[(algorithm, s)]) / plan.budget for s in seeds]
        timing[algorithm] = {"seconds_per_query": mean_interval(per_query), "seconds_all_seeds": round(sum(per_query) * plan.budget, 1)}
    notes = list(plan.notes)
    if plan.eval_every and not any("heldout_on_unseen" in final[a] for a in plan.algorithms):
        notes.append("No unseen prompts: this config's evaluation holds only prompts it trains on (set prompts.heldout_file).")
    if plan.eval_every and not base.model.use_lora:
        notes.append("KL to the base model not measured: it compares the policy with its LoRA disabled (model.use_lora=false).")
    bases = _bases(plan, monitor)
    if len(bases) == 1:
        final["base"] = bases[0]["scores"]
    elif bases:
        notes.append("The entries evaluate the base model differently (their own sampling settings, e.g. the CFG scale): each row 'base model (...)' is the base as those entries evaluate it.")
    return {
        "command": plan.command(),
        "config": plan.config,
        "overrides": plan.overrides,
        "model": base.model.pretrained,
        "reward": "+".join(t["name"] for t in base.reward.terms) or base.reward.name,
        "heldout_reward": heldout_reward_name(base),
        "algorithms": plan.algorithms,
        "seeds": plan.seeds,
        "budget": plan.budget,
        "samples_per_epoch": plan.samples_per_epoch,
        "epochs": plan.epochs,
        "eval_every": plan.eval_every,
        "runs": {f"{a}-seed{s}": str(plan.run_dir(a, s).relative_to(plan.out)) for a, s in plan.cells()},
        "notes": notes,
        "curves": curves,
        "final": final,
        "bases": bases,
        "queries_to_fraction": _queries_to_fraction(plan, metrics, curves),
        "timing": timing,
    }


def _bases(plan: Plan, monitor: dict) -> list[dict]:
    """The base model's evaluation (each run's record before training), averaged over the runs that evaluate it
    alike: one group when every entry samples the evaluation the same way, one per distinct result otherwise."""
    groups: list[dict] = []
    for algorithm in plan.algorithms:
        records = [r for s in range(plan.seeds) for r in monitor[(algorithm, s)] if r["epoch"] == 0]
        if not records:
            continue
        scores = {name: _round(sum(r[key] for r in records) / len(records)) for name, key in CURVE_KEYS.items() if all(_number(r.get(key)) for r in records)}
        same = next((g for g in groups if g["scores"] == scores), None)
        if same:
            same["algorithms"].append(algorithm)
        else:
            groups.append({"algorithms": [algorithm], "scores": scores})
    return groups


def _queries_to_fraction(plan: Plan, metrics: dict, curves: dict) -> dict:
    """Reward queries each algorithm's seed-mean reward needs to reach `FRACTIONS` of the reward range: from the
    untrained policy's reward (the mean first epoch of every run) to the best seed mean of any algorithm. Where the
    entries sample differently (LABEL=CONFIG2 with another CFG scale or SDE window), their untrained rewards differ
    and each algorithm's range starts at its own (`start_by_algorithm`)."""
    start = sum(records[0]["reward_mean"] for records in metrics.values()) / len(metrics)
    starts = {a: sum(metrics[(a, s)][0]["reward_mean"] for s in range(plan.seeds)) / plan.seeds for a in plan.algorithms}
    own_starts = max(starts.values()) - min(starts.values()) > 1e-9
    best_algorithm = max(plan.algorithms, key=lambda a: max(curves[a]["reward"]["mean"]))
    best = max(curves[best_algorithm]["reward"]["mean"])
    result: dict = {"fractions": list(FRACTIONS), "start": _round(start), "best": _round(best), "best_algorithm": best_algorithm, "targets": {}, "queries": {}}
    if own_starts:
        result["start_by_algorithm"] = {a: _round(v) for a, v in starts.items()}
    if best <= (min(starts.values()) if own_starts else start):
        result["note"] = "no algorithm's seed-mean reward rose above the untrained policy's"
        result["queries"] = {a: {str(f): None for f in FRACTIONS} for a in plan.algorithms}
        return result
    if not own_starts:
        result["targets"] = {str(f): _round(start + f * (best - start)) for f in FRACTIONS}
    for algorithm in plan.algorithms:
        curve, origin = curves[algorithm]["reward"], starts[algorithm] if own_starts else start
        result["queries"][algorithm] = {str(f): queries_to_reach(curve["queries"], curve["mean"], origin + f * (best - origin)) if best > origin else None for f in FRACTIONS}
    return result


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------------------------------ the page

CURVE_TITLES = {
    "reward": "training reward (each epoch's samples)",
    "eval_reward": "reward on the fixed evaluation set",
    "heldout_on_trained": "held-out score, trained prompts",
    "heldout_on_unseen": "held-out score, unseen prompts",
    "kl": "KL to the base model (sum over steps, per dim)",
    "diversity": "diversity (pixel RMS distance, same prompt)",
}
PAGE_STYLE = """
img.strip{image-rendering:pixelated;display:block;height:72px;width:auto} table.numbers td,table.numbers th{text-align:right}
table.numbers td:first-child,table.numbers th:first-child{text-align:left} table.numbers{margin-bottom:20px} .interval{color:#666;font-size:.85em}
"""


def _cell(interval: dict | float | None, digits: str = ".4g") -> str:
    """A table cell: mean and [low, high], a plain number, or n/a."""
    if isinstance(interval, (int, float)):
        return f"<td>{interval:{digits}}</td>"
    if not interval or interval.get("mean") is None:
        return "<td>n/a</td>"
    spread = f' <span class="interval">[{interval["low"]:{digits}}, {interval["high"]:{digits}}]</span>' if interval["low"] is not None else ""
    return f"<td>{interval['mean']:{digits}}{spread}</td>"


def _charts(result: dict) -> str:
    from .charts import Chart, Series, render_chart
    from .report import _figure

    figures = []
    for name, title in CURVE_TITLES.items():
        series = []
        for algorithm in result["algorithms"]:
            curve = result["curves"][algorithm].get(name)
            if curve:
                band = (curve["low"], curve["high"]) if result["seeds"] > 1 else None
                series.append(Series(algorithm, curve["queries"], curve["mean"], band))
        if series:
            figures.append(_figure(render_chart(Chart(title, "reward queries", series), width=440, height=260)))
    return f'<div class="row">{"".join(figures)}</div>'


def _tables(result: dict) -> str:
    final, reach, timing = result["final"], result["queries_to_fraction"], result["timing"]
    shown = FINAL_COLUMNS if result["eval_every"] else ()  # n/a where a run did not measure it (the notes say why)
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in shown)
    rows = []
    for label, scores in _base_rows(result):
        rows.append(f"<tr><td>{html.escape(label)}</td>" + "".join(_cell(scores.get(key)) for key, _ in shown) + "<td>n/a</td></tr>")
    for algorithm in result["algorithms"]:
        rows.append(f"<tr><td>{html.escape(algorithm)}</td>" + "".join(_cell(final[algorithm].get(key)) for key, _ in shown) + _cell(final[algorithm]["reward_last_epoch"]) + "</tr>")
    last = f'<table class="numbers"><caption>At the last epoch ({result["epochs"]}): mean over {result["seeds"]} seeds [95% t-interval]</caption><tr><th>algorithm</th>{head}<th>reward, last epoch\'s samples</th></tr>{"".join(rows)}</table>'
    fractions = reach["fractions"]
    head = "".join(f"<th>{f:.0%} of the range</th>" for f in fractions)
    rows = []
    for algorithm in result["algorithms"]:
        cells = "".join(f"<td>{q if q is not None else 'not reached'}</td>" for q in (reach["queries"][algorithm][str(f)] for f in fractions))
        per_query = timing[algorithm]["seconds_per_query"]
        rows.append(f"<tr><td>{html.escape(algorithm)}</td>{cells}{_cell(per_query, '.3g')}</tr>")
    note = _range_sentence(reach)
    speed = f'<table class="numbers"><caption>Reward queries to reach a fraction of the reward range ({html.escape(note)}); wall time</caption><tr><th>algorithm</th>{head}<th>seconds per query (sampling + training)</th></tr>{"".join(rows)}</table>'
    return last + speed


def _range_sentence(reach: dict) -> str:
    """What the queries-to-fraction table measures from and to (`_queries_to_fraction`'s result), or its note."""
    if reach.get("note"):
        return reach["note"]
    if "start_by_algorithm" in reach:
        starts = ", ".join(f"{a} {v:.4g}" for a, v in reach["start_by_algorithm"].items())
        origin = f"each algorithm's untrained policy's samples ({starts}; the entries sample differently)"
    else:
        origin = f"{reach['start']:.6g} (the untrained policy's samples)"
    return f"Reward range: from {origin} to {reach['best']:.6g} ({reach['best_algorithm']}'s best seed mean)."


def _base_rows(result: dict) -> list[tuple[str, dict]]:
    """("base model", scores) or, where the entries evaluate it differently, one ("base model (as A, B)", scores)
    per way."""
    bases = result.get("bases", [])
    if len(bases) == 1:
        return [("base model", bases[0]["scores"])]
    return [(f"base model (as {', '.join(b['algorithms'])})", b["scores"]) for b in bases]


def markdown_interval(interval: dict | None, digits: str, signed: bool = False) -> str:
    """`mean_interval`'s result as "mean [low, high] (n=K)" (without the brackets below two values), or n/a."""
    if not interval or interval.get("mean") is None:
        return "n/a"
    sign = "+" if signed else ""
    if interval["low"] is None:
        return f"{interval['mean']:{sign}{digits}} (n={interval['n']})"
    return f"{interval['mean']:{sign}{digits}} [{interval['low']:{sign}{digits}}, {interval['high']:{sign}{digits}}] (n={interval['n']})"


def build_markdown(result: dict) -> str:
    """comparison.md: the page's tables in Markdown (for docs), each figure with its interval and seed count."""
    final, reach, timing = result["final"], result["queries_to_fraction"], result["timing"]
    names = [(k, t) for k, t in FINAL_COLUMNS if any(k in final[a] for a in result["algorithms"])]
    lines = [f"`{result['command']}`", "", f"{result['budget']} reward queries ({result['epochs']} epoch(s) of {result['samples_per_epoch']}), seeds 0..{result['seeds'] - 1}, "
             f"model {result['model']}, reward {result['reward']}, held-out judge {result['heldout_reward'] or 'none'}.", ""]  # fmt: skip
    lines += ["| algorithm | " + " | ".join(t for _, t in names) + " | reward, last epoch's samples |", "|---" * (len(names) + 2) + "|"]
    for label, scores in _base_rows(result):
        lines.append(f"| {label} | " + " | ".join(f"{scores[k]:.4g}" if k in scores else "n/a" for k, _ in names) + " | |")
    for algorithm in result["algorithms"]:
        lines.append(f"| {algorithm} | " + " | ".join(markdown_interval(final[algorithm].get(k), ".4g") for k, _ in names) + f" | {markdown_interval(final[algorithm]['reward_last_epoch'], '.4g')} |")
    lines += ["", "Change from the base model at the last evaluation, paired per seed:", "", "| algorithm | " + " | ".join(t for _, t in names) + " |", "|---" * (len(names) + 1) + "|"]
    for algorithm in result["algorithms"]:
        changes = final[algorithm].get("change_from_base", {})
        lines.append(f"| {algorithm} | " + " | ".join(markdown_interval(changes.get(k), ".4f", signed=True) for k, _ in names) + " |")
    fractions = reach["fractions"]
    lines += ["", "| algorithm | " + " | ".join(f"queries to {f:.0%} of the reward range" for f in fractions) + " | s per query |", "|---" * (len(fractions) + 2) + "|"]
    for algorithm in result["algorithms"]:
        cells = " | ".join(str(reach["queries"][algorithm][str(f)]) if reach["queries"][algorithm][str(f)] is not None else "not reached" for f in fractions)
        lines.append(f"| {algorithm} | {cells} | {markdown_interval(timing[algorithm]['seconds_per_query'], '.3g')} |")
    lines += ["", _range_sentence(reach)]
    lines += [f"Note: {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def _strips(result: dict, plan: Plan) -> str:
    """Each grid prompt's row of seeds: the base model, then each algorithm's seed-0 run at its last epoch."""
    from .charts import png_data_uri
    from .report import _grid_shape, load_run

    columns: list[tuple[str, Path]] = []
    first = plan.run_dir(result["algorithms"][0], 0)
    columns.append(("base model", RunDirectory(first).sample_grid_path(0)))
    columns += [(a, RunDirectory(plan.run_dir(a, 0)).sample_grid_path(plan.epochs)) for a in result["algorithms"]]
    if not all(path.is_file() for _, path in columns):
        return '<p class="note">Sample grids missing from the seed-0 runs.</p>'
    data = load_run(first)
    grids = {label: Image.open(path).convert("RGB") for label, path in columns}
    prompts, seeds, cell_w, cell_h = _grid_shape(data, grids["base model"])
    header = "".join(f"<th>{html.escape(label)}</th>" for label, _ in columns)
    rows = []
    for row, prompt in enumerate(prompts):
        cells = "".join(
            f'<td><img class="strip" alt="{html.escape(f"{prompt}, {label}")}" src="{png_data_uri(grid.crop((0, row * cell_h, seeds * cell_w, (row + 1) * cell_h)))}"></td>'
            for label, grid in grids.items()
        )
        rows.append(f"<tr><th>{html.escape(prompt)}</th>{cells}</tr>")
    return (
        f'<p class="note">Seed-0 runs after epoch {plan.epochs} ({epoch_name(plan.epochs)}), each prompt with seeds 0..{seeds - 1} left to '
        "right: every column starts from the same noise.</p>"
        f'<div class="scroll"><table class="strips"><tr><th>prompt</th>{header}</tr>{"".join(rows)}</table></div>'
    )


def build_page(result: dict, plan: Plan) -> str:
    """comparison.html: the settings, the curves, the tables and the image strips (no script, no other file)."""
    from .report import STYLE, _section

    title = f"ddpo compare: {', '.join(result['algorithms'])} on {result['config']}"
    settings = [
        ("command", result["command"]), ("model", result["model"]), ("reward", result["reward"]),
        ("held-out judge", result["heldout_reward"] or "none"), ("budget", f"{result['budget']} reward queries = {result['epochs']} epochs of {result['samples_per_epoch']}"),
        ("seeds", f"0..{result['seeds'] - 1}"), ("evaluation", f"every {result['eval_every']} epoch(s), and before training" if result["eval_every"] else "none"),
    ]  # fmt: skip
    summary = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in settings)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in result["notes"])
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">{html.escape(str(plan.out.resolve()))} · written {time.strftime("%Y-%m-%d %H:%M:%S")}</p>',
        f'<ul class="notes">{notes}</ul>' if notes else "",
        f'<table class="summary">{summary}</table>',
        _section("Against reward queries", '<p class="note">Mean over seeds, shaded: its 95% t-interval.</p>' + _charts(result), "curves"),
        _section("Numbers", _tables(result), "numbers"),
        _section("Same prompts, same noise", _strips(result, plan), "strips"),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}{PAGE_STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )
