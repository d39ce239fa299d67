"""`ddpo serve-reward`: one reward behind HTTP (FastAPI on uvicorn), concurrent requests batched together.

Every `POST /score` (JSON or multipart/form-data, see `protocol`) is validated and decoded in the request
handler, then queued. One batching worker takes the queued requests (up to `max_batch_images` images,
waiting at most `batch_wait_seconds` for more to arrive once the first is in) and scores them in one reward
call, in a worker thread so that the server keeps accepting requests meanwhile; each request gets its own
slice of the scores back. A batch whose reward call fails is scored again request by request, so that one
bad request fails alone.

Safety: binds 127.0.0.1 unless told otherwise; with a token, every request but `GET /health` needs
`Authorization: Bearer TOKEN`; bodies over `max_body_bytes` (never held in memory) and requests over
`max_request_images` are refused before decoding; images are PNG only, their pixel count bounded; nothing
is unpickled. Refusals are 4xx with `{"detail": "one line"}`; a failing reward is a 500 naming it.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

from ddpo.rewards.base import CheckedReward, RewardOutput
from ddpo.rewards.wire import RequestError, decode_multipart, decode_request, jsonable

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DRAIN_FACTOR = 16
"""An oversize body is read (and dropped) up to this many times the limit before the 413 is sent."""


@dataclass
class ServerLimits:
    """What one server accepts and how it batches."""

    max_body_bytes: int = 64 * 2**20
    """Largest request body (HTTP 413 above it)."""
    max_request_images: int = 256
    """Most images in one request (HTTP 413 above it)."""
    max_batch_images: int = 64
    """Most images in one reward call; a larger request is scored alone."""
    batch_wait_seconds: float = 0.005
    """How long the batching worker waits for more requests once one is queued."""


@dataclass
class ServerStats:
    """Counters reported by `GET /health`."""

    requests: int = 0
    """Valid /score requests."""
    images: int = 0
    """Images passed to the reward (a batch scored again request by request counts twice)."""
    reward_calls: int = 0
    largest_batch: int = 0
    refused: int = 0
    reward_seconds: float = 0.0


@dataclass
class _Pending:
    images: list[Image.Image]
    prompts: list[str]
    metadata: list[dict]
    future: asyncio.Future = field(repr=False)


class RewardService:
    """The queue, the batching worker and the counters of one served reward."""

    def __init__(self, reward: CheckedReward, limits: ServerLimits) -> None:
        self.reward = reward
        self.limits = limits
        self.stats = ServerStats()
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self._carried: _Pending | None = None  # taken from the queue but too large for the last batch
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._batching_worker())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def score(self, images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> RewardOutput:
        """Queue one request and wait for its scores."""
        assert self._queue is not None, "the service is not started"
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(images, prompts, metadata, future))
        return await future

    async def _next_batch(self) -> list[_Pending]:
        assert self._queue is not None
        first = self._carried or await self._queue.get()
        self._carried = None
        batch, count = [first], len(first.images)
        deadline = time.monotonic() + self.limits.batch_wait_seconds
        while count < self.limits.max_batch_images:
            try:
                if self._queue.empty():
                    item = await asyncio.wait_for(self._queue.get(), max(0.0, deadline - time.monotonic()))
                else:
                    item = self._queue.get_nowait()
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                break
            if count + len(item.images) > self.limits.max_batch_images:
                self._carried = item
                break
            batch.append(item)
            count += len(item.images)
        return batch

    async def _batching_worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            batch = [item for item in batch if not item.future.done()]  # a client that gave up
            if not batch:
                continue
            try:
                outputs = await loop.run_in_executor(self._thread, self._score_batch, batch)
            except Exception as error:  # noqa: BLE001 - handed to the waiting requests
                outputs = [error] * len(batch)
            for item, output in zip(batch, outputs):
                if item.future.done():
                    continue
                if isinstance(output, BaseException):
                    item.future.set_exception(output)
                else:
                    item.future.set_result(output)

    def _call(self, images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> RewardOutput:
        started = time.perf_counter()
        try:
            return self.reward(images, prompts, metadata)
        finally:  # failed calls count too
            self.stats.reward_calls += 1
            self.stats.images += len(images)
            self.stats.largest_batch = max(self.stats.largest_batch, len(images))
            self.stats.reward_seconds += time.perf_counter() - started

    def _score_batch(self, batch: list[_Pending]) -> list[RewardOutput | BaseException]:
        """One reward call for the whole batch, split per request; if it fails, one call per request."""
        images = [image for item in batch for image in item.images]
        prompts = [prompt for item in batch for prompt in item.prompts]
        metadata = [entry for item in batch for entry in item.metadata]
        try:
            output = self._call(images, prompts, metadata)
        except Exception as error:  # noqa: BLE001
            if len(batch) == 1:
                return [error]
            return [self._score_alone(item) for item in batch]
        results: list[RewardOutput | BaseException] = []
        start = 0
        for item in batch:
            stop = start + len(item.images)
            results.append(RewardOutput(output.scores[start:stop], _slice_info(output.info, start, stop, len(images))))
            start = stop
        return results

    def _score_alone(self, item: _Pending) -> RewardOutput | BaseException:
        try:
            return self._call(item.images, item.prompts, item.metadata)
        except Exception as error:  # noqa: BLE001
            return error


def _slice_info(info: dict, start: int, stop: int, total: int) -> dict:
    """Per-sample entries of `info` (sequences of length `total`) cut to [start, stop); others kept whole."""
    sliced: dict[str, Any] = {}
    for key, value in info.items():
        if isinstance(value, (list, tuple, np.ndarray)) and len(value) == total:
            sliced[key] = value[start:stop]
        else:
            sliced[key] = value
    return sliced


def create_app(reward: CheckedReward, *, token: str | None = None, limits: ServerLimits | None = None):
    """The FastAPI application serving `reward` (see the module docstring)."""
    limits = limits or ServerLimits()
    service = RewardService(reward, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(title=f"ddpo reward server ({reward.name})", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    def refuse(message: str, status: int) -> JSONResponse:
        service.stats.refused += 1
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"detail": message}, status_code=status, headers=headers)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "reward": reward.name, "stats": vars(service.stats), "limits": vars(limits)}

    @app.post("/score")
    async def score(request: Request):
        # The body is read before any refusal, bytes past the limit dropped rather than kept (and reading stops
        # at DRAIN_FACTOR x the limit): a client still sending when the answer comes sees a broken pipe, not
        # the message.
        body, size = bytearray(), 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limits.max_body_bytes:
                body += chunk
            elif size > DRAIN_FACTOR * limits.max_body_bytes:
                break
        if token is not None:
            given = request.headers.get("authorization", "")
            if not given:
                return refuse("missing Authorization header: this server needs 'Authorization: Bearer <token>'", 401)
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
                return refuse("wrong bearer token", 401)
        content_type = request.headers.get("content-type", "")
        media_type = content_type.split(";")[0].strip().lower()
        if media_type not in ("application/json", "multipart/form-data"):
            return refuse(f"content type {media_type or 'none'!r} is not supported: send application/json or multipart/form-data", 415)
        if size > limits.max_body_bytes:
            declared = request.headers.get("content-length", "")
            length = f"{int(declared)} bytes" if declared.isdigit() else "too long"
            return refuse(f"the body is {length}, over the server's limit of {limits.max_body_bytes} bytes", 413)
        try:
            if media_type == "application/json":
                images, prompts, metadata = decode_request(bytes(body), limits.max_request_images)
            else:
                images, prompts, metadata = decode_multipart(bytes(body), content_type, limits.max_request_images)
        except RequestError as error:
            return refuse(str(error), error.status)
        service.stats.requests += 1
        try:
            output = await service.score(images, prompts, metadata)
        except Exception as error:  # noqa: BLE001 - the reward's failure, named by CheckedReward
            return JSONResponse({"detail": f"{type(error).__name__}: {error}"}, status_code=500)
        return {"scores": output.scores.tolist(), "info": jsonable(output.info)}

    return app


def serve(reward: CheckedReward, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None, limits: ServerLimits | None = None) -> None:
    """Serve `reward` until interrupted.

    Raises:
        OSError: `host:port` cannot be listened on (e.g. already in use), before anything is served.
    """
    import socket

    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror or error}") from error
    config = uvicorn.Config(create_app(reward, token=token, limits=limits), log_level="warning", access_log=False)
    with listener:
        uvicorn.Server(config).run(sockets=[listener])
