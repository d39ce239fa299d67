"""The `ddpo` command."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from .config import DEFAULT_PRESET, flatten_config
from .errors import UserError, user_errors as _user_errors
from .utils import quiet_libraries as _quiet_libraries

# Keys a resumed run may change: how long it runs, how it logs and where its reward server is, not what the
# checkpoint holds.
RESUMABLE_OVERRIDES = ("train.epochs=", "train.early_stop", "log.", "reward.url=")


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
    from .training.assemble import load_config
    from .training.preemption import REQUEUE_EXIT_STATUS, Preempted
    from .training.run_directory import RunDirectory
    from .training.loop import train as run_training

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
    from .config import config_to_dict
    from .training.assemble import load_config
    from .training.run_directory import RunDirectory

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
    for key, value in flatten_config(requested).items():
        if not f"{key}=".startswith(RESUMABLE_OVERRIDES) and not key.startswith(RESUMABLE_OVERRIDES) and flatten_config(stored).get(key) != value:
            raise UserError(f"--resume auto: {out} was started with {key} = {flatten_config(stored).get(key)!r}, this command line asks for {value!r}; use another --out")
    return str(out)




@main.command()
@click.option("--config", "config_path", metavar="FILE.toml|PRESET", help=f"Config file or preset name (default: {DEFAULT_PRESET}).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override one config key; repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the checks and the forecast as JSON.")
def doctor(config_path: str | None, overrides: tuple[str, ...], as_json: bool) -> None:
    """Check that a run would train on-policy here, and forecast its time: builds what `ddpo train` builds
    (same config, model, precision, reward), samples one batch and measures. Exit status 1 when a check fails."""
    import json

    _quiet_libraries()
    from .training.assemble import load_config
    from .doctor import run_doctor

    try:
        report = run_doctor(load_config(config_path or DEFAULT_PRESET, overrides))
    except _user_errors() as error:
        raise UserError(str(error).strip('"')) from error
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else report.table())
    if report.failed:
        sys.exit(1)


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
    from .training.evaluate import policy_for_checkpoint, run_config_of
    from .training.run_directory import resolve_adapter_dir
    from .utils import image_grid

    try:
        checkpoint_dir = resolve_adapter_dir(lora, which) if lora else None
        run_config = run_config_of(lora)
        config = run_config or Config()  # sample as the run trained
        model = model or (config.model.pretrained if run_config else "shapes")
        sampling = SamplingOptions.from_config(config.sample, num_steps=num_steps, eta=eta, guidance_scale=guidance_scale)
        if rl_scale is not None and checkpoint_dir is None:
            raise UserError("--rl-scale mixes a base model with a fine-tuned LoRA: give --lora RUN_DIR")
        policy = policy_for_checkpoint(model, checkpoint_dir, sampling, native_size=run_config is None)
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

    from .training.evaluate import evaluate_run
    from .training.run_directory import write_text_atomic

    try:
        report = evaluate_run(target, which, prompts_file, rewards, seeds, include_base=not no_base)
    except _user_errors() as error:
        raise UserError(str(error)) from error
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
    from .training.assemble import load_config
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
@click.option("--algorithms", required=True, metavar="A,B,...", help="Registered algorithms, comma-separated (e.g. ddpo_is,ddpo_sf,rwr,rwr_sparse); LABEL=CONFIG2 trains CONFIG2 (its own algorithm and settings, same task) as LABEL.")
@click.option("--budget", required=True, type=int, metavar="QUERIES", help="Reward queries per run: a whole number of the config's epochs.")
@click.option("--seeds", default=3, show_default=True, type=int, metavar="K", help="Runs per algorithm, seeds 0..K-1.")
@click.option("--out", type=click.Path(file_okay=False), metavar="DIR", help="Comparison directory (default: comparisons/<config name>); rerun the same command to continue it.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override one config key for every run; repeatable.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def compare(config_path: str, algorithms: str, budget: int, seeds: int, out: str | None, overrides: tuple[str, ...], no_progress: bool) -> None:
    """Train each algorithm with K seeds at the same budget of reward queries; DIR/comparison.html and .json."""
    _quiet_libraries()
    from .compare import CompareError, parse_algorithms, plan_comparison, run_comparison
    from .training.preemption import REQUEUE_EXIT_STATUS, Preempted

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
    from .shapes.pretrain import PretrainConfig, Pretrainer

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
    from .training.run_directory import resolve_adapter_dir
    from .shapes import WEIGHTS_DIR
    from .shapes.evaluation import judge_exact_match

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


from .cli_people import label, preference  # noqa: E402 - the command groups of people's labels, registered below

main.add_command(label)
main.add_command(preference)

if __name__ == "__main__":
    sys.exit(main())
