"""Scripted labellers: stand-ins for people with a known, hidden preference, for testing people-in-the-loop
training on the Shapes world.

A hidden preference gives each scene a utility. On rendered images it reads the renderer's ground truth (the
`Scene`); on generated images, which have none, it reads the judge (the recogniser that is never a training
reward) and takes the expected utility under the judge's probabilities, so that near-identical images (FDFO's
churned pairs) still compare. The labeller prefers the image of higher utility and calls a tie when the two are
within `tie_margin`.

`PersonLikeLabeller` behaves more like a person: it flips a share of its answers, calls ties when the two images
are close, may take its time (a response time), and may answer at random (a careless or adversarial labeller);
`ByPromptColour` is a taste that depends on what was asked.

`label_over_http` plays a labeller against the labelling app, through the same HTTP API as the page.
"""

from __future__ import annotations

import base64
import io
import json
import random
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from .render import COLORS, COUNTS, SHAPES, Scene, render

COLOR_NAMES = tuple(COLORS)


class HiddenPreference(Protocol):
    name: str

    def scene_utility(self, scene: Scene, prompt: str = "") -> float: ...

    def image_utilities(self, images: list[Image.Image], prompts: list[str] | None = None) -> np.ndarray:
        """(n,) expected utility of each image under the judge's reading of it (given the prompt it was made for)."""
        ...


def _judge_probabilities(images: list[Image.Image]) -> dict[str, torch.Tensor]:
    from .rewards import SHIPPED_JUDGE, _load_judge

    return _load_judge(SHIPPED_JUDGE.resolve()).probabilities(images)


@dataclass(frozen=True)
class FewerObjects:
    """Prefers images with fewer objects: utility = -count."""

    name: str = "fewer objects"

    def scene_utility(self, scene: Scene, prompt: str = "") -> float:
        return -float(scene.count)

    def image_utilities(self, images: list[Image.Image], prompts: list[str] | None = None) -> np.ndarray:
        counts = torch.tensor(COUNTS, dtype=torch.float32)
        return -(_judge_probabilities(images)["count"] * counts).sum(-1).numpy()


@dataclass(frozen=True)
class PrefersColor:
    """Prefers images in one colour: utility = 1 for that colour, else 0."""

    color: str = "red"

    @property
    def name(self) -> str:
        return f"prefers {self.color}"

    def scene_utility(self, scene: Scene, prompt: str = "") -> float:
        return float(scene.color == self.color)

    def image_utilities(self, images: list[Image.Image], prompts: list[str] | None = None) -> np.ndarray:
        return _judge_probabilities(images)["color"][:, COLOR_NAMES.index(self.color)].numpy()


WARM_COLORS = ("red", "orange", "yellow", "magenta")


def _warm(prompt: str) -> bool:
    return any(word in WARM_COLORS for word in prompt.lower().split())


@dataclass(frozen=True)
class ByPromptColour:
    """A taste that depends on the prompt: for a prompt naming a warm colour (red, orange, yellow, magenta) fewer
    objects are better, for any other prompt more are (utility -count or +count). Nothing about the image alone
    says which image is preferred: the preference model must learn the interaction with the prompt."""

    name: str = "fewer objects for warm colours, more for others"

    def scene_utility(self, scene: Scene, prompt: str = "") -> float:
        return -float(scene.count) if _warm(prompt) else float(scene.count)

    def image_utilities(self, images: list[Image.Image], prompts: list[str] | None = None) -> np.ndarray:
        counts = (_judge_probabilities(images)["count"] * torch.tensor(COUNTS, dtype=torch.float32)).sum(-1).numpy()
        prompts = prompts if prompts is not None else [""] * len(images)
        return np.where([_warm(p) for p in prompts], -counts, counts)


@dataclass(frozen=True)
class ScriptedLabeller:
    """Chooses by a hidden preference: "1" or "2" for the higher utility, "tie" within `tie_margin`."""

    preference: HiddenPreference
    tie_margin: float = 0.0

    def choose(self, utility_a: float, utility_b: float) -> str:
        if abs(utility_a - utility_b) <= self.tie_margin:
            return "tie"
        return "1" if utility_a > utility_b else "2"

    def choose_scenes(self, scene_a: Scene, scene_b: Scene, prompt: str = "") -> str:
        """From the renderer's ground truth."""
        return self.choose(self.preference.scene_utility(scene_a, prompt), self.preference.scene_utility(scene_b, prompt))

    def choose_images(self, image_a: Image.Image, image_b: Image.Image, prompt: str = "") -> str:
        """From the judge's reading of two images."""
        utility_a, utility_b = self.preference.image_utilities([image_a, image_b], [prompt, prompt])
        return self.choose(float(utility_a), float(utility_b))


class PersonLikeLabeller:
    """A scripted labeller with a person's failings, reproducible from `seed`:

    - ties: a tie when the two utilities are within `tie_margin` (images that differ too little to care);
    - flips: a decided answer is reversed with probability `flip_rate` (a slip, a misread image);
    - random answers: with `answers_at_random`, "1" or "2" by a coin, whatever the images (a labeller to flag);
    - a response time: `label_over_http` waits `response_seconds` (times a uniform factor in [0.5, 1.5]) before
      each answer, so labels arrive at a person's pace.
    """

    def __init__(self, preference: HiddenPreference, *, flip_rate: float = 0.0, tie_margin: float = 0.0, response_seconds: float = 0.0, answers_at_random: bool = False, seed: int = 0) -> None:
        if not 0 <= flip_rate <= 0.5 or tie_margin < 0 or response_seconds < 0:
            raise ValueError(f"flip_rate must be in [0, 0.5], tie_margin and response_seconds >= 0; got {flip_rate}, {tie_margin}, {response_seconds}")
        self.preference, self.flip_rate, self.tie_margin = preference, flip_rate, tie_margin
        self.response_seconds, self.answers_at_random = response_seconds, answers_at_random
        self.rng = random.Random(seed)

    def choose(self, utility_a: float, utility_b: float) -> str:
        if self.answers_at_random:
            return self.rng.choice(["1", "2"])
        if abs(utility_a - utility_b) <= self.tie_margin:
            return "tie"
        better_first = utility_a > utility_b
        if self.rng.random() < self.flip_rate:
            better_first = not better_first
        return "1" if better_first else "2"

    def choose_scenes(self, scene_a: Scene, scene_b: Scene, prompt: str = "") -> str:
        return self.choose(self.preference.scene_utility(scene_a, prompt), self.preference.scene_utility(scene_b, prompt))

    def choose_images(self, image_a: Image.Image, image_b: Image.Image, prompt: str = "") -> str:
        utility_a, utility_b = self.preference.image_utilities([image_a, image_b], [prompt, prompt])
        return self.choose(float(utility_a), float(utility_b))

    def response_time(self) -> float:
        return self.response_seconds * self.rng.uniform(0.5, 1.5)


def perturbed_scene(prompt_scene: Scene, rng: random.Random, mistake_rate: float) -> Scene:
    """What a model asked for `prompt_scene` might draw: each of count, colour and shape is, with probability
    `mistake_rate`, drawn uniformly instead (possibly the same value)."""

    def maybe(value, choices):
        return rng.choice(choices) if rng.random() < mistake_rate else value

    return Scene(maybe(prompt_scene.count, COUNTS), maybe(prompt_scene.color, COLOR_NAMES), maybe(prompt_scene.shape, SHAPES))


@dataclass(frozen=True)
class RenderedPair:
    prompt: str
    scene_a: Scene
    scene_b: Scene
    image_a: Image.Image
    image_b: Image.Image


def rendered_pairs(num_pairs: int, seed: int, *, mistake_rate: float = 0.5, size: int = 32) -> list[RenderedPair]:
    """Pairs for one prompt each, as a model's two samples might differ: the prompt is a uniform Shapes caption,
    each image a render of it with attributes replaced at `mistake_rate` (`perturbed_scene`)."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(num_pairs):
        asked = Scene(rng.choice(COUNTS), rng.choice(COLOR_NAMES), rng.choice(SHAPES))
        scene_a, scene_b = perturbed_scene(asked, rng, mistake_rate), perturbed_scene(asked, rng, mistake_rate)
        image_a, image_b = render(scene_a, random.Random(rng.getrandbits(63)), size), render(scene_b, random.Random(rng.getrandbits(63)), size)
        pairs.append(RenderedPair(asked.caption, scene_a, scene_b, image_a, image_b))
    return pairs


def _decode_data_url(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def label_over_http(url: str, token: str, labeller: ScriptedLabeller | PersonLikeLabeller, stop: threading.Event, *, poll_seconds: float = 0.05) -> int:
    """Label every pair the app at `url` offers, as a person at the page would (GET /api/next, POST
    /api/label with the bearer token), until `stop` is set; returns the number of labels given."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def call(method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url.rstrip("/") + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    given = 0
    while not stop.is_set():
        try:
            pair = call("GET", "/api/next")["pair"]
        except (urllib.error.URLError, ConnectionError):
            time.sleep(poll_seconds)
            continue
        if pair is None:
            time.sleep(poll_seconds)
            continue
        choice = labeller.choose_images(*(_decode_data_url(image) for image in pair["images"]), prompt=pair["prompt"])
        if hasattr(labeller, "response_time") and stop.wait(labeller.response_time()):
            break  # stopped while "looking at" the pair: no answer
        call("POST", "/api/label", {"pair": pair["id"], "choice": choice})
        given += 1
    return given
