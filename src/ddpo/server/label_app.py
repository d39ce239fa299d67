"""`ddpo label serve`: the labelling web app (FastAPI on uvicorn) over a label store (`ddpo.preference.store`).

A labeller opens http://HOST:PORT/#token=TOKEN: the page (plain HTML and JS, no build step, `static/`) shows a
prompt and two images, and keys 1 / 2 / t / s choose the first, the second, a tie or skip; u (or Backspace)
undoes the last label. The token leaves the address bar at once and travels only in `Authorization: Bearer`.

    GET  /               the page (no data in it)           GET  /api/next      the next pair for this labeller
    POST /api/label      {"pair": ID, "choice": "1"}         POST /api/undo      undo this labeller's last label
    GET  /api/progress   pairs, labels per labeller          GET  /health        200 when serving (no token)

Every /api request needs a labeller's token (401 without one). A label is committed to SQLite before the
response leaves, so labels survive the server being killed. Prompts reach the page as JSON and are shown as
text (`textContent`), and the Content-Security-Policy allows no inline script: a prompt cannot run code.
"""

from __future__ import annotations

import base64
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel

from ddpo.preference.store import CHOICES, LabelStore, LabelStoreError, Pair

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8766
STATIC_FILES = {"label.js": "text/javascript", "label.css": "text/css"}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class LabelRequest(BaseModel):
    pair: str
    choice: str


def _static(name: str) -> str:
    return resources.files("ddpo.server").joinpath("static", name).read_text(encoding="utf-8")


def create_label_app(store_path: str | Path) -> FastAPI:
    """The app over the label store at `store_path` (which must exist: `ddpo label add-labeller` creates it)."""
    store = LabelStore(store_path)
    app = FastAPI(title="ddpo label", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for header, value in SECURITY_HEADERS.items():
            response.headers.setdefault(header, value)
        return response

    def labeller(request: Request) -> str:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        name = store.labeller_for_token(token.strip()) if scheme.lower() == "bearer" else None
        if name is None:
            raise HTTPException(401, "a valid labeller token is required (open the link `ddpo label add-labeller` printed)", headers={"WWW-Authenticate": "Bearer"})
        return name

    def pair_json(pair: Pair | None) -> dict | None:
        if pair is None:
            return None
        images = [f"data:image/png;base64,{base64.b64encode(store.image(h)).decode()}" for h in (pair.image_a, pair.image_b)]
        return {"id": pair.id, "prompt": pair.prompt, "images": images, "source": pair.source}

    def next_for(name: str) -> dict:
        return {"pair": pair_json(store.next_pair(name)), "progress": store.progress(name)}

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return _static("label.html")

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in STATIC_FILES:
            raise HTTPException(404, "no such file")
        return Response(_static(name), media_type=STATIC_FILES[name])

    @app.get("/health")
    def health() -> dict:
        return {"ok": True, "pairs": store.num_pairs()}

    @app.get("/api/next")
    def next_pair(name: str = Depends(labeller)) -> dict:
        return next_for(name)

    @app.get("/api/progress")
    def progress(name: str = Depends(labeller)) -> dict:
        return store.progress(name)

    @app.post("/api/label")
    def label(body: LabelRequest, name: str = Depends(labeller)) -> dict:
        if body.choice not in CHOICES:
            raise HTTPException(422, f"choice {body.choice!r} is not one of {', '.join(CHOICES)}")
        try:
            recorded = store.record(name, body.pair, body.choice)
        except LabelStoreError as error:
            raise HTTPException(404, str(error)) from error
        return {"label": {"id": recorded.id, "pair": recorded.pair, "choice": recorded.choice}, **next_for(name)}

    @app.post("/api/undo")
    def undo(name: str = Depends(labeller)) -> dict:
        undone = store.undo(name)
        # The undone pair comes back first, so the labeller can choose again.
        pair = store.pair(undone.pair) if undone is not None else store.next_pair(name)
        return {"undone": None if undone is None else {"pair": undone.pair, "choice": undone.choice}, "pair": pair_json(pair), "progress": store.progress(name)}

    @app.exception_handler(LabelStoreError)
    async def store_error(request: Request, error: LabelStoreError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=400)

    return app


def serve(store_path: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, log_level: str = "warning") -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_label_app(store_path), host=host, port=port, log_level=log_level, access_log=False)


class ServedInThread:
    """The app on uvicorn in a thread of this process, for experiments and tests: `with ServedInThread(store) as
    server: ... server.url ...`."""

    def __init__(self, store_path: str | Path, host: str = DEFAULT_HOST) -> None:
        import socket
        import threading

        import uvicorn

        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(create_label_app(store_path), host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ServedInThread":
        import time

        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the label app did not start on {self.url}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
