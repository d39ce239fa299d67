"""Rewards on CLIP embeddings (transformers `CLIPModel`): the LAION aesthetic predictor, CLIP score, and
PickScore-style preference scores.

- `aesthetic` (Black et al. 2023, Sec. 6.1, after kvablack/ddpo-pytorch `aesthetic_scorer.py`): the CLIP
  ViT-L/14 image embedding, L2-normalised, through the LAION aesthetic MLP (`sac+logos+ava1-l14-linearMSE`:
  768 -> 1024 -> 128 -> 64 -> 16 -> 1, linear layers with dropout between them and no non-linearity), which
  predicts a 1-10 rating.
- `clip_score`: 100 x cos(image embedding, prompt embedding) with any CLIP checkpoint (not clamped at 0, so
  that images below zero still get a gradient of preference).
- `pickscore`: exp(logit_scale) x cos(image, prompt) with a preference model of the CLIP architecture, as
  PickScore (Kirstain et al. 2023) scores an image for a prompt.

Every model loads when the reward is built, once per (checkpoint, device, dtype) in a process; images are
embedded `batch_size` at a time in `dtype`, the scores computed in float32.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ddpo.rewards.base import Reward, RewardOutput, register_reward
from ddpo.rewards.loading import batches, load_or_explain, resolve_device, resolve_dtype

if TYPE_CHECKING:
    import torch

OPENAI_CLIP_L14 = "openai/clip-vit-large-patch14"
LAION_AESTHETIC_HEAD = "camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth"
"""The LAION aesthetic head on the hub as "owner/repo/file" (the same file ddpo-pytorch ships in its assets)."""
PICKSCORE = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
AESTHETIC_HIDDEN = (1024, 128, 64, 16)
AESTHETIC_DROPOUT = (0.2, 0.2, 0.1, 0.0)


class CLIPEmbedder:
    """L2-normalised CLIP embeddings of images and texts, float32 on the CPU, one model shared by rewards."""

    def __init__(self, reward: str, model: str, processor: str | None, device: str | None, dtype: str) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model, self.processor = _load_clip(reward, str(model), str(processor or model), self.device, self.dtype)

    def images(self, images: list[Image.Image], batch_size: int) -> torch.Tensor:
        """(n, projection_dim) unit-norm image embeddings."""
        import torch

        embeddings = []
        with torch.inference_mode():
            for batch in batches([image.convert("RGB") for image in images], batch_size):
                pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
                pooled = self.model.vision_model(pixel_values=pixels).pooler_output
                embeddings.append(self.model.visual_projection(pooled).float().cpu())
        return torch.nn.functional.normalize(torch.cat(embeddings), dim=-1)

    def texts(self, texts: list[str], batch_size: int) -> torch.Tensor:
        """(n, projection_dim) unit-norm text embeddings; texts longer than the model's context are truncated."""
        import torch

        tokenizer = self.processor.tokenizer
        max_length = min(tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        embeddings = []
        with torch.inference_mode():
            for batch in batches(texts, batch_size):
                tokens = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                pooled = self.model.text_model(
                    input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
                ).pooler_output
                embeddings.append(self.model.text_projection(pooled).float().cpu())
        return torch.nn.functional.normalize(torch.cat(embeddings), dim=-1)

    def cosines(self, images: list[Image.Image], prompts: list[str], batch_size: int) -> np.ndarray:
        """(n,) float32 cos(image_i, prompt_i); each distinct prompt is embedded once."""
        unique = list(dict.fromkeys(prompts))
        text = self.texts(unique, batch_size)[[unique.index(prompt) for prompt in prompts]]
        return (self.images(images, batch_size) * text).sum(dim=-1).numpy().astype(np.float32)


@functools.lru_cache(maxsize=4)
def _load_clip(reward: str, model: str, processor: str, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoProcessor, CLIPModel

    clip = load_or_explain(reward, "CLIP model", model, lambda: CLIPModel.from_pretrained(model, dtype=dtype))
    loaded_processor = load_or_explain(reward, "CLIP processor", processor, lambda: AutoProcessor.from_pretrained(processor))
    return clip.to(device).eval().requires_grad_(False), loaded_processor


def aesthetic_head(input_dim: int = 768) -> torch.nn.Sequential:
    """The LAION aesthetic MLP with random weights, its parameter names those of the released state dict
    (`layers.0` ... `layers.7`): Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear."""
    import torch

    layers: list[torch.nn.Module] = []
    sizes = (input_dim, *AESTHETIC_HIDDEN)
    for index, (size_in, size_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(size_in, size_out))
        if AESTHETIC_DROPOUT[index]:
            layers.append(torch.nn.Dropout(AESTHETIC_DROPOUT[index]))
    layers.append(torch.nn.Linear(AESTHETIC_HIDDEN[-1], 1))
    return torch.nn.Sequential(*layers)


def load_aesthetic_head(head: str | Path) -> torch.nn.Sequential:
    """The aesthetic MLP from a local `.pth`/`.pt` (read with `weights_only=True`: tensors, never pickled code)
    or `.safetensors` file, or from the hub as "owner/repo/path/in/repo"; in eval mode, float32, on the CPU.
    Accepts the released state dict (`layers.N.*`) or the same keys without the `layers.` prefix."""
    import torch

    path = Path(head)
    if not path.is_file():
        parts = str(head).split("/")
        if len(parts) < 3 or Path(head).is_absolute() or str(head).startswith("."):
            raise FileNotFoundError(f"aesthetic head {str(head)!r} is neither a file nor a hub 'owner/repo/file'")
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(repo_id="/".join(parts[:2]), filename="/".join(parts[2:])))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = {key if key.startswith("layers.") else f"layers.{key}": value for key, value in state.items()}
    state = {key[len("layers.") :]: value.float() for key, value in state.items()}
    module = aesthetic_head(int(state["0.weight"].shape[1]))
    module.load_state_dict(state)
    return module.eval().requires_grad_(False)


@register_reward("aesthetic")
def aesthetic(
    model: str = OPENAI_CLIP_L14,
    head: str = LAION_AESTHETIC_HEAD,
    processor: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    batch_size: int = 32,
) -> Reward:
    """Reward = the LAION aesthetic predictor's rating of each image (prompts are ignored).

    Args:
        model: CLIP checkpoint (hub id or directory) whose image embedding the head was trained on.
        head: the aesthetic MLP: a local .pth/.safetensors file or "owner/repo/file" on the hub.
        processor: image processor checkpoint, if not `model`'s.
        device: where CLIP runs; None is the GPU when there is one.
        dtype: CLIP's precision ("auto": float16 on a GPU, float32 elsewhere); the head runs in float32.
        batch_size: images per CLIP forward pass.
    """
    import torch

    embedder = CLIPEmbedder("aesthetic", model, processor, device, dtype)
    mlp = load_or_explain("aesthetic", "aesthetic head", str(head), lambda: load_aesthetic_head(head))
    if mlp[0].in_features != embedder.model.config.projection_dim:
        raise ValueError(
            f"reward 'aesthetic': the head takes {mlp[0].in_features}-d embeddings but {model!r} makes "
            f"{embedder.model.config.projection_dim}-d ones; pair the head with the CLIP it was trained on"
        )

    def reward(images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> RewardOutput:
        with torch.inference_mode():
            scores = mlp(embedder.images(images, batch_size)).squeeze(-1)
        return RewardOutput(scores.numpy().astype(np.float32))

    return reward


@register_reward("clip_score")
def clip_score(
    model: str = OPENAI_CLIP_L14, processor: str | None = None, device: str | None = None, dtype: str = "auto", batch_size: int = 32
) -> Reward:
    """Reward = 100 x cosine similarity of the image's and the prompt's CLIP embeddings.

    Args: as `aesthetic` (`model` is any CLIP checkpoint).
    """
    embedder = CLIPEmbedder("clip_score", model, processor, device, dtype)

    def reward(images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> RewardOutput:
        return RewardOutput(100 * embedder.cosines(images, prompts, batch_size))

    return reward


@register_reward("pickscore")
def pickscore(
    model: str = PICKSCORE, processor: str | None = PICKSCORE_PROCESSOR, device: str | None = None, dtype: str = "auto", batch_size: int = 32
) -> Reward:
    """Reward = exp(logit_scale) x cos(image, prompt) of a CLIP-architecture preference model (PickScore's
    score of one image for its prompt; about 100 x cos for PickScore_v1).

    Args: as `aesthetic`; `processor` defaults to the processor PickScore was trained with.
    """
    embedder = CLIPEmbedder("pickscore", model, processor, device, dtype)
    scale = float(embedder.model.logit_scale.exp())

    def reward(images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> RewardOutput:
        return RewardOutput(np.float32(scale) * embedder.cosines(images, prompts, batch_size))

    return reward
