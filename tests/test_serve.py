"""`kerasfleet serve`: real servers (the CLI in a subprocess, and `Server` in this process),
real clients (tritonclient.http, aiohttp, urllib), real models of the zoo on JAX and TensorFlow.

Servers are shared per module (starting one compiles every batch bucket); each test that
stops a server starts its own.
"""

import asyncio
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np
import psutil
import pytest
import tritonclient.http as triton

from conftest import load_x, load_y

pytestmark = pytest.mark.timeout(300)

ZOO_MODELS = ["mlp", "multi_input", "multi_output"]
ROWS = 5  # rows per parity request


# -- helpers -----------------------------------------------------------------------------------
class CliServer:
    """`python -m kerasfleet serve ...` in a subprocess, port read from its log."""

    def __init__(self, args, backend="jax", env=None, ready_timeout=240):
        self.log_path = Path(os.environ["KERASFLEET_CACHE_DIR"]) / f"serve-{time.time_ns()}.log"
        self.log = open(self.log_path, "w+b")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kerasfleet", "serve", *args, "--port", "0"],
            env={**os.environ, "KERAS_BACKEND": backend, **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + ready_timeout
        self.url = None
        self.seen_loading = False  # live 200 while ready 503: models loading
        while time.monotonic() < deadline:
            text = self.text()
            found = re.search(r"listening on (http://[\d.]+:\d+)", text)
            if found and self.url is None:
                self.url = found.group(1)
            if self.url:
                ready = get(self.url + "/v2/health/ready")[0]
                if ready == 200:
                    return
                if ready == 503 and get(self.url + "/v2/health/live")[0] == 200:
                    self.seen_loading = True
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"server did not become ready:\n{self.text()}")

    def text(self):
        return self.log_path.read_bytes().decode(errors="replace")

    def stop(self, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            self.log.close()


def request(method, url, body=None, headers=None, timeout=60):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)
    except (urllib.error.URLError, ConnectionError):
        return 0, b"", {}


def get(url, **kw):
    return request("GET", url, **kw)


def post_json(url, value, **kw):
    return request("POST", url, json.dumps(value).encode(), {"Content-Type": "application/json", **kw.pop("headers", {})}, **kw)


def rows_of(x, lo, hi):
    return {k: v[lo:hi] for k, v in x.items()} if isinstance(x, dict) else x[lo:hi]


def expected_rows(y, lo, hi):
    return {k: v[lo:hi] for k, v in y.items()}


def close(got, want):
    np.testing.assert_allclose(np.asarray(got, dtype=want.dtype), want, rtol=1e-5, atol=1e-6)


def metric(url, name, model, **kw):
    text = get(url + "/metrics", **kw)[1].decode()
    found = re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


# -- servers shared by the module --------------------------------------------------------------
@pytest.fixture(scope="module", params=["jax", "tensorflow"])
def zoo_server(request, zoo):
    """Every zoo kind on one server per backend: JAX in-process Keras, TF on a fleet of workers."""
    backend = request.param
    folder = zoo(backend)
    execution = ["--execution", "in-process"] if backend == "jax" else ["--execution", "fleet", "--workers", "1"]
    server = CliServer(
        [*(f"{m}={folder / (m + '.keras')}" for m in ZOO_MODELS), "--engine", "keras", "--max-batch-size", "16", *execution],
        backend=backend,
    )
    yield server, folder, backend
    assert server.stop() == 0, server.text()


def input_names(url, model):
    status, body, _ = get(f"{url}/v2/models/{model}")
    assert status == 200, body
    return json.loads(body)


# -- parity: every protocol, every zoo kind, JAX and TensorFlow --------------------------------
@pytest.mark.parametrize("model", ZOO_MODELS)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_parity(zoo_server, model, binary):
    server, folder, _ = zoo_server
    assert server.seen_loading  # live before ready: /v2/health/ready said 503 while warming up
    x, y = load_x(folder, model), load_y(folder, model)
    meta = input_names(server.url, model)
    client = triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)
    assert client.is_server_ready() and client.is_model_ready(model)
    for lo, hi in [(0, ROWS), (7, 8), (100, 140)]:  # 40 rows: more than max_batch_size, run in two buckets
        part = rows_of(x, lo, hi)
        arrays = part if isinstance(part, dict) else {meta["inputs"][0]["name"]: part}
        inputs = []
        for spec in meta["inputs"]:
            a = arrays[spec["name"]]
            t = triton.InferInput(spec["name"], list(a.shape), spec["datatype"])
            t.set_data_from_numpy(a, binary_data=binary)
            inputs.append(t)
        outputs = [triton.InferRequestedOutput(o["name"], binary_data=binary) for o in meta["outputs"]]
        result = client.infer(model, inputs, outputs=outputs)
        want = expected_rows(y, lo, hi)
        assert sorted(o["name"] for o in meta["outputs"]) == sorted(want)
        for name, expected in want.items():
            got = result.as_numpy(name)
            assert got.shape == expected.shape
            close(got, expected)


@pytest.mark.parametrize("model", ZOO_MODELS)
@pytest.mark.parametrize("fmt", ["instances", "inputs"])
def test_tf_serving_parity(zoo_server, model, fmt):
    server, folder, _ = zoo_server
    x, y = load_x(folder, model), load_y(folder, model)
    part = rows_of(x, 10, 10 + ROWS)
    if fmt == "instances":
        if isinstance(part, dict):
            body = {"instances": [{k: v[i].tolist() for k, v in part.items()} for i in range(ROWS)]}
        else:
            body = {"instances": part.tolist()}
    else:
        body = {"inputs": {k: v.tolist() for k, v in part.items()} if isinstance(part, dict) else part.tolist()}
    status, answer, _ = post_json(f"{server.url}/v1/models/{model}:predict", body)
    assert status == 200, answer
    answer = json.loads(answer)
    want = expected_rows(y, 10, 10 + ROWS)
    if fmt == "instances":
        rows = answer["predictions"]
        if len(want) == 1:
            close(rows, want["output_0"])
        else:
            for name, expected in want.items():
                close([r[name] for r in rows], expected)
    else:
        out = answer["outputs"]
        if len(want) == 1:
            close(out, want["output_0"])
        else:
            for name, expected in want.items():
                close(out[name], expected)
    status, body, _ = get(f"{server.url}/v1/models/{model}")
    assert status == 200 and json.loads(body)["model_version_status"][0]["state"] == "AVAILABLE"


def test_64_concurrent_clients_are_batched(zoo_server):
    """64 clients sending 1-row requests: every answer right, batches of 8+ rows on average."""
    server, folder, _ = zoo_server
    x, y = load_x(folder, "mlp"), load_y(folder, "mlp")["output_0"]
    url = f"{server.url}/v1/models/mlp:predict"
    before = metric(server.url, "nv_inference_count", "mlp"), metric(server.url, "nv_inference_exec_count", "mlp")

    async def client(session, k, wrong):
        for i in range(k * 20, k * 20 + 20):
            async with session.post(url, data=json.dumps({"instances": x[i : i + 1].tolist()})) as r:
                assert r.status == 200, await r.text()
                got = (await r.json(content_type=None))["predictions"]
            try:
                close(got, y[i : i + 1])
            except AssertionError:
                wrong.append(i)

    async def main():
        wrong = []
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            await asyncio.gather(*(client(session, k, wrong) for k in range(64)))
        return wrong

    assert asyncio.run(main()) == []
    rows = metric(server.url, "nv_inference_count", "mlp") - before[0]
    batches = metric(server.url, "nv_inference_exec_count", "mlp") - before[1]
    assert rows == 64 * 20
    assert rows / batches >= 8, f"mean batch size {rows / batches:.1f}"


# -- bad input: a clear 4xx, and the server keeps serving ---------------------------------------
@pytest.fixture(scope="module")
def local_server(zoo):
    """`kerasfleet.Server` in this process: ONNX Runtime in-process, a token, small limits."""
    import kerasfleet

    folder = zoo("jax")
    server = kerasfleet.Server(
        {"mlp": folder / "mlp.keras", "multi_input": folder / "multi_input.keras", "embedding": folder / "embedding.keras"},
        port=0,
        engine="onnx",
        execution="in-process",
        max_batch_size=8,
        max_body_mb=0.05,
        token="s3cret",
    )
    with server:
        yield server, folder
    assert server.state.ready is False  # drained
    # Nothing of the server is left running in this process: its threads are gone.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and [t for t in threading.enumerate() if t.name.startswith("kerasfleet-")]:
        time.sleep(0.1)
    assert [t.name for t in threading.enumerate() if t.name.startswith(("kerasfleet-serve", "kerasfleet-batch"))] == []


AUTH = {"Authorization": "Bearer s3cret"}
V2 = "/v2/models/mlp/infer"


def v2_body(data, shape=(1, 32), name="features", datatype="FP32", outputs=None):
    request = {"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": data}]}
    if outputs is not None:
        request["outputs"] = outputs
    return json.dumps(request).encode()


def binary_body(declared, sent, shape=(1, 32)):
    header = json.dumps(
        {"inputs": [{"name": "features", "shape": list(shape), "datatype": "FP32", "parameters": {"binary_data_size": declared}}]}
    ).encode()
    return header + b"\0" * sent, {"Inference-Header-Content-Length": str(len(header))}


ROW = [0.5] * 32
BAD_INPUTS = {
    "malformed json": ("POST", V2, b'{"inputs": [', {}, 400, "invalid JSON"),
    "not an object": ("POST", V2, b"[1, 2]", {}, 400, '"inputs" list'),
    "unknown model": ("POST", "/v2/models/nope/infer", v2_body(ROW), {}, 404, "served models"),
    "unknown model tf": ("POST", "/v1/models/nope:predict", b'{"instances": [[1]]}', {}, 404, "served models"),
    "wrong tensor name": ("POST", V2, v2_body(ROW, name="pixels"), {}, 400, "Expected input names ['features']"),
    "wrong row size": ("POST", V2, v2_body([0.5] * 31, shape=(1, 31)), {}, 400, "Received: shape [1, 31]"),
    "shape/data mismatch": ("POST", V2, v2_body([0.5] * 30), {}, 400, "Expected 32 values"),
    "wrong datatype": ("POST", V2, v2_body(ROW, datatype="FP64"), {}, 400, "Expected datatype FP32"),
    "strings as data": ("POST", V2, v2_body(["a"] * 32), {}, 400, "Expected numbers"),
    "missing input": (
        "POST",
        "/v2/models/multi_input/infer",
        v2_body([0.5] * 12, shape=(1, 12), name="numeric"),
        {},
        400,
        "Received: no ['image']",
    ),
    "tf ragged rows": ("POST", "/v1/models/mlp:predict", b'{"instances": [[1, 2], [3]]}', {}, 400, "equal lengths"),
    "tf wrong row size": ("POST", "/v1/models/mlp:predict", b'{"instances": [[1, 2, 3]]}', {}, 400, "Received: shape [1, 3]"),
    "tf both formats": ("POST", "/v1/models/mlp:predict", b'{"instances": [], "inputs": []}', {}, 400, "exactly one of"),
    "tf empty instances": ("POST", "/v1/models/mlp:predict", b'{"instances": []}', {}, 400, "non-empty list"),
    "body over the limit": ("POST", V2, v2_body([0.5] * 32 * 3000, shape=(3000, 32)), {}, 413, "at most 0.05 MB"),
    "binary size mismatch": ("POST", V2, *binary_body(100, 128), 400, "Expected binary_data_size 128"),
    "binary bytes missing": ("POST", V2, *binary_body(128, 64), 400, "Expected 128 bytes of binary data"),
    "header length past the body": (
        "POST",
        V2,
        b"{}",
        {"Inference-Header-Content-Length": "99"},
        400,
        "Inference-Header-Content-Length",
    ),
    "huge shape": ("POST", V2, v2_body([], shape=(2**32, 2**32)), {}, 400, "Expected 18446744073709551616 values"),
    "huge binary shape": ("POST", V2, *binary_body(0, 0, shape=[2**62, 4]), 400, "Expected binary_data_size"),
    "booleans for floats": ("POST", V2, v2_body([True] * 32), {}, 400, "Expected numeric values"),
    "null data": ("POST", V2, v2_body(None), {}, 400, "Expected numbers"),
    "objects as data": ("POST", V2, v2_body([{"a": 1}] * 32), {}, 400, "Expected numbers"),
    "beyond FP32": ("POST", V2, v2_body([1e39] * 32), {}, 400, "beyond its range"),
    "beyond INT32": (
        "POST",
        "/v2/models/embedding/infer",
        v2_body([3e9] * 8, shape=(1, 8), name="tokens", datatype="INT32"),
        {},
        400,
        "Expected values in [-2147483648, 2147483647]",
    ),
    "fraction for INT32": (
        "POST",
        "/v1/models/embedding:predict",
        b'{"instances": [[1, 2, 3, 4, 5, 6, 7, 8.5]]}',
        {},
        400,
        "Expected integers",
    ),
    "unknown output": ("POST", V2, v2_body(ROW, outputs=[{"name": "nope"}]), {}, 400, "Expected output names ['output_0']"),
    "classification asked": (
        "POST",
        V2,
        v2_body(ROW, outputs=[{"name": "output_0", "parameters": {"classification": 3}}]),
        {},
        400,
        "no classification",
    ),
    "unknown route": ("GET", "/v3/models", None, {}, 404, "Expected a route"),
    "wrong method": ("GET", V2, None, {}, 405, "Received: GET"),
    "zip bomb": ("POST", V2, gzip.compress(b" " * 200_000), {"Content-Encoding": "gzip"}, 413, "once decompressed"),
    "unknown encoding": ("POST", V2, v2_body(ROW), {"Content-Encoding": "br"}, 415, "Expected Content-Encoding gzip"),
    "missing token": ("POST", V2, v2_body(ROW), {"Authorization": None}, 401, "Bearer"),
    "wrong token": ("GET", "/v2/models/mlp", None, {"Authorization": "Bearer nope"}, 401, "Bearer"),
    "unknown version": ("GET", "/v2/models/mlp/versions/7", None, {}, 404, "version 1"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_refused_clearly(local_server, case):
    server, _ = local_server
    method, path, body, extra, status, message = BAD_INPUTS[case]
    headers = {**AUTH, **{k: v for k, v in extra.items() if v is not None}}
    if extra.get("Authorization", "") is None:
        headers.pop("Authorization")
    got, answer, _ = request(method, server.url + path, body, headers)
    assert got == status, answer
    error = json.loads(answer)["error"]
    assert message in error, error
    if status in (400, 404, 405, 413, 415):
        assert "Expected" in error and "Received" in error
    # The server is alive and answers a good request right after.
    got, answer, _ = request("POST", server.url + V2, v2_body(ROW), AUTH)
    assert got == 200, answer


@pytest.mark.parametrize("compression", ["gzip", "deflate"])
def test_tritonclient_compressed_requests(local_server, compression):
    server, folder = local_server
    x, y = load_x(folder, "mlp"), load_y(folder, "mlp")["output_0"]
    client = triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)
    t = triton.InferInput("features", [3, 32], "FP32")
    t.set_data_from_numpy(x[:3], binary_data=True)
    result = client.infer("mlp", [t], headers=dict(AUTH), request_compression_algorithm=compression)  # it adds to the dict
    close(result.as_numpy("output_0"), y[:3])


def test_integer_inputs_all_outputs_in_binary_and_request_id(local_server):
    """INT32 inputs (JSON and binary), tritonclient's default of every output in binary
    (`binary_data_output`), the request id echoed, a lower-case bearer scheme."""
    server, folder = local_server
    x, y = load_x(folder, "embedding"), load_y(folder, "embedding")["output_0"]
    client = triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)
    for binary in (False, True):
        t = triton.InferInput("tokens", [4, 8], "INT32")
        t.set_data_from_numpy(x[:4], binary_data=binary)
        result = client.infer("embedding", [t], headers={"Authorization": "bearer s3cret"}, request_id=f"req-{binary}")
        close(result.as_numpy("output_0"), y[:4])
        assert result.get_response()["id"] == f"req-{binary}"
        assert result.get_output("output_0")["parameters"]["binary_data_size"] == 4 * 2 * 4
    status, body, _ = post_json(server.url + "/v1/models/embedding:predict", {"instances": x[:3].tolist()}, headers=AUTH)
    assert status == 200
    close(json.loads(body)["predictions"], y[:3])


def test_bad_requests_do_not_disturb_good_traffic(local_server):
    """Good clients keep getting right answers while bad requests of every kind arrive."""
    server, folder = local_server
    x, y = load_x(folder, "mlp"), load_y(folder, "mlp")["output_0"]
    url = server.url + "/v1/models/mlp:predict"

    async def good(session, k, wrong):
        for i in range(k * 30, k * 30 + 30):
            async with session.post(url, data=json.dumps({"instances": x[i : i + 1].tolist()}), headers=AUTH) as r:
                got = (await r.json(content_type=None)).get("predictions")
            try:
                assert r.status == 200
                close(got, y[i : i + 1])
            except AssertionError:
                wrong.append(i)

    async def bad(session, statuses):
        for _ in range(3):
            for method, path, body, extra, expected, _ in BAD_INPUTS.values():
                headers = {**AUTH, **{k: v for k, v in extra.items() if v is not None}}
                if extra.get("Authorization", "") is None:
                    headers.pop("Authorization")
                async with session.request(method, server.url + path, data=body, headers=headers) as r:
                    await r.read()
                    statuses.append((r.status, expected))

    async def main():
        wrong, statuses = [], []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120)) as s:
            await asyncio.gather(*(good(s, k, wrong) for k in range(8)), bad(s, statuses))
        return wrong, statuses

    wrong, statuses = asyncio.run(main())
    assert wrong == []
    assert len(statuses) == 3 * len(BAD_INPUTS) and all(got == expected for got, expected in statuses), statuses


def test_health_needs_no_token_but_the_rest_does(local_server):
    server, _ = local_server
    assert get(server.url + "/v2/health/live")[0] == 200
    assert get(server.url + "/v2/health/ready")[0] == 200
    for path in ("/v2", "/v2/models/mlp", "/v2/models/mlp/ready", "/v1/models/mlp", "/metrics"):
        assert get(server.url + path)[0] == 401
        assert get(server.url + path, headers=AUTH)[0] == 200


def test_larger_requests_than_max_batch_size_are_run_whole(local_server):
    """A request of more rows than max_batch_size runs as its own batch, in bucket-sized chunks."""
    server, folder = local_server
    x, y = load_x(folder, "mlp"), load_y(folder, "mlp")["output_0"]
    status, body, _ = post_json(server.url + "/v1/models/mlp:predict", {"instances": x[:50].tolist()}, headers=AUTH)
    assert status == 200, body
    close(json.loads(body)["predictions"], y[:50])


def test_metrics_use_triton_names(local_server):
    server, _ = local_server
    text = get(server.url + "/metrics", headers=AUTH)[1].decode()
    for name in (
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_pending_request_count",
        "kerasfleet_requests_in_flight",
        "kerasfleet_queue_seconds_bucket",
        "kerasfleet_compute_seconds_bucket",
    ):
        assert re.search(rf'^{name}{{.*model="mlp"', text, re.M), name
    assert "_created" not in text and "_total{" not in text


# -- overload, timeout, shutdown ---------------------------------------------------------------
@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    """About 9 MFLOP per row: a few thousand rows keep a lane busy for a second or more."""
    out = tmp_path_factory.mktemp("slow") / "slow.keras"
    code = (
        "import keras\n"
        "i = keras.Input((256,), name='x')\n"
        "h = keras.layers.Dense(2048, activation='relu')(i)\n"
        "h = keras.layers.Dense(2048, activation='relu')(h)\n"
        f"keras.Model(i, keras.layers.Dense(4)(h)).save({str(out)!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env={**os.environ, "KERAS_BACKEND": "jax"})
    return out


def _busy_body(rows):
    return json.dumps({"instances": np.zeros((rows, 256), np.float32).tolist()}).encode()


def _busy_binary(rows):
    """A KServe V2 binary request: no JSON to parse, so it reaches the queue at once."""
    header = json.dumps(
        {"inputs": [{"name": "x", "shape": [rows, 256], "datatype": "FP32", "parameters": {"binary_data_size": rows * 1024}}]}
    ).encode()
    return header + np.zeros((rows, 256), np.float32).tobytes(), {"Inference-Header-Content-Length": str(len(header))}


async def _post_many(url, bodies, timeout=120):
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=timeout)
    ) as session:

        async def one(body, delay):
            body, headers = body if isinstance(body, tuple) else (body, {})
            await asyncio.sleep(delay)
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as r:
                return r.status, await r.read(), time.perf_counter() - started

        return await asyncio.gather(*(one(b, d) for b, d in bodies))


def test_overload_answers_503_at_once_and_keeps_serving(slow_model):
    import kerasfleet

    with kerasfleet.Server(slow_model, port=0, engine="keras", execution="in-process", max_batch_size=4, max_queue=4) as server:
        url = server.url + "/v1/models/slow:predict"
        one_row = json.dumps({"instances": np.ones((1, 256), np.float32).tolist()}).encode()
        # A long request keeps the only lane busy; 256 clients then find a queue of 4.
        results = asyncio.run(_post_many(url, [(_busy_body(4000), 0)] + [(one_row, 0.3)] * 256))
        statuses = [r[0] for r in results]
        assert statuses[0] == 200
        assert statuses.count(503) >= 200, statuses
        assert set(statuses) <= {200, 503}
        refused = [r for r in results if r[0] == 503]
        assert max(r[2] for r in refused) < 2.0, "503 must come at once, not after waiting"
        answers = [json.loads(r[1])["predictions"] for r in results[1:] if r[0] == 200]
        assert answers and all(np.allclose(a, answers[0], rtol=1e-5) for a in answers)
        assert json.loads(refused[0][1])["error"].startswith("Expected at most max_queue=4")
        status, _, headers = request("POST", url, one_row)
        assert status == 200
        assert get(server.url + "/v2/health/ready")[0] == 200
        text = get(server.url + "/metrics")[1].decode()
        assert re.search(r'nv_inference_request_failure{model="slow",reason="overloaded",version="1"} (\d+)', text)


def test_timeout_answers_504_and_drops_unrun_rows(slow_model):
    import kerasfleet

    with kerasfleet.Server(slow_model, port=0, engine="keras", execution="in-process", max_batch_size=4, timeout_s=0.5) as server:
        url = server.url + "/v2/models/slow/infer"
        before = metric(server.url, "nv_inference_count", "slow")
        # The long request runs past its timeout (504, its rows were run); the short one
        # behind it times out while queued: its rows never run.
        results = asyncio.run(_post_many(url, [(_busy_binary(8000), 0), (_busy_binary(3), 0.2)]))
        assert [r[0] for r in results] == [504, 504], results
        assert "timeout_s=0.5" in json.loads(results[1][1])["error"]
        deadline = time.monotonic() + 60
        while metric(server.url, "nv_inference_count", "slow") - before < 8000 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
        assert metric(server.url, "nv_inference_count", "slow") - before == 8000  # not 8003
        status, _, _ = request("POST", url, *_busy_binary(1))
        assert status == 200
        # Warm-up compiled every bucket: requests of any size never retraced.
        assert server.state.models["slow"].batcher.executor.predictor.stats()["retraces"] == 0


def test_sigterm_drains_requests_in_flight_then_exits_0(slow_model):
    server = CliServer([str(slow_model), "--engine", "keras", "--execution", "fleet", "--workers", "2", "--max-batch-size", "4"])
    proc = psutil.Process(server.proc.pid)
    workers = proc.children(recursive=True)
    assert len(workers) >= 2
    url = server.url + "/v1/models/slow:predict"

    async def scenario():
        task = asyncio.ensure_future(_post_many(url, [(_busy_body(3000), 0)] * 4))
        await asyncio.sleep(0.5)  # the requests are in flight
        server.proc.send_signal(signal.SIGTERM)
        return await task

    results = asyncio.run(scenario())
    assert [r[0] for r in results] == [200] * 4, server.text()
    assert server.proc.wait(60) == 0, server.text()
    server.stop()
    _, alive = psutil.wait_procs(workers, timeout=15)
    assert alive == []
    assert "stopped" in server.text()
    # Other module servers still run: only this server's segments must be gone.
    assert [f for f in os.listdir("/dev/shm") if f.startswith(f"kerasfleet_{proc.pid}_")] == []


def test_auto_execution_is_measured_once_and_remembered(zoo):
    import kerasfleet

    folder = zoo("jax")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    lines = []
    opts = dict(port=0, engine="keras", execution="auto", max_batch_size=4, log=lines.append)
    with kerasfleet.Server({"m": folder / "mlp.keras"}, **opts) as server:
        assert get(server.url + "/v2/health/ready")[0] == 200
    measured = next(line for line in lines if line.startswith("m: ") and "rows/s" in line)
    assert "measured on 4-row batches: in-process keras" in measured and "rows/s" in measured
    lines.clear()
    with kerasfleet.Server({"m": folder / "mlp.keras"}, **opts) as server:
        x = load_x(folder, "mlp")
        status, body, _ = post_json(server.url + "/v1/models/m:predict", {"instances": x[:3].tolist()})
        assert status == 200
        close(json.loads(body)["predictions"], load_y(folder, "mlp")["output_0"][:3])
    assert any("remembered from" in line for line in lines), lines
    # Other module servers (and their workers) still run: only processes started here count.
    new = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    _, alive = psutil.wait_procs([p for p in new if "resource_tracker" not in " ".join(p.cmdline())], timeout=15)
    assert alive == [], "fleet workers of the measurement left behind"


def test_bad_options_fail_before_any_work(tmp_path):
    import kerasfleet
    from kerasfleet import InputError

    with pytest.raises(InputError, match="Expected max_batch_size to be a positive int"):
        kerasfleet.Server(str(tmp_path / "x.keras"), max_batch_size=0)
    with pytest.raises(InputError, match="no such file"):
        kerasfleet.Server(str(tmp_path / "x.keras"))
    with pytest.raises(InputError, match="Expected options among"):
        kerasfleet.Server(str(tmp_path / "x.keras"), max_batch=3)
    (tmp_path / "m.keras").write_bytes(b"")
    with pytest.raises(InputError, match="one model per name"):
        kerasfleet.Server([f"a={tmp_path / 'm.keras'}", f"a={tmp_path / 'm.keras'}"])


def test_cli_refuses_a_bad_model_path_with_exit_1(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "kerasfleet", "serve", str(tmp_path / "missing.keras"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "Expected an existing model file" in out.stderr


def test_blocking_serve_in_a_running_event_loop_points_to_server(tmp_path):
    """A notebook cell runs inside an event loop: serve() says to use Server().start() instead."""
    import kerasfleet
    from kerasfleet import InputError

    (tmp_path / "m.keras").write_bytes(b"")

    async def cell():
        kerasfleet.serve(str(tmp_path / "m.keras"), port=0)

    with pytest.raises(InputError, match=r"Server\(models, \.\.\.\)\.start\(\)"):
        asyncio.run(cell())
