"""The reward server's wire format, shared by the server and the `remote` reward (standard library only).

`POST /score` takes JSON `{"images": [base64 PNG, ...], "prompts": [str, ...], "metadata": [{...}, ...]}`
(`metadata` may be left out), or the same as multipart/form-data (`decode_multipart`: PNG files, no base64),
and answers `{"scores": [float, ...], "info": {...}}`; errors answer
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


def decode_base64_png(text: Any, index: int) -> Image.Image:
    """The image of base64 PNG `text` (a JSON request's `images[index]`).

    Raises:
        RequestError: naming the image's index: not a string, not base64, or see `decode_png`.
    """
    if not isinstance(text, str):
        raise RequestError(f"images[{index}] must be a base64 PNG string, got {type(text).__name__}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(f"images[{index}] is not valid base64: {error}") from None
    return decode_png(data, index)


def decode_png(data: bytes, index: int) -> Image.Image:
    """The image of PNG file bytes, fully decoded (so that a truncated file fails here, not in the reward).

    Raises:
        RequestError: naming the image's index: not a PNG, too many pixels (413), or corrupt.
    """
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
    """(images, prompts, metadata) of a JSON `/score` body.

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
    images = payload.get("images")
    if not isinstance(images, list):
        raise RequestError("the body needs 'images' (a list of base64 PNG strings) and 'prompts' (a list of strings)")
    prompts, metadata = _checked_fields(len(images), payload.get("prompts"), payload.get("metadata"), max_images)
    return [decode_base64_png(text, index) for index, text in enumerate(images)], prompts, metadata


def decode_multipart(body: bytes, content_type: str, max_images: int) -> tuple[list[Image.Image], list[str], list[dict]]:
    """(images, prompts, metadata) of a multipart/form-data `/score` body: one file field `images` per image
    (the PNG bytes, in order), a field `prompts` holding a JSON list of strings and an optional field
    `metadata` holding a JSON list of objects. Parsed with the standard library's MIME parser.

    Raises:
        RequestError: no boundary, unknown or missing fields, bad JSON, or as `decode_request`.
    """
    from email.parser import BytesParser
    from email.policy import HTTP

    if "boundary=" not in content_type:
        raise RequestError("the multipart/form-data content type has no boundary")
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    if not message.is_multipart():
        raise RequestError("the body is not multipart/form-data")
    images: list[bytes] = []
    fields: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True) or b""
        if name == "images":
            images.append(data)
        elif name in ("prompts", "metadata"):
            try:
                fields[name] = json.loads(data)
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise RequestError(f"the multipart field {name!r} is not JSON: {error}") from None
        else:
            raise RequestError(f"unknown multipart field {name!r}: send 'images' (PNG files), 'prompts' and 'metadata' (JSON)")
    if "prompts" not in fields:
        raise RequestError("the multipart body needs a 'prompts' field (a JSON list of strings)")
    prompts, metadata = _checked_fields(len(images), fields["prompts"], fields.get("metadata"), max_images)
    return [decode_png(data, index) for index, data in enumerate(images)], prompts, metadata


def _checked_fields(count: int, prompts: Any, metadata: Any, max_images: int) -> tuple[list[str], list[dict]]:
    """`prompts` and `metadata` (None: empty objects) checked against each other and `count` images."""
    if not isinstance(prompts, list) or not all(isinstance(prompt, str) for prompt in prompts):
        raise RequestError("'prompts' must be a list of strings, one per image")
    metadata = [{} for _ in range(count)] if metadata is None else metadata
    if not isinstance(metadata, list) or not all(isinstance(item, dict) for item in metadata):
        raise RequestError("'metadata' must be a list of objects, one per image")
    if len(prompts) != count or len(metadata) != count:
        raise RequestError(f"got {count} images, {len(prompts)} prompts and {len(metadata)} metadata entries; send one of each per image")
    if not count:
        raise RequestError("the request has no images")
    if count > max_images:
        raise RequestError(f"the request has {count} images, over the server's limit of {max_images} per request", 413)
    return prompts, metadata


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
