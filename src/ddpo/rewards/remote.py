"""The `remote` reward: scores come from a reward server (`ddpo serve-reward`) over HTTP.

Each call POSTs the batch as JSON with base64 PNG images (`ddpo.rewards.wire`). A connection failure, a
timeout, a 429, 502, 503 or 504 is retried `retries` times, waiting `backoff`, 2 x `backoff`, 4 x `backoff`,
... seconds; a refusal (another 4xx) or the served reward failing (500) is not retried. When the server cannot score, the reward raises, naming
the server and why: never a silent zero. Training already scores each batch in a thread while the next one
samples (`ddpo.training.loop`), so a remote reward overlaps the network and the server's work with sampling.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np
from PIL import Image

from ddpo.rewards.base import Reward, RewardOutput, register_reward

TOKEN_ENVIRONMENT_VARIABLE = "DDPO_REWARD_TOKEN"
RETRIED_STATUSES = frozenset({429, 502, 503, 504})
"""Busy or briefly unavailable. A 500 is the served reward failing on this batch, which a retry repeats."""


class RemoteRewardError(RuntimeError):
    """The reward server could not score a batch (after retries where retrying made sense)."""


class RemoteReward:
    """A reward scored by the server at `url` (its root, or its `/score` endpoint)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 120.0, retries: int = 3, backoff: float = 1.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"reward server url must start with http:// or https://, got {url!r}")
        if retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError(f"remote reward needs retries >= 0, timeout > 0 and backoff >= 0; got {retries}, {timeout}, {backoff}")
        root = url.rstrip("/")
        root = root[: -len("/score")] if root.endswith("/score") else root
        self.url = root
        self.token = token if token is not None else os.environ.get(TOKEN_ENVIRONMENT_VARIABLE) or None
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff

    def _request(self, path: str, body: bytes | None = None) -> Any:
        """The JSON answer of one request; raises urllib/socket errors as they come."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + path, data=body, headers=headers, method="POST" if body is not None else "GET")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read())

    def health(self) -> dict:
        """The server's `GET /health` answer (its reward's name, counters and limits).

        Raises:
            RemoteRewardError: the server cannot be reached or does not answer as a reward server.
        """
        try:
            answer = self._request("/health")
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as error:
            raise RemoteRewardError(f"reward server {self.url} is not answering /health: {_reason(error)}") from None
        if not isinstance(answer, dict) or "reward" not in answer:
            raise RemoteRewardError(f"{self.url} answered /health with {answer!r}, not as a ddpo reward server")
        return answer

    def __call__(self, images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> RewardOutput:
        from ddpo.rewards.wire import encode_request

        body = encode_request(images, prompts, metadata)
        failures: list[str] = []
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                answer = self._request("/score", body)
            except urllib.error.HTTPError as error:
                reason = f"HTTP {error.code}: {_detail(error)}"
                if error.code not in RETRIED_STATUSES:
                    verb = "refused" if error.code < 500 else "failed to score"
                    raise RemoteRewardError(f"reward server {self.url} {verb} the batch ({reason})") from None
                failures.append(reason)
                continue
            except (urllib.error.URLError, OSError, json.JSONDecodeError) as error:
                failures.append(_reason(error))
                continue
            if not isinstance(answer, dict) or not isinstance(answer.get("scores"), list):
                raise RemoteRewardError(f"reward server {self.url} answered without a list of scores: {str(answer)[:200]}")
            info = answer.get("info") or {}
            return RewardOutput(np.asarray(answer["scores"], dtype=np.float32), info if isinstance(info, dict) else {})
        attempts = f"{self.retries + 1} attempt{'s' if self.retries else ''}"
        raise RemoteRewardError(f"reward server {self.url} failed {attempts} over {self._total_wait():.1f}s of backoff; last: {failures[-1]}")

    def _total_wait(self) -> float:
        return sum(self.backoff * 2 ** (attempt - 1) for attempt in range(1, self.retries + 1))


def _reason(error: BaseException) -> str:
    """A short reason for a failed request: connection refused, timed out, reset, ..."""
    reason = getattr(error, "reason", error)
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(reason, BaseException):
        return f"{type(reason).__name__}: {reason}"
    return str(reason)


def _detail(error: urllib.error.HTTPError) -> str:
    """The server's one-line `detail`, or the body's start."""
    try:
        text = error.read().decode(errors="replace")
    except OSError:
        return error.reason or ""
    try:
        return str(json.loads(text)["detail"])
    except (ValueError, KeyError, TypeError):
        return text[:200] or str(error.reason)


@register_reward("remote")
def remote(url: str, token: str | None = None, timeout: float = 120.0, retries: int = 3, backoff: float = 1.0, expect: str | None = None) -> Reward:
    """Reward = the scores of the reward server at `url` (`ddpo serve-reward`).

    Args:
        url: the server's root, e.g. "http://127.0.0.1:8765".
        token: bearer token; None reads the environment variable DDPO_REWARD_TOKEN (keeps it out of configs).
        timeout: seconds one request may take (a batch of a big model on a busy server takes a while).
        retries: further attempts after a connection failure, a timeout, or a 429, 502, 503 or 504.
        backoff: seconds before the first retry, doubled before each next one.
        expect: the name of the reward the server must be serving (checked once, at build); None: any.

    Raises:
        RemoteRewardError: at build, when the server is unreachable or serves another reward than `expect`.
    """
    client = RemoteReward(url, token, timeout, retries, backoff)
    served = client.health()["reward"]
    if expect is not None and served != expect:
        raise RemoteRewardError(f"reward server {client.url} serves {served!r}, not {expect!r}")
    return client
