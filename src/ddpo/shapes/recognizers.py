"""Recognisers for the Shapes world: the describer (the miniature of the paper's LLaVA) and the judge.

Both read a 32x32 image and name its count, colour and shape. The describer writes a caption from what it
sees and is used as a reward (through BERTScore, like LLaVA + BERTScore in the paper). The judge is trained
independently (another architecture and seed) and is never a reward: when RL learns to fool the describer,
the judge's opinion is what shows it.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from .render import COLORS, SHAPES, Scene, caption, render_batch, uniform_scene

COLOR_NAMES = tuple(COLORS)
NUM_COUNTS = 3


def images_to_tensor(images: list[Image.Image], size: int = 32) -> torch.Tensor:
    """PIL images -> float tensor (B, 3, size, size) in [-1, 1]."""
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class _Heads(nn.Module):
    """Three classification heads over a feature vector: count (3), colour (6), shape (4)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.count = nn.Linear(features, NUM_COUNTS)
        self.color = nn.Linear(features, len(COLOR_NAMES))
        self.shape = nn.Linear(features, len(SHAPES))

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"count": self.count(h), "color": self.color(h), "shape": self.shape(h)}


class Recognizer(nn.Module):
    """Base class: `forward(x (B,3,32,32) in [-1,1]) -> logits per attribute`; `features(x) -> (B, F)`."""

    body: nn.Module
    heads: _Heads

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.features(x))

    @torch.no_grad()
    def logits(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Per attribute ("count", "color", "shape"), each image's class logits: (B, classes)."""
        self.eval()
        return self(images_to_tensor(images).to(next(self.parameters()).device))

    def probabilities(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Per attribute, each image's class probabilities: (B, classes) fp32 on CPU."""
        return {name: value.float().softmax(-1).cpu() for name, value in self.logits(images).items()}

    def predict(self, images: list[Image.Image]) -> list[Scene]:
        """The scene each image shows, by this recogniser."""
        return most_likely_scenes(self.logits(images))

    def describe(self, images: list[Image.Image]) -> list[str]:
        """A caption per image, in the template language of the Shapes world."""
        return [scene.caption for scene in self.predict(images)]


def most_likely_scenes(scores: dict[str, torch.Tensor]) -> list[Scene]:
    """The arg-max scene per row of per-attribute scores (logits or probabilities, as `Recognizer.probabilities`)."""
    counts, colors, shapes = (scores[name].argmax(-1).tolist() for name in ("count", "color", "shape"))
    return [Scene(n + 1, COLOR_NAMES[c], SHAPES[s]) for n, c, s in zip(counts, colors, shapes)]


class Describer(Recognizer):
    """VGG-style CNN with a flattened spatial map (keeps where objects are, which helps counting)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(4 * w * 16, 128), nn.ReLU(),
        )  # fmt: skip
        self.heads = _Heads(128)


class Judge(Recognizer):
    """A different design on purpose: strided convolutions, GroupNorm, GELU, global average + max pooling."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 5, padding=2), nn.GroupNorm(8, w), nn.GELU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.GroupNorm(8, w), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * w), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(),
            _AvgMaxPool(), nn.Linear(4 * w, 96), nn.GELU(),
        )  # fmt: skip
        self.heads = _Heads(96)


class _AvgMaxPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


RECOGNIZERS: dict[str, type[Recognizer]] = {"describer": Describer, "judge": Judge}


def scene_targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    return {
        "count": torch.tensor([s.count - 1 for s in scenes]),
        "color": torch.tensor([COLOR_NAMES.index(s.color) for s in scenes]),
        "shape": torch.tensor([SHAPES.index(s.shape) for s in scenes]),
    }


def _degrade(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Augment renders toward what a small VAE decodes: random blur, noise and contrast (x in [-1, 1])."""
    b = x.shape[0]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(b, 1, 1, 1, generator=generator) * 0.8
    x = (1 - mix) * x + mix * blur
    x = x * (0.85 + 0.3 * torch.rand(b, 1, 1, 1, generator=generator))
    x = x + 0.06 * torch.rand(b, 1, 1, 1, generator=generator) * torch.randn(x.shape, generator=generator)
    return x.clamp(-1, 1)


def training_set(num_images: int, seed: int, size: int = 32) -> tuple[torch.Tensor, list[Scene]]:
    """Rendered images of every colour-shape pair equally often (recognisers must know the unusual ones)."""
    rng = random.Random(seed)
    scenes = [uniform_scene(rng) for _ in range(num_images)]
    return images_to_tensor(render_batch(scenes, seed, size)), scenes


def train_recognizer(
    kind: str, *, seed: int, steps: int, batch_size: int = 128, lr: float = 2e-3, num_images: int = 30_000, log=print
) -> Recognizer:
    """Train a describer or judge from scratch on rendered images (deterministic given the seed)."""
    torch.manual_seed(seed)
    model = RECOGNIZERS[kind]()
    images, scenes = training_set(num_images, seed)
    targets = scene_targets(scenes)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        index = torch.randint(0, num_images, (batch_size,), generator=generator)
        logits = model(_degrade(images[index], generator))
        loss = sum(F.cross_entropy(logits[key], targets[key][index]) for key in logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"{kind} step {step}/{steps} loss {loss.item():.4f}")
    return model.eval()


@torch.no_grad()
def exact_accuracy(model: Recognizer, num_images: int = 2000, seed: int = 12345) -> float:
    """Fraction of freshly rendered images whose count, colour and shape are all named correctly."""
    rng = random.Random(seed)
    scenes = [uniform_scene(rng) for _ in range(num_images)]
    predicted = []
    for start in range(0, num_images, 500):
        predicted += model.predict(render_batch(scenes[start : start + 500], seed + start))
    return float(np.mean([p == s for p, s in zip(predicted, scenes)]))


def save_recognizer(model: Recognizer, path: str | Path) -> None:
    kind = next(name for name, cls in RECOGNIZERS.items() if type(model) is cls)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"kind": kind})


def load_recognizer(path: str | Path, kind: str) -> Recognizer:
    model = RECOGNIZERS[kind]()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


__all__ = ["Describer", "Judge", "Recognizer", "caption", "exact_accuracy", "load_recognizer", "train_recognizer"]
