"""The `ddpo` command."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

DEFAULT_PRESET = "shapes/default"
# Keys a resumed run may change: how long it runs, how it logs and where its reward server is, not what the
# checkpoint holds.
RESUMABLE_OVERRIDES = ("train.epochs=", "train.early_stop", "log.", "reward.url=")


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
    from .rewards.remote import RemoteRewardError
    from .run_directory import RunDirectoryError
    from .train import OffPolicyError

    # FloatingPointError: training stopped on a non-finite loss before the update reached the weights.
    # RemoteRewardError: a reward server that stopped answering during the run (at start-up it is a ConfigError).
    return (ConfigError, PolicyLoadError, PromptSourceError, RewardError, RunDirectoryError, FileNotFoundError, FloatingPointError, OffPolicyError, RemoteRewardError)


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
@click.option("--resume", type=click.Path(), metavar="RUN_DIR|auto",
              help="Continue the run in this directory from its latest checkpoint; 'auto' (with --out): continue --out if it holds a checkpoint, else start it.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def train(config_path: str | None, overrides: tuple[str, ...], out: str | None, resume: str | None, no_progress: bool) -> None:
    """Train a policy against a reward; with no options, the embedded Shapes default.

    On SIGTERM or SIGUSR1 the run finishes its current optimizer step, writes a checkpoint and exits with
    status 75 (requeue); `ddpo train --resume auto --out RUN_DIR ...` continues it, so one command line can be
    requeued until the run is done."""
    _quiet_libraries()
    from .config import load_config
    from .preemption import REQUEUE_EXIT_STATUS, Preempted
    from .run_directory import RunDirectory
    from .train import train as run_training

    try:
        if resume == "auto":
            resume = _resume_auto(config_path, overrides, out)
            config_path = None if resume else config_path
        if resume:
            if config_path or (out and Path(out) != Path(resume)):
                raise UserError("--resume continues a run in place with its own config.toml; use --set to change keys, not --config/--out")
            run = RunDirectory.open(resume)
            structural = [] if out else [o for o in overrides if not o.strip().startswith(RESUMABLE_OVERRIDES)]  # --resume auto checked them
            if structural:
                raise UserError(f"--resume can only change {', '.join(RESUMABLE_OVERRIDES)}; {structural[0]!r} would change what the checkpoint holds")
            config = load_config(run.config_path, overrides)
            run_dir = Path(resume)
        else:
            config = load_config(config_path or DEFAULT_PRESET, overrides)
            run_dir = Path(out) if out else Path("runs") / (config.run_name or time.strftime("%Y%m%d-%H%M%S"))
        path = run_training(config, run_dir, resume=bool(resume), progress=not no_progress)
    except Preempted as stopped:
        click.echo(f"ddpo: preempted: {stopped}", err=True)
        sys.exit(REQUEUE_EXIT_STATUS)
    except _user_errors() as error:
        raise UserError(str(error).strip('"')) from error
    click.echo(f"run directory: {path}")


def _resume_auto(config_path: str | None, overrides: tuple[str, ...], out: str | None) -> str | None:
    """`--resume auto --out RUN_DIR`: RUN_DIR when it holds a checkpoint (the command line's other keys must then
    agree with its config.toml), else None (start RUN_DIR, discarding a start that never reached a checkpoint)."""
    from .config import config_to_dict, load_config
    from .run_directory import RunDirectory

    if not out:
        raise UserError("--resume auto needs --out RUN_DIR: the run to continue, or to start when it has no checkpoint")
    run = RunDirectory(out)
    if not run.config_path.is_file() or not run.resume_candidates():
        if run.config_path.is_file():  # started, but killed before its first checkpoint: nothing to continue
            for path in (run.config_path, run.metrics_path, run.prompt_rewards_path, run.monitor_path):
                path.unlink(missing_ok=True)
        return None
    requested = config_to_dict(load_config(config_path or DEFAULT_PRESET, overrides))
    resumable = [o for o in overrides if o.strip().startswith(RESUMABLE_OVERRIDES)]
    stored = config_to_dict(load_config(run.config_path, resumable))
    for key, value in _flatten(requested).items():
        if not f"{key}=".startswith(RESUMABLE_OVERRIDES) and not key.startswith(RESUMABLE_OVERRIDES) and _flatten(stored).get(key) != value:
            raise UserError(f"--resume auto: {out} was started with {key} = {_flatten(stored).get(key)!r}, this command line asks for {value!r}; use another --out")
    return str(out)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key in ("model", "sample", "train", "reward", "prompts", "log"):
            flat.update(_flatten(value, f"{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@main.command()
@click.option("--config", "config_path", metavar="FILE.toml|PRESET", help=f"Config file or preset name (default: {DEFAULT_PRESET}).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override one config key; repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the checks and the forecast as JSON.")
def doctor(config_path: str | None, overrides: tuple[str, ...], as_json: bool) -> None:
    """Check that a run would train on-policy here, and forecast its time: builds what `ddpo train` builds
    (same config, model, precision, reward), samples one batch and measures. Exit status 1 when a check fails."""
    import json

    _quiet_libraries()
    from .config import load_config
    from .doctor import run_doctor

    try:
        report = run_doctor(load_config(config_path or DEFAULT_PRESET, overrides))
    except _user_errors() as error:
        raise UserError(str(error).strip('"')) from error
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else report.table())
    if report.failed:
        sys.exit(1)


def _run_config(path: str | None):
    """The config of the run a --lora/target path belongs to (RUN_DIR or RUN_DIR/checkpoints/epoch-NNNN), or None."""
    from .config import load_config
    from .run_directory import run_of_checkpoint

    run = run_of_checkpoint(path) if path else None
    return load_config(run.config_path) if run is not None else None


def _policy_for(model: str, checkpoint_dir, sampling, *, native_size: bool = False, flow_num_steps: int | None = None):
    """A sampling-only policy over `model` (hub id, directory or 'shapes') with a checkpoint applied, if any;
    `native_size` samples at the size the model was trained at instead of `sampling`'s. Flow-matching models
    sample their ODE, with `flow_num_steps` steps if given."""
    from .policy import load_pipeline, resolve_model, sampling_policy
    from .policy.stable_diffusion import native_image_size
    from .run_directory import load_checkpoint_into

    pipe = load_pipeline(resolve_model(model))
    if checkpoint_dir is not None:
        load_checkpoint_into(pipe, checkpoint_dir)
    if native_size:
        sampling.height = sampling.width = native_image_size(pipe)
    return sampling_policy(pipe, sampling, flow_num_steps=flow_num_steps)


CHECKPOINT_HELP = "With a run directory: an epoch number, 'latest', 'best' (best.json), or 'auto' (best if marked, else latest)."


@main.command()
@click.option("--model", "model", help="Hub id, local pipeline directory, or 'shapes' (default: the --lora run's model, else 'shapes').")
@click.option("--lora", type=click.Path(exists=True), help="A run directory or a checkpoint directory (LoRA or full UNet).")
@click.option("--checkpoint", "which", default="auto", show_default=True, help=CHECKPOINT_HELP)
@click.option("--prompt", "prompts", required=True, multiple=True, help="Text prompt; repeatable (one grid row each).")
@click.option("-n", "num_images", default=4, show_default=True, help="Images per prompt (one per seed: seed, seed+1, ...).")
@click.option("--seed", default=0, show_default=True)
@click.option("--steps", "num_steps", type=int, help="Denoising steps (default: the run's config, else 50).")
@click.option("--guidance", "guidance_scale", type=float, help="CFG scale (default: the run's config, else 5).")
@click.option("--eta", type=float, help="DDIM eta (default: the run's config, else 1).")
@click.option("--rl-scale", "rl_scale", type=float, help="RL guidance: base + S x (fine-tuned - base); 0 is the base model, 1 the --lora checkpoint.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output PNG: a grid, one row per prompt.")
def sample(model: str | None, lora: str | None, which: str, prompts: tuple[str, ...], num_images: int, seed: int, num_steps, guidance_scale, eta, rl_scale, out: str) -> None:
    """Sample images from a base model, or from base + a run's checkpoint (any epoch)."""
    _quiet_libraries()
    from contextlib import nullcontext

    import torch

    from .config import Config
    from .guidance import GuidanceError, rl_guidance
    from .policy import SamplingOptions
    from .run_directory import resolve_adapter_dir
    from .utils import image_grid

    try:
        checkpoint_dir = resolve_adapter_dir(lora, which) if lora else None
        run_config = _run_config(lora)
        config = run_config or Config()  # sample as the run trained
        model = model or (config.model.pretrained if run_config else "shapes")
        sampling = SamplingOptions.from_config(config.sample, num_steps=num_steps, eta=eta, guidance_scale=guidance_scale)
        if rl_scale is not None and checkpoint_dir is None:
            raise UserError("--rl-scale mixes a base model with a fine-tuned LoRA: give --lora RUN_DIR")
        policy = _policy_for(model, checkpoint_dir, sampling, native_size=run_config is None)
        cells = [(prompt, seed + i) for prompt in prompts for i in range(num_images)]
        with rl_guidance(policy, rl_scale) if rl_scale is not None else nullcontext():
            images = policy.sample([p for p, _ in cells], [torch.Generator().manual_seed(s) for _, s in cells]).images
    except (GuidanceError, *_user_errors()) as error:
        raise UserError(str(error)) from error
    if checkpoint_dir is not None:
        click.echo(f"checkpoint: {checkpoint_dir}", err=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, len(prompts), num_images).save(out)
    click.echo(out)


@main.command("eval")
@click.argument("target", type=click.Path(exists=True, file_okay=False))
@click.option("--checkpoint", "which", multiple=True, help=CHECKPOINT_HELP + " Repeatable; 'all' for every kept one. Default: best (if marked) and latest.")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), help="Held-out prompts, one per line (default: prompts.heldout_file / the Shapes held-out half); those the run trained on count as trained.")
@click.option("--reward", "rewards", multiple=True, help="Reward name or package.module:function; repeatable (default: the run's reward and held-out scorer).")
@click.option("--seeds", type=int, help="Seeds per prompt (default: log.num_eval_seeds).")
@click.option("--no-base", is_flag=True, help="Skip the base model.")
@click.option("--out", type=click.Path(dir_okay=False), help="Where to write the JSON (default: TARGET/eval.json).")
def eval_command(target: str, which: tuple[str, ...], prompts_file: str | None, rewards: tuple[str, ...], seeds: int | None, no_base: bool, out: str | None) -> None:
    """Score base model and checkpoints on fixed prompts x fixed seeds, trained vs held-out prompts (JSON)."""
    _quiet_libraries()
    import json

    from .evaluate import GROUPS, eval_prompts_of, eval_rewards_of, evaluate_policy
    from .policy import SamplingOptions
    from .run_directory import RunDirectoryError, epoch_name, run_of_checkpoint, write_text_atomic

    try:
        run = run_of_checkpoint(target)
        if run is None:
            raise RunDirectoryError(f"{target}: not a run directory nor a checkpoint inside one (RUN_DIR/checkpoints/epoch-NNNN); its run's config.toml says how to sample and score")
        config = _run_config(target)
        if seeds is not None and seeds < 1:
            raise UserError(f"--seeds {seeds} must be at least 1")
        num_seeds = seeds or config.log.num_eval_seeds
        if Path(target).resolve() == run.path.resolve():
            default = ["best", "latest"] if run.best_epoch() is not None else ["latest"]
            choices = list(which) or default
            if "all" in choices:
                chosen = [epoch for epoch, _ in run.checkpoints()]
            else:
                chosen = [run.checkpoint(choice)[0] for choice in choices]
            checkpoints = {epoch_name(e): run.checkpoint(e)[1] for e in sorted(dict.fromkeys(chosen))}
        else:
            if which:
                raise UserError("--checkpoint picks among a run's checkpoints; TARGET is already one checkpoint")
            checkpoints = {Path(target).name: Path(target)}
        eval_prompts = eval_prompts_of(config, prompts_file)
        scorers = eval_rewards_of(config, rewards)
        sampling = SamplingOptions(
            num_steps=config.sample.num_steps, eta=config.sample.eta, guidance_scale=config.sample.guidance_scale,
            height=config.sample.height, width=config.sample.width, scheduler=config.sample.scheduler, num_frames=config.sample.num_frames,
        )  # fmt: skip
        flow_steps = config.sample.eval_num_steps or config.sample.num_steps  # flow models evaluate as the trainer does
        models = {} if no_base else {"base": None}
        models.update(checkpoints)
        results = {}
        for name, checkpoint_dir in models.items():
            policy = _policy_for(config.model.pretrained, checkpoint_dir, sampling, flow_num_steps=flow_steps)
            results[name] = evaluate_policy(policy, eval_prompts, scorers, num_seeds, config.sample.batch_size)
    except _user_errors() as error:
        raise UserError(str(error)) from error
    report = {
        "run": str(run.path),
        "model": config.model.pretrained,
        "checkpoints": {name: str(path) for name, path in checkpoints.items()},
        "seeds": num_seeds,
        "sampling": {"num_steps": sampling.num_steps, "eta": sampling.eta, "guidance_scale": sampling.guidance_scale},
        "rewards": list(scorers),
        "prompts": {group: eval_prompts.of_group(group) for group in GROUPS},
        "models": results,
    }
    if "base" in results:
        base = results["base"]["groups"]
        report["gain_over_base"] = {
            name: {group: {reward: round(result["groups"][group][reward] - base[group][reward], 6) for reward in scorers} for group in result["groups"]}
            for name, result in results.items() if name != "base"
        }  # fmt: skip
    text = json.dumps(report, indent=2)
    destination = Path(out) if out else Path(target) / "eval.json"
    destination.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(destination, text + "\n")
    click.echo(text)


@main.command()
def models() -> None:
    """The model families ddpo trains: pipeline class, what the tests verify, presets, and each real network's size."""
    from .policy.families import architecture_table

    click.echo(architecture_table())


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
def report(run_dir: str) -> None:
    """Write RUN_DIR/report.html: curves, per-prompt rewards, same-seed samples across epochs, config."""
    from .report import write_report

    try:
        path = write_report(run_dir)
    except _user_errors() as error:
        raise UserError(str(error)) from error
    click.echo(path)


@main.command("sft")
@click.argument("data", required=False, type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Run directory to create.")
@click.option("--resume", type=click.Path(file_okay=False), help="Continue the SFT run in this directory from its latest checkpoint.")
@click.option("--config", "config_path", metavar="FILE.toml|PRESET", help=f"The model and LoRA keys (default: {DEFAULT_PRESET}).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override one config key; repeatable.")
@click.option("--epochs", type=int, help="Passes over the demonstrations (default 10; with --resume: the new total).")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--caption-column", default="text", show_default=True, help="The caption's key in metadata.jsonl.")
def sft(data: str | None, out: str | None, resume: str | None, config_path: str | None, overrides: tuple[str, ...], epochs: int | None, batch_size: int, lr: float, caption_column: str) -> None:
    """Supervised fine-tuning on demonstrations (DATA: images + metadata.jsonl), the RLHF recipe's first step."""
    _quiet_libraries()
    from .config import load_config
    from .sft import SftDataError, SftOptions, SftTrainer, read_options

    try:
        if resume:
            if data or out or config_path or overrides:
                raise UserError("--resume continues an SFT run with its own config.toml and sft.json; give only --epochs")
            options = read_options(resume)
            options.epochs = epochs or options.epochs
            run_dir = resume
            config = load_config(Path(resume) / "config.toml")
        else:
            if not data or not out:
                raise UserError("give DATA (a folder with metadata.jsonl) and --out RUN_DIR, or --resume RUN_DIR")
            options = SftOptions(data=str(Path(data).resolve()), epochs=epochs or 10, batch_size=batch_size, lr=lr, caption_column=caption_column)
            config = load_config(config_path or DEFAULT_PRESET, overrides)
            run_dir = out
        path = SftTrainer(config, options, run_dir, resume=bool(resume), log=click.echo).run()
    except (SftDataError, *_user_errors()) as error:
        raise UserError(str(error)) from error
    click.echo(f"run directory: {path}")


@main.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--checkpoint", "which", default="auto", show_default=True, help=CHECKPOINT_HELP)
@click.option("--out", required=True, type=click.Path(), help="Pipeline directory to write (must not exist, or be empty).")
@click.option("--merge", is_flag=True, help="Fuse the LoRA into the UNet (default: base pipeline + the LoRA file).")
@click.option("--push", "repo_id", metavar="REPO_ID", help="Then upload the directory to the hub as this model repo (needs a token).")
@click.option("--private", is_flag=True, help="With --push: create the repo private.")
def export(run_dir: str, which: str, out: str, merge: bool, repo_id: str | None, private: bool) -> None:
    """Write a run's checkpoint as a diffusers pipeline with a model card (README.md); optionally push it."""
    _quiet_libraries()
    from .export import ExportError, export_run, push_to_hub

    try:
        result = export_run(run_dir, out, checkpoint=which, merge=merge)
        click.echo(f"exported epoch {result.epoch} ({'merged' if result.merged else 'base + LoRA'}, {result.size_bytes / 2**20:.1f} MiB): {result.path}")
        if repo_id:
            click.echo(f"pushed: {push_to_hub(result.path, repo_id, private=private)}")
    except (ExportError, *_user_errors()) as error:
        raise UserError(str(error)) from error


@main.command("sweep")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--cfg", "cfg_scales", default="1,2,3,5", show_default=True, help="CFG scales, comma-separated.")
@click.option("--rl-scale", "rl_scales", default="0,0.5,1,1.5", show_default=True, help="RL-guidance scales, comma-separated (0: base model, 1: the checkpoint).")
@click.option("--checkpoint", "which", default="auto", show_default=True, help=CHECKPOINT_HELP)
@click.option("--seeds", type=int, help="Seeds per prompt (default: log.num_eval_seeds; at least 2, for diversity).")
@click.option("--prompts-per-group", default=0, show_default=True, help="Evaluate this many trained and held-out prompts each (0: all).")
@click.option("--out", type=click.Path(dir_okay=False), help="The page (default: RUN_DIR/sweep.html; the numbers go beside it as .json).")
def sweep(run_dir: str, cfg_scales: str, rl_scales: str, which: str, seeds: int | None, prompts_per_group: int, out: str | None) -> None:
    """Reward, held-out score and diversity over CFG x RL-guidance scales, with image strips (an HTML page)."""
    _quiet_libraries()
    from .sweep import SweepError, parse_scales, run_sweep, write_sweep

    try:
        result = run_sweep(run_dir, parse_scales(cfg_scales, "--cfg"), parse_scales(rl_scales, "--rl-scale"), checkpoint=which, seeds=seeds, prompts_per_group=prompts_per_group)
        click.echo(write_sweep(result, out))
    except (SweepError, *_user_errors()) as error:
        raise UserError(str(error)) from error


@main.command("compare")
@click.argument("config_path", metavar="CONFIG")
@click.option("--algorithms", required=True, metavar="A,B,...", help="Registered algorithms, comma-separated (e.g. ddpo_is,ddpo_sf,rwr,rwr_sparse).")
@click.option("--budget", required=True, type=int, metavar="QUERIES", help="Reward queries per run: a whole number of the config's epochs.")
@click.option("--seeds", default=3, show_default=True, type=int, metavar="K", help="Runs per algorithm, seeds 0..K-1.")
@click.option("--out", type=click.Path(file_okay=False), metavar="DIR", help="Comparison directory (default: comparisons/<config name>); rerun the same command to continue it.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override one config key for every run; repeatable.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def compare(config_path: str, algorithms: str, budget: int, seeds: int, out: str | None, overrides: tuple[str, ...], no_progress: bool) -> None:
    """Train each algorithm with K seeds at the same budget of reward queries; DIR/comparison.html and .json."""
    _quiet_libraries()
    from .compare import CompareError, parse_algorithms, plan_comparison, run_comparison
    from .preemption import REQUEUE_EXIT_STATUS, Preempted

    try:
        plan = plan_comparison(config_path, parse_algorithms(algorithms), budget, seeds, overrides, out)
        click.echo(run_comparison(plan, progress=not no_progress, log=click.echo))
    except Preempted as stopped:
        click.echo(f"ddpo: preempted: {stopped}; rerun the same `ddpo compare` command to continue", err=True)
        sys.exit(REQUEUE_EXIT_STATUS)
    except (CompareError, *_user_errors()) as error:
        raise UserError(str(error).strip('"')) from error


@main.command("serve-reward")
@click.option("--reward", "reward_name", required=True, metavar="NAME", help="Registered reward name or 'package.module:function'.")
@click.option("--kwargs", "reward_kwargs", default="{}", metavar="JSON", help='Keyword arguments of the reward, a JSON object, e.g. \'{"model": "DIR"}\'.')
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; anything but loopback should come with --token.")
@click.option("--port", default=8765, type=int, show_default=True)
@click.option("--token", envvar="DDPO_REWARD_TOKEN", help="Bearer token every /score request must carry (default: $DDPO_REWARD_TOKEN).")
@click.option("--max-batch", default=64, type=click.IntRange(min=1), show_default=True, help="Most images per reward call.")
@click.option("--max-request-images", default=256, type=click.IntRange(min=1), show_default=True, help="Most images per request.")
@click.option("--max-body-mb", default=64.0, type=click.FloatRange(min=0, min_open=True), show_default=True, help="Largest request body.")
def serve_reward(reward_name: str, reward_kwargs: str, host: str, port: int, token: str | None, max_batch: int, max_request_images: int, max_body_mb: float) -> None:
    """Serve a reward over HTTP (POST /score, GET /health), batching concurrent requests."""
    import json

    _quiet_libraries()
    try:
        from .server.reward_server import ServerLimits, serve
    except ImportError as error:
        raise UserError(f"the reward server needs FastAPI and uvicorn: pip install 'ddpo[server]' ({error})") from error
    from .rewards import build_reward

    try:
        kwargs = json.loads(reward_kwargs)
    except json.JSONDecodeError as error:
        raise UserError(f"--kwargs is not JSON: {error}") from error
    if not isinstance(kwargs, dict):
        raise UserError(f"--kwargs must be a JSON object, got {reward_kwargs!r}")
    try:
        reward = build_reward(reward_name, **kwargs)
    except (ValueError, *_user_errors()) as error:
        raise UserError(str(error)) from error
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        click.echo(f"ddpo: warning: serving on {host} without --token: anyone who can reach it can use the reward", err=True)
    limits = ServerLimits(max_body_bytes=int(max_body_mb * 2**20), max_request_images=max_request_images, max_batch_images=max_batch)
    click.echo(f"serving reward {reward.name!r} on http://{host}:{port} (POST /score, GET /health)", err=True)
    try:
        serve(reward, host=host, port=port, token=token, limits=limits)
    except OSError as error:
        raise UserError(str(error)) from error


@main.group()
def toy() -> None:
    """The Shapes world: the shipped tiny model, its pretraining and evaluation."""


@toy.command("path")
@click.option("--flow", is_flag=True, help="The flow-matching twin (model 'shapes-flow') instead of the DDIM model.")
def toy_path(flow: bool) -> None:
    """Print the directory of the shipped Shapes pipeline."""
    _quiet_libraries()
    from .policy import resolve_model

    try:
        click.echo(resolve_model("shapes-flow" if flow else "shapes"))
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
@click.option("--per-prompt", is_flag=True, help="Also report every prompt's exact match, and every unusual pair's.")
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the JSON here.")
def toy_evaluate(model: str, lora: str | None, judge: str | None, seeds: int, steps: int, guidance: float, per_prompt: bool, out: str | None) -> None:
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
        result = judge_exact_match(resolve_model(model), judge_path, seeds=seeds, num_steps=steps, guidance_scale=guidance, lora_dir=adapter, per_prompt=per_prompt)
    except _user_errors() as error:
        raise UserError(str(error)) from error
    text = json.dumps({"model": model, "lora": str(adapter) if adapter else None, "seeds": seeds, "judge_exact_match": result}, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    click.echo(text)


def _label_errors() -> tuple[type[BaseException], ...]:
    from .preference.store import LabelStoreError

    return (LabelStoreError, FileNotFoundError)


def _open_store(path: str, *, must_exist: bool = True):
    from .preference.store import LabelStore

    if must_exist and not Path(path).is_file():
        raise UserError(f"no label store at {path}; create it with `ddpo label add-labeller {path} NAME` or `ddpo label add-pairs {path} ...`")
    try:
        return LabelStore(path)
    except _label_errors() as error:
        raise UserError(str(error)) from error


@main.group()
def label() -> None:
    """People in the loop: a labelling web app over a label store (SQLite), its labellers, pairs and labels."""


@label.command("serve")
@click.argument("store", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; other than loopback, put it behind TLS.")
@click.option("--port", default=8766, show_default=True, type=int)
@click.option("--select", "strategy", help="random, uncertainty or bald: re-choose the queue while serving, as `ddpo label select` does (default: no selection).")
@click.option("--reselect-every", default=25, show_default=True, type=int, help="With --select: re-choose after this many new labels.")
def label_serve(store: str, host: str, port: int, strategy: str | None, reselect_every: int) -> None:
    """Serve the labelling page: a prompt, two images, keys 1 / 2 / t (tie) / s (skip) / u (undo)."""
    if reselect_every < 1:
        raise UserError(f"--reselect-every must be at least 1; got {reselect_every}")
    if strategy is not None and strategy not in ("random", "uncertainty", "bald"):
        raise UserError(f"--select {strategy!r} is not one of random, uncertainty, bald")
    try:
        from .server.label_app import serve
    except ImportError as error:
        raise UserError(f"the labelling app needs FastAPI and uvicorn: pip install 'ddpo[label]' ({error})") from error
    opened = _open_store(store)
    progress, labellers = opened.progress(), opened.labellers()
    opened.close()
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"ddpo label: warning: binding {host}: tokens and labels travel unencrypted; put the app behind TLS", err=True)
    hint = "" if labellers else f"; no labellers yet: `ddpo label add-labeller {store} NAME`"
    click.echo(f"ddpo label: {store} ({progress['pairs']} pairs, {sum(progress['labels_per_labeller'].values())} labels) on http://{host}:{port}/{hint}", err=True)
    if strategy is not None:
        _start_reselection(store, strategy, reselect_every)
    serve(store, host, port)


def _start_reselection(store: str, strategy: str, every: int):
    """A daemon thread that re-chooses the app's queue (`queue_for_store`) whenever `every` new labels came in;
    returns the event that stops it."""
    import threading

    from .preference.active import queue_for_store

    def loop() -> None:
        opened = _open_store(store)
        done = -every  # choose once at the start
        while not stop.is_set():
            labels = len(opened.labels())
            if labels - done >= every and opened.unlabelled_pairs():
                try:
                    reply = queue_for_store(opened, strategy)
                    click.echo(f"ddpo label: queue re-chosen after {labels} labels: {reply['active']} active, {reply['random']} random", err=True)
                except Exception as error:  # noqa: BLE001 - the app keeps serving the last queue
                    click.echo(f"ddpo label: warning: re-choosing the queue failed ({error}); keeping the last one", err=True)
                done = labels
            stop.wait(2.0)
        opened.close()

    stop = threading.Event()
    threading.Thread(target=loop, name="label-reselect", daemon=True).start()
    return stop


@label.command("add-labeller")
@click.argument("store", type=click.Path())
@click.argument("name")
@click.option("--replace", is_flag=True, help="Give an existing labeller a new token (the old one stops working).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Host of the link printed.")
@click.option("--port", default=8766, show_default=True, type=int, help="Port of the link printed.")
def label_add_labeller(store: str, name: str, replace: bool, host: str, port: int) -> None:
    """Create a labeller (and the store if new); prints their private link, which carries their token."""
    try:
        token = _open_store(store, must_exist=False).add_labeller(name, replace=replace)
    except _label_errors() as error:
        raise UserError(str(error)) from error
    click.echo(f"http://{host}:{port}/#token={token}")


@label.command("add-pairs")
@click.argument("store", type=click.Path())
@click.option("--run", "run_dir", type=click.Path(file_okay=False), help="A run directory: same-prompt pairs from its sample grid.")
@click.option("--epoch", type=int, help="With --run: the grid of this epoch (default: the last).")
@click.option("--file", "pairs_file", type=click.Path(dir_okay=False), help='JSONL, one {"prompt", "image_a", "image_b"} per line.')
def label_add_pairs(store: str, run_dir: str | None, epoch: int | None, pairs_file: str | None) -> None:
    """Queue pairs to label, from a run's sample grid or from a file."""
    from .preference.pairs import pairs_from_file, pairs_from_run

    if (run_dir is None) == (pairs_file is None):
        raise UserError("give exactly one of --run RUN_DIR and --file PAIRS.jsonl")
    try:
        pairs, metadata = pairs_from_run(run_dir, epoch) if run_dir else pairs_from_file(pairs_file)
        ids = _open_store(store, must_exist=False).add_pairs(pairs, source=f"run:{run_dir}" if run_dir else f"file:{pairs_file}", metadata=metadata)
    except _label_errors() as error:
        raise UserError(str(error)) from error
    click.echo(f"{len(ids)} pairs in {store}")


@label.command("export")
@click.argument("store", type=click.Path())
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--no-images", is_flag=True, help="Leave the PNGs out (the importing store must already hold them).")
def label_export(store: str, out: str, no_images: bool) -> None:
    """Write every label as one JSON line (labeller, choice, time, prompt, image hashes and PNGs)."""
    try:
        count = _open_store(store).export_jsonl(out, images=not no_images)
    except _label_errors() as error:
        raise UserError(str(error)) from error
    click.echo(f"{count} labels -> {out}")


@label.command("import")
@click.argument("store", type=click.Path())
@click.argument("jsonl", type=click.Path(dir_okay=False))
def label_import(store: str, jsonl: str) -> None:
    """Merge the labels of an export into STORE (created if new); labels already there are not duplicated."""
    import json

    try:
        counts = _open_store(store, must_exist=False).import_jsonl(jsonl)
    except _label_errors() as error:
        raise UserError(str(error)) from error
    click.echo(json.dumps(counts))


@label.command("status")
@click.argument("store", type=click.Path())
@click.option("--model", "model_path", type=click.Path(dir_okay=False), help="A preference model: also each labeller's agreement with it.")
def label_status(store: str, model_path: str | None) -> None:
    """Pairs, labels per labeller, and each labeller's agreement with the others' majority (and with --model);
    a labeller whose agreement is at chance is flagged (JSON; a warning line on stderr)."""
    import json

    from .preference.agreement import labeller_agreement, model_margins

    opened = _open_store(store)
    margins = None
    if model_path is not None:
        _quiet_libraries()
        from .preference.model import PreferenceModelError

        try:
            margins = model_margins(opened, model_path)
        except (PreferenceModelError, *_label_errors()) as error:
            raise UserError(str(error)) from error
    agreement = labeller_agreement(opened.labels(), margins)
    click.echo(json.dumps({**opened.progress(), "labellers": [a.as_dict() for a in agreement]}, indent=2))
    for flagged in (a for a in agreement if a.at_chance):
        majority = flagged.judged_against == "majority"
        reference, share = ("the others' majority", flagged.majority_agreement) if majority else ("the preference model", flagged.model_agreement)
        click.echo(f"ddpo label: warning: {flagged.labeller} agrees with {reference} on {share:.0%} of their answers: at chance; check their labels before training on them", err=True)


@label.command("select")
@click.argument("store", type=click.Path())
@click.option("--strategy", default="bald", show_default=True, help="random, uncertainty or bald: at random, or what the preference model is least sure of.")
@click.option("--count", default=100, show_default=True, type=int, help="Pairs to queue (the rest keep their order behind them).")
@click.option("--random-share", default=0.2, show_default=True, type=float, help="Share of the queue drawn at random (held-out material: `ddpo preference train --heldout-random-only`).")
@click.option("--features", default="shapes-describer", show_default=True, help="'shapes-describer' or 'clip:MODEL'.")
@click.option("--l2", default=3e-2, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
def label_select(store: str, strategy: str, count: int, random_share: float, features: str, l2: float, seed: int) -> None:
    """Choose which unlabelled pairs the app shows next: fit a preference model on the labels so far and queue the
    pairs whose answers would teach it most (active selection), with a share drawn at random. Run it again as
    labels come in; the app (which may be serving) follows the new order at once."""
    _quiet_libraries()
    import json

    from .preference.active import queue_for_store
    from .preference.model import PreferenceModelError

    try:
        reply = queue_for_store(_open_store(store), strategy, count, random_share=random_share, features=features, l2=l2, seed=seed)
    except (PreferenceModelError, ValueError, *_label_errors()) as error:
        raise UserError(str(error)) from error
    click.echo(json.dumps(reply))


@main.group()
def preference() -> None:
    """Preference models learned from labels (Bradley-Terry), usable as reward `preference:PATH`."""


@preference.command("train")
@click.argument("store", type=click.Path())
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write the model (.safetensors).")
@click.option("--features", default="shapes-describer", show_default=True, help="'shapes-describer' or 'clip:MODEL' (hub id or directory).")
@click.option("--heldout", default=0.2, show_default=True, type=float, help="Fraction of pairs held out to measure pairwise accuracy.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--l2", default=3e-2, show_default=True, type=float, help="L2 penalty on the weights (more: less confident, less overfit).")
@click.option("--ties", default="half", show_default=True, help="half or davidson: a tie as a target of 1/2, or as Davidson's third outcome.")
@click.option("--heldout-random-only", is_flag=True, help="Hold out only pairs `ddpo label select` drew at random (unbiased under active selection).")
def preference_train(store: str, out: str, features: str, heldout: float, seed: int, l2: float, ties: str, heldout_random_only: bool) -> None:
    """Fit a Bradley-Terry model on STORE's labels; prints the held-out pairwise accuracy (JSON)."""
    _quiet_libraries()
    import json
    from dataclasses import asdict

    from .preference.model import PreferenceModelError, save_preference_model, train_preference_model

    try:
        opened = _open_store(store)
        candidates = {pair for pair, selection in opened.selections().items() if selection == "random"} if heldout_random_only else None
        model, _, report = train_preference_model(opened.comparisons(), features, heldout_fraction=heldout, seed=seed, l2=l2, ties=ties, heldout_candidates=candidates)
        save_preference_model(model, report, out)
    except (PreferenceModelError, ValueError, *_label_errors()) as error:
        raise UserError(str(error)) from error
    click.echo(json.dumps({"model": out, "reward": f"preference:{out}", **asdict(report)}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
