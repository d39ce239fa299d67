"""TRL's DDPO API (TRL <= 0.23, removed after) on ddpo's trainer: change `from trl import ...` to
`from ddpo.compat.trl import ...` and a TRL DDPO script runs.

    DDPOConfig                           TRL's fields and defaults; each maps onto a ddpo config key (FIELD_MAP,
                                         docs/migrating-from-trl.md); options ddpo cannot honour are refused by name
    DefaultDDPOStableDiffusionPipeline   (pretrained_model_name, pretrained_model_revision="main", use_lora=True)
    DDPOTrainer                          (config, reward_function, prompt_function, sd_pipeline, image_samples_hook=None)
                                         .train(epochs=None), .step(epoch, global_step), .save_model(dir), .push_to_hub(repo_id)

The callables keep TRL's conventions: `reward_function(images, prompts, prompt_metadata) -> (rewards, metadata)`
with `images` a float tensor (B, 3, H, W) in [0, 1]; `prompt_function() -> (prompt, metadata)`;
`image_samples_hook(prompt_image_data, global_step, tracker)` once per epoch with one
`[images, prompts, prompt_metadata, rewards, reward_metadata]` per sampling batch.

What differs from TRL, on purpose: the run is a ddpo run directory (PROJECT_DIR/RUN_NAME: config.toml,
metrics.jsonl, checkpoints/epoch-NNNN, report.html), so `ddpo eval`, `ddpo report`, `ddpo export` work on it;
each sample's noise and prompt draw are seeded from (seed, epoch, index), so runs repeat; `mixed_precision="fp16"`
(TRL's default) on a machine without CUDA trains in fp32 and says so, where TRL's accelerate would stop.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import ConfigError


class UnsupportedOptionError(ConfigError):
    """A TRL option ddpo cannot honour; the message names it."""


def _one_line_errors(previous=sys.excepthook):
    """TRL scripts build their config at the top level: an option ddpo refuses (or any bad-input error of
    ddpo's) ends the script with one line on stderr and exit status 2, not a traceback. Other exceptions go to the
    previous hook unchanged."""

    def hook(kind, error, traceback):
        from ..errors import user_errors as _user_errors

        if issubclass(kind, (ConfigError, *_user_errors())):
            print(f"ddpo: error: {error}", file=sys.stderr)
            sys.exit(2)
        previous(kind, error, traceback)

    return hook


sys.excepthook = _one_line_errors()


def _default_exp_name() -> str:
    name = os.path.basename(sys.argv[0])
    return name[: -len(".py")] if name.endswith(".py") else (name or "ddpo")


@dataclass
class DDPOConfig:
    """TRL 0.23.1's `DDPOConfig`, field for field (names, types, defaults), plus `output_dir` (which TRL's example
    script reads but TRL's class lacks). `HfArgumentParser(DDPOConfig)` turns it into command-line options."""

    exp_name: str = field(default_factory=_default_exp_name, metadata={"help": "Name of this experiment (the run directory's name when run_name is empty)."})
    run_name: str = field(default="", metadata={"help": "Name of this run (the run directory's name)."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    log_with: Optional[str] = field(default=None, metadata={"help": "'tensorboard' or 'wandb' (TensorBoard always logs)."})
    tracker_kwargs: dict = field(default_factory=dict, metadata={"help": "Not supported (must be empty)."})
    accelerator_kwargs: dict = field(default_factory=dict, metadata={"help": "Not supported (must be empty)."})
    project_kwargs: dict = field(default_factory=dict, metadata={"help": "project_dir (parent of the run directory), total_limit (checkpoints kept)."})
    tracker_project_name: str = field(default="trl", metadata={"help": "Accepted; the tracker's run is named after the run."})
    logdir: str = field(default="logs", metadata={"help": "Parent of the run directory when project_kwargs has no project_dir."})
    num_epochs: int = field(default=100, metadata={"help": "Number of epochs (train.epochs)."})
    save_freq: int = field(default=1, metadata={"help": "Epochs between checkpoints (log.save_every)."})
    num_checkpoint_limit: int = field(default=5, metadata={"help": "Checkpoints kept (log.keep_last)."})
    mixed_precision: str = field(default="fp16", metadata={"help": "'no', 'fp16' or 'bf16' (model.mixed_precision)."})
    allow_tf32: bool = field(default=True, metadata={"help": "Allow TF32 on Ampere GPUs (model.allow_tf32)."})
    resume_from: str = field(default="", metadata={"help": "A ddpo run directory to continue."})
    sample_num_steps: int = field(default=50, metadata={"help": "Sampler steps (sample.num_steps)."})
    sample_eta: float = field(default=1.0, metadata={"help": "DDIM eta (sample.eta)."})
    sample_guidance_scale: float = field(default=5.0, metadata={"help": "CFG scale (sample.guidance_scale)."})
    sample_batch_size: int = field(default=1, metadata={"help": "Sampling batch size per process (sample.batch_size)."})
    sample_num_batches_per_epoch: int = field(default=2, metadata={"help": "Sampling batches per epoch (sample.num_batches_per_epoch)."})
    train_batch_size: int = field(default=1, metadata={"help": "Training batch size (train.batch_size)."})
    train_use_8bit_adam: bool = field(default=False, metadata={"help": "Not supported (must be False)."})
    train_learning_rate: float = field(default=3e-4, metadata={"help": "Learning rate (train.lr)."})
    train_adam_beta1: float = field(default=0.9, metadata={"help": "train.adam_beta1"})
    train_adam_beta2: float = field(default=0.999, metadata={"help": "train.adam_beta2"})
    train_adam_weight_decay: float = field(default=1e-4, metadata={"help": "train.adam_weight_decay"})
    train_adam_epsilon: float = field(default=1e-8, metadata={"help": "train.adam_epsilon"})
    train_gradient_accumulation_steps: int = field(default=1, metadata={"help": "train.gradient_accumulation_steps"})
    train_max_grad_norm: float = field(default=1.0, metadata={"help": "train.max_grad_norm"})
    train_num_inner_epochs: int = field(default=1, metadata={"help": "train.inner_epochs"})
    train_cfg: bool = field(default=True, metadata={"help": "CFG during training (train.cfg)."})
    train_adv_clip_max: float = field(default=5.0, metadata={"help": "train.adv_clip_max"})
    train_clip_range: float = field(default=1e-4, metadata={"help": "train.clip_range"})
    train_timestep_fraction: float = field(default=1.0, metadata={"help": "train.timestep_fraction"})
    per_prompt_stat_tracking: bool = field(default=False, metadata={"help": "train.per_prompt_stat_tracking"})
    per_prompt_stat_tracking_buffer_size: int = field(default=16, metadata={"help": "train.stat_buffer_size"})
    per_prompt_stat_tracking_min_count: int = field(default=16, metadata={"help": "train.stat_min_count"})
    async_reward_computation: bool = field(default=False, metadata={"help": "Accepted: ddpo always scores a batch while the next one samples."})
    max_workers: int = field(default=2, metadata={"help": "Accepted: ddpo scores in one thread."})
    negative_prompts: str = field(default="", metadata={"help": "Not supported (must be empty): ddpo's unconditional prompt is ''."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the trained model at the end of train() (needs output_dir as the repo name or hub_model_id)."})
    output_dir: str = field(default="", metadata={"help": "Not in TRL's DDPOConfig (its example script reads it): where save_model writes (default: RUN_DIR/export)."})

    def __post_init__(self) -> None:
        check_supported(self)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# TRL field -> ddpo config key. Fields not here are handled in `to_ddpo_overrides` (see UNSUPPORTED / ACCEPTED).
FIELD_MAP: dict[str, str] = {
    "run_name": "run_name",
    "seed": "seed",
    "num_epochs": "train.epochs",
    "save_freq": "log.save_every",
    "num_checkpoint_limit": "log.keep_last",
    "mixed_precision": "model.mixed_precision",
    "allow_tf32": "model.allow_tf32",
    "sample_num_steps": "sample.num_steps",
    "sample_eta": "sample.eta",
    "sample_guidance_scale": "sample.guidance_scale",
    "sample_batch_size": "sample.batch_size",
    "sample_num_batches_per_epoch": "sample.num_batches_per_epoch",
    "train_batch_size": "train.batch_size",
    "train_learning_rate": "train.lr",
    "train_adam_beta1": "train.adam_beta1",
    "train_adam_beta2": "train.adam_beta2",
    "train_adam_weight_decay": "train.adam_weight_decay",
    "train_adam_epsilon": "train.adam_epsilon",
    "train_gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "train_max_grad_norm": "train.max_grad_norm",
    "train_num_inner_epochs": "train.inner_epochs",
    "train_cfg": "train.cfg",
    "train_adv_clip_max": "train.adv_clip_max",
    "train_clip_range": "train.clip_range",
    "train_timestep_fraction": "train.timestep_fraction",
    "per_prompt_stat_tracking": "train.per_prompt_stat_tracking",
    "per_prompt_stat_tracking_buffer_size": "train.stat_buffer_size",
    "per_prompt_stat_tracking_min_count": "train.stat_min_count",
    "log_with": "log.with",
}
# Options ddpo refuses unless left at TRL's default: (default, why).
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "train_use_8bit_adam": (False, "bitsandbytes' 8-bit Adam is not wired into ddpo's optimizer"),
    "negative_prompts": ("", "ddpo's classifier-free guidance always uses the empty prompt as the unconditional one"),
    "tracker_kwargs": ({}, "ddpo configures its trackers itself (log.with)"),
    "accelerator_kwargs": ({}, "ddpo builds its Accelerator from the config (launch multi-GPU runs with `accelerate launch`)"),
}
# Accepted, with no ddpo key of their own: field -> what happens.
ACCEPTED: dict[str, str] = {
    "exp_name": "names the run directory when run_name is empty",
    "project_kwargs": "project_dir: the run directory's parent; total_limit: log.keep_last; logging_dir and automatic_checkpoint_naming: accepted (ddpo's layout is fixed)",
    "tracker_project_name": "accepted, no effect (trackers are named after the run)",
    "logdir": "the run directory's parent when project_kwargs has no project_dir",
    "resume_from": "a ddpo run directory: the run continues from its latest checkpoint (`ddpo train --resume`)",
    "async_reward_computation": "accepted either way: ddpo always scores a batch in a thread while the next one samples",
    "max_workers": "accepted, no effect: ddpo scores in one thread (rewards that need more parallelism batch inside)",
    "push_to_hub": "at the end of train(): `ddpo export` of the last checkpoint, uploaded to output_dir's name (needs a token)",
    "output_dir": "not a TRL 0.23 field (its example script reads it): where save_model() exports",
}
PROJECT_KWARGS = {"project_dir", "total_limit", "logging_dir", "automatic_checkpoint_naming"}
TRACKERS = ("tensorboard", "wandb")


def check_supported(config: DDPOConfig) -> None:
    """Refuse, by name, every option ddpo cannot honour.

    Raises:
        UnsupportedOptionError: naming the field, its value and why.
    """
    for name, (default, why) in UNSUPPORTED.items():
        value = getattr(config, name)
        if value != default:
            raise UnsupportedOptionError(f"DDPOConfig option {name}={value!r} is not supported by ddpo.compat.trl: {why}")
    unknown = sorted(set(config.project_kwargs) - PROJECT_KWARGS)
    if unknown:
        raise UnsupportedOptionError(f"DDPOConfig option project_kwargs[{unknown[0]!r}] is not supported by ddpo.compat.trl (supported: {', '.join(sorted(PROJECT_KWARGS))})")
    if config.log_with not in (None, "", *TRACKERS):
        raise UnsupportedOptionError(f"DDPOConfig option log_with={config.log_with!r} is not supported by ddpo.compat.trl (use one of {', '.join(TRACKERS)})")


def to_ddpo_overrides(config: DDPOConfig, *, cuda_available: bool) -> tuple[dict[str, Any], list[str]]:
    """ddpo config keys for a TRL config, and notes to print (what was adapted)."""
    check_supported(config)
    overrides: dict[str, Any] = {}
    notes: list[str] = []
    for name, key in FIELD_MAP.items():
        value = getattr(config, name)
        if name == "log_with":
            value = [value] if value else []
        if name == "mixed_precision" and value == "fp16" and not cuda_available:
            notes.append("mixed_precision='fp16' needs a CUDA GPU; training in fp32 on this machine")
            value = "no"
        overrides[key] = value
    if not config.run_name:
        overrides.pop("run_name")
    if "total_limit" in config.project_kwargs:
        overrides["log.keep_last"] = int(config.project_kwargs["total_limit"])
    return overrides, notes


# ---- the pipeline ---------------------------------------------------------------------------------------
class DefaultDDPOStableDiffusionPipeline:
    """TRL's pipeline argument: which Stable Diffusion model, which revision, LoRA or not. The pipeline itself
    loads when first used (`.sd_pipeline`), so the trainer does not hold two copies."""

    def __init__(self, pretrained_model_name: str, *, pretrained_model_revision: str = "main", use_lora: bool = True) -> None:
        self.pretrained_model = pretrained_model_name
        self.pretrained_revision = pretrained_model_revision
        self.use_lora = use_lora
        self._pipeline = None

    @property
    def sd_pipeline(self):
        if self._pipeline is None:
            from ..policy import load_pipeline, resolve_model

            self._pipeline = load_pipeline(resolve_model(self.pretrained_model), self.pretrained_revision)
        return self._pipeline

    @property
    def unet(self):
        return self.sd_pipeline.unet

    @property
    def tokenizer(self):
        return self.sd_pipeline.tokenizer


def _native_size(pretrained: str, revision: str | None) -> int:
    """The image size the model's UNet was trained at (what TRL's pipeline call samples), from the configs alone."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ..policy import PolicyLoadError, resolve_model

    source = resolve_model(pretrained)
    revision = None if Path(source).is_dir() else revision
    try:
        unet = UNet2DConditionModel.load_config(source, subfolder="unet", revision=revision)
        vae = AutoencoderKL.load_config(source, subfolder="vae", revision=revision)
    except Exception as error:  # diffusers raises many types (OSError, ValueError, HTTP errors)
        raise PolicyLoadError(f"DefaultDDPOStableDiffusionPipeline({pretrained!r}): not a Stable Diffusion pipeline here: {str(error).splitlines()[0]}") from error
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


# ---- the trainer ----------------------------------------------------------------------------------------
def _as_tensor_images(images):
    """PIL images -> float tensor (B, 3, H, W) in [0, 1], what TRL's pipeline hands the reward function."""
    import torch

    arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


class _TrlReward:
    """A TRL reward function as a ddpo reward; keeps each batch's data for the image-samples hook."""

    def __init__(self, reward_function: Callable[..., Any]) -> None:
        self.reward_function = reward_function
        self.batches: list[list[Any]] = []
        self.__name__ = getattr(reward_function, "__name__", "trl_reward")

    def __call__(self, images, prompts, metadata):
        import torch

        tensor = _as_tensor_images(images)
        output = self.reward_function(tensor, tuple(prompts), tuple(metadata))
        if not (isinstance(output, tuple) and len(output) == 2):
            raise TypeError("a TRL reward_function returns (rewards, reward_metadata)")
        rewards, reward_metadata = output
        rewards = torch.as_tensor(rewards).detach().float().cpu().reshape(-1)
        self.batches.append([tensor, tuple(prompts), tuple(metadata), rewards, reward_metadata])
        return rewards.numpy()


class DDPOTrainer:
    """TRL's `DDPOTrainer` signature over ddpo's `Trainer` (one ddpo run directory per trainer)."""

    def __init__(
        self,
        config: DDPOConfig,
        reward_function: Callable[..., Any],
        prompt_function: Callable[[], Any],
        sd_pipeline: DefaultDDPOStableDiffusionPipeline,
        image_samples_hook: Optional[Callable[[Any, Any, Any], Any]] = None,
    ) -> None:
        import torch

        from .. import api
        from ddpo.training.loop import Trainer

        if not isinstance(sd_pipeline, DefaultDDPOStableDiffusionPipeline):
            raise UnsupportedOptionError(f"sd_pipeline must be a DefaultDDPOStableDiffusionPipeline, got {type(sd_pipeline).__name__} (custom DDPOStableDiffusionPipeline subclasses are not supported)")
        self.config = config
        overrides, notes = to_ddpo_overrides(config, cuda_available=torch.cuda.is_available())
        for note in notes:
            print(f"ddpo.compat.trl: {note}", file=sys.stderr)
        overrides.update({"model.pretrained": sd_pipeline.pretrained_model, "model.revision": sd_pipeline.pretrained_revision or "", "model.use_lora": sd_pipeline.use_lora})
        self.reward = _TrlReward(reward_function)
        self.image_samples_hook = image_samples_hook
        if config.resume_from:
            from ddpo.training.run_directory import RunDirectory

            run = RunDirectory.open(config.resume_from)  # RunDirectoryError naming the path
            ddpo_config = api.load_config(run.config_path, **{k.replace(".", "__"): v for k, v in overrides.items() if k.startswith(("train.epochs", "log."))})
            self.run_dir = run.path
        else:
            # ddpo's defaults (LoRA rank 4 on to_k/to_q/to_v/to_out.0, as TRL hard-codes) under TRL's keys; images at
            # the model's native size (TRL's pipeline call); no periodic evaluation (TRL has none).
            from ..config import Config

            size = _native_size(sd_pipeline.pretrained_model, sd_pipeline.pretrained_revision)
            extra = {"sample.height": size, "sample.width": size, "log.eval_every": 0, "log.grid_prompts": [], "log.num_eval_seeds": 2}
            ddpo_config = api.load_config(Config(), **{k.replace(".", "__"): v for k, v in {**extra, **overrides}.items()})
            parent = Path(config.project_kwargs.get("project_dir") or config.logdir)
            self.run_dir = parent / (config.run_name or f"{config.exp_name}-{time.strftime('%Y%m%d-%H%M%S')}")
        ddpo_config.reward.name, ddpo_config.reward.terms, ddpo_config.reward.kwargs = api._reward_name(self.reward), [], {}
        api._prompt_source_for(prompt_function, ddpo_config, self.run_dir)()
        self.ddpo_config = ddpo_config
        hook = self._call_hook

        class _Trainer(Trainer):
            def record(self, epoch, samples, train_metrics, train_seconds, **kwargs):
                super().record(epoch, samples, train_metrics, train_seconds, **kwargs)
                hook(epoch, self)

        self.trainer = _Trainer(ddpo_config, self.run_dir, resume=bool(config.resume_from), progress=False)
        self.first_epoch = self.trainer.start_epoch

    def _call_hook(self, epoch: int, trainer) -> None:
        batches, self.reward.batches = self.reward.batches, []
        if self.image_samples_hook is not None and trainer.accelerator.is_main_process:
            global_step = epoch * trainer.sizes.optimizer_steps_per_epoch
            self.image_samples_hook(batches, global_step, trainer.accelerator.trackers[0])

    def train(self, epochs: Optional[int] = None) -> None:
        """Train up to `epochs` epochs in all (default: config.num_epochs), as TRL's `train` does."""
        if epochs is not None:
            self.trainer.config.train.epochs = epochs
        try:
            self.trainer.run()
        finally:
            from ..api import _reset_accelerate

            _reset_accelerate()
        if self.config.push_to_hub:
            self.push_to_hub()

    def step(self, epoch: int, global_step: int) -> int:
        """One epoch (sample, score, advantages, update, record) as epoch number `epoch` (0-based, TRL's
        convention); returns the global optimizer step after it."""
        from ..utils import derive_seed
        from accelerate.utils import set_seed

        trainer, number = self.trainer, epoch + 1
        set_seed(derive_seed(trainer.config.seed, "epoch", number) % 2**32)
        if number == 1 and trainer.last_epoch == 0:
            trainer.save_sample_grid(0)
        samples = trainer.sample_epoch(number)
        advantages = trainer.advantages(samples)
        metrics, seconds = trainer.update(number, samples, advantages)
        trainer.record(number, samples, metrics, seconds)
        trainer.last_epoch = number
        return global_step + trainer.sizes.optimizer_steps_per_epoch

    def save_model(self, output_dir: Optional[str] = None) -> Path:
        """`ddpo export` of the latest checkpoint (base pipeline + LoRA, with a model card) into `output_dir`."""
        from ..export import export_run

        target = Path(output_dir or self.config.output_dir or self.run_dir / "export")
        return export_run(self.run_dir, target, checkpoint="latest").path

    def push_to_hub(self, repo_id: Optional[str] = None, **ignored: Any) -> str:
        """Export (if not yet) and upload with huggingface_hub; `repo_id` defaults to output_dir's name."""
        from ..export import push_to_hub

        target = Path(self.config.output_dir or self.run_dir / "export")
        if not (target / "README.md").is_file():
            self.save_model(str(target))
        return push_to_hub(target, repo_id or target.name)


def migration_table() -> str:
    """Markdown rows: every DDPOConfig field, what ddpo does with it (docs/migrating-from-trl.md)."""
    rows = []
    for f in fields(DDPOConfig):
        if f.name in FIELD_MAP:
            what = f"`{FIELD_MAP[f.name]}`"
        elif f.name in UNSUPPORTED:
            what = f"refused unless {UNSUPPORTED[f.name][0]!r}: {UNSUPPORTED[f.name][1]}"
        else:
            what = ACCEPTED[f.name]
        rows.append(f"| `{f.name}` | {what} |")
    return "\n".join(rows)
