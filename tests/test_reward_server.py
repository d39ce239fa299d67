"""The reward server on loopback: same scores as in process, concurrent requests batched, bad requests
refused with a message while it keeps serving; the `remote` reward's retries and failures."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the reward server needs ddpo[server]")
pytest.importorskip("uvicorn", reason="the reward server needs ddpo[server]")

import reward_server_helpers as helpers  # noqa: E402
from reward_server_helpers import running_server  # noqa: E402

from ddpo.rewards import RewardError, build_reward, checked_reward  # noqa: E402
from ddpo.rewards.remote import RemoteRewardError  # noqa: E402
from ddpo.rewards.wire import encode_png, encode_request  # noqa: E402
from ddpo.server.reward_server import ServerLimits  # noqa: E402


def noise_images(count: int, seed: int = 0, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def post(url: str, body: bytes, content_type: str = "application/json", token: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url + "/score", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        assert response.status == 200
        return json.loads(response.read())


def test_served_scores_equal_the_in_process_reward():
    reward = build_reward("jpeg_compressibility")
    images, prompts = noise_images(3) + [Image.new("RGB", (32, 32), (200, 30, 30))], ["a", "b", "c", "d"]
    expected = reward(images, prompts, [{}] * 4).scores
    with running_server(reward) as (url, _):
        assert health(url)["reward"] == "jpeg_compressibility"
        served = build_reward("remote", url=url, expect="jpeg_compressibility")(images, prompts, [{}] * 4).scores
    assert served.dtype == np.float32
    np.testing.assert_array_equal(served, expected)  # PNG is lossless and float32 survives JSON exactly


def test_served_model_reward_equals_in_process(tmp_path):
    from ddpo.rewards.tiny import save_tiny_clip

    reward = build_reward("clip_score", model=str(save_tiny_clip(tmp_path / "clip")), device="cpu")
    images, prompts = noise_images(4, seed=1), ["a red circle", "a cat", "two dogs playing chess", "a cat"]
    with running_server(reward) as (url, _):
        served = build_reward("remote", url=url)(images, prompts, [{}] * 4).scores
    np.testing.assert_array_equal(served, reward(images, prompts, [{}] * 4).scores)


def test_32_concurrent_clients_are_batched_and_each_gets_its_own_scores():
    helpers.SLOW_CALLS.clear()
    reward = checked_reward("slow_mean_pixel", helpers.slow_mean_pixel)
    clients = 32
    requests = [(noise_images(2, seed=client), [{"offset": client}, {"offset": client}]) for client in range(clients)]
    results: dict[int, np.ndarray] = {}
    infos: dict[int, dict] = {}
    errors: list[BaseException] = []
    with running_server(reward) as (url, _):
        remote = build_reward("remote", url=url)
        barrier = threading.Barrier(clients)

        def client(index: int) -> None:
            images, metadata = requests[index]
            barrier.wait()
            try:
                output = remote(images, ["a", "b"], metadata)
                results[index] = output.scores
                infos[index] = output.info
            except BaseException as error:  # noqa: BLE001 - reported by the assertion below
                errors.append(error)

        threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        stats = health(url)["stats"]
    assert not errors, errors[0]
    for index, (images, metadata) in enumerate(requests):
        expected = helpers.mean_pixel(images, ["a", "b"], metadata).scores
        np.testing.assert_array_equal(results[index], expected)
        np.testing.assert_array_equal(np.asarray(infos[index]["doubled"], dtype=np.float32), 2 * expected)  # per-image info sliced
        assert infos[index]["batch_size"] >= 2  # batch-level info passed whole
    assert stats["requests"] == clients and stats["images"] == 2 * clients
    assert stats["reward_calls"] == len(helpers.SLOW_CALLS) < clients  # fewer model calls than requests
    assert stats["largest_batch"] == max(helpers.SLOW_CALLS) > 2
    print(f"32 clients x 2 images: {stats['reward_calls']} reward calls, largest batch {stats['largest_batch']} images")


def test_bad_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving():
    reward = checked_reward("mean_pixel", helpers.mean_pixel)
    limits = ServerLimits(max_body_bytes=200_000, max_request_images=4)
    good = encode_request(noise_images(2), ["a", "b"], [{}, {}])
    png = base64.b64decode(encode_png(noise_images(1)[0]))
    truncated = base64.b64encode(png[: len(png) // 2]).decode()
    jpeg = io.BytesIO()
    noise_images(1)[0].save(jpeg, format="JPEG")

    def body(images, prompts) -> bytes:
        return json.dumps({"images": images, "prompts": prompts}).encode()

    cases = {
        "garbage PNG": (body([base64.b64encode(b"\x89PNG\r\n\x1a\nnot really").decode()], ["a"]), "application/json", "t", 400, "images[0] is not a readable PNG"),
        "truncated PNG": (body([truncated], ["a"]), "application/json", "t", 400, "images[0] is not a readable PNG"),
        "not base64": (body(["%%%"], ["a"]), "application/json", "t", 400, "images[0] is not valid base64"),
        "a JPEG": (body([base64.b64encode(jpeg.getvalue()).decode()], ["a"]), "application/json", "t", 400, "images[0] is not a PNG"),
        "not JSON": (b"{images: [", "application/json", "t", 400, "the body is not valid JSON"),
        "wrong content type": (good, "text/plain", "t", 415, "content type 'text/plain' is not supported: send application/json"),
        "pickle content type": (good, "application/python-pickle", "t", 415, "is not supported"),
        "oversize body": (body([encode_png(noise_images(1, size=256)[0])] * 4, ["a"] * 4), "application/json", "t", 413, "over the server's limit of 200000"),
        "too many images": (body([encode_png(noise_images(1, size=8)[0])] * 5, ["a"] * 5), "application/json", "t", 413, "over the server's limit of 4 per request"),
        "missing token": (good, "application/json", None, 401, "missing Authorization header"),
        "wrong token": (good, "application/json", "nope", 401, "wrong bearer token"),
        "wrong-length prompts": (body(json.loads(good)["images"], ["a"]), "application/json", "t", 400, "got 2 images, 1 prompts and 2 metadata entries"),
        "prompts not strings": (body(json.loads(good)["images"], ["a", 3]), "application/json", "t", 400, "'prompts' must be a list of strings"),
        "no images": (body([], []), "application/json", "t", 400, "the request has no images"),
    }
    with running_server(reward, token="t", limits=limits) as (url, _):
        for case, (data, content_type, token, status, message) in cases.items():
            got_status, answer = post(url, data, content_type, token)
            assert (got_status, case) == (status, case), answer
            assert message in answer["detail"], (case, answer)
            assert "\n" not in answer["detail"]
            ok_status, ok = post(url, good, token="t")  # still serving
            assert ok_status == 200 and len(ok["scores"]) == 2, case
        stats = health(url)["stats"]
    assert stats["refused"] == len(cases) and stats["requests"] == len(cases)


def test_a_failing_request_fails_alone_in_its_batch():
    reward = checked_reward("fails_on_boom", helpers.fails_on_boom)
    answers: dict[str, tuple[int, dict]] = {}
    with running_server(reward, limits=ServerLimits(batch_wait_seconds=0.2)) as (url, _):
        def client(prompt: str) -> None:
            answers[prompt] = post(url, encode_request(noise_images(1), [prompt], [{}]))

        threads = [threading.Thread(target=client, args=(prompt,)) for prompt in ("fine", "boom", "also fine")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    assert answers["fine"][0] == answers["also fine"][0] == 200
    status, answer = answers["boom"]
    assert status == 500
    assert answer["detail"] == "RewardError: reward 'fails_on_boom' raised ValueError: cannot score 'boom' on prompt 'boom'"


def test_remote_retries_with_backoff_then_names_the_server_and_why():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    from ddpo.rewards.remote import RemoteReward

    remote = checked_reward("remote", RemoteReward(f"http://127.0.0.1:{port}", retries=2, backoff=0.1))
    started = time.monotonic()
    with pytest.raises(RewardError) as error:
        remote(noise_images(1), ["a cat"], [{}])
    assert time.monotonic() - started >= 0.3  # waited 0.1 + 0.2 s between the 3 attempts
    message = str(error.value)
    assert message.startswith(f"reward 'remote' raised RemoteRewardError: reward server http://127.0.0.1:{port} failed 3 attempts")
    assert "ConnectionRefusedError" in message and message.endswith("on prompt 'a cat'")


def test_remote_does_not_retry_a_refusal_and_passes_on_the_servers_message():
    reward = checked_reward("mean_pixel", helpers.mean_pixel)
    with running_server(reward, token="right") as (url, _):
        from ddpo.rewards.remote import RemoteReward

        started = time.monotonic()
        with pytest.raises(RemoteRewardError, match=rf"^reward server {url} refused the batch \(HTTP 401: wrong bearer token\)$"):
            RemoteReward(url, token="wrong", retries=3, backoff=5.0)(noise_images(1), ["a"], [{}])
        assert time.monotonic() - started < 5  # no backoff for a refusal
        scores = RemoteReward(url + "/score", token="right")(noise_images(1), ["a"], [{}]).scores
        assert scores.shape == (1,)


def test_remote_checks_the_served_reward_at_build():
    with running_server(checked_reward("mean_pixel", helpers.mean_pixel)) as (url, _):
        with pytest.raises(RemoteRewardError, match=rf"reward server {url} serves 'mean_pixel', not 'aesthetic'"):
            build_reward("remote", url=url, expect="aesthetic")
    with pytest.raises(RemoteRewardError, match=rf"reward server {url} is not answering /health: .*ConnectionRefusedError"):
        build_reward("remote", url=url)


def test_reward_url_in_the_config():
    from ddpo.config import ConfigError
    from ddpo.training.assemble import load_config
    from ddpo.rewards import build_reward_from_config

    with running_server(checked_reward("mean_pixel", helpers.mean_pixel)) as (url, _):
        config = load_config("shapes/default", [f'reward.url="{url}"', 'reward.name="remote"', "reward.kwargs={retries = 1}"])
        reward = build_reward_from_config(config.reward)
        assert reward.reward.retries == 1
        np.testing.assert_array_equal(reward(noise_images(1), ["a"], [{}]).scores, helpers.mean_pixel(noise_images(1), ["a"], [{}]).scores)
        with pytest.raises(RemoteRewardError, match="serves 'mean_pixel', not 'shapes_alignment_soft'"):
            build_reward_from_config(load_config("shapes/default", [f'reward.url="{url}"']).reward)
    with pytest.raises(ConfigError, match="reward.url serves one reward"):
        load_config("shapes/default", ['reward.url="http://x"', 'reward.terms=[{name="jpeg_compressibility", weight=1.0}]'])
    with pytest.raises(ConfigError, match="reward.kwargs: .*'remote' does not accept"):
        load_config("shapes/default", ['reward.url="http://x"', "reward.kwargs={model='m'}"])


def test_serve_reward_cli_refuses_bad_input_in_one_line():
    from click.testing import CliRunner

    from ddpo.cli import main

    result = CliRunner().invoke(main, ["serve-reward", "--reward", "jpeg_compressability"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] .startswith("ddpo: error: unknown reward 'jpeg_compressability' (did you mean 'jpeg_compressibility'?)")
    result = CliRunner().invoke(main, ["serve-reward", "--reward", "jpeg_compressibility", "--kwargs", "[1]"])
    assert result.exit_code == 2 and "--kwargs must be a JSON object" in result.output
    result = CliRunner().invoke(main, ["serve-reward", "--reward", "clip_score", "--kwargs", '{"model": "/no/such/clip"}'])
    assert result.exit_code == 2 and "ddpo: error: reward 'clip_score' cannot load its CLIP model from '/no/such/clip'" in result.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve-reward", "--reward", "jpeg_compressibility", "--port", str(port)])
    assert result.exit_code == 2
    assert f"ddpo: error: cannot listen on 127.0.0.1:{port}: Address already in use" in result.output


def test_a_refused_large_batch_gets_the_message_not_a_broken_pipe():
    """A client sending a big body to a server that refuses it (wrong token) reads the refusal."""
    from ddpo.rewards.remote import RemoteReward

    with running_server(checked_reward("mean_pixel", helpers.mean_pixel), token="right") as (url, _):
        big = noise_images(16, size=256)  # ~3 MB of PNG
        with pytest.raises(RemoteRewardError, match=r"refused the batch \(HTTP 401: wrong bearer token\)$"):
            RemoteReward(url, token="wrong", retries=0)(big, ["a"] * 16, [{}] * 16)


def test_remote_retries_a_busy_server_and_then_gets_its_scores():
    """A server answering 503 twice, then scores: the reward waits out the backoff and returns the scores."""
    import http.server

    answers = [(503, {"detail": "busy"}), (503, {"detail": "busy"}), (200, {"scores": [0.25], "info": {}})]
    seen: list[int] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            self.rfile.read(int(self.headers["Content-Length"]))
            status, body = answers[len(seen)]
            seen.append(status)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        from ddpo.rewards.remote import RemoteReward

        started = time.monotonic()
        scores = RemoteReward(f"http://127.0.0.1:{server.server_address[1]}", retries=2, backoff=0.1)(noise_images(1), ["a"], [{}]).scores
    finally:
        server.shutdown()
    assert seen == [503, 503, 200] and scores.tolist() == [0.25]
    assert time.monotonic() - started >= 0.3


def test_remote_does_not_retry_a_failing_served_reward_and_passes_on_its_message():
    from ddpo.rewards.remote import RemoteReward

    reward = checked_reward("fails_on_boom", helpers.fails_on_boom)
    with running_server(reward) as (url, _):
        with pytest.raises(RemoteRewardError) as error:
            RemoteReward(url, retries=3, backoff=5.0)(noise_images(1), ["boom"], [{}])
        assert health(url)["stats"]["reward_calls"] == 1  # not retried
    assert str(error.value) == (
        f"reward server {url} failed to score the batch (HTTP 500: RewardError: reward 'fails_on_boom' raised ValueError: "
        "cannot score 'boom' on prompt 'boom')"
    )


def test_metadata_travels_as_json_and_what_json_cannot_carry_is_named():
    with running_server(checked_reward("mean_pixel", helpers.mean_pixel)) as (url, _):
        remote = build_reward("remote", url=url)
        scores = remote(noise_images(1), ["a"], [{"offset": np.float32(2.0), "tags": np.array([1, 2])}]).scores
        assert scores[0] == pytest.approx(helpers.mean_pixel(noise_images(1), ["a"], [{}]).scores[0] + 2.0)
        with pytest.raises(RewardError, match=r"raised TypeError: metadata value <object object at .*> \(object\) cannot be sent to a reward server as JSON"):
            remote(noise_images(1), ["a"], [{"thing": object()}])


def multipart_body(fields: list[tuple[str, bool, bytes]], boundary: str = "ddpo-test-boundary-7f3a") -> tuple[bytes, str]:
    """A multipart/form-data body of (name, is_file, data) fields, as browsers and HTTP libraries send it."""
    parts = []
    for index, (name, is_file, data) in enumerate(fields):
        disposition = f'form-data; name="{name}"' + (f'; filename="{index}.png"' if is_file else "")
        content_type = "image/png" if is_file else "application/json"
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_multipart_requests_score_as_json_ones_and_bad_ones_are_refused():
    reward = checked_reward("mean_pixel", helpers.mean_pixel)
    images = noise_images(3, seed=5)
    pngs = [base64.b64decode(encode_png(image)) for image in images]
    assert any(b"\r\n" in png for png in pngs)  # raw binary parts, line breaks included, must survive the parser
    metadata = [{"offset": 1}, {}, {"offset": 2}]
    fields = [("images", True, png) for png in pngs] + [("prompts", False, b'["a", "b", "c"]'), ("metadata", False, json.dumps(metadata).encode())]
    with running_server(reward) as (url, _):
        status, answer = post(url, *multipart_body(fields))
        assert status == 200, answer
        np.testing.assert_array_equal(np.float32(answer["scores"]), helpers.mean_pixel(images, ["a"] * 3, metadata).scores)
        bad = {
            "no prompts": ([("images", True, pngs[0])], 400, "needs a 'prompts' field"),
            "unknown field": ([("images", True, pngs[0]), ("prompts", False, b'["a"]'), ("pickle", False, b"x")], 400, "unknown multipart field 'pickle'"),
            "prompts not JSON": ([("images", True, pngs[0]), ("prompts", False, b"a cat")], 400, "the multipart field 'prompts' is not JSON"),
            "corrupt PNG": ([("images", True, pngs[0][:100]), ("prompts", False, b'["a"]')], 400, "images[0] is not a readable PNG"),
            "wrong-length prompts": ([("images", True, pngs[0]), ("prompts", False, b'["a", "b"]')], 400, "got 1 images, 2 prompts"),
        }
        for case, (case_fields, expected_status, message) in bad.items():
            status, answer = post(url, *multipart_body(case_fields))
            assert (status, case) == (expected_status, case) and message in answer["detail"], (case, answer)
        status, answer = post(url, multipart_body(fields)[0], "multipart/form-data")
        assert status == 400 and answer["detail"] == "the multipart/form-data content type has no boundary"
        assert post(url, *multipart_body(fields))[0] == 200  # still serving
