"""``posebatch serve`` as its users meet it: a real server process, driven by the original API's
own Python SDK (``baidu-aip``, pinned) with its two URLs pointed at it, and by raw HTTP where the
SDK cannot send what a test needs.

The persons must equal what ``posebatch run`` writes for the same images (within 1 px), every
error code of the API must come back for the input that provokes it, and concurrent clients must
all get their own answers.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.devdata import require_dev_data, require_model
from tests.images import encode, gradient, jpeg

aip = pytest.importorskip("aip", reason="baidu-aip is in the dev extra")

pytestmark = pytest.mark.timeout(300)

CLI = [sys.executable, "-m", "posebatch.cli"]
KEY, SECRET = "test-key", "s3cret-never-logged-4f9a"
SLOW_KEY, SLOW_SECRET = "slow-key", "slow-s3cret-77c1"
ANALYSIS = "/rest/2.0/image-classify/v1/body_analysis"
TOKEN = "/oauth/2.0/token"
MAX_B64 = 4 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``posebatch serve`` on a free port, its output in a log file; stopped by ``stop()``."""

    def __init__(self, log: Path, args: list[str], env: dict[str, str]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.tokens: list[str] = []  # every token handed to a test, for the no-secrets check
        with log.open("wb") as out:
            self.proc = subprocess.Popen([*CLI, "-vv", "serve", "--port", str(self.port), *args],
                                         stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(self.base + "/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise AssertionError(f"serve did not answer /healthz in 120 s:\n{log.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def client(self, key: str = KEY, secret: str = SECRET):
        """The SDK's client, its two URLs pointed here (instance attributes: no global patch)."""
        c = aip.AipBodyAnalysis("1", key, secret)
        c._AipBase__accessTokenUrl = self.base + TOKEN
        c._AipBodyAnalysis__bodyAnalysisUrl = self.base + ANALYSIS
        return c

    def healthz(self) -> dict:
        with urllib.request.urlopen(self.base + "/healthz", timeout=5) as resp:
            return json.loads(resp.read())

    def metrics(self) -> str:
        with urllib.request.urlopen(self.base + "/metrics", timeout=5) as resp:
            return resp.read().decode()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSEBATCH_API_KEYS")}
    env.update(extra)
    return env


def _need_model() -> None:
    require_model()  # skipped locally, failed on CI (tests/devdata.py)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    _need_model()
    srv = ServeProcess(tmp_path_factory.mktemp("serve") / "serve.log",
                       ["--max-wait-ms", "20"],
                       _env(POSEBATCH_API_KEYS=f"{KEY}:{SECRET},{SLOW_KEY}:{SLOW_SECRET}:2"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def dev_images() -> dict[str, bytes]:
    images = require_dev_data() / "images"
    return {p.relative_to(images).as_posix(): p.read_bytes()
            for p in sorted(images.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(dev_images, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """What ``posebatch run`` writes for the dev images, by relative path."""
    out = tmp_path_factory.mktemp("run-out")
    proc = subprocess.run([*CLI, "run", str(require_dev_data() / "images"), "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return {rel: json.loads((out / f"{rel}.json").read_text()) for rel in dev_images}


def assert_same_persons(got: dict, want: dict, where: str) -> None:
    assert "error_code" not in got, f"{where}: {got}"
    assert set(got) == {"person_num", "person_info", "log_id"}, where
    assert got["person_num"] == want["person_num"] == len(got["person_info"]), where
    left = list(got["person_info"])
    for person in want["person_info"]:
        loc = person["location"]
        # Pair by box, not by list position: two near-equal scores may swap places.
        match = min(left, key=lambda p: max(abs(p["location"][k] - loc[k])
                                            for k in ("left", "top", "width", "height")))
        left.remove(match)
        for k in ("left", "top", "width", "height"):
            assert abs(match["location"][k] - loc[k]) <= 1.0, (where, k)
        assert abs(match["location"]["score"] - loc["score"]) <= 0.01, where
        assert set(match["body_parts"]) == set(person["body_parts"])
        for name, part in person["body_parts"].items():
            mine = match["body_parts"][name]
            assert abs(mine["x"] - part["x"]) <= 1.0 and abs(mine["y"] - part["y"]) <= 1.0, \
                (where, name, mine, part)


def raw_post(srv: ServeProcess, fields: dict[str, str], token: str | None = None) -> dict:
    query = urllib.parse.urlencode({"access_token": token} if token is not None else {})
    data = urllib.parse.urlencode(fields).encode()
    req = urllib.request.Request(f"{srv.base}{ANALYSIS}?{query}", data=data, method="POST")
    req.add_header("Content-Type", "application/x-www-form-urlencoded")
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200  # the original answers errors with 200 and error JSON
        return json.loads(resp.read())


def get_token(srv: ServeProcess, key: str = KEY, secret: str = SECRET,
              grant: str = "client_credentials") -> tuple[int, dict]:
    query = urllib.parse.urlencode({"grant_type": grant, "client_id": key,
                                    "client_secret": secret})
    try:
        with urllib.request.urlopen(f"{srv.base}{TOKEN}?{query}", timeout=10) as resp:
            body = json.loads(resp.read())
            srv.tokens.append(body.get("access_token", ""))
            return resp.status, body
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# -- the SDK gets what `posebatch run` writes --------------------------------------------------

def test_sdk_gets_the_persons_of_posebatch_run(server, dev_images, reference):
    client = server.client()
    for rel, data in dev_images.items():
        assert_same_persons(client.bodyAnalysis(data), reference[rel], rel)
    server.tokens.append(client._authObj["access_token"])
    assert sum(r["person_num"] for r in reference.values()) > 0  # the check compared persons


def test_eight_concurrent_sdk_clients_each_get_their_own_answers(server, dev_images, reference):
    before = _batches(server.metrics())
    names = sorted(dev_images)

    def one_client(n: int) -> int:
        client = server.client()
        # Three images each, a different three per client; together they cover every image.
        order = [names[(3 * n + k) % len(names)] for k in range(3)]
        for rel in order:
            assert_same_persons(client.bodyAnalysis(dev_images[rel]), reference[rel],
                                f"client {n}: {rel}")
        server.tokens.append(client._authObj["access_token"])
        return len(order)

    with ThreadPoolExecutor(8) as pool:
        answered = sum(pool.map(one_client, range(8)))
    assert answered == 8 * 3
    calls, images = (a - b for a, b in zip(_batches(server.metrics()), before, strict=True))
    assert images == answered
    assert calls < images, "concurrent requests never shared a model call"


def _batches(metrics: str) -> tuple[float, float]:
    values = dict(line.rsplit(" ", 1) for line in metrics.splitlines()
                  if line.startswith("posebatch_serve_batch_size_"))
    return (float(values["posebatch_serve_batch_size_count"]),
            float(values["posebatch_serve_batch_size_sum"]))


# -- error codes through the SDK ---------------------------------------------------------------

@pytest.mark.parametrize(("data", "code"), [
    (b"", 216200),
    (b"plain text, not an image" * 10, 216201),
    (encode(gradient(40, 30, "P"), "GIF"), 216201),
    (encode(gradient(10, 10), "PNG"), 216202),  # shortest side under 15 px
    (bytes(3 * 1024 * 1024), 216201),  # exactly 4 MiB after base64: allowed in, then no image
    (bytes(3 * 1024 * 1024 + 1), 216202),  # 4 bytes of base64 over the API's limit
], ids=["empty", "text", "gif", "too-small", "4MiB-base64", "over-4MiB-base64"])
def test_sdk_gets_the_api_error_code(server, data, code):
    result = server.client().bodyAnalysis(data)
    assert result["error_code"] == code, result
    assert result["error_msg"] and isinstance(result["log_id"], int)


def test_sdk_with_a_wrong_secret_gets_110(server):
    # The token URL refuses it; the SDK then signs requests itself (its cloud mode), without
    # an access token, which this server answers with 110.
    result = server.client(secret="wrong").bodyAnalysis(jpeg())
    assert result["error_code"] == 110, result


def test_sdk_refreshes_a_forged_token_on_110_and_gets_its_answer(server, dev_images,
                                                                   reference):
    client = server.client()
    client._auth()
    client._authObj["access_token"] = "pb1.dGVzdC1rZXk.9999999999.forged-signature"
    rel = next(r for r in sorted(reference) if reference[r]["person_num"])
    assert_same_persons(client.bodyAnalysis(dev_images[rel]), reference[rel], rel)
    assert client._authObj["access_token"] != "pb1.dGVzdC1rZXk.9999999999.forged-signature"
    server.tokens.append(client._authObj["access_token"])


def test_sdk_with_an_expired_token_gets_111(server):
    from workers.serve.auth import Authority, parse_keys

    month_ago = time.time() - 31 * 24 * 3600
    expired = Authority(parse_keys(f"{KEY}:{SECRET}", "test")).issue(
        parse_keys(f"{KEY}:{SECRET}", "test")[KEY], now=month_ago)
    client = server.client()
    client._auth()
    client._authObj["access_token"] = expired  # the SDK trusts its own expiry clock
    result = client.bodyAnalysis(jpeg())
    assert result["error_code"] == 111, result


def test_sdk_past_its_key_qps_limit_gets_18(server):
    client = server.client(SLOW_KEY, SLOW_SECRET)  # 2 requests/s
    codes = [client.bodyAnalysis(b"")["error_code"] for _ in range(8)]
    assert codes[:2] == [216200, 216200] and 18 in codes[2:], codes
    # Another key is not slowed down by this one.
    assert server.client().bodyAnalysis(b"")["error_code"] == 216200


# -- error codes only raw HTTP can provoke ------------------------------------------------------

def test_bad_base64_gets_216203(server):
    _, body = get_token(server)
    for bad in ("@@@@", "abc", "aGVsbG8=!"):
        assert raw_post(server, {"image": bad}, body["access_token"])["error_code"] == 216203


def test_no_image_field_gets_216200(server):
    _, body = get_token(server)
    assert raw_post(server, {"picture": "aGVsbG8="}, body["access_token"])["error_code"] == 216200


def test_unencoded_plus_signs_still_decode(server, dev_images, reference):
    # A client that forgets to URL-encode sends '+' as a space: read it back as '+'.
    _, body = get_token(server)
    rel = next(r for r in sorted(reference) if reference[r]["person_num"])
    b64 = base64.b64encode(dev_images[rel]).decode().replace("+", " ")
    assert "+" not in b64 and " " in b64
    assert_same_persons(raw_post(server, {"image": b64}, body["access_token"]), reference[rel],
                        rel)


def test_multipart_forms_are_read_too(server, dev_images, reference):
    import requests  # the SDK's own dependency

    _, body = get_token(server)
    rel = next(r for r in sorted(reference) if reference[r]["person_num"])
    b64 = base64.b64encode(dev_images[rel]).decode()
    url = f"{server.base}{ANALYSIS}?access_token={body['access_token']}"
    as_field = requests.post(url, files={"image": (None, b64)}, timeout=60).json()
    as_file = requests.post(url, files={"image": ("x.txt", b64.encode())}, timeout=60).json()
    for result in (as_field, as_file):
        assert_same_persons(result, reference[rel], rel)


@pytest.mark.parametrize("token", [None, "", "garbage", "pb1.a.b.c",
                                   "pb1.dGVzdC1rZXk.9999999999.forged", "pb1.ü.1.é"])
def test_bad_tokens_get_110(server, token):
    assert raw_post(server, {"image": "aGVsbG8="}, token)["error_code"] == 110


def test_an_oversized_body_is_refused_from_its_content_length_alone(server):
    # Headers announce 100 MB and no body follows: an answer at all proves nothing was read.
    _, body = get_token(server)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.putrequest("POST", f"{ANALYSIS}?access_token={body['access_token']}")
        conn.putheader("Content-Type", "application/x-www-form-urlencoded")
        conn.putheader("Content-Length", str(100 * 1024 * 1024))
        conn.endheaders()
        resp = conn.getresponse()
        result = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 200 and result["error_code"] == 216202, result
    assert str(MAX_B64) in result["error_msg"]


def test_token_url_answers_like_the_original(server):
    status, body = get_token(server)
    assert status == 200 and body["expires_in"] == 30 * 24 * 3600
    assert "brain_all_scope" in body["scope"].split()
    assert get_token(server, secret="wrong") == (
        401, {"error": "invalid_client", "error_description": "Client authentication failed"})
    assert get_token(server, key="nobody") == (
        401, {"error": "invalid_client", "error_description": "unknown client id"})
    assert get_token(server, grant="password")[1]["error"] == "unsupported_grant_type"
    # POST with the parameters in a form body works too.
    data = urllib.parse.urlencode({"grant_type": "client_credentials", "client_id": KEY,
                                   "client_secret": SECRET}).encode()
    with urllib.request.urlopen(server.base + TOKEN, data=data, timeout=10) as resp:
        token = json.loads(resp.read())["access_token"]
    server.tokens.append(token)
    assert raw_post(server, {"image": ""}, token)["error_code"] == 216200


def test_health_metrics_and_unknown_paths(server):
    assert server.healthz()["status"] == "ok"
    text = server.metrics()
    assert 'posebatch_serve_requests_total{code="0"}' in text
    assert 'posebatch_serve_requests_total{code="216200"}' in text
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server.base + "/rest/2.0/image-classify/v1/nope", data=b"x",
                               timeout=5)
    assert json.loads(err.value.read())["error_code"] == 3


def test_the_log_never_holds_a_secret_or_a_token(server):
    # Runs after the tests above (file order): they asked for tokens and used them in URLs.
    text = server.log.read_text()
    assert f"{ANALYSIS} -> 0 in" in text  # the log is verbose (-vv) and not empty
    assert SECRET not in text and SLOW_SECRET not in text
    assert len(server.tokens) >= 5
    for token in server.tokens:
        assert token.split(".")[-1] not in text


# -- model failure and overload: a server whose model fails on real images ---------------------

def broken_model(path: Path) -> Path:
    """A pose-model-shaped ONNX graph (output [B, 56, N]) that runs on the all-zero warm-up
    batch but fails inside ONNX Runtime on any image with a bright pixel (a Gather index out of
    range): a real model failure, not a mock."""
    import onnx
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "h", "w"])
    out = helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 56, "anchors"])
    inits = [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
             helper.make_tensor("table", TensorProto.FLOAT, [1, 56], [0.0] * 56),
             helper.make_tensor("shape", TensorProto.INT64, [3], [0, 56, -1])]
    nodes = [helper.make_node("ReduceMax", ["images"], ["peak"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("Mul", ["peak", "two"], ["scaled"]),
             helper.make_node("Cast", ["scaled"], ["index"], to=TensorProto.INT64),
             helper.make_node("Gather", ["table", "index"], ["rows"], axis=0),
             helper.make_node("Reshape", ["rows", "shape"], ["output0"])]
    graph = helper.make_graph(nodes, "fails-on-bright-images", [inp], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def broken_server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("broken")
    # --no-auth: also shows the SDK working against a server without keys.
    srv = ServeProcess(tmp / "serve.log",
                       ["--model", str(broken_model(tmp / "broken.onnx")), "--no-auth",
                        "--max-queue", "1", "--max-wait-ms", "400"], _env())
    yield srv
    srv.stop()


def test_a_failing_model_gets_282000_and_no_traceback(broken_server):
    result = broken_server.client("any", "thing").bodyAnalysis(jpeg())
    assert result["error_code"] == 282000, result
    assert "Traceback" not in json.dumps(result) and "Gather" not in json.dumps(result)
    assert "Gather" in broken_server.log.read_text()  # the cause is in the server's log


def test_past_max_queue_a_request_is_refused_at_once(broken_server):
    first: dict = {}
    thread = threading.Thread(target=lambda: first.update(
        broken_server.client().bodyAnalysis(jpeg())))
    thread.start()
    deadline = time.monotonic() + 10
    while broken_server.healthz()["pending"] < 1:  # the first holds the only slot
        assert time.monotonic() < deadline, "the first request was never admitted"
        time.sleep(0.01)
    started = time.monotonic()
    second = broken_server.client().bodyAnalysis(jpeg())
    refused_in = time.monotonic() - started
    thread.join(30)
    assert second["error_code"] == 2, second
    assert "retry" in second["error_msg"]
    assert first["error_code"] == 282000  # the admitted one was still answered
    assert refused_in < 5  # refused, not queued behind the 400 ms batch wait and the model


# -- start-up checks ---------------------------------------------------------------------------

@pytest.mark.parametrize(("env", "message"), [
    ({}, "no API keys"),
    ({"POSEBATCH_API_KEYS": "alice:pa55word:fast"}, "QPS must be a number"),
    ({"POSEBATCH_API_KEYS": "alice-pa55word"}, "entry 1 is not KEY:SECRET"),
])
def test_serve_refuses_to_start_without_usable_keys(env, message):
    proc = subprocess.run([*CLI, "serve", "--port", str(free_port())], env=_env(**env),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert message in proc.stderr
    assert "pa55word" not in proc.stderr
    if not env:
        assert "--no-auth" in proc.stderr and "POSEBATCH_API_KEYS" in proc.stderr


# -- slow and vanishing clients ----------------------------------------------------------------

@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory):
    _need_model()
    srv = ServeProcess(tmp_path_factory.mktemp("small") / "serve.log",
                       ["--no-auth", "--max-queue", "2", "--body-timeout", "2"], _env())
    yield srv
    srv.stop()


def slow_client(srv: ServeProcess, length: int = 100_000) -> socket.socket:
    """Headers, then a few bytes of a body it promised to be ``length`` long: 1 byte/s users."""
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    sock.sendall(f"POST {ANALYSIS} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-"
                 f"urlencoded\r\nContent-Length: {length}\r\n\r\nimage=".encode())
    return sock


def test_slow_bodies_neither_hold_queue_slots_nor_stay_past_the_body_timeout(small_server):
    slow = [slow_client(small_server) for _ in range(8)]  # 4x --max-queue of them
    try:
        time.sleep(0.5)
        assert small_server.healthz()["pending"] == 0  # reading is not holding a slot
        started = time.monotonic()
        answer = raw_post(small_server, {"image": base64.b64encode(jpeg()).decode()})
        assert "error_code" not in answer, answer  # served while the slow ones dawdle
        for sock in slow:
            head = b""
            while chunk := sock.recv(4096):  # the server closes the connection after it
                head += chunk
            head = head.decode(errors="replace")
            assert head.startswith("HTTP/1.1 408"), head
            assert "216100" in head and "did not arrive within 2 s" in head
        assert time.monotonic() - started < 20
    finally:
        for sock in slow:
            sock.close()


def test_a_client_that_leaves_mid_body_is_not_an_internal_error(small_server):
    sock = slow_client(small_server)
    sock.sendall(b"abc")
    time.sleep(0.3)
    sock.close()
    deadline = time.monotonic() + 10
    while 'code="disconnected"' not in small_server.metrics():
        assert time.monotonic() < deadline, small_server.metrics()
        time.sleep(0.2)
    assert 'code="282000"' not in small_server.metrics()
    assert "Traceback" not in small_server.log.read_text()
