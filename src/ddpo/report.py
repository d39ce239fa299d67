"""`ddpo report RUN_DIR`: one self-contained HTML page of a run (RUN_DIR/report.html).

What people look at to judge an RL fine-tune (Black et al. 2023 show exactly these): the reward curve against
reward queries, the loss / approx_kl / clipfrac of the update, which prompts gained and which did not, the
same prompts and seeds drawn epoch after epoch, and, from the periodic evaluation (`ddpo.training.monitor`), the
held-out score next to the training reward: where the first peaks while the second keeps rising, the reward
is being gamed. Charts are inline SVG drawn here and images are PNG data URIs: the page needs no network, no
script and no other file. Whatever the run lacks (no finished epoch, no samples folder, no evaluation yet) the
page says so instead of failing.
"""

from __future__ import annotations

import html
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ddpo.charts import Chart, Series, finite, png_data_uri, render_chart
from ddpo.training.run_directory import (
    CHECKPOINT_PATTERN,
    RunDirectory,
    RunDirectoryError,
    read_jsonl,
    write_text_atomic,
)

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

MAX_STRIP_EPOCHS = 10
"""Epochs shown in each prompt's strip, spread evenly from the first to the last grid."""
MAX_CELL_PIXELS = 160
"""Sample images larger than this are downscaled before embedding, so the page stays small."""
TABLE_ROWS = 10
"""Best and worst prompts listed when a run has more than twice as many prompts."""


@dataclass
class RunData:
    run: RunDirectory
    config_text: str | None
    config: dict
    metrics: list[dict]
    prompt_rewards: list[dict]
    monitor: list[dict]
    best: dict | None
    grids: dict[int, Path]
    grid_layout: dict | None
    notes: list[str]


def load_run(run_dir: str | Path) -> RunData:
    """Everything a report shows, read tolerantly: what is missing or unreadable becomes a note.

    Raises:
        RunDirectoryError: `run_dir` does not exist or holds neither a config.toml nor a metrics.jsonl.
    """
    run = RunDirectory(run_dir)
    if not run.path.is_dir():
        raise RunDirectoryError(f"{run.path}: no such directory")
    if not run.config_path.is_file() and not run.metrics_path.is_file():
        raise RunDirectoryError(f"{run.path}: not a ddpo run directory (no config.toml, no metrics.jsonl)")
    notes: list[str] = []
    config_text, config = None, {}
    if run.config_path.is_file():
        config_text = run.config_path.read_text(encoding="utf-8", errors="replace")
        try:
            config = tomllib.loads(config_text)
        except tomllib.TOMLDecodeError as error:
            notes.append(f"config.toml does not parse ({error}); it is shown as it is.")
    else:
        notes.append("This run has no config.toml.")
    metrics = read_jsonl(run.metrics_path, tolerant=True)
    metrics = [r for r in metrics if isinstance(r.get("epoch"), int)]
    if not metrics:
        notes.append("No finished epoch yet: metrics.jsonl is missing or empty, so there are no curves and no per-prompt rewards.")
    best = None
    if run.best_path.is_file():
        try:
            best = json.loads(run.best_path.read_text())
        except (OSError, ValueError):
            notes.append("best.json does not parse.")
    grids: dict[int, Path] = {}
    layout = None
    if not run.samples_dir.is_dir():
        notes.append("No samples folder (samples/): there are no sample images to show.")
    else:
        for path in run.samples_dir.glob("epoch-*.png"):
            match = CHECKPOINT_PATTERN.match(path.stem)
            if match:
                grids[int(match.group(1))] = path
        if not grids:
            notes.append("The samples folder holds no epoch-NNNN.png grid yet.")
        if run.grid_layout_path.is_file():
            try:
                layout = json.loads(run.grid_layout_path.read_text())
            except (OSError, ValueError):
                layout = None
    return RunData(
        run=run, config_text=config_text, config=config, metrics=metrics,
        prompt_rewards=read_jsonl(run.prompt_rewards_path, tolerant=True), monitor=read_jsonl(run.monitor_path, tolerant=True),
        best=best, grids=dict(sorted(grids.items())), grid_layout=layout, notes=notes,
    )  # fmt: skip


def overoptimization(monitor: Sequence[dict]) -> dict | None:
    """The evaluation where the held-out score peaked while the training reward kept rising after it.

    Returns None unless, after the (first) peak of `heldout_score`, the held-out score ended lower and the
    training reward (on the same evaluation samples) ended higher than at the peak. Otherwise returns
    {"epoch", "heldout_at_peak", "heldout_last", "reward_at_peak", "reward_last", "last_epoch"}.
    """
    records = [r for r in monitor if finite(r.get("heldout_score")) and finite(r.get("train_reward"))]
    if len(records) < 2:
        return None
    peak_index = max(range(len(records)), key=lambda i: (records[i]["heldout_score"], -i))
    peak, last = records[peak_index], records[-1]
    if peak is last or not (last["heldout_score"] < peak["heldout_score"] and last["train_reward"] > peak["train_reward"]):
        return None
    return {
        "epoch": peak["epoch"], "heldout_at_peak": peak["heldout_score"], "heldout_last": last["heldout_score"],
        "reward_at_peak": peak["train_reward"], "reward_last": last["train_reward"], "last_epoch": last["epoch"],
    }  # fmt: skip


def prompt_window(num_epochs: int) -> int:
    """Epochs averaged at each end of the per-prompt table: half the run (each prompt is drawn only now and
    then, so shorter windows would leave most cells empty), or the one epoch of a one-epoch run."""
    return max(1, num_epochs // 2)


def prompt_table(prompt_rewards: Sequence[dict]) -> list[dict]:
    """Per prompt: mean reward over the first and the last `prompt_window` epochs ("first", "recent") and its
    sample count, sorted best (highest recent mean) first."""
    if not prompt_rewards:
        return []
    window = prompt_window(len(prompt_rewards))
    first_epochs = {r["epoch"] for r in prompt_rewards[:window]}
    last_epochs = {r["epoch"] for r in prompt_rewards[-window:]}
    totals: dict[str, dict[str, list[float]]] = {}
    for record in prompt_rewards:
        for prompt, stats in record.get("prompts", {}).items():
            entry = totals.setdefault(prompt, {"first": [0.0, 0], "recent": [0.0, 0], "all": [0.0, 0]})
            for key, included in (("first", record["epoch"] in first_epochs), ("recent", record["epoch"] in last_epochs), ("all", True)):
                if included:
                    entry[key][0] += stats["mean"] * stats["n"]
                    entry[key][1] += stats["n"]
    rows = []
    for prompt, entry in totals.items():
        mean = {key: (s / n if n else math.nan) for key, (s, n) in entry.items()}
        rows.append({"prompt": prompt, "first": mean["first"], "recent": mean["recent"], "all": mean["all"], "samples": int(entry["all"][1])})
    return sorted(rows, key=lambda r: (-(r["recent"] if finite(r["recent"]) else -math.inf), r["prompt"]))


# ------------------------------------------------------------------------------------------------ images


def _grid_shape(data: RunData, grid: Image.Image) -> tuple[list[str], int, int, int]:
    """(row prompts, seeds, cell width, cell height) of a sample grid: from samples/grid.json, else from the
    config's grid prompts and seed count, else square cells one seed wide."""
    layout = data.grid_layout or {}
    log = data.config.get("log", {})
    prompts = list(layout.get("prompts") or log.get("grid_prompts") or [])
    seeds = max(1, int(layout.get("seeds") or log.get("num_eval_seeds") or 1))
    if prompts and grid.width % seeds == 0 and grid.height % len(prompts) == 0:
        return prompts, seeds, grid.width // seeds, grid.height // len(prompts)
    cell = max(1, grid.width // seeds)
    rows = max(1, grid.height // cell)
    return [f"row {i + 1}" for i in range(rows)], seeds, cell, grid.height // rows


def _shrink(image: Image.Image, cell_width: int) -> Image.Image:
    """Downscale so that one cell is at most MAX_CELL_PIXELS wide."""
    if cell_width <= MAX_CELL_PIXELS:
        return image
    scale = MAX_CELL_PIXELS / cell_width
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS)


def strip_epochs(epochs: Sequence[int], limit: int = MAX_STRIP_EPOCHS) -> list[int]:
    """At most `limit` epochs, evenly spread, always the first and the last."""
    epochs = sorted(epochs)
    if len(epochs) <= limit:
        return epochs
    return sorted({epochs[round(k * (len(epochs) - 1) / (limit - 1))] for k in range(limit)})


def _img(uri: str, alt: str, css_class: str = "sample") -> str:
    return f'<img class="{css_class}" src="{uri}" alt="{html.escape(alt)}">'


# ------------------------------------------------------------------------------------------------ sections


def _distinct(a: float, b: float) -> tuple[str, str]:
    """Two numbers with the fewest significant digits (4 or more) that tell them apart."""
    for digits in range(4, 10):
        pair = f"{a:.{digits}g}", f"{b:.{digits}g}"
        if pair[0] != pair[1]:
            return pair
    return pair


def _number(value: float, spec: str = ".4g") -> str:
    """A table cell's number; "–" where a prompt was not drawn in those epochs (NaN)."""
    return format(value, spec) if finite(value) else "–"


def _section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def _figure(svg: str) -> str:
    return f'<figure class="figure">{svg}</figure>'


def _summary(data: RunData) -> str:
    config, metrics = data.config, data.metrics
    planned = config.get("train", {}).get("epochs")
    items = [
        ("model", config.get("model", {}).get("pretrained", "?")),
        ("algorithm", config.get("train", {}).get("algorithm", "?")),
        ("reward", "+".join(t.get("name", "?") for t in config.get("reward", {}).get("terms", [])) or config.get("reward", {}).get("name", "?")),
        ("prompts", config.get("prompts", {}).get("source", "?")),
        ("epochs finished", f"{metrics[-1]['epoch'] if metrics else 0}" + (f" of {planned}" if planned else "")),
        ("reward queries", f"{metrics[-1].get('samples', '?') if metrics else 0}"),
    ]
    if metrics:
        first, last = metrics[0], metrics[-1]
        items.append(("reward, first -> last epoch", f"{first.get('reward_mean', math.nan):.4g} -> {last.get('reward_mean', math.nan):.4g}"))
    if data.best:
        stopped = f"; stopped early after epoch {data.best['stopped_after_epoch']}" if "stopped_after_epoch" in data.best else ""
        items.append(("best checkpoint (held-out)", f"{data.best.get('checkpoint')} ({data.best.get('metric')} {data.best.get('value', math.nan):.4g}){stopped}"))
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in items)
    return f'<table class="summary">{rows}</table>'


def _reward_section(data: RunData) -> str:
    m = data.metrics
    xs = [r.get("samples", math.nan) for r in m]
    means = [r.get("reward_mean", math.nan) for r in m]
    stds = [r.get("reward_std", math.nan) for r in m]
    band = ([a - b for a, b in zip(means, stds)], [a + b for a, b in zip(means, stds)])
    chart = Chart("reward mean ± std per epoch", "reward queries (samples)", [Series("reward", xs, means, band)], empty_note="no finished epoch yet")
    return _figure(render_chart(chart, width=620, height=300))


def _training_section(data: RunData) -> str:
    epochs = [r.get("epoch") for r in data.metrics]
    figures = []
    for key in ("loss", "approx_kl", "clipfrac"):
        values = [r.get(key, math.nan) for r in data.metrics]
        note = "no finished epoch yet" if not data.metrics else f"{key} not recorded by this algorithm"
        figures.append(_figure(render_chart(Chart(key, "epoch", [Series(key, epochs, values)], empty_note=note), width=330, height=220)))
    return f'<div class="row">{"".join(figures)}</div>'


PEOPLE_METRICS = (
    ("reward_labels_new", "labels per epoch"),
    ("reward_label_latency_seconds", "label latency (s, pair queued to labelled)"),
    ("reward_people_share", "share of pairs whose reward came from people"),
    ("reward_model_labels", "labels the preference model was fitted on"),
    ("reward_wait_seconds", "seconds training waited for the reward"),
)


def _people_section(data: RunData) -> str | None:
    """Charts of the people-in-the-loop metrics (`people_and_model`), or None for a run without them."""
    if not any("reward_labels_new" in r for r in data.metrics):
        return None
    epochs = [r.get("epoch") for r in data.metrics]
    figures = [
        _figure(render_chart(Chart(label, "epoch", [Series(key, epochs, [r.get(key, math.nan) for r in data.metrics])], empty_note=f"{key} not recorded"), width=330, height=220))
        for key, label in PEOPLE_METRICS
    ]
    return f'<div class="row">{"".join(figures)}</div>'


def _monitor_section(data: RunData) -> str:
    records = data.monitor
    if not records:
        every = data.config.get("log", {}).get("eval_every")
        why = "log.eval_every = 0 turns it off" if every == 0 else "no evaluation has run yet"
        return f'<p class="note">No periodic evaluation in this run ({html.escape(why)}).</p>'
    epochs = [r["epoch"] for r in records]
    flag = overoptimization(records)
    markers = [(flag["epoch"], f"held-out peak, epoch {flag['epoch']}")] if flag else []
    if data.best and data.best.get("epoch") is not None and (not flag or data.best["epoch"] != flag["epoch"]):
        markers.append((data.best["epoch"], f"kept: epoch {data.best['epoch']}"))
    reward_name = records[-1].get("reward_name") or "training reward"
    heldout_name = records[-1].get("heldout_reward")

    split = any(finite(r.get("train_reward_on_heldout")) for r in records)  # both groups: show each too
    groups = (("", "all prompts"), ("_on_trained", "trained prompts"), ("_on_heldout", "held-out prompts")) if split else (("", "all prompts"),)

    def series(key: str, label: str) -> list[Series]:
        out = []
        for suffix, group in groups:
            values = [r.get(key + suffix, math.nan) for r in records]
            if any(finite(v) for v in values):
                out.append(Series(f"{label}, {group}", epochs, values))
        return out

    charts = [
        Chart(f"training reward ({reward_name}) on eval samples", "epoch", series("train_reward", "reward"), markers),
        Chart(f"held-out score ({heldout_name})" if heldout_name else "held-out score", "epoch", series("heldout_score", "held-out"), markers,
              empty_note="no held-out scorer (log.heldout_reward)"),
        Chart("KL to the base model (sum over steps, per dim)", "epoch", series("kl", "KL"), markers, empty_note="not measured (full fine-tuning)"),
        Chart("diversity (pixel RMS distance, same prompt)", "epoch", series("diversity", "diversity"), markers),
    ]  # fmt: skip
    if flag:
        held = _distinct(flag["heldout_at_peak"], flag["heldout_last"])
        reward = _distinct(flag["reward_at_peak"], flag["reward_last"])
        text = (
            f'<p class="flag"><strong>Over-optimization:</strong> the held-out score peaked at epoch {flag["epoch"]} '
            f'({held[0]}) and fell to {held[1]} by epoch {flag["last_epoch"]}, while the '
            f'training reward on the same samples rose from {reward[0]} to {reward[1]}.</p>'
        )
    elif heldout_name:
        text = '<p class="note">No over-optimization seen: the held-out score has not fallen after a peak while the training reward rose.</p>'
    else:
        text = '<p class="note">Without a held-out scorer (log.heldout_reward) over-optimization cannot be flagged.</p>'
    last = records[-1]
    numbers = ", ".join(f"{k} = {last[k]:.4g}" for k in ("train_reward_on_trained", "train_reward_on_heldout", "heldout_score_on_trained", "heldout_score_on_heldout") if finite(last.get(k)))
    generalization = f'<p class="note">Last evaluation (epoch {last["epoch"]}): {html.escape(numbers)}.</p>' if numbers else ""
    return text + generalization + f'<div class="row">{"".join(_figure(render_chart(c, width=440, height=250)) for c in charts)}</div>'


def _prompt_section(data: RunData) -> str:
    rows = prompt_table(data.prompt_rewards)
    if not rows:
        why = "no finished epoch yet" if not data.metrics else "this run recorded no per-prompt rewards (prompt_rewards.jsonl)"
        return f'<p class="note">No per-prompt rewards: {html.escape(why)}.</p>'

    epochs = [r["epoch"] for r in data.prompt_rewards]
    window = prompt_window(len(epochs))
    first, last = epochs[:window], epochs[-window:]
    ends = tuple(f"epoch {e[0]}" if len(e) == 1 else f"epochs {e[0]}–{e[-1]}" for e in (first, last))

    def table(title: str, chosen: list[dict]) -> str:
        head = f"<tr><th>prompt</th><th>{ends[0]}</th><th>{ends[1]}</th><th>change</th><th>all epochs</th><th>samples</th></tr>"
        body = "".join(
            f"<tr><td>{html.escape(r['prompt'])}</td><td>{_number(r['first'])}</td><td>{_number(r['recent'])}</td>"
            f"<td>{_number(r['recent'] - r['first'], '+.4g')}</td><td>{_number(r['all'])}</td><td>{r['samples']}</td></tr>"
            for r in chosen
        )
        return f'<table class="prompts"><caption>{html.escape(title)}</caption>{head}{body}</table>'

    if len(rows) <= 2 * TABLE_ROWS:
        return table(f"all {len(rows)} prompts, best first (mean reward of the later epochs)", rows)
    return f'<div class="row">{table(f"best {TABLE_ROWS} of {len(rows)} prompts", rows[:TABLE_ROWS])}{table(f"worst {TABLE_ROWS} of {len(rows)} prompts", rows[-TABLE_ROWS:][::-1])}</div>'


def _samples_section(data: RunData) -> tuple[str, str]:
    """(same-seed strips, first vs last) sections' bodies."""
    if not data.grids:
        why = "no samples folder" if not data.run.samples_dir.is_dir() else "no sample grid yet"
        note = f'<p class="note">No sample images: {why}.</p>'
        return note, note
    images = {epoch: Image.open(path).convert("RGB") for epoch, path in data.grids.items()}
    first_epoch, last_epoch = min(images), max(images)
    prompts, seeds, cell_w, cell_h = _grid_shape(data, images[first_epoch])
    shown = strip_epochs(list(images))
    header = "".join(f"<th>epoch {e}</th>" for e in shown)
    rows = []
    for row, prompt in enumerate(prompts):
        cells = []
        for epoch in shown:
            grid = images[epoch]
            column = grid.crop((0, row * cell_h, min(grid.width, seeds * cell_w), (row + 1) * cell_h))
            column = _column_of(column, seeds, cell_w, cell_h)
            cells.append(f"<td>{_img(png_data_uri(_shrink(column, cell_w)), f'{prompt}, epoch {epoch}')}</td>")
        rows.append(f"<tr><th>{html.escape(prompt)}</th>{''.join(cells)}</tr>")
    strips = (
        f'<p class="note">Each column is one epoch; within a column, seeds 0..{seeds - 1} top to bottom: the same noise every epoch.</p>'
        f'<div class="scroll"><table class="strips"><tr><th>prompt</th>{header}</tr>{"".join(rows)}</table></div>'
    )
    labels = "".join(f"<li>{html.escape(p)}</li>" for p in prompts)
    pair = []
    for epoch, title in ((first_epoch, "before training" if first_epoch == 0 else f"epoch {first_epoch}"), (last_epoch, f"epoch {last_epoch}")):
        pair.append(f'<figure class="grid"><figcaption>{html.escape(title)}</figcaption>{_img(png_data_uri(_shrink(images[epoch], cell_w)), f"sample grid, {title}", "grid")}</figure>')
    compare = (
        f'<p class="note">Rows, top to bottom: </p><ol class="rows">{labels}</ol>'
        + (f'<div class="row">{"".join(pair)}</div>' if first_epoch != last_epoch else f'<div class="row">{pair[0]}</div><p class="note">Only one grid so far.</p>')
    )
    return strips, compare


def _column_of(row_image: Image.Image, seeds: int, cell_w: int, cell_h: int) -> Image.Image:
    """A grid row (seeds side by side) restacked as a column (seeds top to bottom)."""
    column = Image.new("RGB", (cell_w, cell_h * seeds))
    for s in range(seeds):
        column.paste(row_image.crop((s * cell_w, 0, (s + 1) * cell_w, cell_h)), (0, s * cell_h))
    return column


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1400px;padding:0 16px;color:#222}
h1{font-size:1.5em;margin-bottom:4px} h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
.meta{color:#666;font-size:.9em} .note{color:#555} .flag{background:#fff3e0;border-left:4px solid #e65100;padding:8px 12px}
.notes{background:#fffde7;border-left:4px solid #f9a825;padding:8px 12px 8px 28px}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start} figure{margin:0}
svg.chart{background:#fff;font-size:11px} svg .title{font-size:12.5px;font-weight:600} svg .frame{fill:none;stroke:#999}
svg .grid{stroke:#eee} svg .tick{fill:#555} svg .axis{fill:#333} svg .legend{fill:#333} svg .note{fill:#888;font-size:13px}
svg .marker{stroke:#e65100;stroke-dasharray:4 3} svg .marker-label{fill:#e65100;font-size:10.5px}
table{border-collapse:collapse;font-size:.9em} th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
table.summary th{color:#555;font-weight:500} caption{text-align:left;font-weight:600;padding:4px 0}
img.sample,img.grid{image-rendering:pixelated;display:block} img.sample{width:72px;height:auto} img.grid{width:min(600px,90vw);height:auto}
.scroll{overflow-x:auto} table.strips td{padding:2px} ol.rows{margin:0 0 8px 0}
pre{background:#f6f8fa;padding:12px;overflow-x:auto;font-size:.85em}
"""


def build_report(run_dir: str | Path) -> str:
    """The report of a run as one HTML document (see the module docstring)."""
    data = load_run(run_dir)
    strips, compare = _samples_section(data)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in data.notes)
    title = f"ddpo run {data.run.path.resolve().name}"
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">{html.escape(str(data.run.path.resolve()))} · report written {time.strftime("%Y-%m-%d %H:%M:%S")}</p>',
        f'<ul class="notes">{notes}</ul>' if notes else "",
        _summary(data),
        _section("Reward", _reward_section(data), "reward"),
        _section("Policy update", _training_section(data), "update"),
        _section("People in the loop", people, "people") if (people := _people_section(data)) else "",
        _section("Held-out evaluation and over-optimization", _monitor_section(data), "overoptimization"),
        _section("Per-prompt reward", _prompt_section(data), "prompts"),
        _section("Same prompts, same seeds, epoch after epoch", strips, "strips"),
        _section("First vs last", compare, "first-last"),
        _section("Resolved config", f"<pre>{html.escape(data.config_text)}</pre>" if data.config_text else '<p class="note">No config.toml.</p>', "config"),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        # No script, no fetch: the page is inert and self-contained (images are data: URIs).
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.html atomically; returns its path."""
    run = RunDirectory(run_dir)
    text = build_report(run_dir)
    write_text_atomic(run.report_path, text)
    return run.report_path
