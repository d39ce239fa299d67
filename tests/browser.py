"""Open a local HTML page in real headless Chromium and report what a reader would see broken.

Chromium is driven through the DevTools protocol over `--remote-debugging-pipe` (JSON messages separated by
NUL bytes on file descriptors 3 and 4, what Puppeteer and Playwright use), so no Python package is needed:
the standard library talks to the browser directly.

    python tests/browser.py PAGE.html SCREENSHOT.png    # prints the findings as JSON; exit 1 if any problem
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-extensions", "--disable-dev-shm-usage", "--mute-audio",
    "--hide-scrollbars", "--remote-debugging-pipe",
)  # fmt: skip

# Run in the page after it loaded: every <img> decoded with a size, every chart <svg> laid out with content.
INSPECT_PAGE = """(() => {
  const images = [...document.images].map(img => ({alt: img.alt, complete: img.complete,
      width: img.naturalWidth, height: img.naturalHeight, shown: img.getBoundingClientRect().width}));
  const charts = [...document.querySelectorAll('svg.chart')].map(svg => {
      const box = svg.getBoundingClientRect();
      return {title: (svg.querySelector('.title') || {}).textContent || '', width: box.width, height: box.height,
              marks: svg.querySelectorAll('polyline, circle, polygon').length,
              note: (svg.querySelector('text.note') || {}).textContent || ''};
  });
  return {title: document.title, images, charts, text: document.body.innerText,
          height: document.documentElement.scrollHeight};
})()"""


@dataclass
class PageFindings:
    title: str = ""
    images: list[dict] = field(default_factory=list)
    charts: list[dict] = field(default_factory=list)
    text: str = ""
    console: list[str] = field(default_factory=list)
    """Console messages of level error or warning, uncaught exceptions, and browser log errors (e.g. a
    resource that failed to load or a Content-Security-Policy violation)."""
    screenshot: Path | None = None

    @property
    def broken_images(self) -> list[dict]:
        return [i for i in self.images if not i["complete"] or i["width"] == 0 or i["height"] == 0 or i["shown"] == 0]

    @property
    def empty_charts(self) -> list[dict]:
        return [c for c in self.charts if c["width"] == 0 or c["height"] == 0 or (c["marks"] == 0 and not c["note"])]


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class _Pipe:
    """The DevTools protocol over a pipe: send commands, collect events."""

    def __init__(self, to_browser: int, from_browser: int) -> None:
        self.to_browser, self.from_browser = to_browser, from_browser
        self.buffer = b""
        self.events: list[dict] = []
        self.next_id = 0

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self.buffer += chunk
        message, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(message)


def inspect_page(page: str | Path, screenshot: str | Path | None = None, *, chromium: str | None = None, width: int = 1400) -> PageFindings:
    """Load `page` (a local file) in headless Chromium; return what loaded, what broke, and save a full-page
    screenshot (PNG) to `screenshot` when given."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found (apt-get install chromium)")
    url = Path(page).resolve().as_uri()
    # The child's ends sit at fd >= 10 (close-on-exec) so that placing them at 3 and 4 cannot overwrite each other.
    to_browser_read, to_browser_write = _high_pipe()
    from_browser_read, from_browser_write = _high_pipe()

    def child_fds() -> None:  # the browser reads commands on fd 3 and writes replies on fd 4
        os.dup2(to_browser_read, 3)
        os.dup2(from_browser_write, 4)

    with tempfile.TemporaryDirectory(prefix="ddpo-chromium-") as profile:
        process = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},1000", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=child_fds, close_fds=False,  # dup2 leaves 3 and 4 inheritable; every other fd here is close-on-exec
        )  # fmt: skip
        os.close(to_browser_read)
        os.close(from_browser_write)
        pipe = _Pipe(to_browser_write, from_browser_read)
        try:
            target = pipe.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                pipe.call(f"{domain}.enable", session=session)
            pipe.call("Page.navigate", {"url": url}, session=session)
            pipe.wait_for("Page.loadEventFired")
            result = pipe.call("Runtime.evaluate", {"expression": INSPECT_PAGE, "returnByValue": True}, session=session)
            value = result["result"]["value"]
            findings = PageFindings(title=value["title"], images=value["images"], charts=value["charts"], text=value["text"])
            if screenshot is not None:
                height = min(int(value["height"]), 16000)
                pipe.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
                shot = pipe.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=session)
                Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
                findings.screenshot = Path(screenshot)
            findings.console = _problems(pipe.events)
            return findings
        finally:
            try:
                pipe.call("Browser.close", timeout=10)
            except (RuntimeError, TimeoutError, OSError):
                pass
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            os.close(to_browser_write)
            os.close(from_browser_read)


def _high_pipe() -> tuple[int, int]:
    read, write = os.pipe()
    high = fcntl.fcntl(read, fcntl.F_DUPFD_CLOEXEC, 10), fcntl.fcntl(write, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(read)
    os.close(write)
    return high


def _problems(events: list[dict]) -> list[str]:
    problems = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
            problems.append(f"console.{params['type']}: " + " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            problems.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") in ("error", "warning"):
            entry = params["entry"]
            problems.append(f"log {entry['level']} ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip())
    return problems


if __name__ == "__main__":
    found = inspect_page(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
    print(json.dumps({"title": found.title, "images": len(found.images), "charts": len(found.charts),
                      "broken_images": found.broken_images, "empty_charts": found.empty_charts, "console": found.console}, indent=2))  # fmt: skip
    sys.exit(1 if found.broken_images or found.empty_charts or found.console else 0)
