"""The reward interface, the registry of reward factories, and the checks every reward output passes.

A reward is any callable `reward(images, prompts, metadata) -> RewardOutput`. It is registered by name as a
factory (`factory(**kwargs) -> Reward`), so that a reward backed by a model loads it only when built, or
referenced from the config as `"package.module:function"`. Every reward that `build_reward` returns is
wrapped by `checked_reward`: an exception, a wrong number of scores or a non-finite score becomes a
`RewardError` naming the reward and the prompt, instead of silently corrupting an epoch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ddpo.registry import Registry, import_reference

_PLUGIN_PACKAGES = ("ddpo.shapes",)
"""Packages that register more rewards on import; imported once when a name is not found."""


@dataclass
class RewardOutput:
    """Scores of a batch of images."""

    scores: np.ndarray
    """(n,) float32, one score per image; higher is better."""
    info: dict = field(default_factory=dict)
    """Anything worth logging, e.g. per-term scores of a weighted sum as (n,) arrays."""


class Reward(Protocol):
    """Scores images given the prompts (and prompt metadata) they were sampled for."""

    def __call__(self, images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> RewardOutput: ...


class RewardError(RuntimeError):
    """A reward raised, or returned something other than one finite score per image."""


RewardFactory = Callable[..., Reward]
REWARDS: Registry[RewardFactory] = Registry("reward", _PLUGIN_PACKAGES)


def register_reward(name: str, *, path_argument: str | None = None) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator registering `factory(**kwargs) -> Reward` under `name` (the value of `reward.name`). With
    `path_argument`, `name:PATH` also names the reward: the factory gets `path_argument=PATH`."""
    return REWARDS.register(name, path_argument=path_argument)


def _with_path(name: str, kwargs: Mapping[str, Any] | None) -> tuple[str, Mapping[str, Any] | None]:
    """`name:PATH` of a reward registered with a path argument -> (name, kwargs with that argument = PATH);
    anything else unchanged."""
    prefix, colon, path = name.partition(":")
    argument = REWARDS.attribute(prefix, "path_argument") if colon else None
    if not argument:
        return name, kwargs
    if not path:
        raise ValueError(f"reward {name!r} needs a path after '{prefix}:'")
    return prefix, None if kwargs is None else {**kwargs, argument: path}


def available_rewards() -> list[str]:
    """Names of all registered rewards, the Shapes world's included."""
    return REWARDS.names()


def score(
    reward: Callable[..., Any], name: str, images: list[Image.Image], prompts: list[str], metadata: list[dict]
) -> RewardOutput:
    """Call `reward` and check its output: one finite score per image, as a float32 array.

    The reward may return a `RewardOutput` or just the scores (a sequence, numpy array or tensor).

    Raises:
        RewardError: naming `name` and the offending prompt (the batch's first one if the reward raised).
    """
    if images and isinstance(images[0], (list, tuple)):
        return score_videos(reward, name, images, prompts, metadata)
    try:
        output = reward(images, prompts, metadata)
    except RewardError:  # already names the failing reward, e.g. one term of a weighted sum
        raise
    except Exception as error:
        first = f" on prompt {prompts[0]!r}" if prompts else ""
        raise RewardError(f"reward {name!r} raised {type(error).__name__}: {error}{first}") from error
    if not isinstance(output, RewardOutput):
        output = RewardOutput(scores=output)
    scores = output.scores
    if hasattr(scores, "detach"):  # a torch tensor, possibly on an accelerator
        scores = scores.detach().float().cpu().numpy()
    try:
        scores = np.asarray(scores, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise RewardError(
            f"reward {name!r} returned {type(output.scores).__name__}, not numbers: return "
            "RewardOutput(scores, info) or a sequence of floats"
        ) from error
    if scores.ndim != 1 or len(scores) != len(images):
        count = f"{len(scores)} scores" if scores.ndim == 1 else f"scores of shape {scores.shape}"
        raise RewardError(f"reward {name!r} returned {count} for {len(images)} images")
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        index = int(bad[0])
        raise RewardError(
            f"reward {name!r} returned a non-finite score ({scores[index]}) for prompt {prompts[index]!r}"
        )
    return RewardOutput(scores=scores, info=output.info)


def score_videos(
    reward: Callable[..., Any], name: str, videos: list[list[Image.Image]], prompts: list[str], metadata: list[dict]
) -> RewardOutput:
    """A video's score: the mean of its frames' scores (every frame scored as an image with its video's prompt).

    Per-frame info arrays are averaged per video too; other info is kept as the reward returned it."""
    lengths = [len(frames) for frames in videos]
    owner = np.repeat(np.arange(len(videos)), lengths)
    frames = [frame for video in videos for frame in video]
    output = score(reward, name, frames, [prompts[i] for i in owner], [metadata[i] for i in owner])

    def per_video(values):
        return np.bincount(owner, weights=np.asarray(values, dtype=np.float64), minlength=len(videos)) / np.asarray(lengths)

    info = {}
    for key, value in (output.info or {}).items():
        is_per_frame = isinstance(value, (list, tuple, np.ndarray)) and np.ndim(value) == 1 and len(value) == len(frames)
        info[key] = per_video(value).astype(np.float32) if is_per_frame and np.issubdtype(np.asarray(value).dtype, np.number) else value
    return RewardOutput(scores=per_video(output.scores).astype(np.float32), info=info)


@dataclass
class CheckedReward:
    """A reward whose every output passes `score`'s checks; `name` is how errors refer to it."""

    name: str
    reward: Callable[..., Any]

    def __call__(self, images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> RewardOutput:
        return score(self.reward, self.name, images, prompts, metadata)


def checked_reward(name: str, reward: Callable[..., Any]) -> CheckedReward:
    """Wrap `reward` so that its outputs are checked and its failures name it (see `score`)."""
    return reward if isinstance(reward, CheckedReward) else CheckedReward(name, reward)


def _import_reference(reference: str) -> Callable[..., Any]:
    """The callable named by `"package.module:attribute"` (the attribute may be dotted)."""
    target = import_reference(reference, "reward")
    if not callable(target):
        raise ValueError(f"reward {reference!r} is a {type(target).__name__}, not a callable")
    return target


def check_reward(name: str, kwargs: Mapping[str, Any] | None) -> None:
    """Check, without building anything, that `name` is registered and its factory accepts `kwargs` (None:
    check the name only); a `"package.module:function"` reference is only checked for its form (importing it
    may be expensive).

    Raises:
        ValueError: unknown name (with the nearest registered one), malformed reference, or keyword
            arguments the factory does not accept.
    """
    name, kwargs = _with_path(name, kwargs)
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        if not module_name or not attribute:
            raise ValueError(f"reward reference {name!r} must look like 'package.module:function'")
        if kwargs:
            raise ValueError(f"reward {name!r} is a reward callable, which takes no kwargs; got {sorted(kwargs)}")
        return
    if name not in REWARDS:
        raise ValueError(f"{REWARDS.unknown(name)}; or give 'package.module:function'")
    if kwargs is None:
        return
    try:
        inspect.signature(REWARDS.get(name)).bind(**kwargs)
    except TypeError as error:
        raise ValueError(f"reward {name!r} does not accept kwargs {sorted(kwargs)}: {error}") from error


def build_reward(name: str, **kwargs: Any) -> CheckedReward:
    """The reward registered as `name`, built with `kwargs`; or, for `"package.module:function"`, that
    callable itself (then `kwargs` must be empty: it is the reward, not a factory).

    Raises:
        ValueError: see `check_reward`; also a reference whose module or attribute cannot be found.
    """
    check_reward(name, kwargs)
    factory_name, factory_kwargs = _with_path(name, kwargs)
    if ":" in factory_name:
        return checked_reward(name, _import_reference(name))
    return checked_reward(name, REWARDS.get(factory_name)(**factory_kwargs))


@dataclass
class WeightedSum:
    """sum_k weight_k * reward_k; each term's scores (and info, prefixed "{name}/") are kept in `info`."""

    terms: list[tuple[CheckedReward, float]]

    def __call__(self, images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> RewardOutput:
        total = np.zeros(len(images), dtype=np.float32)
        info: dict[str, Any] = {}
        for reward, weight in self.terms:
            output = reward(images, prompts, metadata)
            total += np.float32(weight) * output.scores
            info[reward.name] = output.scores
            info.update({f"{reward.name}/{key}": value for key, value in output.info.items()})
        return RewardOutput(scores=total, info=info)


def build_reward_from_config(reward_config: Any) -> CheckedReward:
    """The reward of a `RewardConfig` (`ddpo.config`): `reward.name` built with `reward.kwargs`, or, when
    `reward.terms` is non-empty, the weighted sum of its terms, each `{name, weight, kwargs?}`; or, when
    `reward.url` is set, the reward server there (reward `remote` with `reward.kwargs`), which must be serving
    `reward.name` (any reward when the name is "remote")."""
    url = getattr(reward_config, "url", "")
    if url:
        if reward_config.terms:
            raise ValueError("reward.url serves one reward; for a weighted sum give a term name='remote' and kwargs.url")
        expect = None if reward_config.name == "remote" else reward_config.name
        return checked_reward(reward_config.name, build_reward("remote", url=url, expect=expect, **reward_config.kwargs))
    if not reward_config.terms:
        return build_reward(reward_config.name, **reward_config.kwargs)
    terms: list[tuple[CheckedReward, float]] = []
    for term in reward_config.terms:
        if not isinstance(term, Mapping) or "name" not in term or "weight" not in term:
            raise ValueError(f"each of reward.terms needs a name and a weight, got {term!r}")
        reward = build_reward(term["name"], **term.get("kwargs", {}))
        if any(reward.name == other.name for other, _ in terms):
            raise ValueError(f"reward.terms lists {reward.name!r} twice; merge them into one weight")
        terms.append((reward, float(term["weight"])))
    return checked_reward("+".join(reward.name for reward, _ in terms), WeightedSum(terms))
