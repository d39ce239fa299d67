"""Reward server throughput: images/s and batch sizes reached by `ddpo serve-reward` under concurrent clients,
against calling the same reward in process.

The server runs as its own process (`python -m ddpo.cli serve-reward`, one torch thread); `--clients`
threads of this process each send `--requests` requests of `--batch` random RGB images through the `remote`
reward (base64 PNG in JSON, as training does). The in-process figure calls the reward directly on the same
batches, one after another. The server's own counters (`GET /health`) give the reward calls it made and the
largest batch it formed.

    python benchmarks/reward_server.py                                       # jpeg_compressibility
    python benchmarks/reward_server.py --reward shapes_alignment --size 32   # the Shapes describer + BERTScore
    python benchmarks/reward_server.py --reward clip_score --tiny-clip       # a tiny random CLIP built in code

Prints numbers only; the last line is `served_images_per_second=X.X`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(url: str, server: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=1).close()
            return
        except OSError:
            if server.poll() is not None:
                sys.exit(f"the reward server exited with status {server.returncode}")
            if time.monotonic() > deadline:
                sys.exit("the reward server did not start")
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward", default="jpeg_compressibility")
    parser.add_argument("--kwargs", default="{}", help="the reward's kwargs as JSON")
    parser.add_argument("--tiny-clip", action="store_true", help="build a tiny random CLIP and pass it as kwargs.model")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--batch", type=int, default=4, help="images per request")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--max-batch", type=int, default=64, help="the server's --max-batch")
    args = parser.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from ddpo.rewards import build_reward

    torch.set_num_threads(1)
    kwargs = json.loads(args.kwargs)
    if args.tiny_clip:
        from ddpo.rewards.tiny import save_tiny_clip

        kwargs["model"] = str(save_tiny_clip(tempfile.mkdtemp(prefix="tiny-clip-"), image_size=args.size))
    rng = np.random.default_rng(0)
    batches = [
        [Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)) for _ in range(args.batch)]
        for _ in range(args.clients * args.requests)
    ]
    prompts, metadata = ["a red circle"] * args.batch, [{}] * args.batch
    total_images = len(batches) * args.batch
    print(f"reward={args.reward} clients={args.clients} requests_per_client={args.requests} images_per_request={args.batch} "
          f"size={args.size} server_max_batch={args.max_batch} torch_threads=1 loadavg={os.getloadavg()[0]:.2f}")

    reward = build_reward(args.reward, **kwargs)
    reward(batches[0], prompts, metadata)  # warm up
    started = time.perf_counter()
    for images in batches:
        reward(images, prompts, metadata)
    in_process = total_images / (time.perf_counter() - started)
    print(f"in_process_images_per_second={in_process:.1f}  (one call per request, {len(batches)} calls)")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "ddpo.cli", "serve-reward", "--reward", args.reward, "--kwargs", json.dumps(kwargs),
               "--port", str(port), "--max-batch", str(args.max_batch)]  # fmt: skip
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until_healthy(url, server)
        remote = build_reward("remote", url=url, retries=0)
        remote(batches[0], prompts, metadata)  # warm up (and the first model call)
        with urllib.request.urlopen(url + "/health") as response:
            before = json.loads(response.read())["stats"]
        latencies: list[float] = []
        errors: list[BaseException] = []
        barrier = threading.Barrier(args.clients)

        def client(index: int) -> None:
            barrier.wait()
            for request in range(args.requests):
                sent = time.perf_counter()
                try:
                    remote(batches[index * args.requests + request], prompts, metadata)
                except BaseException as error:  # noqa: BLE001 - counted and reported
                    errors.append(error)
                latencies.append(time.perf_counter() - sent)

        threads = [threading.Thread(target=client, args=(index,)) for index in range(args.clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
        with urllib.request.urlopen(url + "/health") as response:
            after = json.loads(response.read())["stats"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    if errors:
        sys.exit(f"{len(errors)} requests failed; first: {errors[0]}")
    calls = after["reward_calls"] - before["reward_calls"]
    images = after["images"] - before["images"]
    reward_seconds = after["reward_seconds"] - before["reward_seconds"]
    print(f"requests={len(batches)} reward_calls={calls} mean_batch_images={images / calls:.1f} largest_batch_images={after['largest_batch']}")
    print(f"latency_median_seconds={np.median(latencies):.3f} latency_p95_seconds={np.percentile(latencies, 95):.3f} "
          f"server_reward_busy_fraction={reward_seconds / seconds:.2f}")
    print(f"served_images_per_second={total_images / seconds:.1f}")


if __name__ == "__main__":
    main()
