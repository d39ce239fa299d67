"""Pretraining of the Shapes world's tiny text-to-image pipeline, deterministic from a seed and resumable.

Stages, each skipped when its output already exists in the work directory:
1. recognisers: the describer and the judge (`recognizers.py`), trained on rendered images;
2. VAE: a thin `AutoencoderKL` (32x32x3 <-> 8x8x4, 4x down-sampling), MSE + L1 + a tiny KL as in SD;
3. latent cache: the dataset encoded once (the posterior's mean and std), so the UNet never runs the VAE;
4. text encoder + UNet: a `CLIPTextModel` with its own tokenizer and a `UNet2DConditionModel`, trained
   jointly on the epsilon-prediction objective with 10% caption dropout (for classifier-free guidance) and
   an EMA of the weights; checkpointed every `checkpoint_every` steps so an interrupted run resumes.
The result is a standard `StableDiffusionPipeline` directory (DDIM scheduler, no safety checker).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from copy import deepcopy
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL, DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel,
)  # fmt: skip
from transformers import CLIPTextConfig, CLIPTextModel

from .recognizers import exact_accuracy, images_to_tensor, load_recognizer, save_recognizer, train_recognizer
from .render import UNUSUAL_PRETRAIN_FRACTION, Scene, random_scene, render_batch, uniform_scene
from .tokenizer import write_tokenizer

# SD 1.x's noise schedule, so the tiny model behaves like the real one under DDIM.
NOISE_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


@dataclass
class PretrainConfig:
    seed: int = 0
    size: int = 32
    unusual_fraction: float = UNUSUAL_PRETRAIN_FRACTION  # share of pretraining images with an unusual colour-shape pair
    dataset_size: int = 60_000
    recognizer_steps: int = 600
    recognizer_images: int = 30_000
    vae_steps: int = 1500
    vae_batch_size: int = 32
    vae_lr: float = 2e-3
    unet_steps: int = 600
    unet_schedule_steps: int = 1000  # length of the cosine learning-rate schedule; 0 = unet_steps. Stopping at
    # 600 of 1000 steps ships a model that draws common pairs well and unusual ones poorly (room for RL).
    unet_batch_size: int = 128
    unet_lr: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    checkpoint_every: int = 200
    eval_every: int = 200  # judge the EMA pipeline every this many UNet steps; 0 never
    eval_guidance_scale: float = 3.0
    flow_steps: int = 600  # velocity fine-tuning of the finished UNet for the flow-matching twin; 0 skips it
    flow_lr: float = 5e-4


def build_vae(size: int = 32) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=size,
    )


def build_text_encoder(vocab_size: int, bos: int, eos: int, max_length: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return CLIPTextModel(config)


def build_unet(latent_size: int = 8) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 96),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def _loss_ends(stage: str, losses: list[float], window: int = 20) -> dict[str, float]:
    """Mean loss over the first and the last `window` steps of a stage (this session's steps, if resumed)."""
    if not losses:
        return {}
    window = max(1, min(window, len(losses) // 2))
    return {f"{stage}_loss_start": float(np.mean(losses[:window])), f"{stage}_loss_end": float(np.mean(losses[-window:]))}


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, max_decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, with the decay warmed up as (1 + step) / (10 + step)."""
    decay = min(max_decay, (1 + step) / (10 + step))
    for ema_p, p in zip(ema.parameters(), model.parameters()):
        ema_p.lerp_(p, 1 - decay)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Pretrainer:
    """Runs the stages into `work_dir`; `run()` is idempotent and resumes where a previous run stopped."""

    def __init__(self, work_dir: str | Path, config: PretrainConfig | None = None, log=print) -> None:
        self.work = Path(work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.config = config or PretrainConfig()
        self.log = log
        self.metrics_path = self.work / "metrics.json"
        self.metrics: dict = json.loads(self.metrics_path.read_text()) if self.metrics_path.exists() else {}
        (self.work / "pretrain_config.json").write_text(json.dumps(asdict(self.config), indent=2))

    def _record(self, **values) -> None:
        self.metrics.update(values)
        self.metrics_path.write_text(json.dumps(self.metrics, indent=2))

    # ---- data -------------------------------------------------------------------------------------------
    def scenes(self) -> list[Scene]:
        rng = random.Random(self.config.seed)
        return [random_scene(rng, self.config.unusual_fraction) for _ in range(self.config.dataset_size)]

    def images(self, scenes: list[Scene]) -> torch.Tensor:
        out = []
        for start in range(0, len(scenes), 5000):
            out.append(images_to_tensor(render_batch(scenes[start : start + 5000], self.config.seed + start, self.config.size)))
        return torch.cat(out)

    # ---- stage 1 ----------------------------------------------------------------------------------------
    def recognizers(self) -> None:
        for offset, kind in enumerate(("describer", "judge")):
            path = self.work / f"{kind}.safetensors"
            if path.exists():
                continue
            seed = self.config.seed + 1000 * (offset + 1)  # independent seeds: the judge must not share the describer's mistakes
            model = train_recognizer(kind, seed=seed, steps=self.config.recognizer_steps, num_images=self.config.recognizer_images, log=self.log)
            accuracy = exact_accuracy(model)
            self.log(f"{kind}: exact accuracy on 2000 fresh renders {accuracy:.4f}")
            save_recognizer(model, path)
            self._record(**{f"{kind}_exact_accuracy": accuracy})

    # ---- stage 2 ----------------------------------------------------------------------------------------
    def vae(self) -> AutoencoderKL:
        path = self.work / "vae"
        if (path / "config.json").exists():
            return AutoencoderKL.from_pretrained(path)
        cfg = self.config
        torch.manual_seed(cfg.seed)
        vae = build_vae(cfg.size)
        rng = random.Random(cfg.seed + 1)  # every pair equally often: the VAE must reconstruct unusual pairs too
        images = self.images([uniform_scene(rng) for _ in range(cfg.dataset_size)])
        generator = torch.Generator().manual_seed(cfg.seed)
        optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=0.05)
        vae.train()
        losses = []
        for step in range(cfg.vae_steps):
            x = images[torch.randint(0, len(images), (cfg.vae_batch_size,), generator=generator)]
            posterior = vae.encode(x).latent_dist
            reconstruction = vae.decode(posterior.sample(generator=generator)).sample
            loss = F.mse_loss(reconstruction, x) + 0.5 * F.l1_loss(reconstruction, x) + 1e-6 * posterior.kl().mean()
            losses.append(loss.item())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 200 == 0 or step == cfg.vae_steps - 1:
                self.log(f"vae step {step}/{cfg.vae_steps} loss {loss.item():.4f}")
        vae.eval()
        with torch.no_grad():
            latents = torch.cat([vae.encode(images[i : i + 1000]).latent_dist.mean for i in range(0, min(5000, len(images)), 1000)])
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
        accuracy = self._reconstruction_accuracy(vae)
        self.log(f"vae: describer exact accuracy on reconstructions {accuracy:.4f}, scaling factor {vae.config.scaling_factor:.4f}")
        self._record(vae_reconstruction_accuracy=accuracy, vae_scaling_factor=vae.config.scaling_factor, **_loss_ends("vae", losses))
        vae.save_pretrained(path)
        return vae

    @torch.no_grad()
    def _reconstruction_accuracy(self, vae: AutoencoderKL, n: int = 1000) -> float:
        from PIL import Image

        rng = random.Random(self.config.seed + 77)
        scenes = [uniform_scene(rng) for _ in range(n)]
        x = images_to_tensor(render_batch(scenes, self.config.seed + 77, self.config.size))
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
        arrays = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        describer = load_recognizer(self.work / "describer.safetensors", "describer")
        predicted = describer.predict([Image.fromarray(a) for a in arrays])
        return float(np.mean([p == s for p, s in zip(predicted, scenes)]))

    # ---- stage 3 ----------------------------------------------------------------------------------------
    def latents(self, vae: AutoencoderKL) -> dict:
        path = self.work / "latents.pt"
        if path.exists():
            return torch.load(path)
        scenes = self.scenes()
        images = self.images(scenes)
        means, stds = [], []
        with torch.no_grad():
            for start in range(0, len(images), 1000):
                dist = vae.encode(images[start : start + 1000]).latent_dist
                means.append(dist.mean)
                stds.append(dist.std)
        cache = {
            "mean": torch.cat(means) * vae.config.scaling_factor,
            "std": torch.cat(stds) * vae.config.scaling_factor,
            "captions": [s.caption for s in scenes],
        }
        _atomic_torch_save(cache, path)
        return cache

    # ---- stage 4 ----------------------------------------------------------------------------------------
    def unet(self, vae: AutoencoderKL, cache: dict) -> Path:
        cfg = self.config
        final = self.work / "pipeline"
        if (final / "model_index.json").exists():
            return final
        tokenizer = write_tokenizer(self.work / "tokenizer")
        torch.manual_seed(cfg.seed)
        text_encoder = build_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.model_max_length)
        unet = build_unet(cfg.size // 4)
        ema = {"unet": deepcopy(unet).requires_grad_(False), "text_encoder": deepcopy(text_encoder).requires_grad_(False)}
        parameters = list(unet.parameters()) + list(text_encoder.parameters())
        optimizer = torch.optim.AdamW(parameters, lr=cfg.unet_lr, weight_decay=1e-4)

        def lr_factor(step: int) -> float:  # linear warm-up, cosine decay to 10%
            if step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps
            progress = (step - cfg.warmup_steps) / max(1, (cfg.unet_schedule_steps or cfg.unet_steps) - cfg.warmup_steps)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        noise_scheduler = DDPMScheduler(**NOISE_SCHEDULE)
        generator = torch.Generator().manual_seed(cfg.seed)
        captions: list[str] = cache["captions"]
        token_ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        step = 0
        state_path = self.work / "unet_state.pt"
        if state_path.exists():
            state = torch.load(state_path, weights_only=False)
            unet.load_state_dict(state["unet"])
            text_encoder.load_state_dict(state["text_encoder"])
            ema["unet"].load_state_dict(state["ema_unet"])
            ema["text_encoder"].load_state_dict(state["ema_text_encoder"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            generator.set_state(state["generator"])
            step = state["step"]
            self.log(f"resuming UNet pretraining at step {step}")
        unet.train()
        text_encoder.train()
        started = time.time()
        losses: list[float] = []
        while step < cfg.unet_steps:
            index = torch.randint(0, len(captions), (cfg.unet_batch_size,), generator=generator)
            latents = cache["mean"][index] + cache["std"][index] * torch.randn(cache["mean"][index].shape, generator=generator)
            ids = token_ids[index].clone()
            dropped = torch.rand(len(index), generator=generator) < cfg.caption_dropout
            ids[dropped] = empty_ids[0]
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(index),), generator=generator)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            prediction = unet(noisy, timesteps, text_encoder(ids)[0]).sample
            loss = F.mse_loss(prediction, noise)
            losses.append(loss.item())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            for name, model in (("unet", unet), ("text_encoder", text_encoder)):
                _ema_update(ema[name], model, step, cfg.ema_decay)
            if step % 50 == 0:
                rate = (time.time() - started) / 50
                started = time.time()
                self.log(f"unet step {step}/{cfg.unet_steps} loss {loss.item():.4f} lr {schedule.get_last_lr()[0]:.2e} {rate:.2f}s/step")
            if step % cfg.checkpoint_every == 0 or step == cfg.unet_steps:
                state = {
                    "unet": unet.state_dict(),
                    "text_encoder": text_encoder.state_dict(),
                    "ema_unet": ema["unet"].state_dict(),
                    "ema_text_encoder": ema["text_encoder"].state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "generator": generator.get_state(),
                    "step": step,
                }
                _atomic_torch_save(state, state_path)
                self.save_pipeline(vae, ema["text_encoder"], tokenizer, ema["unet"], self.work / "pipeline-latest")
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.unet_steps):
                snapshot = self.work / f"pipeline-step-{step}"
                shutil.copytree(self.work / "pipeline-latest", snapshot, dirs_exist_ok=True)
                accuracy = self.evaluate(snapshot)
                self.log(f"unet step {step}: judge exact match {accuracy}")
                self._record(**{f"judge_exact_step_{step}": accuracy})
        self._record(**_loss_ends("unet", losses))
        self.save_pipeline(vae, ema["text_encoder"], tokenizer, ema["unet"], final)
        return final

    @staticmethod
    def save_pipeline(vae, text_encoder, tokenizer, unet, directory: Path, scheduler=None) -> None:
        """Write a `StableDiffusionPipeline` directory atomically; the UNet is stored in float16 (loaded as float32)."""
        if scheduler is None:
            scheduler = DDIMScheduler(**NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
        unet = deepcopy(unet).half()
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        tmp = directory.with_name(directory.name + ".tmp")
        pipe.save_pretrained(tmp, safe_serialization=True)
        for config_file in tmp.rglob("config.json"):  # the directory the work was loaded from is nobody's business
            config = json.loads(config_file.read_text())
            if config.pop("_name_or_path", None) is not None:
                config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)

    def evaluate(self, pipeline_dir: Path, seeds: int = 2, steps: int = 20) -> dict:
        """Judge exact-match on common and unusual prompts (the numbers the Shapes issue asks for)."""
        from .evaluation import judge_exact_match

        return judge_exact_match(
            pipeline_dir, self.work / "judge.safetensors", seeds=seeds, num_steps=steps, guidance_scale=self.config.eval_guidance_scale
        )  # fmt: skip

    # ---- stage 5 ----------------------------------------------------------------------------------------
    def flow(self, cache: dict, pipeline_dir: Path) -> Path | None:
        """The flow-matching twin: the finished UNet fine-tuned for velocity (rectified flow), same VAE and text encoder.

        x_sigma = (1 - sigma) x_0 + sigma * noise with sigma ~ logit-normal(0, 1) (SD3's choice); target
        v = noise - x_0; the UNet sees timestep 1000 * sigma, as diffusers' flow pipelines pass it. The text
        encoder stays frozen so both pipelines share it. Saved with a `FlowMatchEulerDiscreteScheduler`.
        """
        cfg = self.config
        final = self.work / "pipeline-flow"
        if cfg.flow_steps <= 0:
            return None
        if (final / "model_index.json").exists():
            return final
        pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir)
        unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder.requires_grad_(False), pipe.tokenizer
        ema = deepcopy(unet).requires_grad_(False)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.flow_lr, weight_decay=1e-4)
        warmup = min(cfg.warmup_steps, cfg.flow_steps // 4)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.flow_steps)))
        )
        generator = torch.Generator().manual_seed(cfg.seed + 5)
        captions: list[str] = cache["captions"]
        with torch.no_grad():
            ids = tokenizer(sorted(set(captions)) + [""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
            table = text_encoder(ids)[0]
        row = {caption: i for i, caption in enumerate(sorted(set(captions)))}
        caption_rows = torch.tensor([row[c] for c in captions])
        empty_row = len(row)
        step = 0
        state_path = self.work / "flow_state.pt"
        if state_path.exists():
            state = torch.load(state_path, weights_only=False)
            unet.load_state_dict(state["unet"])
            ema.load_state_dict(state["ema_unet"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            generator.set_state(state["generator"])
            step = state["step"]
            self.log(f"resuming flow twin at step {step}")
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        unet.train()
        losses: list[float] = []
        started = time.time()
        while step < cfg.flow_steps:
            index = torch.randint(0, len(captions), (cfg.unet_batch_size,), generator=generator)
            x0 = cache["mean"][index] + cache["std"][index] * torch.randn(cache["mean"][index].shape, generator=generator)
            rows = caption_rows[index].clone()
            rows[torch.rand(len(index), generator=generator) < cfg.caption_dropout] = empty_row
            noise = torch.randn(x0.shape, generator=generator)
            sigma = torch.sigmoid(torch.randn(len(index), generator=generator))
            noisy = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
            loss = F.mse_loss(unet(noisy, sigma * 1000, table[rows]).sample, noise - x0)
            losses.append(loss.item())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            _ema_update(ema, unet, step, cfg.ema_decay)
            if step % 50 == 0:
                rate = (time.time() - started) / 50
                started = time.time()
                self.log(f"flow step {step}/{cfg.flow_steps} loss {loss.item():.4f} {rate:.2f}s/step")
            if step % cfg.checkpoint_every == 0 or step == cfg.flow_steps:
                state = {
                    "unet": unet.state_dict(), "ema_unet": ema.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "generator": generator.get_state(), "step": step,
                }  # fmt: skip
                _atomic_torch_save(state, state_path)
        self._record(**_loss_ends("flow", losses))
        self.save_pipeline(pipe.vae, text_encoder, tokenizer, ema, final, scheduler=scheduler)
        if cfg.eval_every:
            accuracy = self.evaluate(final)
            self.log(f"flow twin: judge exact match {accuracy}")
            self._record(flow_judge_exact=accuracy)
        return final

    def run(self) -> Path:
        self.recognizers()
        vae = self.vae()
        cache = self.latents(vae)
        pipeline = self.unet(vae, cache)
        self.flow(cache, pipeline)
        return pipeline
