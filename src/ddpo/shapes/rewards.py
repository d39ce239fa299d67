"""Rewards of the Shapes world, scored by the describer (the miniature of the paper's LLaVA).

- `shapes_alignment`: the describer captions each image, and the caption is compared with the prompt by
  BERTScore recall (all-MiniLM-L6-v2), as the paper's prompt-image alignment reward (Black et al. 2023,
  Sec. 6.3: LLaVA describes the image, BERTScore compares the description with the prompt).
- `shapes_alignment_soft`: the same BERTScore recall in expectation over the describer's class probabilities
  instead of at its arg-max caption: smooth in the image, for algorithms that need small image changes to change
  the reward (FDFO's finite differences) and for lower-variance policy gradients.
- `shapes_attributes`: the fraction of count, colour and shape that the describer sees as the prompt asks.

Neither is ground truth: RL can learn images that fool the describer. The judge (another architecture,
another seed, never a training reward) is what `ddpo.shapes.evaluation` measures with; it is registered
as `shapes_judge` so that evaluation (`ddpo eval`, `log.heldout_reward`) can score with it.

Models load when a reward is built, not when this module is imported, and each once per process.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ddpo.rewards.base import Reward, RewardOutput, register_reward

from . import WEIGHTS_DIR
from .render import Scene, parse_caption

if TYPE_CHECKING:
    from .recognizers import Recognizer

SHIPPED_DESCRIBER = WEIGHTS_DIR / "describer.safetensors"
SHIPPED_JUDGE = WEIGHTS_DIR / "judge.safetensors"


@functools.lru_cache(maxsize=4)
def _load_describer(path: Path) -> Recognizer:
    from .recognizers import load_recognizer

    return load_recognizer(path, "describer").cpu().eval().requires_grad_(False)


def load_describer(describer: str | Path | None = None) -> Recognizer:
    """The describer at `describer` (default: the shipped weights), on CPU in eval mode, loaded once per path.

    Raises:
        FileNotFoundError: naming the missing weights file.
    """
    path = Path(describer) if describer else SHIPPED_DESCRIBER
    if not path.is_file():
        hint = (
            "the shipped describer is written by Shapes pretraining (`ddpo toy pretrain`); reinstall ddpo, "
            "or pass describer=PATH in reward.kwargs"
            if describer is None
            else "check reward.kwargs.describer"
        )
        raise FileNotFoundError(f"describer weights not found at {path}: {hint}")
    return _load_describer(path.resolve())


def _exact_match(seen: list[Scene], prompts: list[str]) -> np.ndarray:
    """1.0 where the describer's scene equals the prompt's (0.0 for a prompt that is not a template caption)."""
    return np.array([float(scene == parse_caption(prompt)) for scene, prompt in zip(seen, prompts)], dtype=np.float32)


@register_reward("shapes_alignment")
def shapes_alignment(describer: str | None = None) -> Reward:
    """Reward = BERTScore recall of the describer's caption (candidate) against the prompt (reference).

    The paper compares LLaVA's free-form answer with "The image contains {prompt}"-style text; in the
    Shapes world caption and prompt are both in the template language ("two red circles"), so they are
    compared directly. Recall asks "is every word of the prompt in the caption?": a right colour and shape
    with the wrong count still earns most of the reward, a caption sharing no word with the prompt little.
    Prompts need not be template captions (their `exact` is then 0).

    info: `captions` (the describer's caption per image) and `exact` ((n,) float32, 1 where the caption's
    count, colour and shape all equal the prompt's).
    """
    from ddpo.rewards.bertscore import BERTScorer, minilm_path

    model = load_describer(describer)
    scorer = BERTScorer(minilm_path())

    def reward(images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> RewardOutput:
        seen = model.predict(images)
        captions = [scene.caption for scene in seen]
        _, recall, _ = scorer.score(captions, prompts)
        return RewardOutput(recall, {"captions": captions, "exact": _exact_match(seen, prompts)})

    return reward


@register_reward("shapes_alignment_soft")
def shapes_alignment_soft(describer: str | None = None) -> Reward:
    """Reward = the expected BERTScore recall of the describer's caption against the prompt, over its
    (independent) count, colour and shape probabilities: sum over the 72 captions c of p(c) * recall(c, prompt).

    `shapes_alignment` scores the arg-max caption, so it is piecewise constant in the image and two nearby
    images almost always score the same; this one moves with the describer's confidence, and equals
    `shapes_alignment` where the describer is certain. The recall of every caption against a prompt is
    computed once per prompt and cached.

    info: `captions` (the arg-max caption per image) and `exact` as `shapes_alignment`, and `p_prompt` ((n,)
    float32, the describer's probability of exactly the prompt's count, colour and shape; 0 for a prompt that is
    not a template caption).
    """
    import torch

    from ddpo.rewards.bertscore import BERTScorer, minilm_path

    from .recognizers import COLOR_NAMES, NUM_COUNTS, most_likely_scenes
    from .render import SHAPES

    model = load_describer(describer)
    scorer = BERTScorer(minilm_path())
    scenes = [Scene(n + 1, color, shape) for n in range(NUM_COUNTS) for color in COLOR_NAMES for shape in SHAPES]
    captions = [scene.caption for scene in scenes]
    table: dict[str, torch.Tensor] = {}  # prompt -> recall of each caption, shaped (counts, colours, shapes)

    def recall_table(prompt: str) -> torch.Tensor:
        if prompt not in table:
            _, recall, _ = scorer.score(captions, [prompt] * len(captions))
            table[prompt] = torch.as_tensor(np.asarray(recall), dtype=torch.float32).reshape(NUM_COUNTS, len(COLOR_NAMES), len(SHAPES))
        return table[prompt]

    def reward(images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> RewardOutput:
        p = model.probabilities(images)
        joint = p["count"][:, :, None, None] * p["color"][:, None, :, None] * p["shape"][:, None, None, :]
        scores = torch.stack([(joint[i] * recall_table(prompt)).sum() for i, prompt in enumerate(prompts)])
        seen = most_likely_scenes(p)
        p_prompt = []
        for i, prompt in enumerate(prompts):
            wanted = parse_caption(prompt)
            p_prompt.append(0.0 if wanted is None else float(joint[i, wanted.count - 1, COLOR_NAMES.index(wanted.color), SHAPES.index(wanted.shape)]))
        info = {"captions": [scene.caption for scene in seen], "exact": _exact_match(seen, prompts), "p_prompt": np.array(p_prompt, dtype=np.float32)}
        return RewardOutput(scores.numpy(), info)

    return reward


@register_reward("shapes_attributes")
def shapes_attributes(describer: str | None = None) -> Reward:
    """Reward = fraction of (count, colour, shape) the describer sees as the prompt names them: 0, 1/3,
    2/3 or 1. Every prompt must be a template caption ("two red circles"); another prompt is a ValueError
    naming it.

    info: `captions` and, per attribute, `count`, `color`, `shape` ((n,) float32, 1 where it matches).
    """
    model = load_describer(describer)

    def reward(images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> RewardOutput:
        wanted = [parse_caption(prompt) for prompt in prompts]
        for prompt, scene in zip(prompts, wanted):
            if scene is None:
                raise ValueError(
                    f"shapes_attributes needs Shapes captions like 'two red circles', got prompt {prompt!r}"
                )
        seen = model.predict(images)
        matches = {
            attribute: np.array([getattr(s, attribute) == getattr(w, attribute) for s, w in zip(seen, wanted)])
            for attribute in ("count", "color", "shape")
        }
        matches = {attribute: match.astype(np.float32) for attribute, match in matches.items()}
        scores = (matches["count"] + matches["color"] + matches["shape"]) / np.float32(3)
        return RewardOutput(scores, {"captions": [s.caption for s in seen], **matches})

    return reward


@functools.lru_cache(maxsize=2)
def _load_judge(path: Path) -> Recognizer:
    from .recognizers import load_recognizer

    return load_recognizer(path, "judge").cpu().eval().requires_grad_(False)


@register_reward("shapes_judge")
def shapes_judge(judge: str | None = None) -> Reward:
    """Held-out score, not a training reward: 1.0 where the judge's (count, colour, shape) equals the
    prompt's (as `ddpo.shapes.evaluation.exact_match`), else 0.0. Trained on, it would stop being held out.

    info: `captions` (the judge's caption per image).
    """
    path = Path(judge) if judge else SHIPPED_JUDGE
    if not path.is_file():
        raise FileNotFoundError(f"judge weights not found at {path}: reinstall ddpo, or pass judge=PATH")
    model = _load_judge(path.resolve())

    def reward(images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> RewardOutput:
        seen = model.predict(images)
        return RewardOutput(_exact_match(seen, prompts), {"captions": [scene.caption for scene in seen]})

    return reward
