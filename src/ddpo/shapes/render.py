"""The Shapes world: procedural captioned images with exact ground truth.

An image holds 1-3 identical flat-coloured objects on a dark, textured background. Its caption names the
count, the colour and the shape ("a red circle", "three blue squares"). Because the renderer knows exactly
what it drew, recognisers trained on it (the describer and the judge) can be trained to near-perfect
accuracy, and a generated image can be scored against its prompt without human labels.

The "unusual" colour-shape pairs are the miniature of the paper's "animals doing human activities": they
are rare in pretraining (together `UNUSUAL_PRETRAIN_FRACTION` of the images) and go against its colour-shape
correlations, so the pretrained model draws them poorly but not never; RL on half of them is measured on the
other, held-out half.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (235, 45, 40),
    "orange": (250, 140, 25),
    "yellow": (245, 225, 40),
    "green": (40, 200, 70),
    "cyan": (50, 225, 235),
    "blue": (55, 95, 255),
    "purple": (150, 65, 250),
    "magenta": (235, 60, 225),
    "white": (235, 235, 235),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COUNT_WORDS: tuple[str, ...] = ("a", "two", "three")
COUNTS: tuple[int, ...] = (1, 2, 3)

# Pretraining is biased the way web data is: every colour has one "home" shape (red, cyan and white things are
# circles, green and orange ones squares, blue and purple ones triangles, yellow and magenta ones crosses), so
# a colour word predicts the shape. The 27 other pairs are "unusual" and together 1% of the pretraining images.
# Measured history (docs/shapes-world.md): unusual pairs spread evenly over a grid were generalised to almost
# perfectly; with them absent, a model never drew some of them at all, which leaves RL no success to reinforce.
# Hence rare, and the shipped model stops at 600 of a 1,000-step schedule. Under the correlation, "a red cross"
# pulls towards red circles: the miniature of the paper's "a dog riding a bike".
COMMON: tuple[tuple[str, str], ...] = (
    ("red", "circle"), ("cyan", "circle"), ("white", "circle"),
    ("green", "square"), ("orange", "square"),
    ("blue", "triangle"), ("purple", "triangle"),
    ("yellow", "cross"), ("magenta", "cross"),
)  # fmt: skip
UNUSUAL: tuple[tuple[str, str], ...] = tuple(
    (color, shape) for color in COLORS for shape in SHAPES if (color, shape) not in COMMON
)
# The RL experiment, the miniature of the paper's "animals doing activities" with unseen animals held out: the
# cross is the activity and the five colours whose home is a circle or a square are the animals. RL trains on
# red, green and white crosses; orange and cyan crosses are held out, so no held-out colour ever appears in a
# trained prompt and what transfers has to be keyed on the shape word. The shipped model draws these pairs
# right sometimes but not always (judge exact match with 8 seeds x 3 counts: 50% on the RL half, 29% held out),
# so the policy gradient has successes to reinforce. Earlier designs, in which each trained colour came with one
# target shape and the held-out pairs shared those colours, let RL learn colour-keyed shortcuts ("magenta" ->
# circle) that hurt the held-out half (docs/shapes-world.md, sessions 2-8).
UNUSUAL_TRAIN: tuple[tuple[str, str], ...] = (
    ("red", "cross"),
    ("green", "cross"),
    ("white", "cross"),
)
UNUSUAL_HELDOUT: tuple[tuple[str, str], ...] = (
    ("orange", "cross"),
    ("cyan", "cross"),
)
UNUSUAL_PRETRAIN_FRACTION = 0.01


@dataclass(frozen=True)
class Scene:
    """The ground truth of one image."""

    count: int
    color: str
    shape: str

    @property
    def caption(self) -> str:
        return caption(self.count, self.color, self.shape)

    def as_dict(self) -> dict:
        return {"count": self.count, "color": self.color, "shape": self.shape}


def caption(count: int, color: str, shape: str) -> str:
    """The template caption: 'a red circle', 'two red circles', 'three red circles'."""
    noun = shape if count == 1 else PLURALS[shape]
    return f"{COUNT_WORDS[count - 1]} {color} {noun}"


def parse_caption(text: str) -> Scene | None:
    """Inverse of `caption`; None when the text is not a template caption."""
    words = text.strip().lower().split()
    if len(words) != 3 or words[0] not in COUNT_WORDS or words[1] not in COLORS:
        return None
    count = COUNT_WORDS.index(words[0]) + 1
    singular = {PLURALS[s]: s for s in SHAPES} if count > 1 else {s: s for s in SHAPES}
    if words[2] not in singular:
        return None
    return Scene(count, words[1], singular[words[2]])


def prompts_for(pairs: tuple[tuple[str, str], ...]) -> list[str]:
    """All captions (every count) for the given colour-shape pairs."""
    return [caption(n, color, shape) for color, shape in pairs for n in COUNTS]


def vocabulary() -> list[str]:
    """Every word a caption can contain."""
    return sorted(set(COUNT_WORDS) | set(COLORS) | set(SHAPES) | set(PLURALS.values()))


def random_scene(rng: random.Random, unusual_fraction: float = UNUSUAL_PRETRAIN_FRACTION) -> Scene:
    """A scene from the pretraining distribution: common pairs uniformly, unusual ones with probability `unusual_fraction`."""
    pairs = UNUSUAL if rng.random() < unusual_fraction else COMMON
    color, shape = rng.choice(pairs)
    return Scene(rng.choice(COUNTS), color, shape)


def uniform_scene(rng: random.Random) -> Scene:
    """A scene with every count, colour and shape equally likely (for recognisers and the VAE)."""
    return Scene(rng.choice(COUNTS), rng.choice(tuple(COLORS)), rng.choice(SHAPES))


# Object layouts in units of the image size: centres for each count, with per-count object size. Sizes and
# the jitter are chosen so that objects never touch (touching objects would make the count ambiguous).
_LAYOUTS: dict[int, tuple[tuple[tuple[float, float], ...], ...]] = {
    1: (((0.5, 0.5),),),
    2: (((0.28, 0.5), (0.72, 0.5)), ((0.5, 0.28), (0.5, 0.72)), ((0.3, 0.3), (0.7, 0.7)), ((0.3, 0.7), (0.7, 0.3))),
    3: (((0.5, 0.25), (0.25, 0.72), (0.75, 0.72)), ((0.27, 0.28), (0.73, 0.28), (0.5, 0.75)), ((0.22, 0.22), (0.5, 0.5), (0.78, 0.78))),
}
_SIZES: dict[int, tuple[float, float]] = {1: (0.44, 0.56), 2: (0.32, 0.36), 3: (0.26, 0.3)}
_JITTER = 0.025
_SUPERSAMPLE = 4


def _background(rng: random.Random, size: int) -> np.ndarray:
    """Dark textured background: a tinted base, a smooth gradient, blotches and fine grain (for JPEG)."""
    np_rng = np.random.default_rng(rng.getrandbits(32))
    base = np.array([rng.uniform(30, 70)] * 3) + np.array([rng.uniform(-10, 10) for _ in range(3)])
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * np.pi)
    gradient = (np.cos(angle) * xx + np.sin(angle) * yy - 0.5) * rng.uniform(0, 30)
    coarse = np_rng.normal(0, 1, (size // 8 + 1, size // 8 + 1))
    blotches = np.kron(coarse, np.ones((8, 8)))[:size, :size] * rng.uniform(2, 8)
    grain = np_rng.normal(0, rng.uniform(2, 7), (size, size, 1))
    image = base[None, None, :] + (gradient + blotches)[..., None] + grain
    return np.clip(image, 0, 255)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float, fill) -> None:
    half = size / 2
    if shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "square":
        side = half * 0.86  # a square of equal area reads as bigger than a circle; shrink it a little
        draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half * 0.8), (cx - half, cy + half * 0.8)], fill=fill)
    elif shape == "cross":
        arm = half * 0.36
        draw.rectangle((cx - half, cy - arm, cx + half, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - half, cx + arm, cy + half), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def render(scene: Scene, rng: random.Random, size: int = 32) -> Image.Image:
    """Draw `scene` as a size x size RGB image (antialiased by supersampling); layout and texture from `rng`."""
    big = size * _SUPERSAMPLE
    layout = rng.choice(_LAYOUTS[scene.count])
    object_size = rng.uniform(*_SIZES[scene.count]) * big
    jitter = _JITTER * big
    color = np.array(COLORS[scene.color], dtype=float) * rng.uniform(0.9, 1.0)
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for fx, fy in layout:
        cx = fx * big + rng.uniform(-jitter, jitter)
        cy = fy * big + rng.uniform(-jitter, jitter)
        _draw_shape(draw, scene.shape, cx, cy, object_size, fill=255)
    alpha = np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=float)[..., None] / 255.0
    image = _background(rng, size) * (1 - alpha) + color[None, None, :] * alpha
    return Image.fromarray(np.round(image).astype(np.uint8), "RGB")


def render_batch(scenes: list[Scene], seed: int, size: int = 32) -> list[Image.Image]:
    """Render scenes deterministically: image i depends only on (seed, i)."""
    return [render(scene, random.Random(seed * 1_000_003 + i), size) for i, scene in enumerate(scenes)]
