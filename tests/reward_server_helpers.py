"""A reward server running in a thread of the test process, and rewards the server tests serve."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np


@contextlib.contextmanager
def running_server(reward, token: str | None = None, limits=None) -> Iterator[tuple[str, object]]:
    """(url, FastAPI app) of `reward` served by uvicorn on a free loopback port, for the `with` block."""
    import uvicorn

    from ddpo.server.reward_server import create_app

    app = create_app(reward, token=token, limits=limits)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the reward server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def mean_pixel(images, prompts, metadata):
    """Each image's mean pixel value / 255 plus its metadata's "offset" (so that a test sees each request get
    its own scores), with info: per-image `doubled` scores and the batch's `batch_size`."""
    from ddpo.rewards import RewardOutput

    scores = np.array([np.asarray(image).mean() / 255 + entry.get("offset", 0) for image, entry in zip(images, metadata)], dtype=np.float32)
    return RewardOutput(scores, {"doubled": 2 * scores, "batch_size": len(images)})


SLOW_CALLS: list[int] = []


def slow_mean_pixel(images, prompts, metadata):
    """`mean_pixel`, taking 50 ms per call (a model's forward pass), recording each call's batch size."""
    SLOW_CALLS.append(len(images))
    time.sleep(0.05)
    return mean_pixel(images, prompts, metadata)


def fails_on_boom(images, prompts, metadata):
    """`mean_pixel`, but raises when a prompt is "boom"."""
    if "boom" in prompts:
        raise ValueError("cannot score 'boom'")
    return mean_pixel(images, prompts, metadata)


_calls = 0


def dies_on_third_call(images, prompts, metadata):
    """JPEG compressibility, but the serving process kills itself (SIGKILL, no clean-up) on its third call."""
    global _calls
    _calls += 1
    if _calls == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    from ddpo.rewards.jpeg import jpeg_size_kb

    return [-jpeg_size_kb(image) for image in images]
