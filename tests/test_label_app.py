"""The labelling app in real headless Chromium: a labeller labels 20 pairs with the keyboard (undo included), the
server is killed with SIGKILL and restarted, and every label is still there; a prompt holding a script tag is
shown as text; requests without a valid token are refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from browser import ChromiumPage, require_chromium
from ddpo.preference.store import LabelStore
from ddpo.shapes.labeller import rendered_pairs

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

# Screenshots for people to look at, kept only where DDPO_TEST_ARTIFACTS names a folder (CI): tests write only under
# their temporary directories otherwise.
ARTIFACTS = Path(os.environ["DDPO_TEST_ARTIFACTS"]) if os.environ.get("DDPO_TEST_ARTIFACTS") else None
SCRIPT_PROMPT = "<script>alert(1)</script>"
KEYS = ["1", "2", "t", "s"]  # first, second, tie, skip
CHOICE_OF_KEY = {"1": "1", "2": "2", "t": "tie", "s": "skip"}
READY = "document.body.dataset.state === 'ready'"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabelServerProcess:
    """`ddpo label serve` in its own process, so that it can be killed like a crashed server."""

    def __init__(self, store: Path, port: int) -> None:
        self.store, self.port, self.url = store, port, f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> "LabelServerProcess":
        command = [sys.executable, "-m", "ddpo.cli", "label", "serve", str(self.store), "--port", str(self.port)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError):
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"ddpo label serve exited: {self.process.stderr.read().decode()}")
            assert time.monotonic() < deadline, "ddpo label serve did not start in 60 s"
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no shutdown handler, no flush, no chance to finish anything."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def request(url: str, *, token: str | None = None, scheme: str = "Bearer", body: dict | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"{scheme} {token}"
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET"), timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture
def chromium():
    return require_chromium("Chromium is not installed (`make test` runs `apt-get install -y chromium`)")


@pytest.fixture
def store_with_pairs(tmp_path):
    """A store with 24 Shapes pairs and, shown first (higher priority), one whose prompt is a script tag."""
    path = tmp_path / "labels.db"
    store = LabelStore(path)
    pairs = rendered_pairs(24, seed=3)
    store.add_pairs([(SCRIPT_PROMPT, pairs[0].image_b, pairs[0].image_a)], source="test", priority=1)
    store.add_pairs([(p.prompt, p.image_a, p.image_b) for p in pairs], source="test")
    tokens = {name: store.add_labeller(name) for name in ("alice", "bob")}
    store.close()
    return path, tokens


def test_labels_made_by_keyboard_in_chromium_survive_a_killed_server(store_with_pairs, chromium, tmp_path):
    store_path, tokens = store_with_pairs
    server = LabelServerProcess(store_path, free_port()).start()
    try:
        with ChromiumPage(chromium=chromium, width=900, height=900) as page:
            page.navigate(f"{server.url}/#token={tokens['alice']}")
            page.wait_until(READY)
            assert page.evaluate("location.hash") == "", "the token must leave the address bar"
            page.wait_until("[1, 2].every(i => document.getElementById('image-' + i).naturalWidth === 32)")

            # The script-tag prompt is shown as text: no element inside it, no dialog, exactly the characters.
            assert page.evaluate("document.getElementById('prompt').textContent") == SCRIPT_PROMPT
            assert page.evaluate("document.querySelectorAll('#prompt *').length") == 0
            assert page.evaluate("[...document.scripts].map(s => s.src.replace(location.origin, ''))") == ["/static/label.js"]

            expected: dict[str, str] = {}
            pressed = 0
            while pressed < 20:
                pair = page.evaluate("document.body.dataset.pair")
                key = KEYS[pressed % len(KEYS)]
                page.press(key)
                page.wait_until(f"{READY} && document.body.dataset.pair !== {json.dumps(pair)}")
                expected[pair] = CHOICE_OF_KEY[key]
                pressed += 1
                if pressed == 5:  # undo brings the pair back; label it again, differently
                    page.press("u")
                    page.wait_until(f"{READY} && document.body.dataset.pair === {json.dumps(pair)}")
                    assert "Undone" in page.evaluate("document.getElementById('message').textContent")
                    page.press("2")
                    page.wait_until(f"{READY} && document.body.dataset.pair !== {json.dumps(pair)}")
                    expected[pair] = "2"
                if pressed == 8:
                    page.screenshot(tmp_path / "label-app.png", full_page=False)
            assert len(expected) == 20
            assert "You: 20 labelled" in page.evaluate("document.getElementById('progress').textContent")
            assert page.events("Page.javascriptDialogOpening") == [], "a prompt ran script"
            assert page.problems == [], page.problems

            server.kill()
            server.start()  # the same store, the same port
            page.navigate(f"{server.url}/")  # the token is kept for the tab, not in the URL
            page.wait_until(READY)
            assert "You: 20 labelled" in page.evaluate("document.getElementById('progress').textContent")
            assert "alice 20" in page.evaluate("document.getElementById('labellers').textContent")

        with LabelStore(store_path) as store:
            labels = store.labels(labeller="alice")
            assert {label.pair: label.choice for label in labels} == expected
            assert len(labels) == 20
            assert len(store.labels(include_undone=True)) == 21  # the undone label is kept, marked undone
            assert store.next_pair("alice").id not in expected
    finally:
        server.stop()
    if ARTIFACTS is not None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "label-app.png", ARTIFACTS / "label-app.png")


def test_requests_without_a_valid_token_are_refused(store_with_pairs, chromium):
    store_path, tokens = store_with_pairs
    server = LabelServerProcess(store_path, free_port()).start()
    try:
        with LabelStore(store_path) as store:
            pair = store.next_pair("alice").id
        for token, scheme in ((None, "Bearer"), ("not-a-token", "Bearer"), (tokens["alice"], "Basic"), ("", "Bearer")):
            for path, body in (("/api/next", None), ("/api/progress", None), ("/api/label", {"pair": pair, "choice": "1"}), ("/api/undo", {})):
                status, reply = request(server.url + path, token=token, scheme=scheme, body=body)
                assert status == 401, (path, token, scheme, status)
                assert "token" in reply["detail"]
        assert request(server.url + "/api/next", token=tokens["bob"])[0] == 200
        with LabelStore(store_path) as store:
            assert store.labels(include_undone=True) == []  # nothing refused was written

        with ChromiumPage(chromium=chromium, width=900, height=700) as page:
            page.navigate(f"{server.url}/#token=forged")
            page.wait_until("document.body.dataset.state === 'denied'")
            assert "no valid labeller token" in page.evaluate("document.getElementById('message').textContent")
            assert page.evaluate("document.getElementById('prompt').textContent") == ""
    finally:
        server.stop()


def test_the_app_binds_loopback_by_default_and_serves_no_inline_script(store_with_pairs):
    from ddpo.cli_people import label_serve
    from ddpo.server.label_app import SECURITY_HEADERS, _static

    assert {param.name: param.default for param in label_serve.params}["host"] == "127.0.0.1"  # the command's own default
    assert "script-src 'self'" in SECURITY_HEADERS["Content-Security-Policy"]
    assert "<script>" not in _static("label.html") and "innerHTML" not in _static("label.js")
