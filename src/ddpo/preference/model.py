"""A Bradley-Terry preference model learned from labelled pairs, over frozen image and prompt features.

Bradley and Terry (1952): each item has a strength s, and item a beats item b with probability
sigmoid(s_a - s_b). Here the strength of an image for a prompt is

    s(image, prompt) = w . g + (A g) . (B h),    g = (f(image) - mean) / std,   h = f(prompt),

a linear score of the standardised frozen image features g plus a rank-r interaction with the prompt's
features h (so that what is preferred may depend on what was asked). It is fitted by minimising the
cross-entropy of sigmoid(s_a - s_b) against the labels (1 for "1", 0 for "2", 1/2 for a tie; skips carry no
preference and are left out) with an L2 penalty, the reward model of RLHF (Ouyang et al. 2022, Sec. 3.5) on
features instead of a fine-tuned network. With `ties="davidson"` a tie is its own outcome (Davidson 1970: a softmax
over d/2, -d/2 and a learned log nu; `ddpo.preference.bradley_terry`) instead of a target of 1/2. Pairs, not labels, are split into training and held-out sets, so
that two labellers' votes on one pair never straddle the split. As a reward (`preference:PATH`), s is the
score.
"""

from __future__ import annotations

import contextlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from .bradley_terry import davidson_nll
from .features import FeatureExtractor, build_features, unique_image_features
from .store import Comparison

FORMAT = "ddpo-preference-model"
FORMAT_VERSION = "1"
TARGETS = {"1": 1.0, "2": 0.0, "tie": 0.5}
MIN_COMPARISONS = 10
TIE_MODELS = ("half", "davidson")
"""How a tie enters the fit: as a target of 1/2 in the Bradley-Terry cross-entropy, or as Davidson's third outcome."""


class PreferenceModelError(ValueError):
    """Too few labels to train on, or a file that is not a saved preference model; the message says which."""


class BradleyTerryModel(nn.Module):
    """s(g, h) = w . g + (A g) . (B h) over standardised image features g and prompt features h: (n,) scores."""

    def __init__(self, image_dim: int, prompt_dim: int, rank: int = 8) -> None:
        super().__init__()
        self.register_buffer("image_mean", torch.zeros(image_dim))
        self.register_buffer("image_std", torch.ones(image_dim))
        self.linear = nn.Linear(image_dim, 1, bias=False)
        self.image_factor = nn.Linear(image_dim, rank, bias=False)
        self.prompt_factor = nn.Linear(prompt_dim, rank, bias=False)

    def forward(self, image_features: torch.Tensor, prompt_features: torch.Tensor) -> torch.Tensor:
        g = (image_features - self.image_mean) / self.image_std
        return self.linear(g).squeeze(-1) + (self.image_factor(g) * self.prompt_factor(prompt_features)).sum(-1)


@dataclass
class TrainingReport:
    """What `ddpo preference train` prints and saves with the model."""

    features: str
    comparisons: int
    """Labelled comparisons used (skips left out), training and held-out together."""
    pairs: int
    train_comparisons: int
    heldout_comparisons: int
    heldout_decided: int
    """Held-out comparisons that are not ties: the denominator of the held-out accuracy."""
    heldout_accuracy: float | None
    """Fraction of held-out decided comparisons whose preferred image the model scores higher; None without a held-out set."""
    heldout_log_loss: float | None
    train_accuracy: float
    seed: int
    ties: str = "half"
    tie_log_nu: float | None = None
    """Davidson's log nu (with ties="davidson"): at equal strengths a tie has probability nu / (2 + nu)."""


@dataclass
class _Data:
    image_a: torch.Tensor
    image_b: torch.Tensor
    prompt: torch.Tensor
    target: torch.Tensor

    def select(self, rows: list[int]) -> "_Data":
        return _Data(self.image_a[rows], self.image_b[rows], self.prompt[rows], self.target[rows])


def _tensors(comparisons: list[Comparison], extractor: FeatureExtractor) -> _Data:
    features, rows = unique_image_features(extractor, [c.png_a for c in comparisons] + [c.png_b for c in comparisons])
    n = len(comparisons)
    prompts = extractor.prompts([c.prompt for c in comparisons])
    target = torch.tensor([TARGETS[c.choice] for c in comparisons])
    return _Data(features[rows[:n]], features[rows[n:]], prompts, target)


def _margins(model: BradleyTerryModel, data: _Data) -> torch.Tensor:
    return model(data.image_a, data.prompt) - model(data.image_b, data.prompt)


def _accuracy(margins: torch.Tensor, target: torch.Tensor) -> tuple[float | None, int]:
    decided = target != 0.5
    if not bool(decided.any()):
        return None, 0
    correct = (margins[decided] > 0) == (target[decided] > 0.5)
    return float(correct.float().mean()), int(decided.sum())


def fit(model: BradleyTerryModel, data: _Data, *, steps: int, lr: float, l2: float, ties: str = "half") -> float | None:
    """Full-batch Adam on the Bradley-Terry cross-entropy (ties="half") or Davidson's likelihood (ties="davidson",
    with a learned log nu, which is returned) + l2 * ||weights||^2; standardisation from `data`."""
    if ties not in TIE_MODELS:
        raise PreferenceModelError(f"ties {ties!r} is not one of {', '.join(TIE_MODELS)}")
    with _one_thread():
        return _fit(model, data, steps=steps, lr=lr, l2=l2, ties=ties)


@contextlib.contextmanager
def _one_thread():
    """The fit's tensors are tiny: torch's intra-op threads only wait on each other, and on a busy machine badly
    (400 steps on 60 pairs: 35 s with 2 threads, 1.4 s with 1, on a 2-core machine with load 7). torch's thread
    count is per process, so whatever else the process runs meanwhile runs on one thread too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit(model: BradleyTerryModel, data: _Data, *, steps: int, lr: float, l2: float, ties: str) -> float | None:
    stacked = torch.cat([data.image_a, data.image_b])
    model.image_mean.copy_(stacked.mean(0))
    model.image_std.copy_(stacked.std(0).clamp_min(1e-4) if len(stacked) > 1 else torch.ones_like(stacked[0]))
    log_nu = torch.zeros((), requires_grad=True)
    # Targets 1 / 0 / 1/2 as indices into bradley_terry.OUTCOMES ("1", "2", "tie").
    outcomes = torch.where(data.target == 1.0, 0, torch.where(data.target == 0.0, 1, 2)) if ties == "davidson" else None
    optimizer = torch.optim.Adam([*model.parameters(), log_nu] if outcomes is not None else model.parameters(), lr=lr)
    for _ in range(steps):
        margins = _margins(model, data)
        if outcomes is None:
            loss = nn.functional.binary_cross_entropy_with_logits(margins, data.target)
        else:
            loss = davidson_nll(margins, outcomes, log_nu)
        loss = loss + l2 * sum(p.pow(2).sum() for p in model.parameters())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(log_nu.detach()) if outcomes is not None else None


def margin_jacobian(model: BradleyTerryModel, image_a: torch.Tensor, image_b: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """d(s_a - s_b)/d(theta) for each pair, theta = (w, A, B) flattened in `model.parameters()` order: (n, p).

    With delta = g_a - g_b the margin is w . delta + (A delta) . (B h), so its gradient is delta for w,
    outer(B h, delta) for A and outer(A delta, h) for B (checked against autograd in the tests)."""
    delta = (image_a - image_b) / model.image_std
    with torch.no_grad():
        projected_prompt = model.prompt_factor(prompt)
        projected_delta = model.image_factor(delta)
    n = len(delta)
    return torch.cat([delta, (projected_prompt[:, :, None] * delta[:, None, :]).reshape(n, -1), (projected_delta[:, :, None] * prompt[:, None, :]).reshape(n, -1)], dim=1)


def train_preference_model(
    comparisons: list[Comparison],
    features: str | FeatureExtractor = "shapes-describer",
    *,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    rank: int = 8,
    steps: int = 400,
    lr: float = 1e-2,
    l2: float = 3e-2,
    ties: str = "half",
    heldout_candidates: set[str] | None = None,
) -> tuple[BradleyTerryModel, FeatureExtractor, TrainingReport]:
    """Fit on a random (1 - heldout_fraction) of the labelled pairs, report pairwise accuracy on the rest. With
    `heldout_candidates` (e.g. the pairs an active selection drew at random), only those pairs may be held out:
    heldout_fraction of them are, so that the accuracy is one on a random sample, not on the hardest pairs.

    Raises:
        PreferenceModelError: fewer than `MIN_COMPARISONS` comparisons, or a held-out fraction outside [0, 1).
    """
    comparisons = [c for c in comparisons if c.choice in TARGETS]
    if len(comparisons) < MIN_COMPARISONS:
        raise PreferenceModelError(f"a preference model needs at least {MIN_COMPARISONS} labelled comparisons (1, 2 or tie); got {len(comparisons)}")
    if not 0 <= heldout_fraction < 1:
        raise PreferenceModelError(f"held-out fraction {heldout_fraction} must be in [0, 1)")
    extractor = build_features(features) if isinstance(features, str) else features
    pairs = sorted({c.pair for c in comparisons})
    eligible = pairs if heldout_candidates is None else [pair for pair in pairs if pair in heldout_candidates]
    random.Random(seed).shuffle(eligible)
    heldout_pairs = set(eligible[: round(heldout_fraction * len(eligible))])
    train_rows = [i for i, c in enumerate(comparisons) if c.pair not in heldout_pairs]
    heldout_rows = [i for i, c in enumerate(comparisons) if c.pair in heldout_pairs]
    data = _tensors(comparisons, extractor)
    torch.manual_seed(seed)
    model = BradleyTerryModel(data.image_a.shape[1], data.prompt.shape[1], rank)
    tie_log_nu = fit(model, data.select(train_rows), steps=steps, lr=lr, l2=l2, ties=ties)
    model.eval()
    with torch.no_grad():
        train_accuracy, _ = _accuracy(_margins(model, data.select(train_rows)), data.target[train_rows])
        heldout_accuracy, decided, log_loss = None, 0, None
        if heldout_rows:
            held = data.select(heldout_rows)
            margins = _margins(model, held)
            heldout_accuracy, decided = _accuracy(margins, held.target)
            log_loss = float(nn.functional.binary_cross_entropy_with_logits(margins, held.target))
    report = TrainingReport(
        features=extractor.name, comparisons=len(comparisons), pairs=len(pairs), train_comparisons=len(train_rows),
        heldout_comparisons=len(heldout_rows), heldout_decided=decided, heldout_accuracy=heldout_accuracy,
        heldout_log_loss=log_loss, train_accuracy=train_accuracy if train_accuracy is not None else float("nan"), seed=seed,
        ties=ties, tie_log_nu=tie_log_nu,
    )  # fmt: skip
    return model, extractor, report


def save_preference_model(model: BradleyTerryModel, report: TrainingReport, path: str | Path) -> Path:
    """One .safetensors file: the weights, and in its metadata the feature extractor's name and the report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "version": FORMAT_VERSION, "features": report.features, "rank": str(model.image_factor.out_features), "report": json.dumps(asdict(report))}
    temporary = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(temporary), metadata=metadata)
    temporary.replace(path)
    return path


class PreferenceModel:
    """A saved preference model with its feature extractor: `scores(images, prompts)` -> (n,) float32."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"preference model {path} not found (write one with `ddpo preference train STORE --out {path}`)")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except Exception as error:  # noqa: BLE001 - any unreadable file gets the same one-line explanation
            raise PreferenceModelError(f"{path} is not a safetensors file: {error}") from error
        if metadata.get("format") != FORMAT:
            raise PreferenceModelError(f"{path} is not a ddpo preference model (written by `ddpo preference train`)")
        state = load_file(str(path))
        self.path = path
        self.report = json.loads(metadata["report"])
        self.extractor = build_features(metadata["features"])
        self.model = BradleyTerryModel(state["linear.weight"].shape[1], state["prompt_factor.weight"].shape[1], int(metadata["rank"]))
        self.model.load_state_dict(state)
        self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def scores(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        return self.model(self.extractor.images(images), self.extractor.prompts(prompts)).numpy().astype(np.float32)


def pairwise_accuracy(model: PreferenceModel, comparisons: list[Comparison]) -> tuple[float | None, int]:
    """Fraction of decided (non-tie) comparisons whose preferred image `model` scores higher, and their number."""
    from .store import decode_png

    decided = [c for c in comparisons if c.choice in ("1", "2")]
    if not decided:
        return None, 0
    score_a = model.scores([decode_png(c.png_a) for c in decided], [c.prompt for c in decided])
    score_b = model.scores([decode_png(c.png_b) for c in decided], [c.prompt for c in decided])
    correct = [(a > b) == (c.choice == "1") for a, b, c in zip(score_a, score_b, decided)]
    return float(np.mean(correct)), len(decided)
