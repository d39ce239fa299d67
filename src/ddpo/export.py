"""`ddpo export`: a run's checkpoint as a diffusers pipeline directory with a hub model card.

    OUT/model_index.json, unet/, vae/, ...   the pipeline (`DiffusionPipeline.from_pretrained(OUT)` loads it offline)
    OUT/pytorch_lora_weights.safetensors     without --merge: the LoRA, applied with `pipe.load_lora_weights(OUT)`
    OUT/README.md                            the model card (YAML front matter in the hub's format)
    OUT/images/before-after.png              the run's fixed-seed grid before training | after

With `--merge` the LoRA is fused into the UNet's weights (`fuse_lora`) and the directory is a plain pipeline;
without it the base pipeline is copied unchanged next to the LoRA file, so the directory still loads offline and
the adapter can be switched off or scaled. A full fine-tune (no LoRA) is always written merged. The directory is
written into a temporary sibling and renamed: an export that fails leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .training.assemble import load_config
from .training.run_directory import RunDirectory, RunDirectoryError, read_jsonl, run_of_checkpoint

LORA_FILE = "pytorch_lora_weights.safetensors"
CARD_TAGS = ["diffusers", "text-to-image", "reinforcement-learning", "ddpo"]


class ExportError(ValueError):
    """The run cannot be exported as asked; the message names the problem."""


@dataclass
class ExportResult:
    path: Path
    merged: bool
    epoch: int
    size_bytes: int


def export_run(run_dir: str | Path, out: str | Path, *, checkpoint: str | int = "auto", merge: bool = False) -> ExportResult:
    """Write the pipeline directory of `run_dir`'s checkpoint `checkpoint` (an epoch, "latest", "best", "auto") to `out`."""
    from .policy import PolicyLoadError, load_pipeline, resolve_model

    run = run_of_checkpoint(run_dir)
    if run is None or run.path.resolve() != Path(run_dir).resolve():
        raise RunDirectoryError(f"{run_dir}: not a run directory (no config.toml); export takes RUN_DIR and --checkpoint N")
    out = Path(out)
    if out.exists() and any(out.iterdir()) if out.is_dir() else out.exists():
        raise ExportError(f"--out {out} exists and is not empty; choose a new directory")
    config = load_config(run.config_path)
    epoch, checkpoint_dir = run.checkpoint(checkpoint)
    is_lora = (checkpoint_dir / LORA_FILE).is_file()
    try:
        pipe = load_pipeline(resolve_model(config.model.pretrained), config.model.revision)
    except FileNotFoundError as error:
        raise PolicyLoadError(str(error)) from error
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        if is_lora and merge:
            pipe.load_lora_weights(str(checkpoint_dir))
            pipe.fuse_lora()
            pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
        elif not is_lora:
            from .training.run_directory import load_checkpoint_into

            load_checkpoint_into(pipe, checkpoint_dir)
        pipe.save_pretrained(tmp, safe_serialization=True)
        if is_lora and not merge:
            shutil.copy2(checkpoint_dir / LORA_FILE, tmp / LORA_FILE)
        before_after = run.samples_dir / "before-after.png"
        if before_after.is_file():
            (tmp / "images").mkdir()
            shutil.copy2(before_after, tmp / "images" / "before-after.png")
        card = model_card_text(run, config, epoch, merged=merge or not is_lora, lora=is_lora, has_image=before_after.is_file())
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return ExportResult(path=out, merged=merge or not is_lora, epoch=epoch, size_bytes=size)


def push_to_hub(directory: str | Path, repo_id: str, *, token: str | None = None, private: bool = False) -> str:
    """Upload an exported directory to the hub as model repo `repo_id`; returns the repo's URL.

    Not exercised by the test suite (no hub access there): tests stop at the `upload_folder` call.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import get_token

    token = token or get_token()
    if not token:
        raise ExportError("--push needs a Hugging Face token: run `huggingface-cli login` or set HF_TOKEN")
    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(directory), repo_id=repo_id, repo_type="model", commit_message="Upload a ddpo-trained pipeline")
    return str(url)


# ---- the model card ---------------------------------------------------------------------------------------
def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def _base_license(pretrained: str) -> str | None:
    """The base model's license from its own model card, where it can be read offline (a local directory's
    README.md, or the hub cache); None when unknown."""
    from huggingface_hub import ModelCard

    from .policy import resolve_model

    try:
        if pretrained in ("shapes", "shapes-flow"):
            return "mit"  # shipped with ddpo, under ddpo's license
        local = Path(resolve_model(pretrained)) / "README.md"
        if local.is_file():
            return ModelCard.load(local).data.to_dict().get("license")
        if _is_hub_id(pretrained):
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(pretrained, "README.md")
            if isinstance(cached, str):
                return ModelCard.load(cached).data.to_dict().get("license")
    except Exception:  # noqa: BLE001 - a card we cannot read means "license unknown", said as such in the card
        return None
    return None


def _evaluation_rows(run: RunDirectory, epoch: int) -> tuple[list[tuple[str, float, float]], str]:
    """(metric, before, after) from the run's periodic evaluation (monitor.jsonl: epoch 0 vs `epoch`), else from
    `ddpo eval`'s eval.json; and a sentence saying where they come from."""
    records = {r["epoch"]: r for r in read_jsonl(run.monitor_path, tolerant=True)}
    before, after = records.get(0), records.get(epoch)
    if before and after:
        keys = [k for k, v in after.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "samples", "seconds") and k in before]
        names = {"train_reward": f"reward {after.get('reward_name')}", "heldout_score": f"held-out {after.get('heldout_reward')}", "kl": "KL to base", "diversity": "diversity"}

        def label(key: str) -> str:
            stem, _, group = key.partition("_on_")
            return names.get(stem, stem) + (f" ({group} prompts)" if group else "")

        rows = [(label(k), float(before[k]), float(after[k])) for k in keys]
        return rows, f"the run's periodic evaluation (monitor.jsonl), before training and after epoch {epoch}, {after.get('samples', '?')} reward queries, fixed prompts x fixed seeds"
    eval_path = run.path / "eval.json"
    if eval_path.is_file():
        report = json.loads(eval_path.read_text())
        models = report.get("models", {})
        name = f"epoch-{epoch:04d}"
        if "base" in models and name in models:
            rows = []
            for group, values in models[name]["groups"].items():
                for reward, value in values.items():
                    base = models["base"]["groups"].get(group, {}).get(reward)
                    if isinstance(value, (int, float)) and isinstance(base, (int, float)):
                        rows.append((f"{reward} ({group})", float(base), float(value)))
            return rows, f"`ddpo eval` (eval.json), {report.get('seeds', '?')} seeds per prompt"
    return [], ""


def model_card_text(run: RunDirectory, config: Config, epoch: int, *, merged: bool, lora: bool, has_image: bool) -> str:
    """README.md in the hub's format: YAML front matter (base model, library, tags, license) and the run's numbers."""
    from huggingface_hub import ModelCardData

    metrics = [r for r in run.read_metrics() if r["epoch"] <= epoch]
    last = metrics[-1] if metrics else {}
    reward = config.reward.name if not config.reward.terms else " + ".join(f"{t['weight']} x {t['name']}" for t in config.reward.terms)
    pretrained = config.model.pretrained
    is_sft = (run.path / "sft.json").is_file()
    license_ = _base_license(pretrained)
    data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=(["diffusers", "text-to-image", "ddpo", "sft"] if is_sft else [*CARD_TAGS, config.train.algorithm.replace("_", "-")]) + (["lora"] if lora else []),
        base_model=pretrained if _is_hub_id(pretrained) else None,
        license=license_ or "other",
    )
    rows, source = _evaluation_rows(run, epoch)
    table = "\n".join(f"| {name} | {before:.4f} | {after:.4f} | {after - before:+.4f} |" for name, before, after in rows if math.isfinite(before) and math.isfinite(after))
    first_reward = metrics[0].get("reward_mean") if metrics else None  # None for a `ddpo sft` run (no reward)
    usage = (
        "pipe = DiffusionPipeline.from_pretrained(\"PATH_OR_REPO\")  # the LoRA is fused into the UNet"
        if merged
        else "pipe = DiffusionPipeline.from_pretrained(\"PATH_OR_REPO\")  # the base model\npipe.load_lora_weights(\"PATH_OR_REPO\")  # the RL-trained LoRA"
    )
    base_line = f"[{pretrained}](https://huggingface.co/{pretrained})" if _is_hub_id(pretrained) else f"`{pretrained}` (shipped with ddpo)" if pretrained in ("shapes", "shapes-flow") else f"`{pretrained}`"
    sft = json.loads((run.path / "sft.json").read_text()) if is_sft else None
    adapter = "LoRA rank " + str(config.model.lora_rank) if lora else "all UNet weights"
    if sft is None:
        lines = [
            f"# {run.path.name}: {config.train.algorithm} fine-tune of {pretrained}",
            "",
            f"Trained with [ddpo](https://pypi.org/project/ddpo/) by reinforcement learning against the reward `{reward}`.",
            "",
            f"- Base model: {base_line}" + ("" if license_ else " (license of the base model unknown: check it before sharing)"),
            f"- Algorithm: `{config.train.algorithm}`; {adapter}" + (", fused into the weights" if lora and merged else ""),
            f"- Reward: `{reward}`; prompts: `{config.prompts.source}`" + (f" (`{config.prompts.file}`)" if config.prompts.file else ""),
            f"- Checkpoint: epoch {epoch} of {config.train.epochs}; reward queries: {last.get('samples', 0)}",
            f"- Sampling: {config.sample.num_steps} steps, eta {config.sample.eta}, guidance {config.sample.guidance_scale}, {config.sample.width}x{config.sample.height}",
        ]
    else:
        lines = [
            f"# {run.path.name}: supervised fine-tune of {pretrained}",
            "",
            "Trained with [ddpo](https://pypi.org/project/ddpo/) by supervised fine-tuning on demonstrations (`ddpo sft`).",
            "",
            f"- Base model: {base_line}" + ("" if license_ else " (license of the base model unknown: check it before sharing)"),
            f"- Method: the model's own denoising loss on image-caption pairs; {adapter}" + (", fused into the weights" if lora and merged else ""),
            f"- Data: `{sft.get('data')}`; checkpoint: epoch {epoch} of {sft.get('epochs')}, {last.get('samples', 0)} images seen (batch {sft.get('batch_size')}, lr {sft.get('lr')})",
        ]
    if first_reward is not None:
        lines.append(f"- Training reward (batch mean): {first_reward:.4f} in epoch 1, {last['reward_mean']:.4f} in epoch {last['epoch']}")
    lines += ["", "## Evaluation", "", f"Before and after, measured by {source}." if rows else "No before/after evaluation recorded: run `ddpo eval RUN_DIR` before exporting to add one.", ""]
    if table:
        lines += ["| metric | before | after | change |", "|---|---|---|---|", table, ""]
    if has_image:
        lines += ["## Samples", "", "Fixed prompts and seeds, before training (left) and after (right):", "", "![before and after](images/before-after.png)", ""]
    lines += ["## Use", "", "```python", "from diffusers import DiffusionPipeline", "", usage, "```", ""]
    lines += ["## Training config", "", "```toml", run.config_path.read_text(encoding="utf-8").strip(), "```", ""]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
