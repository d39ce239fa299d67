"""Rewards from people's choices.

- `preference:PATH`: the score of a Bradley-Terry preference model trained on labels (`ddpo preference train`;
  `ddpo.preference.model`). Usable everywhere a reward is.
- `human_choice`: online labelling for pairwise algorithms (FDFO). Each call's consecutive pairs of samples
  (2k, 2k + 1, one prompt) are queued in a label store, where the labelling app (`ddpo label serve`) shows
  them first; the call waits until every pair has a label or `timeout` seconds have passed, then scores each
  labelled pair +scale / -scale (chosen / other), so that FDFO's dR = (R1 - R2) / 2 is +-scale: the human
  choice is the sign of dR. Ties, skips and pairs nobody labelled in time score 0 / 0 (dR = 0), and training
  carries on with what was labelled; the unlabelled pairs move behind the next batch's in the app's queue. Several labellers on one pair: the majority of their 1s and 2s.
  The labels stay in the store for the preference model.

The trainer scores each sampling batch in a thread while the next batch samples, so the wait is per batch;
with `sample.num_batches_per_epoch = 1` all of an epoch's pairs are queued at once.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from ddpo.rewards.base import Reward, RewardError, RewardOutput, register_reward


@register_reward("preference", path_argument="path")
def preference(path: str) -> Reward:
    """Reward = the preference model's score s(image, prompt) (a logit: s_a - s_b is the log-odds that a
    person prefers a). Named `preference:PATH` in configs."""
    from ddpo.preference.model import PreferenceModel, PreferenceModelError

    try:
        model = PreferenceModel(path)
    except PreferenceModelError as error:
        raise RewardError(f"reward preference:{path}: {error}") from error

    def reward(images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> RewardOutput:
        return RewardOutput(model.scores(images, prompts))

    return reward


def vote(choices: list[str]) -> int:
    """+1 when more labellers chose the first image than the second, -1 for the reverse, 0 otherwise (ties,
    skips, no labels, or a split vote)."""
    balance = choices.count("1") - choices.count("2")
    return (balance > 0) - (balance < 0)


class HumanChoice:
    """The `human_choice` reward (module docstring); `store` is the label store's file."""

    def __init__(self, store: str, timeout: float = 600.0, scale: float = 1.0, priority: int = 1, poll_seconds: float = 0.5) -> None:
        from ddpo.preference.store import LabelStore, LabelStoreError

        if timeout < 0 or scale <= 0 or poll_seconds <= 0:
            raise RewardError(f"human_choice needs reward.kwargs timeout >= 0, scale > 0 and poll_seconds > 0; got {timeout}, {scale}, {poll_seconds}")
        if not Path(store).parent.is_dir():
            raise FileNotFoundError(f"human_choice: the directory of the label store {store} does not exist (reward.kwargs.store)")
        try:
            self.store = LabelStore(store)
        except LabelStoreError as error:
            raise RewardError(f"human_choice: {error} (reward.kwargs.store)") from error
        self.timeout, self.scale, self.priority, self.poll_seconds = timeout, scale, priority, poll_seconds

    def __call__(self, images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> RewardOutput:
        if len(images) % 2 or any(prompts[i] != prompts[i + 1] for i in range(0, len(prompts), 2)):
            raise ValueError("human_choice compares samples 2k and 2k + 1 of one prompt: use a pairwise algorithm (fdfo) or sample.samples_per_prompt = 2")
        pairs = [(prompts[i], images[i], images[i + 1]) for i in range(0, len(images), 2)]
        started = time.monotonic()
        ids = self.store.add_pairs(pairs, source="online", batch=uuid.uuid4().hex, priority=self.priority, metadata=metadata[0::2])
        while True:
            choices = self.store.choices(ids)
            waited = time.monotonic() - started
            if all(choices[i] for i in ids) or waited >= self.timeout:
                break
            time.sleep(min(self.poll_seconds, max(self.timeout - waited, 0.0)))
        # Pairs nobody labelled in time stay labellable (for the preference model) but behind the next batch's.
        self.store.set_priority([i for i in ids if not choices[i]], 0)
        signs = np.array([vote(choices[i]) for i in ids], dtype=np.float32)
        scores = np.stack([signs, -signs], axis=1).reshape(-1) * np.float32(self.scale)
        labelled = np.repeat(np.array([float(bool(choices[i])) for i in ids], dtype=np.float32), 2)
        decided = np.repeat(np.abs(signs), 2)
        return RewardOutput(scores.astype(np.float32), {"labelled": labelled, "decided": decided, "wait_seconds": np.float32(waited)})


@register_reward("human_choice")
def human_choice(store: str, timeout: float = 600.0, scale: float = 1.0, priority: int = 1, poll_seconds: float = 0.5) -> Reward:
    """Online human choices between the two samples of each pair (module docstring). kwargs: `store` (the label
    store file, created if missing), `timeout` (seconds to wait for each batch's labels), `scale` (|dR| of a
    decided pair), `priority` (how far ahead of other pairs the app shows these), `poll_seconds`."""
    return HumanChoice(store, timeout=timeout, scale=scale, priority=priority, poll_seconds=poll_seconds)
