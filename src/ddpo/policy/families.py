"""The model families ddpo trains: each diffusers pipeline class, its adapter (one small module of `ddpo.policy`),
its presets, and the real architectures whose sizes the README's model table gives.

Adding a family is one adapter module (with its `REAL_ARCHITECTURES`) and one line here. Nothing here imports
diffusers until a family is used (`policy_class_of`), nor builds a network until `architecture_table` is asked.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str  # what users call it
    pipeline_class: str  # the diffusers pipeline class (the `_class_name` of model_index.json)
    module: str  # the adapter module in ddpo.policy
    policy_class: str  # the adapter class in that module
    presets: tuple[str, ...]  # presets in ddpo/configs that train it
    verified: str  # what the tests prove on tiny random components (tests/test_families*.py)
    architectures: tuple[str, ...] = ()  # which of the module's REAL_ARCHITECTURES are this family's (default: all)

    def adapter(self) -> type:
        return getattr(importlib.import_module(f"ddpo.policy.{self.module}"), self.policy_class)

    def real_architectures(self) -> dict[str, dict]:
        real = importlib.import_module(f"ddpo.policy.{self.module}").REAL_ARCHITECTURES
        return {name: real[name] for name in self.architectures} if self.architectures else real


PARITY = "full chain = pipeline (1e-5), log-prob ratio 1, LoRA round trip, CLI epoch"
FAMILIES = (
    Family("SD 1.x / 2.x (epsilon, v)", "StableDiffusionPipeline", "stable_diffusion", "StableDiffusionPolicy", ("sd_compressibility", "sd_incompressibility"), PARITY),
    Family("SDXL", "StableDiffusionXLPipeline", "sdxl", "StableDiffusionXLPolicy", ("sdxl_aesthetic",), PARITY),
    Family("SD3 / SD3.5", "StableDiffusion3Pipeline", "sd3", "StableDiffusion3Policy", ("sd35_flow_grpo", "sd35_fdfo"), PARITY),
    Family("FLUX.1 (dev, schnell)", "FluxPipeline", "flux", "FluxPolicy", ("flux_dev_flow_grpo",), PARITY),
    Family("Qwen-Image", "QwenImagePipeline", "qwen_image", "QwenImagePolicy", ("qwen_image_flow_grpo",), PARITY + " (true CFG)"),
    Family("Z-Image", "ZImagePipeline", "z_image", "ZImagePolicy", ("z_image_flow_grpo",), PARITY),
    Family("FLUX.2 [dev]", "Flux2Pipeline", "flux2", "Flux2Policy", (), PARITY, ("FLUX.2 [dev]",)),
    Family("FLUX.2 [klein]", "Flux2KleinPipeline", "flux2", "Flux2Policy", ("flux2_klein_flow_grpo",), PARITY + " (base and step-distilled)", ("FLUX.2 [klein] 4B",)),
    Family("Wan 2.1 text-to-video", "WanPipeline", "wan", "WanPolicy", ("wan_t2v_flow_grpo",), PARITY + " (5 frames; Euler scheduler on both sides)"),
)  # fmt: skip
PIPELINE_CLASSES = tuple(family.pipeline_class for family in FAMILIES)


def family_of(pipeline_class: str) -> Family:
    return next(family for family in FAMILIES if family.pipeline_class == pipeline_class)


def build_on_meta_device(architecture: dict):
    """The real network of `architecture` (its diffusers class and config.json), on the meta device: no memory, no
    download."""
    import diffusers
    import torch

    with torch.device("meta"):
        return getattr(diffusers, architecture["class"]).from_config(architecture["config"])


def count_weights(architecture: dict) -> int:
    """Tensors in the real network's checkpoint: parameters and persistent buffers (SD3's positional table)."""
    return sum(tensor.numel() for tensor in build_on_meta_device(architecture).state_dict().values())


def architecture_table() -> str:
    """The README's model table (Markdown): family, pipeline class, what is verified, presets, and each real
    network's weights and their bf16 memory, computed from its architecture."""
    lines = [
        "| family | pipeline class | verified on tiny random components | presets | network: weights, bf16 memory |",
        "|---|---|---|---|---|",
    ]
    for family in FAMILIES:
        sizes = "; ".join(
            f"{name}: {count / 1e9:.2f} B, {count * 2 / 2**30:.1f} GiB"
            for name, count in ((name, count_weights(architecture)) for name, architecture in family.real_architectures().items())
        )
        presets = ", ".join(f"`{preset}`" for preset in family.presets)
        lines.append(f"| {family.name} | `{family.pipeline_class}` | {family.verified} | {presets} | {sizes} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(architecture_table())
