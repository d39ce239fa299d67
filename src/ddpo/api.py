"""The Python API: what a notebook calls instead of the `ddpo` command.

    import ddpo
    result = ddpo.train("shapes/default", reward=my_reward, prompts=["a red cross", "a blue circle"], train__epochs=5)
    result.metrics[-1]["reward_mean"], result.path, result.latest_checkpoint
    images = ddpo.sample(result.path, ["a red cross"], n=4)

`train` runs exactly what `ddpo train` runs (the same `Trainer`, the same run directory); a reward callable or a
prompt list given here is recorded in the run's config.toml as far as it can be: an importable function as
"module:function", a prompt list as RUN_DIR/prompts.txt (source "file"). A callable that cannot be imported (a
lambda, a closure, a function defined in a notebook) is registered for this Python session only, and the
config.toml names it "ddpo.api:session.<name>", which another process cannot import.
"""

from __future__ import annotations

import copy
import random
import re
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, _merge
from .training.assemble import validate
from .training.assemble import load_config as _load_config_file

session = types.SimpleNamespace()
"""Rewards and prompt functions given to `train` that cannot be imported by name: config.toml names them
"ddpo.api:session.<name>" (rewards) or prompt source "python:<name>"; they exist for this Python session only."""

PromptsArgument = Callable[..., Any] | Sequence[str] | None


def load_config(config_or_path: str | Path | Config | Mapping | None = None, overrides: Sequence[str] | Mapping[str, Any] = (), **keyword_overrides: Any) -> Config:
    """A validated `Config` from a TOML file, a preset name ("shapes/default"), a `Config`, a nested dict, or
    nothing (the embedded default's preset "shapes/default"); then `overrides` ("train.lr=1e-4" strings as on
    the command line, or a {"train.lr": 1e-4} mapping) and keyword overrides (`train__lr=1e-4`).

    Raises:
        ConfigError: an unknown key, a wrong type or an invalid value, named in the message.
    """
    if isinstance(config_or_path, Config):
        config = copy.deepcopy(config_or_path)
    elif isinstance(config_or_path, Mapping):
        config = Config()
        _merge(config, dict(config_or_path))
    else:
        from .config import DEFAULT_PRESET

        config = _load_config_file(config_or_path or DEFAULT_PRESET)
    strings = [o for o in overrides] if not isinstance(overrides, Mapping) else []
    if strings:
        config = _load_config_file(None, strings, base=config)
    values = dict(overrides) if isinstance(overrides, Mapping) else {}
    values.update({key.replace("__", "."): value for key, value in keyword_overrides.items()})
    for key, value in values.items():
        if "." not in key and key not in ("seed", "run_name"):  # the two top-level keys
            raise ConfigError(f"override {key!r}: name the section too, e.g. train.{key} (or train__{key}=... as a keyword)")
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        _merge(config, nested)
    validate(config)
    return config


@dataclass
class RunResult:
    """A finished (or resumed and finished) run: its directory, config and metrics."""

    path: Path
    config: Config
    metrics: list[dict] = field(default_factory=list)

    @property
    def checkpoints(self) -> list[Path]:
        from .training.run_directory import RunDirectory

        return [path for _, path in RunDirectory(self.path).checkpoints()]

    @property
    def latest_checkpoint(self) -> Path | None:
        return self.checkpoints[-1] if self.checkpoints else None

    @property
    def final_reward(self) -> float | None:
        return self.metrics[-1]["reward_mean"] if self.metrics else None

    def sample(self, prompts: Sequence[str], **kwargs: Any):
        """`ddpo.sample(self.path, prompts, **kwargs)`: images of the run's checkpoint (default: best, else latest)."""
        return sample(self.path, prompts, **kwargs)

    def evaluate(self, **kwargs: Any) -> dict:
        """`ddpo.evaluate(self.path, **kwargs)`."""
        return evaluate(self.path, **kwargs)


def _importable_name(function: Callable[..., Any]) -> str | None:
    """"module:qualname" when that names `function` from another process, else None."""
    module, qualname = getattr(function, "__module__", None), getattr(function, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname or not qualname:
        return None
    import importlib

    try:
        target: Any = importlib.import_module(module)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError):
        return None
    return f"{module}:{qualname}" if target is function else None


def _session_name(function: Callable[..., Any], kind: str) -> str:
    base = re.sub(r"\W", "_", getattr(function, "__name__", kind)) or kind
    name, k = base, 1
    while hasattr(session, name) and getattr(session, name) is not function:
        k += 1
        name = f"{base}_{k}"
    setattr(session, name, function)
    return name


def _reward_name(reward: Any) -> str:
    if isinstance(reward, str):
        return reward
    if not callable(reward):
        raise ConfigError(f"reward= must be a callable reward(images, prompts, metadata) or a reward name, got {type(reward).__name__}")
    return _importable_name(reward) or f"ddpo.api:session.{_session_name(reward, 'reward')}"


@dataclass
class _CallablePromptSource:
    """A prompt function as a prompt source: `f(rng)` or `f()` returning a prompt or (prompt, metadata)."""

    function: Callable[..., Any]
    takes_rng: bool
    prompts: list[str] = field(default_factory=list)

    def __call__(self, rng: random.Random) -> tuple[str, dict]:
        drawn = self.function(rng) if self.takes_rng else self.function()
        prompt, metadata = drawn if isinstance(drawn, tuple) else (drawn, {})
        if not isinstance(prompt, str):
            raise ValueError(f"prompt function {getattr(self.function, '__name__', self.function)!r} returned {type(prompt).__name__}, not a prompt string")
        return prompt, dict(metadata or {})


def callable_prompt_source(function: Callable[..., Any], num_listed: int = 16) -> _CallablePromptSource:
    """A prompt source over `function`; its `prompts` (the sample grid's rows and the evaluation's prompts) are
    the distinct prompts of `num_listed` draws with a fixed seed."""
    import inspect

    try:
        takes_rng = len(inspect.signature(function).parameters) >= 1
    except (TypeError, ValueError):
        takes_rng = False
    source = _CallablePromptSource(function, takes_rng)
    rng = random.Random(0)
    source.prompts = list(dict.fromkeys(source(rng)[0] for _ in range(num_listed)))
    return source


def _prompt_source_for(prompts: PromptsArgument, config: Config, run_dir: Path) -> Callable[[], None]:
    """Point `config.prompts` at `prompts`; returns a function that writes what the run directory must hold."""
    if prompts is None:
        return lambda: None
    if isinstance(prompts, str):
        raise ConfigError("prompts= takes a list of prompts or a prompt function; for a registered source set prompts__source=...")
    if callable(prompts):
        from .prompts import SOURCES, register_prompt_source

        name = f"python:{_importable_name(prompts) or _session_name(prompts, 'prompts')}"
        SOURCES.discard(name)  # the same name given again in this session: the latest function wins
        register_prompt_source(name)(lambda: callable_prompt_source(prompts))
        config.prompts.source, config.prompts.file = name, ""
        return lambda: None
    listed = [str(p).strip() for p in prompts]
    if not listed or not all(listed):
        raise ConfigError("prompts= must hold at least one non-empty prompt")
    path = run_dir / "prompts.txt"
    config.prompts.source, config.prompts.file = "file", str(path)

    def write() -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(p + "\n" for p in listed), encoding="utf-8")

    return write


def train(
    config_or_path: str | Path | Config | Mapping | None = None,
    *,
    reward: Callable[..., Any] | str | None = None,
    prompts: PromptsArgument = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool = False,
    **overrides: Any,
) -> RunResult:
    """Train as `ddpo train` does and return the run.

    Args:
        config_or_path: a TOML file, a preset name, a `Config` or a nested dict (default: "shapes/default").
        reward: `reward(images, prompts, metadata) -> scores or RewardOutput`, or a reward name.
        prompts: a list of prompts (drawn uniformly), or a function `f(rng)` / `f()` returning a prompt or
            (prompt, metadata).
        out: the run directory (default: runs/<run_name or time>, as the CLI).
        resume: continue this run directory from its latest checkpoint (only train.epochs and log.* may change).
        overrides: config keys, `train__epochs=3` or `**{"train.epochs": 3}`.
    """
    import time

    from .utils import quiet_libraries as _quiet_libraries
    from .training.run_directory import RunDirectory, RunDirectoryError, read_jsonl

    _quiet_libraries()
    from .training.loop import train as run_training

    if resume is not None:
        if config_or_path is not None or out is not None or reward is not None or prompts is not None:
            raise ConfigError("resume= continues a run with its own config.toml; give only overrides of train.epochs or log.* with it")
        run = RunDirectory.open(resume)
        config = load_config(run.config_path, **{k.replace(".", "__"): v for k, v in overrides.items()})
        changed = {k for k in overrides if not k.replace("__", ".").startswith(("train.epochs", "log.", "train.early_stop"))}
        if changed:
            raise ConfigError(f"resume= can only change train.epochs, train.early_stop*, log.*; {sorted(changed)[0]!r} would change what the checkpoint holds")
        run_dir = Path(resume)
    else:
        config = load_config(config_or_path, **{k.replace(".", "__"): v for k, v in overrides.items()})
        run_dir = Path(out) if out else Path("runs") / (config.run_name or time.strftime("%Y%m%d-%H%M%S"))
        if RunDirectory(run_dir).config_path.exists():
            raise RunDirectoryError(f"{run_dir} already holds a run; continue it with resume={str(run_dir)!r} or choose another out=")
        if reward is not None:
            config.reward.name, config.reward.terms, config.reward.kwargs = _reward_name(reward), [], {}
        write_prompts = _prompt_source_for(prompts, config, run_dir)
        validate(config)
        existed = run_dir.exists()
        write_prompts()
    try:
        path = run_training(config, run_dir, resume=resume is not None, progress=progress)
    except BaseException:
        if resume is None and not existed and not RunDirectory(run_dir).checkpoints():
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)  # nothing half-written: as the CLI leaves it
        raise
    finally:
        _reset_accelerate()
    return RunResult(path=Path(path), config=config, metrics=read_jsonl(RunDirectory(path).metrics_path))


def _reset_accelerate() -> None:
    """accelerate keeps one global state per process: a second `train` in the same notebook needs a fresh one."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _checkpoint_and_config(model_or_run: str | Path, checkpoint: str | int):
    """(model, checkpoint dir or None, the run's config or None) for a model name/dir, a run dir or a checkpoint dir."""
    from .training.assemble import load_config as load_file
    from .training.run_directory import resolve_adapter_dir, run_of_checkpoint

    run = run_of_checkpoint(model_or_run) if Path(str(model_or_run)).is_dir() else None
    if run is None:
        return str(model_or_run), None, None
    config = load_file(run.config_path)
    return config.model.pretrained, resolve_adapter_dir(model_or_run, checkpoint), config


def sample(
    model_or_run: str | Path = "shapes",
    prompts: Sequence[str] | str = (),
    *,
    n: int = 1,
    seed: int = 0,
    checkpoint: str | int = "auto",
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    eta: float | None = None,
    rl_scale: float | None = None,
):
    """Images (PIL), `n` per prompt with seeds seed, seed+1, ..., prompt-major: as `ddpo sample` draws them.

    `model_or_run`: a model (hub id, directory, "shapes"), a run directory or one of its checkpoints; a run samples
    with its own config's steps, eta, guidance and size. `rl_scale` mixes the base and fine-tuned predictions
    (RL guidance: base + s * (fine-tuned - base); 0 is the base model, 1 the fine-tuned one); it needs a LoRA run.
    """
    import torch

    from .utils import quiet_libraries as _quiet_libraries
    from .policy import SamplingOptions
    from .training.evaluate import policy_for_checkpoint

    _quiet_libraries()
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("sample() needs at least one prompt")
    model, checkpoint_dir, run_config = _checkpoint_and_config(model_or_run, checkpoint)
    config = run_config or Config()
    sampling = SamplingOptions.from_config(config.sample, num_steps=num_steps, eta=eta, guidance_scale=guidance_scale)
    policy = policy_for_checkpoint(model, checkpoint_dir, sampling, native_size=run_config is None)
    cells = [(p, seed + i) for p in prompts for i in range(n)]
    generators = [torch.Generator().manual_seed(s) for _, s in cells]
    if rl_scale is not None:
        from .guidance import rl_guidance

        with rl_guidance(policy, rl_scale):
            return policy.sample([p for p, _ in cells], generators).images
    return policy.sample([p for p, _ in cells], generators).images


def evaluate(run_dir: str | Path, *, checkpoint: str | int = "auto", seeds: int | None = None, base: bool = True, prompts_per_group: int = 0) -> dict:
    """Score the base model and a run's checkpoint on the run's evaluation prompts (trained and held out) with
    its reward(s), as `ddpo eval` does: {"base": {...}, "epoch-NNNN": {...}}, each {"groups": {group: {reward: mean}}}.
    `prompts_per_group` > 0 keeps that many prompts of each group (trained, held out), spread over the list."""
    from .training.evaluate import evaluate_run
    from .training.run_directory import RunDirectoryError, run_of_checkpoint

    run = run_of_checkpoint(run_dir)
    if run is None or run.path.resolve() != Path(run_dir).resolve():
        raise RunDirectoryError(f"{run_dir}: not a run directory (no config.toml)")
    return evaluate_run(run_dir, [str(checkpoint)], seeds=seeds, include_base=base, prompts_per_group=prompts_per_group)["models"]

