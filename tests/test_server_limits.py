"""The servers' limits and defaults, checked on real HTTP responses and on the commands themselves (no browser):
the reward server's pixel cap and per-call batch cap, its default host and its warning for a public bind without
a token; the label app's security headers, its command's default host and its token refusals."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import reward_server_helpers as helpers  # noqa: E402
from reward_server_helpers import running_server  # noqa: E402

from ddpo.cli import main  # noqa: E402
from ddpo.rewards import checked_reward  # noqa: E402
from ddpo.rewards.wire import encode_request  # noqa: E402
from ddpo.server.reward_server import ServerLimits  # noqa: E402


def images(count: int, size: int = 16, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def http(url: str, body: bytes | None = None, token: str | None = None) -> tuple[int, dict, dict]:
    """(status, JSON answer, headers) of a GET (no body) or a JSON POST."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            return response.status, (json.loads(raw) if response.headers.get_content_type() == "application/json" else {}), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}"), dict(error.headers)


def test_the_reward_server_refuses_an_image_over_its_pixel_cap(monkeypatch):
    import ddpo.rewards.wire as protocol

    monkeypatch.setattr(protocol, "MAX_IMAGE_PIXELS", 24 * 24)
    with running_server(checked_reward("mean_pixel", helpers.mean_pixel)) as (url, _):
        status, answer, _ = http(url + "/score", encode_request(images(1, size=25), ["a"], [{}]))
        assert status == 413 and "images[0] is 25x25, over the 576 pixels allowed" in answer["detail"]
        status, answer, _ = http(url + "/score", encode_request(images(1, size=24), ["a"], [{}]))
        assert status == 200 and len(answer["scores"]) == 1


def test_the_reward_server_calls_the_reward_on_at_most_max_batch_images():
    calls: list[int] = []
    gate = threading.Event()

    def recording(images_, prompts, metadata):
        gate.wait(5)  # hold the first call so that the other requests queue up behind it
        calls.append(len(images_))
        return helpers.mean_pixel(images_, prompts, metadata)

    answers: list[tuple[int, dict, dict]] = []
    with running_server(checked_reward("recording", recording), limits=ServerLimits(max_batch_images=4, batch_wait_seconds=0.2)) as (url, _):
        threads = [threading.Thread(target=lambda k=k: answers.append(http(url + "/score", encode_request(images(3, seed=k), ["a"] * 3, [{}] * 3))))
                   for k in range(4)]  # fmt: skip
        for thread in threads:
            thread.start()
        gate.set()
        for thread in threads:
            thread.join(timeout=60)
        big = http(url + "/score", encode_request(images(6), ["a"] * 6, [{}] * 6))  # more than a batch: scored alone
    assert [status for status, _, _ in answers] == [200] * 4 and all(len(a["scores"]) == 3 for _, a, _ in answers)
    assert sum(calls[:-1]) == 12 and max(calls[:-1]) <= 4  # 4 requests of 3 never share a call of more than 4
    assert big[0] == 200 and calls[-1] == 6


def test_serve_reward_binds_loopback_by_default_and_warns_on_a_public_bind_without_token(monkeypatch):
    import ddpo.server.reward_server as reward_server

    bound = []
    monkeypatch.setattr(reward_server, "serve", lambda reward, host, port, token, limits: bound.append((host, port, token)))
    monkeypatch.delenv("DDPO_REWARD_TOKEN", raising=False)
    default = CliRunner().invoke(main, ["serve-reward", "--reward", "jpeg_compressibility"])
    assert default.exit_code == 0, default.output
    assert bound[-1][0] == "127.0.0.1" and "warning" not in default.stderr
    public = CliRunner().invoke(main, ["serve-reward", "--reward", "jpeg_compressibility", "--host", "0.0.0.0"])
    assert public.exit_code == 0 and bound[-1][0] == "0.0.0.0"
    assert "ddpo: warning: serving on 0.0.0.0 without --token" in public.stderr
    with_token = CliRunner().invoke(main, ["serve-reward", "--reward", "jpeg_compressibility", "--host", "0.0.0.0", "--token", "s3cret"])
    assert with_token.exit_code == 0 and bound[-1] == ("0.0.0.0", 8765, "s3cret") and "warning" not in with_token.stderr


@pytest.fixture
def label_store(tmp_path):
    from ddpo.preference.store import LabelStore
    from ddpo.shapes.labeller import rendered_pairs

    path = tmp_path / "labels.db"
    store = LabelStore(path)
    pairs = rendered_pairs(2, seed=3)
    store.add_pairs([(p.prompt, p.image_a, p.image_b) for p in pairs], source="test")
    token = store.add_labeller("alice")
    store.close()
    return path, token


def test_label_app_security_headers_and_token_refusals_over_http(label_store):
    import socket

    import uvicorn

    from ddpo.server.label_app import create_label_app

    path, token = label_store
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_label_app(path), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        for _ in range(300):
            if server.started:
                break
            threading.Event().wait(0.05)
        status, _, headers = http(url + "/")
        assert status == 200
        assert "script-src 'self'" in headers["content-security-policy"] and "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer" and headers["cache-control"] == "no-store"
        for token_sent in (None, "forged", ""):
            status, answer, headers = http(url + "/api/next", token=token_sent)
            assert status == 401 and "valid labeller token" in answer["detail"], token_sent
            assert headers["content-security-policy"]  # refusals carry the headers too
        status, answer, _ = http(url + "/api/label", json.dumps({"pair": "x", "choice": "1"}).encode(), token="forged")
        assert status == 401
        status, answer, _ = http(url + "/api/next", token=token)
        assert status == 200 and answer["pair"] is not None
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_label_serve_binds_loopback_by_default(label_store, monkeypatch):
    import ddpo.server.label_app as label_app

    path, _ = label_store
    bound = []
    monkeypatch.setattr(label_app, "serve", lambda store, host, port: bound.append((host, port)))
    result = CliRunner().invoke(main, ["label", "serve", str(path)])
    assert result.exit_code == 0, result.output
    assert bound == [("127.0.0.1", 8766)] and "warning" not in result.stderr
    public = CliRunner().invoke(main, ["label", "serve", str(path), "--host", "0.0.0.0"])
    assert bound[-1][0] == "0.0.0.0" and "warning: binding 0.0.0.0" in public.stderr
