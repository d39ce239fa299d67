"""What DDPO's trajectory-recording sampler costs over plain diffusers sampling.

(a) `pipe(prompts, ...)` with the pipeline's scheduler swapped to DDIM at eta = 1: sampling without DDPO.
(b) `StableDiffusionPolicy.sample(...)`: the same DDIM chain, also keeping every latent x_T ... x_0 and each
    step's log-probability log p(x_{t-1} | x_t, c) (DDPO, Black et al. 2023, Sec. 4.2).

Both run on the same prompts, steps, batch, guidance and image size, decode with the VAE to PIL images, and
call the same UNet, with LoRA adapters attached as in training (unless --no-lora), so the ratio is the cost of
our sampler alone. Each is called once to warm up, then the two are timed interleaved a, b, a, b, ... so that
load from other processes on the machine falls on both alike; the median of the repeats is reported.

    python benchmarks/sampling_overhead.py --model tiny --steps 20 --batch 8 --repeats 3

Prints numbers only; the last line is `ratio_logprob_vs_plain=X.XX` (time of b / time of a).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

# Before transformers is imported: its import-time warnings (e.g. about optional back-ends) are not actionable here.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from ddpo.policy import LoraOptions, PolicyLoadError, SamplingOptions, StableDiffusionPolicy, load_pipeline, resolve_model  # noqa: E402
from ddpo.policy.tiny import build_tiny_pipeline  # noqa: E402

# Words the tiny pipeline's tokenizer knows; any other pipeline tokenizes them as ordinary English.
PROMPTS = ("a cat riding a bike", "a dog playing chess", "an otter", "a horse riding a bike")


def load(model: str) -> StableDiffusionPipeline:
    """`tiny` (random, built in code), `shapes` (the shipped model), a hub id or a local directory; exit 2 if missing."""
    if model == "tiny":
        return build_tiny_pipeline()
    try:
        return load_pipeline(resolve_model(model))
    except (FileNotFoundError, PolicyLoadError) as error:
        print(f"sampling_overhead: cannot load --model {model}: {error}", file=sys.stderr)
        sys.exit(2)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that a timer stops when the work is done (a no-op on CPU)."""
    backend = getattr(torch, device.type, None)
    if backend is not None and hasattr(backend, "synchronize"):
        backend.synchronize()


def seconds(call: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - started


def lora_layers(unet: torch.nn.Module) -> int:
    """Number of UNet layers wrapped by a peft LoRA adapter (0 when none is attached)."""
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(module, LoraLayer) for module in unet.modules())


def main() -> None:
    # Pipeline save/load progress bars would bury the numbers.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, metavar="ID_OR_DIR|tiny|shapes", help="hub id, pipeline directory, 'tiny' or 'shapes'")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per image")
    parser.add_argument("--batch", type=int, default=8, help="images per call")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each sampler (after one warm-up each)")
    parser.add_argument("--height", type=int, help="image height in pixels (default: the model's native size)")
    parser.add_argument("--width", type=int, help="image width in pixels (default: the model's native size)")
    parser.add_argument("--no-lora", action="store_true", help="no LoRA adapters on the UNet (default: attached, as in training)")
    args = parser.parse_args()

    pipe = load(args.model)
    device = PartialState().device  # the device `ddpo train` would use
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = args.height or native, args.width or native
    rank = LoraOptions().rank
    # The policy attaches LoRA to pipe.unet itself, so (a) and (b) below run the very same UNet.
    policy = StableDiffusionPolicy(
        pipe,
        SamplingOptions(num_steps=args.steps, eta=1.0, guidance_scale=args.guidance, height=height, width=width),
        LoraOptions(enabled=not args.no_lora, rank=rank),
        device=device,
    )
    pipe.to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]

    def generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(i) for i in range(args.batch)]

    def plain() -> object:
        return pipe(prompts, height=height, width=width, num_inference_steps=args.steps, guidance_scale=args.guidance, eta=1.0, generator=generators()).images

    def recorded() -> object:
        return policy.sample(prompts, generators())

    adapted = lora_layers(pipe.unet)
    print(
        f"model: {args.model}  device: {device}  torch threads: {torch.get_num_threads()}  dtype: {pipe.unet.dtype}  "
        f"load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    print(
        f"batch {args.batch}, {args.steps} DDIM steps (eta 1.0), guidance {args.guidance}, {height}x{width} px, "
        f"VAE decode included; {args.repeats} repeats after 1 warm-up each, interleaved a, b"
    )
    print(
        f"LoRA attached: {'yes' if adapted else 'no'}"
        + (f" (rank {rank} on {adapted} UNet layers; a and b run the same UNet)" if adapted else "")
    )

    plain(), recorded()  # warm-up: first-call allocations, kernel selection, lazy imports
    times: dict[str, list[float]] = {"plain": [], "recorded": []}
    for _ in range(args.repeats):
        times["plain"].append(seconds(plain, device))
        times["recorded"].append(seconds(recorded, device))

    labels = {"plain": "(a) plain pipe()", "recorded": "(b) StableDiffusionPolicy.sample"}
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, label in labels.items():
        runs = ", ".join(f"{t:.3f}" for t in times[name])
        print(f"{label:34s} median {medians[name]:.3f} s/batch  {args.batch / medians[name]:8.2f} images/s  (runs: {runs} s)")
    print(f"ratio_logprob_vs_plain={medians['recorded'] / medians['plain']:.2f}")


if __name__ == "__main__":
    main()
