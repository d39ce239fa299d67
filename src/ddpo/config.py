"""The configuration of a run: one typed tree of dataclasses, read from TOML, overridden by `--set`.

A config is built in layers, later ones winning:

1. the defaults below: the paper's published Stable Diffusion settings (Black et al. 2023, arXiv 2305.13301);
2. optionally a `base` config (e.g. one built in code by the CLI);
3. a TOML file, or a preset: a name such as `sd_compressibility` that is not an existing file is looked up
   among the TOML files shipped inside the package (`ddpo/configs/*.toml`), so that presets work from a
   pip-installed wheel without a checkout; an existing file of the same name wins;
4. overrides `"section.key=value"`, the value a TOML literal (`train.lr=1e-4`, `model.use_lora=false`,
   `model.lora_target_modules=["to_q"]`), or a plain string when it does not parse (`train.algorithm=rwr`).

Keys are the dataclass fields, except that a field named after a Python keyword with a trailing underscore
is written without it in TOML: `LogConfig.with_` is the key `log.with`. Tables merge into `dict` fields
(`reward.kwargs`); any other value replaces the default. A list-of-strings key also accepts one string
(`log.with = "wandb"`). Every error is a `ConfigError` naming the key and saying how to fix it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import keyword
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w


if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

"""Valid `train.algorithm` values (see `ddpo.algorithms`)."""
DEFAULT_PRESET = "shapes/default"  # what `ddpo train` with no --config runs
MIXED_PRECISION = ("no", "fp16", "bf16")
SCHEDULERS = ("ddim", "ddpm")
REWARD_TERM_KEYS = ("name", "weight", "kwargs")


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or holds an invalid value; the message names the key."""


@dataclass
class ModelConfig:
    """The pretrained pipeline and which of its weights are trained."""

    pretrained: str = "CompVis/stable-diffusion-v1-4"
    """Hugging Face hub id or local directory of a diffusers pipeline."""
    revision: str = "main"
    """Hub revision (branch, tag or commit) of `pretrained`."""
    use_lora: bool = True
    """Train LoRA adapters on the UNet (true) or all UNet weights (false)."""
    lora_rank: int = 4
    """Rank r of the LoRA matrices."""
    lora_alpha: float = 4.0
    """LoRA scaling numerator: updates are scaled by lora_alpha / lora_rank."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    """UNet module names that receive adapters (the attention projections)."""
    gradient_checkpointing: bool = False
    """Recompute UNet activations in the backward pass: less memory, slower steps."""
    mixed_precision: str = "no"
    """Precision of the frozen weights and forward passes: "no" (fp32), "fp16" or "bf16"."""
    channels_last: bool = False
    """Keep the network's convolution weights in channels-last memory format (NHWC), which GPU convolution kernels
    prefer under mixed precision. Off by default: on this project's CPU machine it measured no faster."""
    init_lora: str = ""
    """Start the LoRA adapters from another run's: a `ddpo sft` (or `ddpo train`) run directory (its latest
    checkpoint) or a checkpoint directory, trained with the same lora_rank and lora_target_modules. The reference
    model (KL, RL guidance) stays the pretrained one. Empty: adapters start at their usual initialisation."""
    allow_tf32: bool = True
    """Let fp32 matmuls and convolutions use TF32 tensor cores on NVIDIA GPUs (Ampere and later): faster, with a
    10-bit mantissa in the products (ddpo-pytorch's default). No effect on CPU."""


@dataclass
class SampleConfig:
    """How images are sampled each epoch."""

    num_steps: int = 50
    """Denoising steps T per image."""
    eta: float = 1.0
    """DDIM eta: 0 is deterministic, 1 gives DDPM's posterior variance."""
    guidance_scale: float = 5.0
    """Classifier-free guidance weight w; 1 disables guidance."""
    batch_size: int = 8
    """Images per sampling batch, per process."""
    num_batches_per_epoch: int = 4
    """Sampling batches per epoch, per process."""
    anchor_batches_per_epoch: int = 0
    """Sampling batches per epoch, per process, of `prompts.anchor_source`'s prompts, after the trained ones:
    never scored, they only carry `train.anchor_kl_weight`'s KL to the base model (prior preservation). Each
    process deals its anchors out to its own micro-batches, so with anchors a run depends on the process count."""
    samples_per_prompt: int = 1
    """Consecutive samples (by global sample index) that share one drawn prompt: groups of this size give
    per-prompt advantage statistics from the first epoch on (Flow-GRPO's groups); 1 draws a prompt per sample."""
    height: int = 512
    """Image height in pixels, a multiple of 8 (the VAE's downsampling factor)."""
    width: int = 512
    """Image width in pixels, a multiple of 8."""
    scheduler: str = "ddim"
    """Sampler of DDIM-family models: "ddim" (with `eta`) or "ddpm". Flow-matching models (a
    FlowMatchEulerDiscreteScheduler: the Shapes flow twin, SD3, FLUX) sample with the algorithm's sampler:
    Flow-GRPO's SDE (ddpo_*, rwr*, flow_grpo, grpo_guard, mix_grpo), FDFO's churned Euler steps (fdfo) or the
    Euler ODE (diffusion_nft, awm); they evaluate with the ODE."""
    noise_level: float = 0.7
    """Flow models: Flow-GRPO's SDE noise level a, the step std being a * sqrt(sigma / (1 - sigma)) * sqrt(-dt)."""
    churn: float = 0.0025
    """Flow models, fdfo: the churn gamma of each step and of the initial noise (the FDFO paper's default)."""
    eval_num_steps: int = 0
    """Steps of the sampler of the sample grid and the periodic evaluation (flow models: the deterministic ODE);
    0 = num_steps. Flow-GRPO trains on 10 steps and evaluates on 40."""
    num_frames: int = 1
    """Video models (Wan): frames per sample; Wan needs num_frames - 1 divisible by 4 (e.g. 33, 81)."""
    sde_window: int = 0
    """Flow models with the SDE sampler: Flow-GRPO-Fast's window of this many consecutive SDE steps per sample,
    starting at a random step of the first half of the chain (drawn from the sample's own noise seed); every
    other step is a deterministic ODE (Euler) step, and only the window's steps are trained (`timestep_fraction`
    of them, rounded up). 0 = every step is an SDE step. mix_grpo needs it: its window is MixGRPO's, at one
    step for all samples, moved over training (`train.sde_window_shift_interval`). Not for fdfo, diffusion_nft,
    awm or DDIM-family models."""


@dataclass
class TrainConfig:
    """The RL update: algorithm, optimizer and advantage estimation."""

    algorithm: str = "ddpo_is"
    """One of "ddpo_is" (importance sampling, clipped), "ddpo_sf" (score function), "rwr", "rwr_sparse",
    "flow_grpo" (group advantages, PPO-clip on SDE log-probs), "grpo_guard" (flow_grpo with ratio_normalization),
    "mix_grpo" (flow_grpo with MixGRPO's sliding SDE window), "fdfo" (Finite Difference Flow Optimization: pairs,
    SPO surrogate with eps = spo_epsilon), "diffusion_nft" (DiffusionNFT: implicit positive/negative policies on the
    forward process), "awm" (Advantage Weighted Matching); the last four on flow-matching models only."""
    epochs: int = 100
    """Outer epochs: each samples a fresh batch of images, then trains on it."""
    lr: float = 3e-4
    """AdamW learning rate."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_weight_decay: float = 1e-4
    """AdamW decoupled weight decay."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    batch_size: int = 1
    """Samples per optimizer micro-batch, per process."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated per optimizer step (ddpo_sf accumulates the whole epoch; leave it at 1)."""
    inner_epochs: int = 1
    """Passes over each epoch's samples (several only for ddpo_is, rwr and rwr_sparse)."""
    clip_range: float = 1e-4
    """PPO clip range epsilon of ddpo_is, flow_grpo, grpo_guard, mix_grpo and awm (the ratio is clipped to
    [1 - eps, 1 + eps]; AWM's code uses 1)."""
    spo_epsilon: float = 3e-2
    """fdfo's trust region: eps of the SPO surrogate -dR r + |dR| / (2 eps) (r - 1)^2 (3e-2 in the FDFO paper)."""
    kl_weight: float = 0.0
    """Weight of the KL to the reference model (the base model: LoRA disabled) added to every algorithm's loss,
    per step: ||mu_theta - mu_ref||^2 / (2 std^2) for the Gaussian steps (Flow-GRPO's beta, DPOK), and
    mean ||v - v_ref||^2 for fdfo. 0 = off. Needs model.use_lora; one more model pass per trained step."""
    anchor_kl_weight: float = 0.0
    """Weight of the KL to the base model on the anchor samples (`sample.anchor_batches_per_epoch`), per step
    as `kl_weight`'s: holds the model near the base on prompts it already draws well (DreamBooth's prior
    preservation, with the KL of DPOK), so that what RL learns on the trained prompts may not rewrite them."""
    global_std: bool = False
    """Divide by the std of the whole epoch's rewards instead of each group's (flow_grpo, the paper's option) or
    each prompt's running std (ddpo_is / ddpo_sf with per-prompt tracking; the mean stays the prompt's own)."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to [-adv_clip_max, adv_clip_max]."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm."""
    timestep_fraction: float = 1.0
    """Fraction of the denoising steps trained on per sample, in (0, 1]."""
    timestep_chunk: int = 0
    """Timesteps whose log-probs are recomputed in one model call (a batch of batch_size x chunk, twice that
    with CFG). Same loss and gradients for every value; bigger is faster and holds more activations. 0 = the most
    that fit `activation_memory_mb`, measured at the run's first update (`ddpo.training.memory`)."""
    activation_memory_mb: float = 0.0
    """With `timestep_chunk = 0`: the memory the update's activations may take, in MiB; 0 = the device's default
    (CUDA: half the memory free after sampling; CPU: 96 MiB)."""
    cfg: bool = True
    """Apply classifier-free guidance also when recomputing log-probs for the update."""
    per_prompt_stat_tracking: bool = True
    """Normalize rewards by running per-prompt mean/std (true) or by the whole batch (false)."""
    stat_buffer_size: int = 32
    """Rewards remembered per prompt by the per-prompt tracker."""
    stat_min_count: int = 16
    """Rewards a prompt needs before its own statistics replace the batch's."""
    rwr_temperature: float = 1.0
    """RWR weights are exp(r / temperature), normalized to mean 1 over the epoch; r is the standardized reward
    (`rwr_normalize`), so T = 1 weighs a sample one std above its prompt's mean e times one at the mean."""
    rwr_percentile: float = 90.0
    """rwr_sparse keeps the samples whose (standardized, see `rwr_normalize`) reward is at or above this
    percentile of the epoch's, in [0, 100); 90 keeps the top 10% (the paper's)."""
    rwr_normalize: bool = True
    """rwr and rwr_sparse weigh the rewards standardized as DDPO's advantages (`per_prompt_stat_tracking`,
    `global_std`, `adv_clip_max`), which makes `rwr_temperature` independent of the reward's units; false weighs
    the raw rewards, as the paper's reference code (with T = 5 on SD's JPEG sizes in kB)."""
    early_stop_on_heldout: bool = False
    """Stop when the held-out score of the periodic evaluation (`log.eval_every`, `log.heldout_reward`) has not
    improved for `early_stop_patience` epochs; its best epoch is checkpointed and named in RUN_DIR/best.json."""
    early_stop_patience: int = 10
    """Epochs without a new best held-out score before `early_stop_on_heldout` stops the run."""
    ratio_normalization: bool = False
    """flow_grpo, mix_grpo: GRPO-Guard's ratio normalization (arXiv 2510.22319): each step's log ratio is
    re-centred and re-scaled, s log r + mean((mu_theta - mu_old)^2) / (2 s) with s the step's std, so that the clip
    range bounds positive and negative updates alike at every step (grpo_guard always has it on)."""
    sde_window_shift_interval: int = 25
    """mix_grpo: epochs between moves of the SDE window (MixGRPO's shift interval tau, 25 iterations in its code)."""
    sde_window_stride: int = 1
    """mix_grpo: steps the SDE window moves by each time (MixGRPO's stride, 1 in its code); past the chain's end
    it rolls back to step 0."""
    nft_beta: float = 1.0
    """diffusion_nft: beta of the implicit policies v+ = (1 - beta) v_old + beta v, v- = (1 + beta) v_old - beta v
    (the paper's 1.0; 0.1 for its OCR and multi-reward runs)."""
    awm_power: float = 0.25
    """awm: power p of the generalised Huber weighting of the matching loss, -sigma ((l + e)^p - e^p) / p (its
    code's default 0.25; 1 is the sigma-weighted flow-matching loss)."""
    awm_old_kl_weight: float = 1.0
    """awm: weight of mean((v - v_old)^2), the velocity's distance to the sampling policy's at the same noised
    latents (its code's EMA KL, weight 1)."""
    on_policy_check: bool = True
    """Algorithms with an importance ratio (ddpo_is, flow_grpo): stop the run at an epoch's first optimizer step
    when some ratio pi_theta / pi_old, which must be 1 there, is off by more than `clip_range` (log-probs
    recomputed in another precision or by batch-dependent kernels: the run would silently train off-policy).
    Costs nothing (the ratios are computed anyway); `ddpo doctor` checks more."""


@dataclass
class RewardConfig:
    """What is rewarded (see `ddpo.rewards`)."""

    name: str = "jpeg_compressibility"
    """Registered reward name, or "package.module:function"; unused when `terms` is set."""
    terms: list[dict] = field(default_factory=list)
    """Weighted sum of rewards, tables {name = ..., weight = ..., kwargs = {...}}; used when non-empty."""
    kwargs: dict = field(default_factory=dict)
    """Keyword arguments of the `name` reward's factory (with `url`: of the `remote` reward: timeout, retries, ...)."""
    url: str = ""
    """Reward server (`ddpo serve-reward`) to score with, e.g. "http://127.0.0.1:8765"; it must serve `name`
    ("remote": whatever it serves). Bearer token from the environment variable DDPO_REWARD_TOKEN."""


@dataclass
class PromptsConfig:
    """Where the prompts come from (see `ddpo.prompts`)."""

    source: str = "imagenet_animals"
    """Registered prompt source: "simple_animals", "imagenet_animals", "animals_activities", "file", "shapes_*"."""
    file: str = ""
    """Prompt file of the "file" source, one prompt per line."""
    eval_prompts: list[str] = field(default_factory=list)
    """Trained prompts of `ddpo eval` and of the periodic evaluation; empty means every prompt of the source."""
    anchor_source: str = ""
    """Prompt source of the anchor batches (`sample.anchor_batches_per_epoch`), e.g. "shapes_common"."""
    heldout_file: str = ""
    """Held-out prompts, one per line, never trained on: evaluation reports them apart (generalization).
    Empty: the Shapes world's held-out unusual prompts when `source` is "shapes_unusual_train", else none."""


@dataclass
class LogConfig:
    """Checkpoints, trackers and the fixed-seed sample grid."""

    save_every: int = 1
    """Epochs between checkpoints."""
    keep_last: int = 3
    """Checkpoints kept on disk, the oldest deleted first; 0 keeps all."""
    with_: list[str] = field(default_factory=list)
    """Trackers besides TensorBoard, which always logs to RUN_DIR/tb (TOML key `log.with`): e.g. ["wandb"]."""
    num_eval_seeds: int = 4
    """Seeds per prompt of the sample grid and of evaluation."""
    eval_every: int = 10
    """Epochs between evaluations on fixed prompts x fixed seeds (training reward, held-out score, KL to the
    base model, diversity; RUN_DIR/monitor.jsonl), the model before training included; 0 never evaluates.
    One evaluation samples up to 2 x eval_num_prompts x num_eval_seeds images and measures their KL (two more
    model passes per step): with the Shapes default, about ten epochs' worth of sampling."""
    eval_num_prompts: int = 8
    """Trained and held-out prompts each of the periodic evaluation, spread evenly over each list; 0 = all."""
    heldout_reward: str = ""
    """Reward that scores the evaluation samples but is never trained on (over-optimization shows as it
    falling while the training reward rises): a registered name or "package.module:function". Empty: the
    Shapes world's judge ("shapes_judge") when prompts.source is a Shapes source, else none; "none": none."""
    grid_prompts: list[str] = field(default_factory=list)
    """Prompts of the sample grid; empty means the source's first few."""
    grid_every: int = 0
    """Epochs between sample grids (RUN_DIR/samples/epoch-NNNN.png, the report's picture strip); the model
    before training and the last epoch always have one (samples/before-after.png). 0 = with the periodic
    evaluation (`eval_every`), so the pictures cost no extra stop; with no evaluation, before and after only."""


@dataclass
class Config:
    """A whole run."""

    seed: int = 42
    """Seed of every random number generator of the run."""
    run_name: str = ""
    """Name of the run in trackers and of its default directory; empty means a timestamp."""
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    log: LogConfig = field(default_factory=LogConfig)


# ------------------------------------------------------------------------------------------------ keys, types


def _toml_key(field_name: str) -> str:
    """`with_` -> `with`: a keyword-named field is spelled without its trailing underscore in TOML."""
    stem = field_name[:-1]
    return stem if field_name.endswith("_") and keyword.iskeyword(stem) else field_name


def _fields(cls: type) -> dict[str, tuple[str, Any]]:
    """TOML key -> (field name, resolved type) of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {_toml_key(f.name): (f.name, hints[f.name]) for f in dataclasses.fields(cls)}


def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key, sections included: ["seed", "run_name", "model", "model.pretrained", ...]."""
    keys = []
    for key, (_, hint) in _fields(cls).items():
        keys.append(prefix + key)
        if dataclasses.is_dataclass(hint):
            keys += _all_keys(hint, f"{prefix}{key}.")
    return keys


def _unknown_key(path: str, is_table: bool) -> ConfigError:
    """`unknown config key 'train.lrr' (did you mean 'train.lr'?)`, or the valid keys when none is close."""
    section, _, name = path.rpartition(".")
    kind = "section" if is_table and not section else "key"
    keys = _all_keys()
    moved = [key for key in keys if key.endswith(f".{name}")]  # e.g. "train.eta" for "sample.eta"
    close = moved or difflib.get_close_matches(path, keys, n=1)
    if close:
        return ConfigError(f"unknown config {kind} '{path}' (did you mean '{close[0]}'?)")
    siblings = [key for key in keys if key.rpartition(".")[0] == section]
    return ConfigError(f"unknown config {kind} '{path}' (valid here: {', '.join(siblings)})")


_TYPE_NAMES = {bool: "a bool (true or false)", int: "an int", float: "a number", str: "a string", dict: "a table"}


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return "a list of strings" if item is str else "a list of tables"
    return _TYPE_NAMES[hint]


def coerce(key: str, value: Any, hint: Any) -> Any:
    """`value` checked against the field type `hint`, ints widened to float and a lone string to a list.

    Raises:
        ConfigError: `train.epochs must be an int, got str 'ten'`.
    """
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is float and is_number and not math.isnan(value):
        return float(value)
    if hint is int and is_number and isinstance(value, int):
        return value
    if hint in (bool, str) and isinstance(value, hint):
        return value
    if hint is dict and isinstance(value, dict):
        return copy.deepcopy(value)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if item is str and isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return [coerce(f"{key}[{index}]", element, item) for index, element in enumerate(value)]
    raise ConfigError(f"{key} must be {_type_name(hint)}, got {type(value).__name__} {value!r}")


# ------------------------------------------------------------------------------------------------ loading


def _merge(target: Any, table: dict[str, Any], prefix: str = "") -> None:
    """Write the keys of a TOML table into the config dataclass `target`, checking names and types."""
    known = _fields(type(target))
    for key, value in table.items():
        path = prefix + key
        if key not in known:
            raise _unknown_key(path, isinstance(value, dict))
        name, hint = known[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                first = next(iter(_fields(hint)))
                raise ConfigError(f"'{path}' is a section, not a value; set its keys, e.g. {path}.{first}=...")
            _merge(getattr(target, name), value, f"{path}.")
        elif hint is dict and isinstance(value, dict):
            getattr(target, name).update(copy.deepcopy(value))
        else:
            setattr(target, name, coerce(path, value, hint))


def _hint_at(path: str) -> Any:
    """Type of the field at a dotted key, or None when the key is unknown or inside a table."""
    cls: Any = Config
    hint = None
    for key in path.split("."):
        if not dataclasses.is_dataclass(cls) or key not in _fields(cls):
            return None
        hint = cls = _fields(cls)[key][1]
    return hint


def _parse_override(override: str) -> dict[str, Any]:
    """`"train.lr=1e-4"` -> `{"train": {"lr": 0.0001}}`."""
    path, equals, raw = override.partition("=")
    path, raw = path.strip(), raw.strip()
    if not equals or not path:
        raise ConfigError(f"override {override!r} must look like section.key=value, e.g. train.lr=1e-4")
    value: Any = raw
    if _hint_at(path) is not str or raw.startswith(('"', "'")):  # strings need no TOML quotes
        try:
            value = tomllib.loads(f"value = {raw}")["value"]
        except tomllib.TOMLDecodeError:
            pass
    for key in reversed(path.split(".")):
        value = {key: value}
    return value


def available_presets() -> list[str]:
    """Names of the presets shipped in `ddpo/configs/` ("sd_compressibility", "shapes/default", ...)."""

    def walk(directory: Any, prefix: str) -> list[str]:
        names = []
        for item in directory.iterdir():
            if item.is_dir():
                names += walk(item, f"{prefix}{item.name}/")
            elif item.name.endswith(".toml"):
                names.append(prefix + item.name[: -len(".toml")])
        return names

    return sorted(walk(resources.files("ddpo").joinpath("configs"), ""))


def _read_toml(path_or_preset: str | Path) -> tuple[dict[str, Any], str]:
    """The parsed table and a label for messages, from a file or, failing that, a preset name."""
    path = Path(path_or_preset)
    if path.is_file():
        text, label = path.read_text(encoding="utf-8"), str(path)
    else:
        name = str(path_or_preset).removesuffix(".toml")
        preset = resources.files("ddpo").joinpath("configs", *f"{name}.toml".split("/"))
        if name not in available_presets():
            presets = ", ".join(available_presets())
            raise ConfigError(f"config '{path_or_preset}' is neither a file nor a preset (presets: {presets})")
        text, label = preset.read_text(encoding="utf-8"), f"preset '{name}'"
    try:
        return tomllib.loads(text), label
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{label} is not valid TOML: {error}") from error


def load_config(
    path: str | Path | None = None, overrides: typing.Sequence[str] = (), base: Config | None = None
) -> Config:
    """Defaults (or a copy of `base`), then the TOML file or preset `path`, then `overrides`; every field checked
    (`check_fields`; `ddpo.training.assemble.load_config` also checks the names the registries resolve).

    Raises:
        ConfigError: an unknown key, a wrong type or an invalid value, named in the message.
    """
    config = copy.deepcopy(base) if base is not None else Config()
    if path is not None:
        table, label = _read_toml(path)
        try:
            _merge(config, table)
        except ConfigError as error:
            raise ConfigError(f"{label}: {error}") from error
    for override in overrides:
        _merge(config, _parse_override(override))
    check_fields(config)
    return config


def flatten_config(tree: dict, prefix: str = "") -> dict:
    """A config's dict (`config_to_dict`) or overrides' tree as `section.key` -> value."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key in ("model", "sample", "train", "reward", "prompts", "log"):
            flat.update(flatten_config(value, f"{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_to_dict(config: Config) -> dict[str, Any]:
    """The config as plain TOML-ready data, keyed as in TOML (`log.with`)."""

    def plain(node: Any) -> Any:
        if dataclasses.is_dataclass(node):
            return {_toml_key(f.name): plain(getattr(node, f.name)) for f in dataclasses.fields(node)}
        return copy.deepcopy(node)

    return plain(config)


def save_config(config: Config, path: str | Path) -> None:
    """Write the fully resolved config as TOML; `load_config(path)` returns an equal config."""
    header = "# Resolved ddpo config: `ddpo train --config <this file>` repeats the run.\n"
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(header + tomli_w.dumps(config_to_dict(config)), encoding="utf-8")
    os.replace(tmp, path)  # a crash mid-write must not leave an empty config (which would load as the defaults)


# ------------------------------------------------------------------------------------------------ validation


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_types(node: Any, cls: type = Config, prefix: str = "") -> None:
    for key, (name, hint) in _fields(cls).items():
        value = getattr(node, name)
        if dataclasses.is_dataclass(hint):
            check(isinstance(value, hint), f"{prefix}{key} must be a {hint.__name__} section")
            _check_types(value, hint, f"{prefix}{key}.")
        else:
            coerce(prefix + key, value, hint)


def check_choice(key: str, value: str, choices: typing.Sequence[str]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"one of {', '.join(choices)}"
        raise ConfigError(f"{key}={value!r} is not valid ({hint})")


def check_fields(config: Config) -> None:
    """Check every type and value that the config alone decides (the checks that need the registries of
    algorithms, rewards and prompt sources run where the run is assembled: `ddpo.training.assemble.validate`).

    Raises:
        ConfigError: naming the first offending key and how to fix it.
    """
    _check_types(config)
    model, sample, train, log = config.model, config.sample, config.train, config.log
    check(config.seed >= 0, f"seed={config.seed} must be >= 0")

    check(bool(model.pretrained), "model.pretrained is empty; give a hub id or a local pipeline directory")
    check(model.lora_rank >= 1, f"model.lora_rank={model.lora_rank} must be at least 1")
    check(model.lora_alpha > 0, f"model.lora_alpha={model.lora_alpha} must be > 0")
    check(
        not model.use_lora or bool(model.lora_target_modules),
        "model.lora_target_modules is empty; name the UNet modules to adapt, e.g. [\"to_q\", \"to_v\"]",
    )
    check_choice("model.mixed_precision", model.mixed_precision, MIXED_PRECISION)

    for key in ("num_steps", "batch_size", "num_batches_per_epoch", "samples_per_prompt", "height", "width"):
        value = getattr(sample, key)
        check(value >= 1, f"sample.{key}={value} must be at least 1")
    for key in ("height", "width"):
        value = getattr(sample, key)
        check(value % 8 == 0, f"sample.{key}={value} is not a multiple of 8 (the VAE downsamples by 8)")
    check_choice("sample.scheduler", sample.scheduler, SCHEDULERS)
    check(sample.eta >= 0, f"sample.eta={sample.eta:g} must be >= 0")
    check(sample.noise_level > 0, f"sample.noise_level={sample.noise_level:g} must be > 0 (0 makes the SDE an ODE, with no log-probability)")
    check(sample.churn >= 0, f"sample.churn={sample.churn:g} must be >= 0")
    check(sample.eval_num_steps >= 0, f"sample.eval_num_steps={sample.eval_num_steps} must be >= 0 (0 = sample.num_steps)")
    check(sample.sde_window >= 0, f"sample.sde_window={sample.sde_window} must be >= 0 (0 = every step an SDE step)")
    check(
        sample.sde_window <= sample.num_steps,
        f"sample.sde_window={sample.sde_window} exceeds sample.num_steps={sample.num_steps}: the window of SDE steps lies inside the chain",
    )
    # Every algorithm here trains on log-probabilities of the sampling policy (paper Sec. 4).
    check(
        sample.scheduler != "ddim" or sample.eta > 0,
        "sample.eta=0 makes the DDIM policy deterministic; its log-probability is undefined (use e.g. 1.0)",
    )

    for key in ("epochs", "batch_size", "gradient_accumulation_steps", "inner_epochs", "stat_buffer_size",
                "stat_min_count"):
        value = getattr(train, key)
        check(value >= 1, f"train.{key}={value} must be at least 1")
    for key in ("lr", "adam_epsilon", "clip_range", "spo_epsilon", "adv_clip_max", "max_grad_norm", "rwr_temperature"):
        value = getattr(train, key)
        check(value > 0, f"train.{key}={value:g} must be > 0")
    for key in ("adam_beta1", "adam_beta2"):
        value = getattr(train, key)
        check(0 <= value < 1, f"train.{key}={value:g} must be in [0, 1)")
    check(train.adam_weight_decay >= 0, f"train.adam_weight_decay={train.adam_weight_decay:g} must be >= 0")
    check(
        train.timestep_chunk >= 0,
        f"train.timestep_chunk={train.timestep_chunk} must be >= 0 (0 = chosen from train.activation_memory_mb)",
    )
    check(train.activation_memory_mb >= 0, f"train.activation_memory_mb={train.activation_memory_mb:g} must be >= 0 (0 = the device's default)")
    check(
        0 < train.timestep_fraction <= 1,
        f"train.timestep_fraction={train.timestep_fraction:g} must be in (0, 1]",
    )
    check(
        train.stat_min_count <= train.stat_buffer_size,
        f"train.stat_min_count={train.stat_min_count} exceeds train.stat_buffer_size={train.stat_buffer_size}, "
        "so per-prompt statistics would never be used",
    )
    check(0 <= train.rwr_percentile < 100, f"train.rwr_percentile={train.rwr_percentile:g} must be in [0, 100)")
    check(train.kl_weight >= 0, f"train.kl_weight={train.kl_weight:g} must be >= 0 (0 = no KL to the reference model)")
    check(
        train.kl_weight == 0 or model.use_lora,
        f"train.kl_weight={train.kl_weight:g} needs model.use_lora=true: the reference model is the base with the LoRA disabled",
    )
    anchors = sample.anchor_batches_per_epoch
    check(anchors >= 0, f"sample.anchor_batches_per_epoch={anchors} must be >= 0")
    check(
        (anchors > 0) == bool(config.prompts.anchor_source) == (train.anchor_kl_weight > 0),
        f"anchors need all three of sample.anchor_batches_per_epoch > 0 (it is {anchors}), prompts.anchor_source "
        f"(it is {config.prompts.anchor_source!r}) and train.anchor_kl_weight > 0 (it is {train.anchor_kl_weight:g}), or none of them",
    )
    check(anchors == 0 or model.use_lora, "anchors (sample.anchor_batches_per_epoch) need model.use_lora=true: their KL is to the base model, the LoRA disabled")
    # The old log-probs were recorded under guidance; recomputing them without it is another policy, and
    # every importance ratio would sit far outside the clip range.
    check(
        train.cfg or sample.guidance_scale == 1.0,
        f"train.cfg=false with sample.guidance_scale={sample.guidance_scale:g}: samples come from the guided "
        "policy, so log-probs must be recomputed with guidance too (set train.cfg=true or guidance_scale=1)",
    )

    check(log.save_every >= 1, f"log.save_every={log.save_every} must be at least 1")
    check(log.grid_every >= 0, f"log.grid_every={log.grid_every} must be >= 0 (0 = with the evaluation, log.eval_every)")
    check(log.keep_last >= 0, f"log.keep_last={log.keep_last} must be >= 0 (0 keeps every checkpoint)")
    check(log.num_eval_seeds >= 1, f"log.num_eval_seeds={log.num_eval_seeds} must be at least 1")
    check(log.eval_every >= 0, f"log.eval_every={log.eval_every} must be >= 0 (0 never evaluates)")
    check(log.eval_num_prompts >= 0, f"log.eval_num_prompts={log.eval_num_prompts} must be >= 0 (0 = all)")
    check(train.early_stop_patience >= 1, f"train.early_stop_patience={train.early_stop_patience} must be at least 1")
    if train.early_stop_on_heldout:
        check(log.eval_every >= 1, "train.early_stop_on_heldout=true needs the periodic evaluation: set log.eval_every >= 1")


@dataclass(frozen=True)
class BatchSizes:
    """The batch arithmetic of an epoch (`batch_sizes`), printed at start.

    Attributes:
        num_processes: processes of the run.
        samples_per_epoch: scored samples (= reward queries) per epoch, all processes.
        anchor_samples_per_epoch: unscored anchor samples per epoch, all processes.
        samples_per_process: scored samples per process per epoch.
        num_train_timesteps: denoising steps trained per sample: `train.timestep_fraction` of `sample.num_steps`
            rounded down, or with `sample.sde_window` of the window's SDE steps rounded up.
        minibatches_per_epoch: micro-batches per process per inner epoch.
        accumulation_steps: micro-batches per optimizer step.
        samples_per_optimizer_step: samples per optimizer step, all processes.
        optimizer_steps_per_epoch: optimizer steps per epoch, over all inner epochs.
    """

    num_processes: int
    samples_per_epoch: int
    anchor_samples_per_epoch: int
    samples_per_process: int
    num_train_timesteps: int
    minibatches_per_epoch: int
    accumulation_steps: int
    samples_per_optimizer_step: int
    optimizer_steps_per_epoch: int


def batch_sizes(config: Config, num_processes: int, *, one_step_per_epoch: bool) -> BatchSizes:
    """The batch arithmetic of an epoch, computed and checked here only.

    Each process samples `sample.batch_size x sample.num_batches_per_epoch` scored images per epoch (and
    `sample.batch_size x sample.anchor_batches_per_epoch` unscored anchors, dealt out to the micro-batches,
    which they do not count in); the trainer shuffles the scored ones and splits them into micro-batches of
    `train.batch_size`, accumulating `train.gradient_accumulation_steps` micro-batches per optimizer step
    (with `one_step_per_epoch`, the algorithm's property, all of them: ddpo_sf).

    Raises:
        ConfigError: `train.batch_size` or `train.gradient_accumulation_steps` does not divide evenly.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes={num_processes} must be at least 1")
    sample, train = config.sample, config.train
    samples_per_process = sample.batch_size * sample.num_batches_per_epoch
    check(
        samples_per_process % train.batch_size == 0,
        f"train.batch_size={train.batch_size} must divide the {samples_per_process} samples per process per "
        f"epoch (sample.batch_size={sample.batch_size} x "
        f"sample.num_batches_per_epoch={sample.num_batches_per_epoch})",
    )
    minibatches = samples_per_process // train.batch_size
    if one_step_per_epoch:
        accumulation = minibatches
    else:
        accumulation = train.gradient_accumulation_steps
        check(
            minibatches % accumulation == 0,
            f"train.gradient_accumulation_steps={accumulation} must divide the {minibatches} micro-batches per "
            f"process per epoch (sample.batch_size x sample.num_batches_per_epoch / train.batch_size)",
        )
    if sample.sde_window:  # only the window's steps have a log-prob (Flow-GRPO-Fast trains all of them)
        num_train_timesteps = max(1, math.ceil(sample.sde_window * train.timestep_fraction))
    else:
        num_train_timesteps = max(1, int(sample.num_steps * train.timestep_fraction))
    return BatchSizes(
        num_processes=num_processes,
        samples_per_epoch=samples_per_process * num_processes,
        anchor_samples_per_epoch=sample.batch_size * sample.anchor_batches_per_epoch * num_processes,
        samples_per_process=samples_per_process,
        num_train_timesteps=num_train_timesteps,
        minibatches_per_epoch=minibatches,
        accumulation_steps=accumulation,
        samples_per_optimizer_step=train.batch_size * accumulation * num_processes,
        optimizer_steps_per_epoch=train.inner_epochs * minibatches // accumulation,
    )
