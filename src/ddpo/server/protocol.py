"""The reward server's wire format, shared by the server and the `remote` reward (standard library only).

`POST /score` takes JSON `{"images": [base64 PNG, ...], "prompts": [str, ...], "metadata": [{...}, ...]}`
(`metadata` may be left out) and answers `{"scores": [float, ...], "info": {...}}`; errors answer
`{"detail": "one line"}`. Images travel as PNG: lossless, so a served reward sees the very pixels an
in-process one would. Nothing is ever unpickled: JSON and PNG are data, not code.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_IMAGE_PIXELS = 4096 * 4096
"""Largest image the server decodes (a small PNG can inflate to gigabytes of pixels)."""


class RequestError(ValueError):
    """A request the server refuses; `status` is the HTTP status it answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def encode_png(image: Image.Image) -> str:
    """`image` as base64 PNG text."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(text: Any, index: int) -> Image.Image:
    """The image of base64 PNG `text`, fully decoded (so that a truncated file fails here, not in the reward).

    Raises:
        RequestError: naming the image's index: not a string, not base64, not a PNG, too large or corrupt.
    """
    if not isinstance(text, str):
        raise RequestError(f"images[{index}] must be a base64 PNG string, got {type(text).__name__}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(f"images[{index}] is not valid base64: {error}") from None
    if not data.startswith(PNG_SIGNATURE):
        raise RequestError(f"images[{index}] is not a PNG (it does not start with the PNG signature)")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise RequestError(f"images[{index}] is {image.width}x{image.height}, over the {MAX_IMAGE_PIXELS} pixels allowed", 413)
            image.load()
            return image.copy()
    except RequestError:
        raise
    except Exception as error:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... on bad data
        raise RequestError(f"images[{index}] is not a readable PNG: {error}") from None


def encode_request(images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> bytes:
    """The JSON body of a `/score` request; numpy numbers and arrays in `metadata` become JSON numbers and lists.

    Raises:
        TypeError: `metadata` holds something else JSON cannot carry (named).
    """
    payload = {"images": [encode_png(image) for image in images], "prompts": list(prompts), "metadata": list(metadata)}
    return json.dumps(payload, default=_json_default).encode()


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"metadata value {value!r} ({type(value).__name__}) cannot be sent to a reward server as JSON")


def decode_request(body: bytes, max_images: int) -> tuple[list[Image.Image], list[str], list[dict]]:
    """(images, prompts, metadata) of a `/score` JSON body.

    Raises:
        RequestError: malformed JSON, missing or mistyped fields, lists of different lengths, more than
            `max_images` images (413), or a bad image.
    """
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(f"the body is not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise RequestError(f"the body must be a JSON object with images, prompts and metadata, got {type(payload).__name__}")
    images, prompts = payload.get("images"), payload.get("prompts")
    if not isinstance(images, list) or not isinstance(prompts, list):
        raise RequestError("the body needs 'images' (a list of base64 PNG strings) and 'prompts' (a list of strings)")
    metadata = payload.get("metadata")
    metadata = [{} for _ in images] if metadata is None else metadata
    if not isinstance(metadata, list) or not all(isinstance(item, dict) for item in metadata):
        raise RequestError("'metadata' must be a list of objects, one per image")
    if not all(isinstance(prompt, str) for prompt in prompts):
        raise RequestError("'prompts' must be a list of strings")
    if len(prompts) != len(images) or len(metadata) != len(images):
        raise RequestError(f"got {len(images)} images, {len(prompts)} prompts and {len(metadata)} metadata entries; send one of each per image")
    if not images:
        raise RequestError("the request has no images")
    if len(images) > max_images:
        raise RequestError(f"the request has {len(images)} images, over the server's limit of {max_images} per request", 413)
    return [decode_png(text, index) for index, text in enumerate(images)], prompts, metadata


def jsonable(value: Any) -> Any:
    """`value` with numpy arrays and scalars turned into lists and numbers; None for what JSON cannot hold."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return None
