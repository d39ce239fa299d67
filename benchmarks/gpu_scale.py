"""GPU-scale costs of ddpo's denoisers: SD-1.5-sized UNet and SD3.5-medium-sized transformer at 512 px.

Both networks are built from their published configs with random weights (the same shapes, hence the same
cost, as the real checkpoints; nothing is downloaded), LoRA attached through peft as `ddpo.policy` attaches it
(SD: rank 4 on to_q/to_k/to_v/to_out.0, the sd_compressibility preset; SD3.5: rank 32, alpha 64, on the joint
attention projections, the sd35_flow_grpo preset). Frozen weights are bf16 and the LoRA weights fp32 under bf16
autocast, as `model.mixed_precision = "bf16"` trains; TF32 is on for what stays in fp32.

Measured per model:
- sampling: one chain of `--steps` denoiser calls with classifier-free guidance (the batch doubled, as the
  policy samples), no grad; images/s = batch / chain time. The VAE decode and the scheduler arithmetic are not
  included (a few percent of a 50-step chain).
- training: forward + backward through the LoRA weights + an AdamW step on them, one timestep of a batch of
  `--train-batch` samples per call with CFG (`train.cfg = true`, as the presets); trained timesteps/s.
- peak memory at train batch 1 without and with gradient checkpointing (`torch.cuda.max_memory_allocated`
  over one training step); the frozen text encoders and VAE that a run keeps on the GPU are added from their
  parameter counts (bf16), built on the meta device from the real configs, and reported apart.
- model FLOP utilization: FLOPs of one sampling call and of one training step counted with
  `torch.utils.flop_counter.FlopCounterMode`, divided by the measured time and the card's peak dense bf16
  TFLOP/s (`PEAK_TFLOPS` by device name, or `--peak-tflops`).

    python benchmarks/gpu_scale.py                      # both models, 512 px, on the GPU
    python benchmarks/gpu_scale.py --models sd15 --steps 20 --batch 4
    OMP_NUM_THREADS=1 python benchmarks/gpu_scale.py --tiny   # tiny configs on CPU: checks the script runs

It prints a table, then one JSON line with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

# Peak dense (no sparsity) bf16 tensor-core TFLOP/s from NVIDIA's data sheets, by a substring of the device name;
# the first match wins, so the more specific names come first.
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "H200": 989.0,
    "A100": 312.0,
}

SD_LORA = dict(rank=4, alpha=4.0, targets=["to_k", "to_q", "to_v", "to_out.0"])
SD3_LORA = dict(
    rank=32,
    alpha=64.0,
    targets=["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"],
)
SD3_TEXT_TOKENS = 77 + 128  # CLIP tokens + T5 tokens (ddpo's SD3 policy: max_sequence_length 128)


@dataclass
class Bench:
    """One denoiser to measure: how to build it, a batch of inputs, and the frozen parts a run keeps beside it."""

    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int, torch.device, torch.dtype], dict]  # batch size -> keyword arguments of forward
    lora: dict
    frozen: Callable[[], dict[str, torch.nn.Module]] = field(default=lambda: {})
    steps: int = 50


# ---- the models -----------------------------------------------------------------------------------------
def sd15_unet(tiny: bool) -> torch.nn.Module:
    """runwayml/stable-diffusion-v1-5 unet/config.json (860M parameters), or a tiny one of the same blocks."""
    from diffusers import UNet2DConditionModel

    if tiny:
        return UNet2DConditionModel(
            sample_size=8, block_out_channels=(16, 32), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
        )  # fmt: skip
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
        flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1, center_input_sample=False,
    )  # fmt: skip


def sd35_medium_transformer(tiny: bool) -> torch.nn.Module:
    """stabilityai/stable-diffusion-3.5-medium transformer/config.json, or a tiny one: 2.24B parameters plus the
    0.23B-entry positional-embedding buffer (384 x 384 x 1536) that its 2.47B checkpoint also stores."""
    from diffusers import SD3Transformer2DModel

    if tiny:
        return SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16,
            dual_attention_layers=(0,), qk_norm="rms_norm",
        )  # fmt: skip
    return SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
    )  # fmt: skip


def sd15_frozen() -> dict[str, torch.nn.Module]:
    """SD 1.5's CLIP ViT-L/14 text encoder and VAE, on the meta device (for their parameter counts)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return {
            "text_encoder": CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)),
            "vae": AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4),
        }  # fmt: skip


def sd35_frozen() -> dict[str, torch.nn.Module]:
    """SD3.5's CLIP-L, OpenCLIP bigG and T5-XXL text encoders and its 16-channel VAE, on the meta device."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        return {
            "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280)),
            "text_encoder_3": T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")),
            "vae": AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=16),
        }  # fmt: skip


def benches(tiny: bool) -> dict[str, Bench]:
    latent = 8 if tiny else 64  # 512 px / the VAE's factor 8
    text_dim, sd3_text_dim, sd3_pooled = (32, 32, 32) if tiny else (768, 4096, 2048)

    def sd15_inputs(batch: int, device: torch.device, dtype: torch.dtype) -> dict:
        return {
            "sample": torch.randn(batch, 4, latent, latent, device=device, dtype=dtype),
            "timestep": torch.randint(0, 1000, (batch,), device=device),
            "encoder_hidden_states": torch.randn(batch, 77, text_dim, device=device, dtype=dtype),
        }

    def sd35_inputs(batch: int, device: torch.device, dtype: torch.dtype) -> dict:
        return {
            "hidden_states": torch.randn(batch, 16, latent, latent, device=device, dtype=dtype),
            "timestep": torch.rand(batch, device=device) * 1000,
            "encoder_hidden_states": torch.randn(batch, SD3_TEXT_TOKENS, sd3_text_dim, device=device, dtype=dtype),
            "pooled_projections": torch.randn(batch, sd3_pooled, device=device, dtype=dtype),
        }

    return {
        "sd15": Bench("sd15", lambda: sd15_unet(tiny), sd15_inputs, SD_LORA, (lambda: {}) if tiny else sd15_frozen, steps=50),
        # Flow-GRPO samples SD3.5 with 10 SDE steps in training (40 ODE steps in evaluation).
        "sd35": Bench("sd35", lambda: sd35_medium_transformer(tiny), sd35_inputs, SD3_LORA, (lambda: {}) if tiny else sd35_frozen, steps=10),
    }


# ---- measuring --------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def with_lora(model: torch.nn.Module, lora: dict, device: torch.device, weight_dtype: torch.dtype) -> torch.nn.Module:
    """Frozen base in `weight_dtype`, peft LoRA adapters in fp32: what `DiffusersPolicy` does."""
    from peft import LoraConfig

    model = model.to(device=device, dtype=weight_dtype).eval().requires_grad_(False)
    model.add_adapter(LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], init_lora_weights="gaussian", target_modules=lora["targets"]))
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return model


def timed(function: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    function()
    synchronize(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def count_flops(function: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def measure(bench: Bench, args: argparse.Namespace, device: torch.device, peak_tflops: float | None) -> dict:
    on_gpu = device.type == "cuda"
    weight_dtype = torch.bfloat16 if on_gpu else torch.float32
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu else (lambda: torch.autocast("cpu", enabled=False))
    steps = args.steps or bench.steps
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of minutes for 2B parameters
        model = with_lora(bench.build(), bench.lora, device, weight_dtype)
    lora_parameters = [p for p in model.parameters() if p.requires_grad]
    result = {
        "model": bench.name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "lora_parameters": sum(p.numel() for p in lora_parameters),
        "steps": steps,
        "batch": args.batch,
        "train_batch": args.train_batch,
    }

    # Sampling: a CFG call runs the unconditional and conditional halves as one batch of 2 x batch.
    sample_inputs = bench.inputs(2 * args.batch, device, weight_dtype)

    @torch.no_grad()
    def sample_call() -> None:
        with autocast():
            model(**sample_inputs)

    def chain() -> None:
        for _ in range(steps):
            sample_call()

    call_flops = count_flops(sample_call)
    chain_seconds = timed(chain, device, args.repeats)
    result["sample_chain_seconds"] = chain_seconds
    result["sample_images_per_second"] = args.batch / chain_seconds
    result["sample_calls_per_second"] = steps / chain_seconds
    result["sample_tflop_per_call"] = call_flops / 1e12
    result["sample_mfu"] = call_flops * steps / chain_seconds / (peak_tflops * 1e12) if peak_tflops else None

    # Training: one timestep of `train_batch` samples per call, CFG halves in the same call (train.cfg).
    optimizer = torch.optim.AdamW(lora_parameters, lr=1e-6)

    def train_step(batch: int) -> Callable[[], None]:
        inputs = bench.inputs(2 * batch, device, weight_dtype)

        def step() -> None:
            with autocast():
                output = model(**inputs).sample
            output.float().square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    step = train_step(args.train_batch)
    train_flops = count_flops(step)
    train_seconds = timed(step, device, args.repeats)
    result["train_step_seconds"] = train_seconds
    result["train_timesteps_per_second"] = args.train_batch / train_seconds
    result["train_tflop_per_step"] = train_flops / 1e12
    result["train_mfu"] = train_flops / train_seconds / (peak_tflops * 1e12) if peak_tflops else None

    # Peak memory of a batch-1 training step, without and with gradient checkpointing.
    frozen = bench.frozen()
    frozen_gib = sum(p.numel() for module in frozen.values() for p in module.parameters()) * 2 / 2**30  # bf16
    result["frozen_parameters"] = {name: sum(p.numel() for p in module.parameters()) for name, module in frozen.items()}
    result["frozen_weights_gib_bf16"] = frozen_gib
    for checkpointing in (False, True):
        key = "peak_gib_checkpointing" if checkpointing else "peak_gib"
        if checkpointing:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()
        if not on_gpu:
            result[key] = None
            continue
        one = train_step(1)
        one()  # AdamW's state exists from here on, as in a run
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        one()
        synchronize(device)
        result[key] = torch.cuda.max_memory_allocated(device) / 2**30
        result[f"{key}_with_frozen"] = result[key] + frozen_gib
        if checkpointing:
            result["train_step_seconds_checkpointing_batch1"] = timed(one, device, args.repeats)
    model.disable_gradient_checkpointing()
    del model, optimizer
    if on_gpu:
        torch.cuda.empty_cache()
    return result


def peak_for(device: torch.device, override: float | None) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", override
    name = torch.cuda.get_device_name(device)
    if override:
        return name, override
    return name, next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def fmt(value, spec: str) -> str:
    """`format(value, spec)`, or a dash as wide for a value not measured (no GPU, unknown peak)."""
    return format(value, spec) if value is not None else "-".rjust(int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd15,sd35", help="comma-separated: sd15, sd35 (default both)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs of the same classes (a CPU smoke check; numbers mean nothing)")
    parser.add_argument("--steps", type=int, default=None, help="denoiser calls per sampling chain (default: sd15 50, sd35 10)")
    parser.add_argument("--batch", type=int, default=8, help="images per sampling chain (8: the sd_compressibility preset)")
    parser.add_argument("--train-batch", type=int, default=4, help="samples per training call (4: the sd_compressibility preset)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (median reported)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's peak dense bf16 TFLOP/s (default: from the device name)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # not the cast-to-bf16 notice of every model
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif not args.tiny:
        parser.error("the full-size models need a GPU (hours and tens of GB on a CPU); use --tiny for a smoke check")
    device_name, peak_tflops = peak_for(device, args.peak_tflops)
    available = benches(args.tiny)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in available]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {sorted(available)}")
    print(
        f"device {device_name} (peak bf16 {fmt(peak_tflops, '.0f')} TFLOP/s) torch {torch.__version__} threads {torch.get_num_threads()} "
        f"load {os.getloadavg()[0]:.2f} host {platform.node()}{'  [tiny configs]' if args.tiny else ''}",
        flush=True,
    )
    results = []
    for name in names:
        results.append(measure(available[name], args, device, peak_tflops))
        r = results[-1]
        print(f"{name}: {r['parameters'] / 1e6:.1f}M parameters, LoRA {r['lora_parameters'] / 1e6:.2f}M; done", flush=True)

    header = f"{'model':6} {'params':>8} {'steps':>5} {'img/s':>8} {'samp MFU':>8} {'train ts/s':>10} {'train MFU':>9} {'peak GiB':>8} {'+ckpt GiB':>9} {'+frozen':>8}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['model']:6} {r['parameters'] / 1e6:7.0f}M {r['steps']:5d} {r['sample_images_per_second']:8.3f} {fmt(r['sample_mfu'], '8.1%')} "
            f"{r['train_timesteps_per_second']:10.2f} {fmt(r['train_mfu'], '9.1%')} {fmt(r['peak_gib'], '8.2f')} {fmt(r['peak_gib_checkpointing'], '9.2f')} "
            f"{fmt(r['frozen_weights_gib_bf16'], '8.2f')}"
        )
    print("img/s: images per second of a sampling chain (batch x CFG); train ts/s: trained (sample, timestep) pairs per second;")
    print("peak GiB: max_memory_allocated of a batch-1 LoRA training step (denoiser only); +frozen: text encoders + VAE weights in bf16")
    print(json.dumps({"device": device_name, "peak_tflops": peak_tflops, "tiny": args.tiny, "torch": torch.__version__, "results": results}))


if __name__ == "__main__":
    main()
