"""Open a local HTML page in real headless Chromium and report what a reader would see broken.

Chromium is driven through the DevTools protocol over `--remote-debugging-pipe` (JSON messages separated by
NUL bytes on file descriptors 3 and 4, what Puppeteer and Playwright use), so no Python package is needed:
the standard library talks to the browser directly.

    python tests/browser.py PAGE.html SCREENSHOT.png    # prints the findings as JSON; exit 1 if any problem

`inspect_page` loads a file and reports; `ChromiumPage` is the session underneath, for tests that drive a page
(navigate, run JavaScript, wait for a condition, press keys with `Input.dispatchKeyEvent`, take screenshots).
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


def require_chromium(reason: str) -> str:
    """Chromium's path; without it the browser test is skipped, except in CI (the `CI` environment variable
    set), where a missing browser fails the test: CI must not pass with its browser tests skipped."""
    import pytest

    path = find_chromium()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and Chromium is missing: install it (`make chromium`) so the browser tests run ({reason})")
        pytest.skip(reason)
    return path


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

    def wait_for(self, method: str, timeout: float = 60, *, after: int = 0) -> dict:
        """The first event `method` among those received from index `after` on, waiting for it if need be."""
        deadline = time.monotonic() + timeout
        for event in self.events[after:]:
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


# Keys for Input.dispatchKeyEvent: key -> (code, Windows virtual key code); printable keys also send text.
_SPECIAL_KEYS = {"Backspace": ("Backspace", 8), "Enter": ("Enter", 13), "Escape": ("Escape", 27), "Tab": ("Tab", 9)}


class ChromiumPage:
    """Headless Chromium with one page, over the DevTools pipe; use as a context manager.

        with ChromiumPage() as page:
            page.navigate("http://127.0.0.1:8766/")
            page.wait_until("document.body.dataset.state === 'ready'")
            page.press("1")
    """

    def __init__(self, *, chromium: str | None = None, width: int = 1400, height: int = 1000) -> None:
        self.chromium = chromium or find_chromium()
        if self.chromium is None:
            raise FileNotFoundError("no Chromium found (apt-get install chromium)")
        self.width, self.height = width, height

    def __enter__(self) -> "ChromiumPage":
        # The child's ends sit at fd >= 10 (close-on-exec) so that placing them at 3 and 4 cannot overwrite each other.
        to_browser_read, to_browser_write = _high_pipe()
        from_browser_read, from_browser_write = _high_pipe()

        def child_fds() -> None:  # the browser reads commands on fd 3 and writes replies on fd 4
            os.dup2(to_browser_read, 3)
            os.dup2(from_browser_write, 4)

        self._profile = tempfile.TemporaryDirectory(prefix="ddpo-chromium-")
        self.process = subprocess.Popen(
            [self.chromium, *CHROMIUM_FLAGS, f"--user-data-dir={self._profile.name}", f"--window-size={self.width},{self.height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=child_fds, close_fds=False,  # dup2 leaves 3 and 4 inheritable; every other fd here is close-on-exec
        )  # fmt: skip
        os.close(to_browser_read)
        os.close(from_browser_write)
        self.pipe = _Pipe(to_browser_write, from_browser_read)
        try:
            target = self.pipe.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self.pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                self.call(f"{domain}.enable")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.pipe.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.pipe.to_browser)
        os.close(self.pipe.from_browser)
        self._profile.cleanup()

    def call(self, method: str, params: dict | None = None, timeout: float = 60) -> dict:
        """A DevTools command on the page's session."""
        return self.pipe.call(method, params, session=self.session, timeout=timeout)

    def navigate(self, url: str, timeout: float = 60) -> None:
        """Load `url` and wait for its load event."""
        seen = len(self.pipe.events)
        self.call("Page.navigate", {"url": url})
        self.pipe.wait_for("Page.loadEventFired", timeout, after=seen)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited); page exceptions raise."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails'].get('exception', {}).get('description')}")
        return result["result"].get("value")

    def wait_until(self, expression: str, timeout: float = 10, interval: float = 0.05):
        """Evaluate `expression` until it is truthy; returns its value, or raises TimeoutError naming it."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never satisfied {expression!r} (last value {value!r})")
            time.sleep(interval)

    def press(self, key: str) -> None:
        """A real key press (keyDown, keyUp) as the page's focused document receives it: "1", "t", "Backspace"."""
        if key in _SPECIAL_KEYS:
            code, virtual = _SPECIAL_KEYS[key]
            down = {"key": key, "code": code, "windowsVirtualKeyCode": virtual}
        elif len(key) == 1:
            code = f"Digit{key}" if key.isdigit() else f"Key{key.upper()}" if key.isalpha() else ""
            down = {"key": key, "code": code, "text": key, "unmodifiedText": key, "windowsVirtualKeyCode": ord(key.upper())}
        else:
            raise ValueError(f"press: no key {key!r}")
        self.call("Input.dispatchKeyEvent", {"type": "keyDown", **down})
        self.call("Input.dispatchKeyEvent", {"type": "keyUp", **{k: v for k, v in down.items() if k not in ("text", "unmodifiedText")}})

    def screenshot(self, path: str | Path, *, full_page: bool = True) -> Path:
        """Save a PNG of the page (its full height unless `full_page` is false)."""
        if full_page:
            height = min(int(self.evaluate("document.documentElement.scrollHeight")), 16000)
            self.call("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        shot = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": full_page})
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(base64.b64decode(shot["data"]))
        return Path(path)

    def events(self, method: str) -> list[dict]:
        """Every event `method` received so far (e.g. "Page.javascriptDialogOpening")."""
        return [event for event in self.pipe.events if event.get("method") == method]

    @property
    def problems(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions and browser log errors so far."""
        return _problems(self.pipe.events)


def inspect_page(page: str | Path, screenshot: str | Path | None = None, *, chromium: str | None = None, width: int = 1400) -> PageFindings:
    """Load `page` (a local file) in headless Chromium; return what loaded, what broke, and save a full-page
    screenshot (PNG) to `screenshot` when given."""
    with ChromiumPage(chromium=chromium, width=width) as browser:
        browser.navigate(Path(page).resolve().as_uri())
        value = browser.evaluate(INSPECT_PAGE)
        findings = PageFindings(title=value["title"], images=value["images"], charts=value["charts"], text=value["text"])
        if screenshot is not None:
            findings.screenshot = browser.screenshot(screenshot)
        findings.console = browser.problems
        return findings


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
