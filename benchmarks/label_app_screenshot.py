"""Screenshot of the labelling app (docs/label-app.png) showing pairs as online FDFO queues them.

Samples pairs from the shipped Shapes flow twin the way `shapes/fdfo_human` does (one initial noise per pair,
churned apart), queues them in a fresh label store, serves the app, labels a few pairs in headless Chromium by
keyboard and saves a screenshot of the page.

    python benchmarks/label_app_screenshot.py --out docs/label-app.png
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from browser import ChromiumPage  # noqa: E402

from ddpo.training.assemble import load_config  # noqa: E402
from ddpo.policy import build_policy  # noqa: E402
from ddpo.preference.store import LabelStore  # noqa: E402

PROMPTS = ["red circles", "triangles", "magenta squares", "crosses", "blue triangles", "circles"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/label-app.png")
    parser.add_argument("--port", type=int, default=8797)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import uvicorn

    from ddpo.server.label_app import create_label_app

    config = load_config("shapes/fdfo_human")
    policy = build_policy(config, sampler="churn")
    prompts = [p for p in PROMPTS for _ in range(2)]
    generators = [torch.Generator().manual_seed(1000 + i) for i in range(len(prompts))]
    initial = [torch.Generator().manual_seed(2000 + i // 2) for i in range(len(prompts))]
    with torch.no_grad():
        images = policy.sample(prompts, generators, [{}] * len(prompts), initial_noise_generators=initial).images
    with tempfile.TemporaryDirectory() as directory:
        store = LabelStore(Path(directory) / "labels.db")
        store.add_pairs([(prompts[i], images[i], images[i + 1]) for i in range(0, len(images), 2)], source="online", priority=1)
        token = store.add_labeller("alice")
        store.add_labeller("bob")
        server = uvicorn.Server(uvicorn.Config(create_label_app(store.path), host="127.0.0.1", port=args.port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        try:
            with ChromiumPage(width=900, height=800) as page:
                page.navigate(f"http://127.0.0.1:{args.port}/#token={token}")
                for key in ("1", "2"):
                    page.wait_until("document.body.dataset.state === 'ready'")
                    pair = page.evaluate("document.body.dataset.pair")
                    page.press(key)
                    page.wait_until(f"document.body.dataset.state === 'ready' && document.body.dataset.pair !== '{pair}'")
                page.wait_until("[1, 2].every(i => document.getElementById('image-' + i).naturalWidth > 0)")
                page.screenshot(args.out, full_page=False)
        finally:
            server.should_exit = True
            thread.join(timeout=10)
    print(args.out)


if __name__ == "__main__":
    main()
