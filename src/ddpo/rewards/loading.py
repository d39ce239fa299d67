"""Shared by the model-based rewards: where a reward model runs, in which precision, and loading it with an
error that names the reward and the checkpoint.

Models are loaded when a reward is built (not when its module is imported), once per (checkpoint, device,
dtype) in a process, through transformers' `from_pretrained`: a hub id (downloaded into the Hugging Face
cache, or read from it with `HF_HUB_OFFLINE=1`) or a local directory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

DTYPES = ("auto", "float32", "float16", "bfloat16")


def resolve_device(device: str | None) -> str:
    """`device`, or the first CUDA GPU when there is one and the CPU otherwise."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """The precision a reward model runs in: "auto" is float16 on a GPU (the reward models here are all
    trained or routinely run in half precision) and float32 elsewhere, where half precision is slow or missing.

    Raises:
        ValueError: `dtype` is not one of `DTYPES`.
    """
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def load_or_explain(reward: str, what: str, checkpoint: str, load: Callable[[], T]) -> T:
    """`load()`, with any failure re-raised as one line naming the reward, the part and the checkpoint.

    Raises:
        ValueError: e.g. "reward 'aesthetic' cannot load its CLIP model from 'x': ...".
    """
    try:
        return load()
    except Exception as error:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ...
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"reward {reward!r} cannot load its {what} from {checkpoint!r}: {first_line}") from error


def batches(items: list[Any], size: int) -> list[list[Any]]:
    """`items` in consecutive chunks of at most `size`."""
    return [items[start : start + size] for start in range(0, len(items), size)]
