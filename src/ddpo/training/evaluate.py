"""Evaluation on fixed prompts x fixed seeds: any set of rewards, trained vs held-out prompts, KL, diversity.

Shared by `ddpo eval` (base model vs checkpoints) and the trainer's periodic over-optimization monitor
(`ddpo.training.monitor`). Sample i of prompt p always starts from the same noise, `derive_seed("eval", p, i)`,
whatever the model, the run or the order of the prompts, so two models are compared on identical noise and
the same evaluation repeated gives the same numbers.

Prompts fall into two groups: "trained" (the run's prompt source can draw them) and "heldout" (it cannot):
the gap between the two is the generalization of what RL learned.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ddpo.config import Config
from ddpo.training.assemble import heldout_reward_name
from ddpo.prompts import SOURCES, build_prompt_source, read_prompt_lines
from ddpo.rewards import CheckedReward, RewardError, build_reward, build_reward_from_config
from ddpo.utils import derive_seed

TRAINED, HELDOUT = "trained", "heldout"
GROUPS = (TRAINED, HELDOUT)
"""The held-out prompt source of a Shapes training source, when `prompts.heldout_file` is empty."""


@dataclass
class EvalPrompts:
    """The prompts of an evaluation, each with its group ("trained" or "heldout") and prompt metadata."""

    prompts: list[str]
    groups: list[str]
    metadata: list[dict] = field(default_factory=list)

    def of_group(self, group: str) -> list[str]:
        return [p for p, g in zip(self.prompts, self.groups) if g == group]


def spread(items: list[str], limit: int) -> list[str]:
    """At most `limit` items spread evenly over the list, the first one included (0 = all)."""
    if limit <= 0 or len(items) <= limit:
        return list(items)
    step = len(items) / limit
    return [items[int(k * step)] for k in range(limit)]


def eval_prompts_of(config: Config, heldout_file: str | Path | None = None, limit: int = 0) -> EvalPrompts:
    """Trained prompts (`prompts.eval_prompts`, else every prompt of the source) and held-out prompts
    (`heldout_file`, else `prompts.heldout_file`, else the source's registered held-out source, e.g. the Shapes
    world's held-out half), `limit` per group.

    Every prompt the run's source can draw counts as trained, every other one as held out, whichever list
    it came from.
    """
    source = build_prompt_source(config.prompts.source, config.prompts.file)
    metadata = {p: dict(m) for p, m in zip(source.prompts, getattr(source, "metadata", None) or [])}
    source_prompts = set(source.prompts)
    listed = list(config.prompts.eval_prompts or source.prompts)
    if heldout_file:
        candidates = read_prompt_lines(heldout_file, "--prompts")
    elif config.prompts.heldout_file:
        candidates = read_prompt_lines(config.prompts.heldout_file, "prompts.heldout_file")
    elif SOURCES.attribute(config.prompts.source, "heldout_source"):
        heldout_source = build_prompt_source(SOURCES.attribute(config.prompts.source, "heldout_source"))
        candidates = list(heldout_source.prompts)
        metadata.update({p: dict(m) for p, m in zip(heldout_source.prompts, heldout_source.metadata)})
    else:
        candidates = []
    candidates = list(dict.fromkeys(listed + candidates))  # grouped by what the source can draw, not by origin
    trained = [p for p in candidates if p in source_prompts]
    heldout = [p for p in candidates if p not in source_prompts]
    trained, heldout = spread(trained, limit), spread(heldout, limit)
    prompts = trained + heldout
    groups = [TRAINED] * len(trained) + [HELDOUT] * len(heldout)
    return EvalPrompts(prompts, groups, [{**metadata.get(p, {}), "group": g} for p, g in zip(prompts, groups)])


def eval_rewards_of(config: Config, names: Sequence[str] = ()) -> dict[str, CheckedReward]:
    """Rewards by name: `names` if given, else the run's training reward and its held-out scorer (if any).
    A run is always also scored by its prompt source's registered held-out scorer (Shapes: `shapes_judge`)."""
    if names:
        rewards = {}
        for name in dict.fromkeys(names):
            try:
                rewards[name] = build_reward(name)
            except ValueError as error:
                raise RewardError(f"--reward: {error}") from error
    else:
        training = build_reward_from_config(config.reward)
        rewards = {training.name: training}
        heldout = heldout_reward_name(config)
        if heldout is not None and heldout not in rewards:
            rewards[heldout] = build_reward(heldout)
    source_judge = SOURCES.attribute(config.prompts.source, "heldout_reward")
    if source_judge and source_judge not in rewards:
        rewards[source_judge] = build_reward(source_judge)
    return rewards


def eval_generator(prompt: str, seed_index: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed("eval", prompt, seed_index))


@dataclass
class EvalSamples:
    """Images of every (prompt, seed) cell, prompt-major, with their group; `kl` (n,) when measured."""

    prompts: list[str]
    groups: list[str]
    seed_indices: list[int]
    metadata: list[dict]
    images: list[Image.Image]
    kl: np.ndarray | None = None


@torch.no_grad()
def sample_eval_set(policy, eval_prompts: EvalPrompts, num_seeds: int, batch_size: int, *, with_kl: bool = False) -> EvalSamples:
    """Sample each prompt with seeds 0..num_seeds-1 in batches of `batch_size` (the same batches every time,
    so the numbers repeat exactly); `with_kl` also measures `policy.kl_to_base` on each chain."""
    cells = [(k, s) for k in range(len(eval_prompts.prompts)) for s in range(num_seeds)]
    images: list[Image.Image] = []
    kls: list[torch.Tensor] = []
    for start in range(0, len(cells), batch_size):
        chunk = cells[start : start + batch_size]
        prompts = [eval_prompts.prompts[k] for k, _ in chunk]
        trajectory = policy.sample(prompts, [eval_generator(p, s) for p, (_, s) in zip(prompts, chunk)])
        images += trajectory.images
        if with_kl:
            kls.append(policy.kl_to_base(trajectory).float().cpu())
    return EvalSamples(
        prompts=[eval_prompts.prompts[k] for k, _ in cells],
        groups=[eval_prompts.groups[k] for k, _ in cells],
        seed_indices=[s for _, s in cells],
        metadata=[dict(eval_prompts.metadata[k], eval_seed=s) for k, s in cells] if eval_prompts.metadata else [{"eval_seed": s} for _, s in cells],
        images=images,
        kl=torch.cat(kls).numpy() if with_kl else None,
    )


def score_eval_set(samples: EvalSamples, rewards: Mapping[str, CheckedReward]) -> dict[str, np.ndarray]:
    """(n,) scores of every sample by each reward (one call per reward over the whole set)."""
    return {name: reward(samples.images, samples.prompts, samples.metadata).scores for name, reward in rewards.items()}


def pairwise_distance(images: Sequence[Image.Image]) -> float:
    """Mean over pairs of the root-mean-square pixel difference (pixels in [0, 1]); 0 for fewer than 2."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]
    pairs = list(itertools.combinations(arrays, 2))
    if not pairs:
        return 0.0
    return float(np.mean([np.sqrt(np.mean((a - b) ** 2)) for a, b in pairs]))


def diversity_per_prompt(samples: EvalSamples) -> dict[str, float]:
    """Diversity of each prompt: `pairwise_distance` among its samples (different seeds). A policy collapsing
    onto one image per prompt, a common form of reward over-optimization, drives it towards 0. Prompts with
    a single sample (one seed) have none."""
    by_prompt: dict[str, list[Image.Image]] = {}
    for prompt, image in zip(samples.prompts, samples.images):
        by_prompt.setdefault(prompt, []).append(image)
    return {prompt: pairwise_distance(images) for prompt, images in by_prompt.items() if len(images) > 1}


def summarize(samples: EvalSamples, scores: Mapping[str, np.ndarray]) -> dict:
    """Means per group ("all", "trained", "heldout" when present) and per prompt.

    Returns:
        {"groups": {group: {reward: mean, ..., "diversity": d (2+ seeds), "kl": k (if measured), "num_prompts", "num_samples"}},
         "per_prompt": {prompt: {"group", reward: mean, ..., "diversity" (2+ seeds)}}}
    """
    diversity = diversity_per_prompt(samples)
    groups_of = dict(zip(samples.prompts, samples.groups))
    summary: dict = {"groups": {}, "per_prompt": {}}
    for group in ("all", *GROUPS):
        mask = np.array([group == "all" or g == group for g in samples.groups])
        if not mask.any():
            continue
        prompts = [p for p in dict.fromkeys(samples.prompts) if group == "all" or groups_of[p] == group]
        entry = {name: _round(values[mask].mean()) for name, values in scores.items()}
        if any(p in diversity for p in prompts):
            entry["diversity"] = _round(np.mean([diversity[p] for p in prompts if p in diversity]))
        if samples.kl is not None:
            entry["kl"] = _round(samples.kl[mask].mean())
        entry["num_prompts"], entry["num_samples"] = len(prompts), int(mask.sum())
        summary["groups"][group] = entry
    for prompt in dict.fromkeys(samples.prompts):
        mask = np.array([p == prompt for p in samples.prompts])
        summary["per_prompt"][prompt] = {
            "group": groups_of[prompt],
            **{name: _round(values[mask].mean()) for name, values in scores.items()},
        }
        if prompt in diversity:
            summary["per_prompt"][prompt]["diversity"] = _round(diversity[prompt])
    return summary


def _round(value: float) -> float:
    return round(float(value), 6)


def evaluate_policy(policy, eval_prompts: EvalPrompts, rewards: Mapping[str, CheckedReward], num_seeds: int, batch_size: int, *, with_kl: bool = False) -> dict:
    """Sample, score and summarize (see `summarize`)."""
    samples = sample_eval_set(policy, eval_prompts, num_seeds, batch_size, with_kl=with_kl)
    return summarize(samples, score_eval_set(samples, rewards))


class EvaluationError(ValueError):
    """A request `evaluate_run` cannot serve (a bad seed count, a checkpoint choice for a single checkpoint)."""


def run_config_of(path: str | Path | None) -> Config | None:
    """The config of the run a path belongs to (RUN_DIR or RUN_DIR/checkpoints/epoch-NNNN), or None."""
    from ddpo.training.assemble import load_config
    from ddpo.training.run_directory import run_of_checkpoint

    run = run_of_checkpoint(path) if path else None
    return load_config(run.config_path) if run is not None else None


def policy_for_checkpoint(model: str, checkpoint_dir: Path | None, sampling: Any, *, native_size: bool = False, flow_num_steps: int | None = None) -> Any:
    """A sampling-only policy over `model` (hub id, directory or 'shapes') with a checkpoint applied, if any;
    `native_size` samples at the size the model was trained at instead of `sampling`'s. Flow-matching models
    sample their ODE, with `flow_num_steps` steps if given."""
    from ddpo.policy import load_pipeline, resolve_model, sampling_policy
    from ddpo.policy.stable_diffusion import native_image_size
    from ddpo.training.run_directory import load_checkpoint_into

    pipe = load_pipeline(resolve_model(model))
    if checkpoint_dir is not None:
        load_checkpoint_into(pipe, checkpoint_dir)
    if native_size:
        sampling.height = sampling.width = native_image_size(pipe)
    return sampling_policy(pipe, sampling, flow_num_steps=flow_num_steps)


def chosen_checkpoints(target: str | Path, which: Sequence[str]) -> dict[str, Path]:
    """The checkpoints `ddpo eval TARGET --checkpoint ...` scores, by name: for a run directory `which` (epoch
    numbers, 'latest', 'best', 'all'; default best if marked, and latest); for a checkpoint directory, itself."""
    from ddpo.training.run_directory import RunDirectoryError, epoch_name, run_of_checkpoint

    run = run_of_checkpoint(target)
    if run is None:
        raise RunDirectoryError(f"{target}: not a run directory nor a checkpoint inside one (RUN_DIR/checkpoints/epoch-NNNN); its run's config.toml says how to sample and score")
    if Path(target).resolve() != run.path.resolve():
        if which:
            raise EvaluationError("--checkpoint picks among a run's checkpoints; TARGET is already one checkpoint")
        return {Path(target).name: Path(target)}
    choices = list(which) or (["best", "latest"] if run.best_epoch() is not None else ["latest"])
    chosen = [epoch for epoch, _ in run.checkpoints()] if "all" in choices else [run.checkpoint(choice)[0] for choice in choices]
    return {epoch_name(e): run.checkpoint(e)[1] for e in sorted(dict.fromkeys(chosen))}


def evaluate_run(target: str | Path, which: Sequence[str] = (), prompts_file: str | None = None, rewards: Sequence[str] = (),
                 seeds: int | None = None, *, include_base: bool = True, prompts_per_group: int = 0) -> dict:  # fmt: skip
    """`ddpo eval`: the base model and a run's checkpoints on fixed prompts x fixed seeds, trained vs held-out
    prompts (`prompts_per_group` > 0 keeps that many of each group, spread over the list), sampled as the run
    trained; each checkpoint's gain over the base model."""
    from ddpo.policy import SamplingOptions
    from ddpo.training.run_directory import run_of_checkpoint

    checkpoints = chosen_checkpoints(target, which)
    config = run_config_of(target)
    if seeds is not None and seeds < 1:
        raise EvaluationError(f"--seeds {seeds} must be at least 1")
    num_seeds = seeds or config.log.num_eval_seeds
    eval_prompts = eval_prompts_of(config, prompts_file, limit=prompts_per_group)
    scorers = eval_rewards_of(config, rewards)
    sample = config.sample
    sampling = SamplingOptions(
        num_steps=sample.eval_num_steps or sample.num_steps, eta=sample.eta, guidance_scale=sample.guidance_scale, height=sample.height,
        width=sample.width, scheduler=sample.scheduler, num_frames=sample.num_frames,
    )  # fmt: skip
    flow_steps = sample.eval_num_steps or sample.num_steps  # flow models evaluate as the trainer does
    models = {"base": None, **checkpoints} if include_base else dict(checkpoints)
    results = {}
    for name, checkpoint_dir in models.items():
        policy = policy_for_checkpoint(config.model.pretrained, checkpoint_dir, sampling, flow_num_steps=flow_steps)
        results[name] = evaluate_policy(policy, eval_prompts, scorers, num_seeds, sample.batch_size)
    report = {
        "run": str(run_of_checkpoint(target).path), "model": config.model.pretrained,
        "checkpoints": {name: str(path) for name, path in checkpoints.items()}, "seeds": num_seeds,
        "sampling": {"num_steps": sampling.num_steps, "eta": sampling.eta, "guidance_scale": sampling.guidance_scale},
        "rewards": list(scorers), "prompts": {group: eval_prompts.of_group(group) for group in GROUPS}, "models": results,
    }  # fmt: skip
    if "base" in results:
        base = results["base"]["groups"]
        report["gain_over_base"] = {
            name: {group: {reward: round(result["groups"][group][reward] - base[group][reward], 6) for reward in scorers} for group in result["groups"]}
            for name, result in results.items() if name != "base"
        }  # fmt: skip
    return report
