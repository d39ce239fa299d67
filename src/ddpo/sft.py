"""`ddpo sft DATA --out RUN_DIR`: supervised fine-tuning on demonstrations, the first step of the RLHF recipe.

DATA is a folder in the `imagefolder` convention of diffusers' training examples: images beside a
`metadata.jsonl` with one `{"file_name": "x.png", "text": "a caption"}` per line. The loss is the model's own:
epsilon (or v) prediction at a uniformly drawn timestep for DDPM-family models (Ho et al. 2020, eq. 14), the
velocity eps - x_0 at a uniformly drawn sigma for flow-matching models (Lipman et al. 2023). LoRA (or all UNet
weights with model.use_lora=false) as in `ddpo train`.

The run directory is `ddpo train`'s: config.toml (the model and LoRA keys, log.save_every, log.keep_last, seed),
sft.json (the data and the SFT options), metrics.jsonl (per epoch: loss, images seen), samples/epoch-NNNN.png
(fixed captions x fixed seeds), checkpoints/epoch-NNNN/ (the LoRA in diffusers' format, trainable tensors,
optimizer and epoch) and `--resume`, which continues bit for bit: every draw of epoch e derives from (seed, e).
`ddpo train --set model.init_lora=RUN_DIR` starts RL from its LoRA.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import Config, ConfigError, save_config
from .training.run_directory import TRAINER_STATE, RunDirectory, RunDirectoryError, resolve_adapter_dir, write_text_atomic
from .utils import derive_seed, image_grid

SFT_FILE = "sft.json"
GRID_CAPTIONS = 4
GRID_SEEDS = 2


class SftDataError(ValueError):
    """The demonstrations folder is not in the imagefolder + metadata.jsonl convention; the message names the line."""


@dataclass
class SftOptions:
    data: str = ""
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    caption_column: str = "text"
    image_column: str = "file_name"


def read_imagefolder(data: str | Path, caption_column: str = "text", image_column: str = "file_name") -> list[tuple[Path, str]]:
    """(image path, caption) per line of DATA/metadata.jsonl, checked: every file exists, every caption is text."""
    data = Path(data)
    metadata = data / "metadata.jsonl"
    if not metadata.is_file():
        raise SftDataError(f"{data}: no metadata.jsonl (one {{\"{image_column}\": ..., \"{caption_column}\": ...}} per line, the imagefolder convention)")
    pairs = []
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SftDataError(f"{metadata}:{number}: not JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(caption_column), str) or not isinstance(record.get(image_column), str):
            raise SftDataError(f"{metadata}:{number}: needs a string {image_column!r} and a string {caption_column!r}")
        path = data / record[image_column]
        if not path.is_file():
            raise SftDataError(f"{metadata}:{number}: image {record[image_column]!r} not found in {data}")
        pairs.append((path, record[caption_column]))
    if not pairs:
        raise SftDataError(f"{metadata}: no demonstrations")
    return pairs


def _pixels(paths: list[Path], size: int) -> torch.Tensor:
    """(B, 3, size, size) in [-1, 1], what the VAE encodes."""
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0 for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def denoising_loss(policy, latents: torch.Tensor, embeds: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The model's own training loss on clean latents x_0 (B, C, h, w) with prompt embeddings (B, L, D)."""
    from .policy import is_flow_pipeline

    batch, device = latents.shape[0], latents.device
    noise = torch.randn(latents.shape, generator=generator).to(device)
    scheduler = policy.pipeline.scheduler
    if is_flow_pipeline(policy.pipeline):
        # x_sigma = (1 - sigma) x_0 + sigma eps; the network, given 1000 sigma, predicts d x / d sigma = eps - x_0.
        sigma = torch.rand(batch, generator=generator).to(device)
        noisy = (1 - sigma[:, None, None, None]) * latents + sigma[:, None, None, None] * noise
        prediction = policy.model(noisy, sigma * 1000, embeds).sample
        return torch.nn.functional.mse_loss(prediction.float(), (noise - latents).float())
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler.from_config(scheduler.config)
    timesteps = torch.randint(0, ddpm.config.num_train_timesteps, (batch,), generator=generator).to(device)
    noisy = ddpm.add_noise(latents, noise, timesteps)
    target = ddpm.get_velocity(latents, noise, timesteps) if ddpm.config.prediction_type == "v_prediction" else noise
    prediction = policy.model(noisy, timesteps, embeds).sample
    return torch.nn.functional.mse_loss(prediction.float(), target.float())


class SftTrainer:
    """Builds the policy (LoRA or full), the optimizer and the run directory; `run()` trains the epochs."""

    def __init__(self, config: Config, options: SftOptions, run_dir: str | Path, *, resume: bool = False, log=print) -> None:
        from .policy import build_policy

        self.config, self.options, self.log = config, options, log
        if options.epochs < 1 or options.batch_size < 1 or not options.lr > 0:
            raise ConfigError(f"--epochs {options.epochs}, --batch-size {options.batch_size} and --lr {options.lr} must be positive")
        self.pairs = read_imagefolder(options.data, options.caption_column, options.image_column)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(config.seed, "init"))
            self.policy = build_policy(config)  # the training sampler is unused: SFT samples only its grids (evaluation)
        self.optimizer = torch.optim.AdamW(self.policy.trainable_parameters(), lr=options.lr, weight_decay=config.train.adam_weight_decay)
        self.run_dir = RunDirectory.open(run_dir) if resume else RunDirectory.create(run_dir)
        self.created = not resume
        self.start_epoch = 0
        if resume:
            epoch, directory = self.run_dir.latest_checkpoint()
            state = torch.load(directory / TRAINER_STATE, map_location="cpu", weights_only=True)
            from safetensors.torch import load_file

            self.policy.load_trainable_state_dict(load_file(str(directory / "trainable.safetensors")))
            self.optimizer.load_state_dict(state["optimizer"])
            self.start_epoch = state["epoch"]
            self.run_dir.truncate_metrics(self.start_epoch)
        else:
            save_config(config, self.run_dir.config_path)
            write_text_atomic(self.run_dir.path / SFT_FILE, json.dumps(asdict(options), indent=2) + "\n")

    def run(self) -> Path:
        config, options = self.config, self.options
        steps_per_epoch = math.ceil(len(self.pairs) / options.batch_size)
        self.log(
            f"ddpo sft: {len(self.pairs)} demonstrations from {options.data}, {steps_per_epoch} steps/epoch of {options.batch_size}, "
            f"{sum(p.numel() for p in self.policy.trainable_parameters()):,} trainable weights; run dir {self.run_dir.path}"
        )
        try:
            if self.start_epoch == 0:
                self.save_grid(0)
            for epoch in range(self.start_epoch + 1, options.epochs + 1):
                started = time.perf_counter()
                order = torch.randperm(len(self.pairs), generator=torch.Generator().manual_seed(derive_seed(config.seed, "sft-shuffle", epoch))).tolist()
                losses = []
                for step, start in enumerate(range(0, len(order), options.batch_size)):
                    chosen = [self.pairs[i] for i in order[start : start + options.batch_size]]
                    generator = torch.Generator().manual_seed(derive_seed(config.seed, "sft-noise", epoch, step))
                    losses.append(self.step([p for p, _ in chosen], [c for _, c in chosen], generator))
                record = {"epoch": epoch, "samples": epoch * len(self.pairs), "loss": float(np.mean(losses)), "train_seconds": time.perf_counter() - started}
                self.run_dir.append_metrics(record)
                self.save_grid(epoch)
                if epoch % config.log.save_every == 0 or epoch == options.epochs:
                    self.run_dir.write_checkpoint(epoch, lambda d: self.write_checkpoint(d, epoch), keep_last=config.log.keep_last)
                self.log(f"epoch {epoch}: loss {record['loss']:.5f}  ({record['train_seconds']:.1f}s)")
        except BaseException:
            if self.created and not self.run_dir.checkpoints():
                shutil.rmtree(self.run_dir.path, ignore_errors=True)  # nothing half-written
            raise
        self.write_report()
        return self.run_dir.path

    def step(self, paths: list[Path], captions: list[str], generator: torch.Generator) -> float:
        policy = self.policy
        with torch.no_grad():
            pixels = _pixels(paths, self.config.sample.height).to(policy.device, policy.vae.dtype)
            latents = policy.vae.encode(pixels).latent_dist.mean * policy.vae.config.scaling_factor
            embeds = policy.encode_prompts(captions)
        loss = denoising_loss(policy, latents.float(), embeds.to(policy.model.dtype), generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), self.config.train.max_grad_norm)
        self.optimizer.step()
        return float(loss.detach())

    def save_grid(self, epoch: int) -> None:
        captions = list(dict.fromkeys(c for _, c in self.pairs))[:GRID_CAPTIONS]
        cells = [(c, s) for c in captions for s in range(GRID_SEEDS)]
        generators = [torch.Generator().manual_seed(derive_seed(self.config.seed, "grid", row, s)) for row, (_, s) in enumerate(cells)]
        with self.policy.evaluation():
            images = self.policy.sample([c for c, _ in cells], generators).images
        image_grid(images, len(captions), GRID_SEEDS).save(self.run_dir.sample_grid_path(epoch))
        if epoch == 0:
            layout = {"prompts": captions, "seeds": GRID_SEEDS, "cell_width": images[0].width, "cell_height": images[0].height}
            write_text_atomic(self.run_dir.grid_layout_path, json.dumps(layout) + "\n")

    def write_checkpoint(self, directory: Path, epoch: int) -> None:
        from safetensors.torch import save_file

        self.policy.save_adapter(directory)
        save_file(self.policy.trainable_state_dict(), str(directory / "trainable.safetensors"))
        torch.save({"epoch": epoch, "optimizer": self.optimizer.state_dict(), "kind": "sft"}, directory / TRAINER_STATE)

    def write_report(self) -> None:
        from .report import write_report

        try:
            write_report(self.run_dir.path)
        except Exception as error:  # noqa: BLE001 - the run matters more than its report
            self.log(f"ddpo: warning: report.html not written: {type(error).__name__}: {error}")


def load_initial_lora(policy, source: str | Path) -> Path:
    """Start a policy's adapters from another run's LoRA (`model.init_lora`): RUN_DIR (its latest checkpoint) or a
    checkpoint directory. The adapters must have the same shape (model.lora_rank, model.lora_target_modules).

    Raises:
        ConfigError: naming model.init_lora and what does not match.
    """
    from safetensors.torch import load_file

    if not policy.lora.enabled:
        raise ConfigError("model.init_lora starts LoRA adapters from a run's; it needs model.use_lora=true")
    try:
        directory = resolve_adapter_dir(source, "latest")
    except RunDirectoryError as error:
        raise ConfigError(f"model.init_lora={str(source)!r}: {error}") from error
    state_path = directory / "trainable.safetensors"
    if not state_path.is_file():
        raise ConfigError(f"model.init_lora={str(source)!r}: {directory} holds no trainable.safetensors (a ddpo sft or ddpo train checkpoint has one)")
    state = load_file(str(state_path))
    ours = {name: p.shape for name, p in policy.model.named_parameters() if p.requires_grad}
    if set(state) != set(ours) or any(state[k].shape != ours[k] for k in ours):
        raise ConfigError(f"model.init_lora={str(source)!r}: its adapters differ from this run's (same model.lora_rank and model.lora_target_modules needed)")
    policy.load_trainable_state_dict(state)
    return directory


def read_options(run_dir: str | Path) -> SftOptions:
    path = Path(run_dir) / SFT_FILE
    if not path.is_file():
        raise RunDirectoryError(f"--resume {run_dir}: not a ddpo sft run (no {SFT_FILE})")
    return SftOptions(**json.loads(path.read_text()))

