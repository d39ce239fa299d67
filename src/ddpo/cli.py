"""The `ddpo` command."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

DEFAULT_PRESET = "shapes/default"
# Keys a resumed run may change: how long it runs and how it logs, not what the checkpoint holds.
RESUMABLE_OVERRIDES = ("train.epochs=", "log.")


class UserError(click.ClickException):
    """Bad input: printed as one line `ddpo: error: ...`, exit status 2, no traceback."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"ddpo: error: {self.format_message()}", err=True)


def _user_errors() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .policy import PolicyLoadError
    from .prompts import PromptSourceError
    from .rewards import RewardError
    from .run_directory import RunDirectoryError

    return (ConfigError, PolicyLoadError, PromptSourceError, RewardError, RunDirectoryError, FileNotFoundError)


def _quiet_libraries() -> None:
    """Keep the console to our own messages: library warnings about optional back-ends are not actionable."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """RL fine-tuning of text-to-image diffusion models (DDPO and successors)."""


@main.command()
@click.option("--config", "config_path", metavar="FILE.toml|PRESET", help=f"Config file or preset name (default: {DEFAULT_PRESET}).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override one config key; repeatable.")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory to create (default: runs/<run_name or time>).")
@click.option("--resume", type=click.Path(), help="Continue the run in this directory from its latest checkpoint.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def train(config_path: str | None, overrides: tuple[str, ...], out: str | None, resume: str | None, no_progress: bool) -> None:
    """Train a policy against a reward; with no options, the embedded Shapes default."""
    _quiet_libraries()
    from .config import load_config
    from .run_directory import RunDirectory
    from .train import train as run_training

    try:
        if resume:
            if config_path or out:
                raise UserError("--resume continues a run in place with its own config.toml; use --set to change keys, not --config/--out")
            run = RunDirectory.open(resume)
            structural = [o for o in overrides if not o.strip().startswith(RESUMABLE_OVERRIDES)]
            if structural:
                raise UserError(f"--resume can only change {', '.join(RESUMABLE_OVERRIDES)}; {structural[0]!r} would change what the checkpoint holds")
            config = load_config(run.config_path, overrides)
            run_dir = Path(resume)
        else:
            config = load_config(config_path or DEFAULT_PRESET, overrides)
            run_dir = Path(out) if out else Path("runs") / (config.run_name or time.strftime("%Y%m%d-%H%M%S"))
        path = run_training(config, run_dir, resume=bool(resume), progress=not no_progress)
    except _user_errors() as error:
        raise UserError(str(error).strip('"')) from error
    click.echo(f"run directory: {path}")


@main.command()
@click.option("--model", "model", default="shapes", show_default=True, help="Hub id, local pipeline directory, or 'shapes'.")
@click.option("--lora", type=click.Path(exists=True), help="A run directory (its latest checkpoint) or a checkpoint directory.")
@click.option("--prompt", required=True, help="Text prompt.")
@click.option("-n", "num_images", default=4, show_default=True, help="Images (one per seed: seed, seed+1, ...).")
@click.option("--seed", default=0, show_default=True)
@click.option("--steps", "num_steps", type=int, help="Denoising steps (default: the run's config, else 50).")
@click.option("--guidance", "guidance_scale", type=float, help="CFG scale (default: the run's config, else 5).")
@click.option("--eta", type=float, help="DDIM eta (default: the run's config, else 1).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output PNG (a row of images).")
def sample(model: str, lora: str | None, prompt: str, num_images: int, seed: int, num_steps, guidance_scale, eta, out: str) -> None:
    """Sample images from a base model, optionally with a trained LoRA."""
    _quiet_libraries()
    import torch

    from .config import Config, load_config
    from .policy import LoraOptions, SamplingOptions, StableDiffusionPolicy, load_pipeline, resolve_model
    from .policy.stable_diffusion import native_image_size
    from .run_directory import RunDirectory, resolve_adapter_dir
    from .utils import image_grid

    try:
        adapter_dir = resolve_adapter_dir(lora) if lora else None
        from_run = bool(lora) and RunDirectory(lora).config_path.is_file()
        config = load_config(RunDirectory(lora).config_path) if from_run else Config()  # sample as the run trained
        pipe = load_pipeline(resolve_model(model))
        if adapter_dir is not None:
            pipe.load_lora_weights(str(adapter_dir))
        native = native_image_size(pipe)
        sampling = SamplingOptions(
            num_steps=num_steps or config.sample.num_steps,
            eta=config.sample.eta if eta is None else eta,
            guidance_scale=config.sample.guidance_scale if guidance_scale is None else guidance_scale,
            height=config.sample.height if from_run else native,
            width=config.sample.width if from_run else native,
        )
        policy = StableDiffusionPolicy(pipe, sampling, LoraOptions(enabled=False))
        generators = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
        images = policy.sample([prompt] * num_images, generators).images
    except _user_errors() as error:
        raise UserError(str(error)) from error
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, 1, num_images).save(out)
    click.echo(out)


@main.group()
def toy() -> None:
    """The Shapes world: the shipped tiny model, its pretraining and evaluation."""


@toy.command("path")
def toy_path() -> None:
    """Print the directory of the shipped Shapes pipeline."""
    from .toyworld import shipped_pipeline_dir

    try:
        click.echo(shipped_pipeline_dir())
    except FileNotFoundError as error:
        raise UserError(str(error)) from error


@toy.command("pretrain")
@click.option("--work", required=True, type=click.Path(file_okay=False), help="Work directory (resumes if it exists).")
@click.option("--seed", default=0, show_default=True)
@click.option("--unet-steps", type=int, help="UNet pretraining steps (default: PretrainConfig's).")
def toy_pretrain(work: str, seed: int, unet_steps: int | None) -> None:
    """Pretrain the Shapes pipeline, recognisers included (deterministic from the seed, resumable)."""
    _quiet_libraries()
    from .toyworld.pretrain import PretrainConfig, Pretrainer

    config = PretrainConfig(seed=seed)
    if unet_steps is not None:
        config.unet_steps = unet_steps
    path = Pretrainer(work, config, log=lambda message: click.echo(message)).run()
    click.echo(f"pipeline: {path}")


@toy.command("evaluate")
@click.option("--model", default="shapes", show_default=True, help="Shapes pipeline directory or 'shapes'.")
@click.option("--lora", type=click.Path(exists=True), help="A run directory (latest checkpoint) or a checkpoint directory.")
@click.option("--judge", type=click.Path(exists=True, dir_okay=False), help="Judge weights (default: the shipped judge).")
@click.option("--seeds", default=8, show_default=True, help="Seeds per prompt.")
@click.option("--steps", default=20, show_default=True)
@click.option("--guidance", default=3.0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the JSON here.")
def toy_evaluate(model: str, lora: str | None, judge: str | None, seeds: int, steps: int, guidance: float, out: str | None) -> None:
    """Judge exact match on common, unusual-train and unusual-held-out prompts (JSON)."""
    _quiet_libraries()
    import json

    from .policy import resolve_model
    from .run_directory import resolve_adapter_dir
    from .toyworld import WEIGHTS_DIR
    from .toyworld.evaluation import judge_exact_match

    try:
        adapter = resolve_adapter_dir(lora) if lora else None
        judge_path = judge or WEIGHTS_DIR / "judge.safetensors"
        result = judge_exact_match(resolve_model(model), judge_path, seeds=seeds, num_steps=steps, guidance_scale=guidance, lora_dir=adapter)
    except _user_errors() as error:
        raise UserError(str(error)) from error
    text = json.dumps({"model": model, "lora": str(adapter) if adapter else None, "seeds": seeds, "judge_exact_match": result}, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    click.echo(text)


if __name__ == "__main__":
    sys.exit(main())
