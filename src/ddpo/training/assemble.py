"""Where a run is assembled: the config checks that need the registries (algorithms, rewards, prompt sources),
the batch arithmetic with the algorithm's properties, and the held-out scorer a run is judged by.

`ddpo.config` checks what the config alone decides; `validate` here checks the rest, naming the key.
"""

from __future__ import annotations

import math
import typing
from pathlib import Path

from ddpo.algorithms import ALGORITHMS
from ddpo import config as config_module
from ddpo.config import REWARD_TERM_KEYS, BatchSizes, Config, ConfigError, RewardConfig, batch_sizes, check, check_choice, check_fields, coerce
from ddpo.prompts import SOURCES, prompt_source_factory, reads_file
from ddpo.rewards import check_reward


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = (), base: Config | None = None) -> Config:
    """`ddpo.config.load_config` (defaults or `base`, then the TOML file or preset, then `overrides`), validated."""
    config = config_module.load_config(path, overrides, base)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Check every type and value (`ddpo.config.check_fields`), the names the registries resolve, what the
    algorithm needs, and the batch arithmetic for one process.

    Raises:
        ConfigError: naming the first offending key and how to fix it.
    """
    check_fields(config)
    _check_algorithm(config)
    _check_reward(config.reward)
    _check_prompts(config)
    heldout = heldout_reward_name(config)
    if heldout is not None:
        check(heldout != config.reward.name or bool(config.reward.terms), f"log.heldout_reward={heldout!r} is the training reward; a held-out scorer must be another one")
        try:
            check_reward(heldout, {})
        except ValueError as error:
            raise ConfigError(f"log.heldout_reward: {error}") from error
    if config.train.early_stop_on_heldout:
        check(heldout is not None, "train.early_stop_on_heldout=true needs a held-out scorer: set log.heldout_reward")
    derived_batch_sizes(config, num_processes=1)


def derived_batch_sizes(config: Config, num_processes: int) -> BatchSizes:
    """`ddpo.config.batch_sizes` for the configured algorithm (ddpo_sf accumulates a whole epoch per step)."""
    check_choice("train.algorithm", config.train.algorithm, tuple(ALGORITHMS))
    return batch_sizes(config, num_processes, one_step_per_epoch=ALGORITHMS[config.train.algorithm].one_step_per_epoch)


def heldout_reward_name(config: Config) -> str | None:
    """The held-out scorer of `log.heldout_reward` after its default: the prompt source's registered one (the
    Shapes sources: their judge), else None."""
    name = config.log.heldout_reward.strip()
    if name == "none":
        return None
    if name:
        return name
    return SOURCES.attribute(config.prompts.source, "heldout_reward")


def _check_algorithm(config: Config) -> None:
    sample, train = config.sample, config.train
    check_choice("train.algorithm", train.algorithm, tuple(ALGORITHMS))
    algorithm = ALGORITHMS[train.algorithm]
    check(
        sample.sde_window == 0 or algorithm.sampler == "sde",
        f"sample.sde_window={sample.sde_window} needs the SDE sampler, but train.algorithm={train.algorithm!r} samples "
        f"with {algorithm.sampler!r} steps; set sample.sde_window=0",
    )
    try:
        algorithm.check_config(config)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if algorithm.shared_initial_noise:
        check(
            sample.batch_size % sample.samples_per_prompt == 0,
            f"sample.batch_size={sample.batch_size} must be a multiple of sample.samples_per_prompt={sample.samples_per_prompt} "
            f"for {train.algorithm}, whose groups are sampled together",
        )
    if algorithm.one_step_per_epoch:
        check(
            train.inner_epochs == 1,
            f"train.inner_epochs={train.inner_epochs} is not allowed with {train.algorithm}: it takes one gradient "
            "step per batch of data (its gradient is unbiased only on fresh samples); use ddpo_is for more",
        )
        check(
            train.gradient_accumulation_steps == 1,
            f"train.gradient_accumulation_steps={train.gradient_accumulation_steps} has no effect with "
            f"{train.algorithm}, which accumulates the whole epoch into one step; leave it at 1",
        )


def _check_prompts(config: Config) -> None:
    prompts = config.prompts
    try:
        factory = prompt_source_factory(prompts.source)
    except ValueError as error:
        raise ConfigError(f"prompts.source: {error}") from error
    if reads_file(factory):
        check(bool(prompts.file), f"prompts.source='{prompts.source}' needs prompts.file, one prompt per line")
    else:
        check(not prompts.file, f"prompts.file is set but prompts.source='{prompts.source}' reads no file")
    if prompts.anchor_source:
        try:
            anchor_factory = prompt_source_factory(prompts.anchor_source)
        except ValueError as error:
            raise ConfigError(f"prompts.anchor_source: {error}") from error
        check(not reads_file(anchor_factory), f"prompts.anchor_source='{prompts.anchor_source}' reads a file; anchors come from a registered list")


def _check_reward_name(key: str, name: str, kwargs: dict) -> None:
    """`key` is where the name sits (`reward` or `reward.terms[i]`); its kwargs sit beside it."""
    for checked_key, checked_kwargs in ((f"{key}.name", None), (f"{key}.kwargs", kwargs)):
        try:
            check_reward(name, checked_kwargs)
        except ValueError as error:
            raise ConfigError(f"{checked_key}: {error}") from error


def _check_reward(reward: RewardConfig) -> None:
    if reward.url:
        check(not reward.terms, "reward.url serves one reward; for a weighted sum give a term name='remote' and kwargs.url")
        _check_reward_name("reward", "remote", {"url": reward.url, **reward.kwargs})
        return
    if not reward.terms:
        _check_reward_name("reward", reward.name, reward.kwargs)
        return
    check(not reward.kwargs, "reward.kwargs applies to reward.name only; give each of reward.terms its kwargs")
    for index, term in enumerate(reward.terms):
        key = f"reward.terms[{index}]"
        unknown = sorted(set(term) - set(REWARD_TERM_KEYS))
        check(not unknown, f"{key} has unknown keys {unknown}; a term has name, weight and optional kwargs")
        check("name" in term and "weight" in term, f"{key} needs a name and a weight, e.g. {{name='x', weight=1.0}}")
        coerce(f"{key}.name", term["name"], str)
        check(math.isfinite(coerce(f"{key}.weight", term["weight"], float)), f"{key}.weight must be finite")
        _check_reward_name(key, term["name"], coerce(f"{key}.kwargs", term.get("kwargs", {}), dict))
