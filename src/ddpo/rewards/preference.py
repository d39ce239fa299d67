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

- `people_and_model`: online labelling that never makes training wait. Every pair gets the preference model's
  choice (refitted on the store's labels in a background thread every `refit_seconds`), replaced by (or mixed
  with, `people_weight`) the labellers' choice where one has arrived (within `wait` seconds, 0 by default).
  Each batch's pairs are queued for the labellers as the newest (older unlabelled ones move behind them);
  `ask = "cross"` asks instead about a sample against an earlier sample of its prompt from other noise (the
  FDFO pair for a prompt not seen before), which teaches the preference model more than FDFO's near-identical
  pairs; only answers about FDFO pairs themselves can be a pair's reward directly. Reports per call `labels_new`, `label_latency_seconds`,
  `people_share` (pairs whose reward came from people), `model_labels`, `model_refits` and `call_seconds`.
"""

from __future__ import annotations

import atexit
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from ddpo.preference.agreement import vote
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


ASK = ("fdfo", "cross")
MODEL_CHOICE = ("sign", "probability")


class PeopleAndModel:
    """The `people_and_model` reward (module docstring)."""

    def __init__(
        self, store: str, *, model: str | None = None, features: str = "shapes-describer", people_weight: float = 1.0,
        refit_seconds: float = 10.0, min_labels: int = 10, scale: float = 1.0, priority: int = 1, wait: float = 0.0,
        ask: str = "fdfo", model_choice: str = "sign", l2: float = 3e-2, ties: str = "half",
    ) -> None:  # fmt: skip
        from ddpo.preference.model import MIN_COMPARISONS, TIE_MODELS
        from ddpo.preference.store import LabelStore, LabelStoreError

        problems = []
        if not 0 <= people_weight <= 1:
            problems.append(f"people_weight {people_weight} must be in [0, 1]")
        if refit_seconds <= 0 or scale <= 0 or wait < 0:
            problems.append(f"refit_seconds and scale must be > 0 and wait >= 0; got {refit_seconds}, {scale}, {wait}")
        if min_labels < MIN_COMPARISONS:
            problems.append(f"min_labels {min_labels} must be at least {MIN_COMPARISONS}")
        for key, value, allowed in (("ask", ask, ASK), ("model_choice", model_choice, MODEL_CHOICE), ("ties", ties, TIE_MODELS)):
            if value not in allowed:
                problems.append(f"{key} {value!r} is not one of {', '.join(allowed)}")
        if problems:
            raise RewardError(f"people_and_model: {'; '.join(problems)} (reward.kwargs)")
        if not Path(store).parent.is_dir():
            raise FileNotFoundError(f"people_and_model: the directory of the label store {store} does not exist (reward.kwargs.store)")
        try:
            self.store = LabelStore(store)
        except LabelStoreError as error:
            raise RewardError(f"people_and_model: {error} (reward.kwargs.store)") from error
        self.features, self.people_weight, self.refit_seconds, self.min_labels = features, people_weight, refit_seconds, min_labels
        self.scale, self.priority, self.wait, self.ask, self.model_choice, self.l2, self.ties = scale, priority, wait, ask, model_choice, l2, ties
        self._lock = threading.Lock()
        self._model = None  # (BradleyTerryModel, extractor): replaced whole by the refit thread
        self.model_labels, self.model_refits = 0, 0
        if model is not None:
            from ddpo.preference.model import PreferenceModel, PreferenceModelError

            try:
                loaded = PreferenceModel(model)
            except PreferenceModelError as error:
                raise RewardError(f"people_and_model: {error} (reward.kwargs.model)") from error
            self._model = (loaded.model, loaded.extractor)
        self._previous: list[str] = []
        self._recent: dict[str, Image.Image] = {}  # prompt -> its last sample, for ask = "cross"
        self._last_call = time.time()
        self._stop = threading.Event()
        self._refitter = threading.Thread(target=self._refit_loop, name="people_and_model-refit", daemon=True)
        self._refitter.start()
        atexit.register(self.close)  # stop the refit thread before the interpreter tears torch down

    # ---- the preference model, refitted in the background -------------------------------------------------------
    def refit(self) -> bool:
        """Fit a new preference model on every label in the store if there are new ones (and at least
        `min_labels`); swap it in. Returns whether it did."""
        from ddpo.preference.features import build_features
        from ddpo.preference.model import train_preference_model

        comparisons = self.store.comparisons()
        if len(comparisons) < self.min_labels or len(comparisons) == self.model_labels:
            return False
        extractor = self._model[1] if self._model is not None and self._model[1].name == self.features else build_features(self.features)
        # (The fit runs on one thread, and so does training for those seconds: `ddpo.preference.model.fit`.)
        model, _, _ = train_preference_model(comparisons, extractor, heldout_fraction=0.0, l2=self.l2, ties=self.ties)
        with self._lock:
            self._model = (model.eval().requires_grad_(False), extractor)
            self.model_labels, self.model_refits = len(comparisons), self.model_refits + 1
        return True

    def _refit_loop(self) -> None:
        while not self._stop.wait(self.refit_seconds):
            try:
                self.refit()
            except Exception as error:  # noqa: BLE001 - a failed refit keeps the last model; training goes on
                print(f"people_and_model: refit failed, keeping the previous model: {error}")

    def close(self) -> None:
        self._stop.set()
        self._refitter.join(timeout=30)

    def _margins(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray | None:
        import torch

        with self._lock:
            current = self._model
        if current is None:
            return None
        model, extractor = current
        with torch.no_grad():
            scores = model(extractor.images(images), extractor.prompts(prompts)).numpy()
        return scores[0::2] - scores[1::2]

    # ---- the reward --------------------------------------------------------------------------------------------
    def __call__(self, images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> RewardOutput:
        if len(images) % 2 or any(prompts[i] != prompts[i + 1] for i in range(0, len(prompts), 2)):
            raise ValueError("people_and_model compares samples 2k and 2k + 1 of one prompt: use a pairwise algorithm (fdfo) or sample.samples_per_prompt = 2")
        started = time.monotonic()
        pairs = [(prompts[i], images[i], images[i + 1]) for i in range(0, len(images), 2)]
        # What to ask: each FDFO pair, or (ask = "cross") a sample against the last earlier sample of its prompt
        # from other noise, falling back to the FDFO pair for a prompt not seen before. `direct[k]`: whether the
        # k-th question is the k-th FDFO pair itself, whose answer can then be its reward.
        asked, direct = [], []
        for prompt, first, second in pairs:
            cross = self.ask == "cross" and prompt in self._recent
            asked.append((prompt, first, self._recent[prompt]) if cross else (prompt, first, second))
            direct.append(not cross)
            self._recent[prompt] = second
        # The newest batch first: the pairs of the previous one nobody labelled yet move behind it.
        self.store.set_priority(self._previous, 0)
        ids = self.store.add_pairs(asked, source="online", batch=uuid.uuid4().hex, priority=self.priority)
        self._previous = ids
        direct_ids = [i for i, is_direct in zip(ids, direct) if is_direct]
        choices = self.store.choices(ids)
        while self.wait > 0 and not all(choices[i] for i in direct_ids) and time.monotonic() - started < self.wait:
            time.sleep(min(0.1, self.wait))
            choices = self.store.choices(ids)
        margins = self._margins(images, prompts)
        if margins is None:
            model_dr = np.zeros(len(pairs), dtype=np.float32)
        elif self.model_choice == "sign":
            model_dr = np.sign(margins).astype(np.float32)
        else:
            model_dr = (2 / (1 + np.exp(-margins)) - 1).astype(np.float32)
        people = np.array([vote(choices[i]) if is_direct else 0 for i, is_direct in zip(ids, direct)], dtype=np.float32)
        from_people = people != 0
        dr = np.where(from_people, self.people_weight * people + (1 - self.people_weight) * model_dr, model_dr) * np.float32(self.scale)
        scores = np.stack([dr, -dr], axis=1).reshape(-1).astype(np.float32)
        now = time.time()
        latencies = self.store.label_latencies(self._last_call)
        self._last_call = now
        info = {
            "people_share": np.repeat(from_people.astype(np.float32), 2),
            "labels_new": np.float32(len(latencies)),
            "model_labels": np.float32(self.model_labels),
            "model_refits": np.float32(self.model_refits),
            # Not "wait_seconds": that key would replace the trainer's own reward_wait_seconds in metrics.jsonl.
            "call_seconds": np.float32(time.monotonic() - started),
        }
        if latencies:  # left out, not NaN, when no label arrived since the last call
            info["label_latency_seconds"] = np.float32(np.mean(latencies))
        return RewardOutput(scores, info)


@register_reward("people_and_model")
def people_and_model(store: str, **kwargs) -> Reward:
    """Training that never waits for people (module docstring). kwargs: `store`, `model` (a preference model to
    start from), `features`, `people_weight` (1: people's choice replaces the model's), `refit_seconds`,
    `min_labels`, `scale`, `priority`, `wait`, `ask` ("fdfo" or "cross"), `model_choice` ("sign": the model's
    choice, or "probability": 2 P(a) - 1), `l2`, `ties`."""
    import inspect

    allowed = set(inspect.signature(PeopleAndModel.__init__).parameters) - {"self", "store"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise RewardError(f"people_and_model: unknown reward.kwargs {', '.join(unknown)} (known: {', '.join(sorted(allowed))})")
    return PeopleAndModel(store, **kwargs)
