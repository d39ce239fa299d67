"""`ddpo sweep`: reward, held-out score and diversity of a run over a grid of CFG scales x RL-guidance scales.

RL guidance (RLG, arXiv 2508.21016; `ddpo.guidance`) mixes the base and the fine-tuned model's predictions with
a scale s; CFG mixes the conditional and unconditional ones with w. Each cell of the grid samples the run's
evaluation prompts (trained and held out) with the same seeds (`ddpo.training.evaluate.eval_generator`) and scores them as
`ddpo eval` does, so s = 0 reproduces the base model's numbers and s = 1 the checkpoint's, at any w. The page
(RUN_DIR/sweep.html, self-contained like report.html) shows the tables and, per cell, a strip of images of the
same prompts and seeds: on the Shapes world it shows whether RL made CFG unnecessary.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .training.assemble import load_config
from .training.run_directory import RunDirectory, RunDirectoryError, run_of_checkpoint, write_text_atomic


class SweepError(ValueError):
    """A sweep that cannot run as asked; the message names the option."""


@dataclass
class SweepResult:
    run: Path
    checkpoint: str
    cfg_scales: list[float]
    rl_scales: list[float]
    seeds: int
    rewards: list[str]
    cells: dict[tuple[float, float], dict] = field(default_factory=dict)
    """(cfg, rl_scale) -> `ddpo.training.evaluate.summarize`'s {"groups": {group: {reward: mean, "diversity": d}}, ...}"""
    strips: dict[tuple[float, float], list[Image.Image]] = field(default_factory=dict)
    strip_prompts: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "run": str(self.run), "checkpoint": self.checkpoint, "cfg": self.cfg_scales, "rl_scale": self.rl_scales,
            "seeds": self.seeds, "rewards": self.rewards,
            "cells": [{"cfg": w, "rl_scale": s, "groups": cell["groups"]} for (w, s), cell in self.cells.items()],
        }  # fmt: skip


def parse_scales(text: str, option: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SweepError(f"{option} {text!r}: give numbers separated by commas, e.g. 1,2,3") from None
    if not values:
        raise SweepError(f"{option} {text!r}: give at least one number")
    return list(dict.fromkeys(values))


def run_sweep(run_dir: str | Path, cfg_scales: list[float], rl_scales: list[float], *, checkpoint: str | int = "auto", seeds: int | None = None, prompts_per_group: int = 0, strip_seeds: int = 4) -> SweepResult:
    """Evaluate every (cfg, rl_scale) cell; see the module docstring."""
    import torch

    from .training.evaluate import policy_for_checkpoint
    from .training.evaluate import eval_generator, eval_prompts_of, eval_rewards_of, sample_eval_set, score_eval_set, summarize
    from .guidance import rl_guidance
    from .policy import SamplingOptions

    run = run_of_checkpoint(run_dir)
    if run is None or run.path.resolve() != Path(run_dir).resolve():
        raise RunDirectoryError(f"{run_dir}: not a run directory (no config.toml)")
    config = load_config(run.config_path)
    epoch, checkpoint_dir = run.checkpoint(checkpoint)
    if not (checkpoint_dir / "pytorch_lora_weights.safetensors").is_file():
        raise SweepError(f"{checkpoint_dir}: RL guidance mixes the base model with a LoRA, and this checkpoint holds full weights")
    if any(w < 1 for w in cfg_scales):
        raise SweepError(f"--cfg {min(cfg_scales)}: CFG scales start at 1 (no guidance)")
    num_seeds = seeds or config.log.num_eval_seeds
    if num_seeds < 2:
        raise SweepError("--seeds must be at least 2: diversity compares samples of a prompt across seeds")
    prompts = eval_prompts_of(config, limit=prompts_per_group)
    rewards = eval_rewards_of(config)
    strip_prompts = [prompts.prompts[prompts.groups.index(g)] for g in dict.fromkeys(prompts.groups)]  # one per group
    result = SweepResult(run.path, f"epoch-{epoch:04d}", cfg_scales, rl_scales, num_seeds, list(rewards), strip_prompts=strip_prompts)
    for w in cfg_scales:
        sampling = SamplingOptions(num_steps=config.sample.num_steps, eta=config.sample.eta, guidance_scale=w, height=config.sample.height, width=config.sample.width, scheduler=config.sample.scheduler)
        policy = policy_for_checkpoint(config.model.pretrained, checkpoint_dir, sampling, flow_num_steps=config.sample.eval_num_steps or config.sample.num_steps)
        for s in rl_scales:
            with rl_guidance(policy, s), torch.no_grad():
                samples = sample_eval_set(policy, prompts, num_seeds, config.sample.batch_size)
                cells = [(p, k) for p in strip_prompts for k in range(strip_seeds)]
                strip = policy.sample([p for p, _ in cells], [eval_generator(p, k) for p, k in cells]).images
            result.cells[(w, s)] = summarize(samples, score_eval_set(samples, rewards))
            result.strips[(w, s)] = strip
    return result


# ---- the page ---------------------------------------------------------------------------------------------
STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1400px;padding:0 16px;color:#222}
h1{font-size:1.5em;margin-bottom:4px} h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
.meta,.note{color:#555;font-size:.9em} table{border-collapse:collapse;font-size:.9em;margin:8px 0 16px}
th,td{padding:4px 10px;border:1px solid #e4e4e4;text-align:right} th{background:#fafafa;font-weight:600}
caption{text-align:left;font-weight:600;padding:4px 0} td.ref{outline:2px solid #1565c0;outline-offset:-2px}
img.strip{image-rendering:pixelated;display:block;height:64px;width:auto} table.strips td{text-align:left}
"""


def _shade(value: float, low: float, high: float) -> str:
    """A background from white (low) to green (high) for a table cell."""
    if high <= low:
        return "#ffffff"
    t = max(0.0, min(1.0, (value - low) / (high - low)))
    return f"rgb({int(255 - 120 * t)},{int(255 - 40 * t)},{int(255 - 120 * t)})"


def _strip_uri(images: list[Image.Image]) -> str:
    from .charts import png_data_uri

    width, height = images[0].size
    canvas = Image.new("RGB", (width * len(images), height), "white")
    for k, image in enumerate(images):
        canvas.paste(image, (k * width, 0))
    return png_data_uri(canvas)


def _table(result: SweepResult, group: str, metric: str) -> str:
    values = {key: cell["groups"].get(group, {}).get(metric) for key, cell in result.cells.items()}
    present = [v for v in values.values() if isinstance(v, (int, float))]
    if not present:
        return ""
    low, high = min(present), max(present)
    header = "".join(f"<th>RL scale {s:g}</th>" for s in result.rl_scales)
    rows = []
    for w in result.cfg_scales:
        cells = []
        for s in result.rl_scales:
            v = values[(w, s)]
            ref = ' class="ref"' if s in (0.0, 1.0) else ""
            cells.append(f'<td{ref} style="background:{_shade(v, low, high)}">{v:.4f}</td>' if isinstance(v, (int, float)) else "<td>-</td>")
        rows.append(f"<tr><th>CFG {w:g}</th>{''.join(cells)}</tr>")
    caption = f"{html.escape(metric)} · {html.escape(group)} prompts"
    return f"<table><caption>{caption}</caption><tr><th></th>{header}</tr>{''.join(rows)}</table>"


def build_page(result: SweepResult) -> str:
    groups = [g for g in ("trained", "heldout", "all") if any(g in c["groups"] for c in result.cells.values())]
    metrics = [*result.rewards, "diversity"]
    tables = "".join(_table(result, g, m) for m in metrics for g in groups)
    header = "".join(f"<th>RL scale {s:g}</th>" for s in result.rl_scales)
    strip_rows = []
    for w in result.cfg_scales:
        cells = "".join(f'<td><img class="strip" alt="CFG {w:g}, RL scale {s:g}" src="{_strip_uri(result.strips[(w, s)])}"></td>' for s in result.rl_scales)
        strip_rows.append(f"<tr><th>CFG {w:g}</th>{cells}</tr>")
    prompts = ", ".join(f"&ldquo;{html.escape(p)}&rdquo;" for p in result.strip_prompts)
    title = f"ddpo sweep {result.run.resolve().name}"
    body = f"""<h1>{html.escape(title)}</h1>
<p class="meta">{html.escape(str(result.run.resolve()))} · checkpoint {result.checkpoint} · {result.seeds} seeds per prompt · written {time.strftime("%Y-%m-%d %H:%M:%S")}</p>
<p class="note">RL guidance mixes the base and fine-tuned predictions, base + s (fine-tuned &minus; base): s = 0 is the base
model, s = 1 the fine-tuned one (framed cells), s &gt; 1 goes further. Every cell samples the same prompts with the same
seeds. If RL replaced classifier-free guidance, the fine-tuned model at low CFG scores as the base model at high CFG,
with more diversity.</p>
<h2>Scores</h2>{tables}
<h2>Samples</h2><p class="note">Each strip: {prompts}, seeds 0&ndash;{len(next(iter(result.strips.values()))) // max(1, len(result.strip_prompts)) - 1}.</p>
<div style="overflow-x:auto"><table class="strips"><tr><th></th>{header}</tr>{''.join(strip_rows)}</table></div>"""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>{body}</body></html>\n"
    )


def write_sweep(result: SweepResult, out: str | Path | None = None) -> Path:
    """RUN_DIR/sweep.html (or `out`) and the numbers beside it as .json; both written atomically."""
    page = Path(out) if out else RunDirectory(result.run).path / "sweep.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(page.with_suffix(".json"), json.dumps(result.to_json(), indent=2) + "\n")
    write_text_atomic(page, build_page(result))
    return page
