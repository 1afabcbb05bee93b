"""HTTP serving under load: `kerasfleet serve` against what Keras users put behind HTTP today, in one run.

    python bench/serve.py [--backend jax|tensorflow] [--model mlp|cnn] [--concurrency 1,8,64] [--rows 1,32]
                          [--duration 10] [--warmup 2] [--servers kerasfleet,plain-predict,...] [--skip NAMES]
                          [--protocol tfs|v2] [--max-batch-size 64] [--max-delay-ms 2] [--kerasfleet-args="..."]
                          [--client raw|aiohttp] [--json PATH] [--keep]

Needs starlette and uvicorn (uvloop, httptools used when installed) for the plain peers,
ray[serve] for the Ray peer (skipped, with the reason, without it), aiohttp only for
`--client aiohttp`. 4 servers x 3 concurrencies x 2 request sizes x 12 s is about 5 minutes,
plus each server's start (kerasfleet measures its execution once per start: ~20 s; Ray ~10 s).

One load generator (this process: asyncio, on uvloop when installed) drives one server at a
time. Each server is its own subprocess: started, polled until ready, measured, stopped with
SIGTERM and waited for; any process of its tree still alive after that is killed and reported.

    load generator (this process)                    server subprocess (one at a time)
    C virtual clients, 1 keep-alive connection each  kerasfleet | plain-predict |
      -- POST {"instances": rows} ---------------->    plain-predict_on_batch | ray-serve
      <- 200 {"predictions": ...} -----------------
    closed loop: a client sends its next request when its answer arrives

The servers (KERAS_BACKEND=--backend in each; the model is bench/bulk.py's MLP 32-256-256-10,
or its small CNN, saved to a temporary .keras file):

- kerasfleet: `python -m kerasfleet serve mlp=PATH --port P --max-batch-size 64 --max-delay-ms D`,
  ready when `GET /v2/health/ready` answers 200. Requests in the TF Serving REST format
  (`POST /v1/models/mlp:predict`), or with `--protocol v2` in the KServe V2 JSON format
  (`POST /v2/models/mlp/infer`, the input's name read from `GET /v2/models/mlp`). The mean
  merged batch per cell is read from its Prometheus `/metrics`: delta of
  `nv_inference_count{model="mlp"}` / delta of `nv_inference_exec_count{model="mlp"}`.
- plain-predict, plain-predict_on_batch: the blog-post Starlette app (bench/_serve_peers.py)
  under uvicorn, one process, `--loop uvloop --http httptools` when installed: one
  `model.predict(x, verbose=0)` or `model.predict_on_batch(x)` per request.
- ray-serve: Ray Serve (`ray.init(num_cpus=2)`), one replica with `@serve.batch(max_batch_size=64
  rows, batch_wait_timeout_s=D)` (bench/_serve_peers.py). Skipped, with the reason, when Ray
  Serve is not installed or does not start.
The peers speak only the TF Serving format; `--protocol v2` changes kerasfleet's requests alone.
kerasfleet runs with its defaults (`--engine auto --execution auto`, measured at each start, as
its cache folder is this run's temporary one) unless `--kerasfleet-args` says otherwise. The
peers' per-request access logs are off: that CPU would count against them, not kerasfleet.

Each cell (server x concurrency x rows per request) runs `--warmup` s, not counted, then
`--duration` s: requests/s and rows/s are the answers completed in that window, p50/p99 their
latencies. Every answer's status is checked (errors counted per status code, connection errors
by exception); the first 50 answers of a cell are also compared with the local `model.predict`
of the same rows (rtol 1e-4, atol 1e-5; a wrong one counts as a "mismatch" error). Requests
take their rows from a fixed pool of 256 distinct rows whose JSON bodies and expected outputs
are built before any server starts, so the load generator only writes bytes and reads answers.
Its CPU (getrusage) and the server tree's CPU (/proc, with its busiest processes) over the
window are printed per cell: with 2 cores, a load generator that ate one would halve the
server's machine. The default client writes prebuilt HTTP/1.1 requests on asyncio streams and
reads answers by Content-Length: ~30-70 us of CPU per request, against ~140 us for aiohttp
(`--client aiohttp`, kept to compare), so under 20% of a core at 6,000 req/s.

Last come the ratios kerasfleet req/s / peer req/s per cell, the machine's facts and its fp32
GEMM ceiling at the top (as in bench/bulk.py), and with `--json PATH` every number in a file.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _common import CEILING_SHAPES, cores, flops_per_row, gemm_ceiling, machine_facts  # noqa: E402

SERVERS = ("kerasfleet", "plain-predict", "plain-predict_on_batch", "ray-serve")
TFS_PATH = "/v1/models/mlp:predict"
V2_PATH = "/v2/models/mlp/infer"
POOL = 256  # distinct rows the requests draw from
CHECKED = 50  # answers per cell compared with the local model.predict
BODY_BUDGET = 64 * 2**20  # bytes of prebuilt request bodies per rows size (the CNN's are large)
READY_TIMEOUT = 300.0
STOP_TIMEOUT = 60.0  # a server that has not exited this long after SIGTERM is killed
DRAIN_TIMEOUT = 120.0  # after a cell's window, in-flight requests get this long to finish
RTOL, ATOL = 1e-4, 1e-5
TICKS = os.sysconf("SC_CLK_TCK")


# -- request bodies and expected answers -------------------------------------------------------
def _json_array(a: np.ndarray) -> str:
    """JSON of a float32 array with each value's shortest float32 repr (parsed back exactly)."""
    if a.ndim == 1:
        return "[" + ",".join(np.format_float_positional(v, unique=True, trim="0") for v in a) + "]"
    return "[" + ",".join(_json_array(s) for s in a) + "]"


def _json_flat(a: np.ndarray) -> str:
    return ",".join(np.format_float_positional(v, unique=True, trim="0") for v in a.ravel())


@dataclass
class Workload:
    """The rows pool, its expected outputs, and the prebuilt bodies of every request."""

    x: np.ndarray
    expected: np.ndarray
    row_json: list[str]  # one nested JSON array per pool row (TF Serving instances)
    row_flat: list[str]  # one flat comma list per pool row (KServe V2 data)

    def starts(self, rows: int) -> list[int]:
        """Pool offsets of the distinct requests of `rows` rows (fewer for large rows: BODY_BUDGET)."""
        size = max(1, sum(len(s) for s in self.row_json[:rows]))
        count = max(1, min(POOL, BODY_BUDGET // size))
        return [(i * POOL) // count for i in range(count)]

    def indices(self, start: int, rows: int) -> np.ndarray:
        return (start + np.arange(rows)) % POOL

    def tfs_body(self, start: int, rows: int) -> bytes:
        return ('{"instances":[' + ",".join(self.row_json[i] for i in self.indices(start, rows)) + "]}").encode()

    def v2_body(self, start: int, rows: int, input_name: str) -> bytes:
        shape = [rows, *self.x.shape[1:]]
        data = ",".join(self.row_flat[i] for i in self.indices(start, rows))
        head = {"name": input_name, "shape": shape, "datatype": "FP32"}
        return ('{"inputs":[' + json.dumps(head)[:-1] + ',"data":[' + data + "]}]}").encode()


def make_workload(model: Any) -> Workload:
    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=(POOL, *model.input_shape[1:])), 4).astype("float32")
    expected = np.asarray(model.predict(x, verbose=0, batch_size=64))
    return Workload(x, expected, [_json_array(r) for r in x], [_json_flat(r) for r in x])


def decode(payload: bytes, protocol: str) -> np.ndarray:
    answer = json.loads(payload)
    if protocol == "tfs":
        return np.asarray(answer["predictions"], dtype="float32")
    out = answer["outputs"][0]
    return np.asarray(out["data"], dtype="float32").reshape(out["shape"])


# -- HTTP clients ------------------------------------------------------------------------------
class RawClient:
    """HTTP/1.1 over one asyncio stream: writes a prebuilt request, reads status, headers, body.

    Cheaper in CPU than a general client (no header objects, no cookie jar, no URL parsing);
    handles Content-Length, chunked bodies and `Connection: close` (it reconnects next time).
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.host_header = f"Host: 127.0.0.1:{port}\r\n".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port, limit=2**20)
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def request(self, method: str, path: str, body: bytes = b"", close: bool = False) -> tuple[int, bytes]:
        if self.writer is None:
            await self.connect()
        assert self.reader is not None and self.writer is not None
        head = (
            f"{method} {path} HTTP/1.1\r\n".encode()
            + self.host_header
            + (b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body) if body or method == "POST" else b"")
            + (b"Connection: close\r\n\r\n" if close else b"\r\n")
        )
        try:
            self.writer.write(head + body)
            raw = await self.reader.readuntil(b"\r\n\r\n")
            status = int(raw[9:12])
            headers = raw.lower()
            at = headers.find(b"\r\ncontent-length:")
            if at >= 0:
                payload = await self.reader.readexactly(int(headers[at + 17 : headers.index(b"\r\n", at + 2)]))
            elif b"\r\ntransfer-encoding: chunked" in headers:
                payload = await self._chunked()
            else:
                payload, close = await self.reader.read(), True
        except BaseException:
            self.close()
            raise
        if close or b"\r\nconnection: close" in headers:
            self.close()
        return status, payload

    async def _chunked(self) -> bytes:
        assert self.reader is not None
        parts = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")  # no trailers expected: the empty line
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size + 2))
            parts[-1] = parts[-1][:-2]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def aclose(self) -> None:
        writer = self.writer
        self.close()
        if writer is not None:
            try:
                await writer.wait_closed()
            except OSError:
                pass


class AiohttpClient:
    """aiohttp with one keep-alive connection (a session whose connector holds one)."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.session: Any = None

    async def connect(self) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=1, force_close=False)
        self.session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))

    async def request(self, method: str, path: str, body: bytes = b"", close: bool = False) -> tuple[int, bytes]:
        if self.session is None:
            await self.connect()
        headers = {"Content-Type": "application/json"} if method == "POST" else None
        async with self.session.request(method, self.base + path, data=body or None, headers=headers) as response:
            return response.status, await response.read()

    async def aclose(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            await session.close()


def make_client(kind: str, port: int) -> RawClient | AiohttpClient:
    return RawClient(port) if kind == "raw" else AiohttpClient(port)


async def http_once(port: int, method: str, path: str, body: bytes = b"", timeout: float = 10.0) -> tuple[int, bytes]:
    """One request on a fresh connection, closed after (control requests: health, metadata, /metrics)."""
    client = RawClient(port)
    try:
        return await asyncio.wait_for(client.request(method, path, body, close=True), timeout)
    finally:
        client.close()


# -- server processes --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3 first), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_tree(root: int) -> dict[int, str]:
    """PID -> start time of `root` and every live descendant, and of every process of its session."""
    parents: dict[int, int] = {}
    starts: dict[int, str] = {}
    sessions: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None and stat[0] != "Z":
                parents[int(entry)], sessions[int(entry)], starts[int(entry)] = int(stat[1]), int(stat[3]), stat[19]
    tree = {pid for pid, sid in sessions.items() if sid == root} | ({root} if root in parents else set())
    grew = True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    return {pid: starts[pid] for pid in tree}


def tree_cpu_seconds(root: int) -> dict[tuple[int, str], float]:
    """CPU seconds so far of each live process of the tree, keyed by (pid, command name)."""
    seconds = {}
    for pid in process_tree(root):
        stat = _proc_stat(pid)
        if stat is not None:
            seconds[(pid, _comm(pid))] = (int(stat[11]) + int(stat[12])) / TICKS  # utime, stime
    return seconds


@dataclass
class Server:
    name: str
    command: list[str]
    env: dict[str, str]
    ready: str  # "health": GET /v2/health/ready; "predict": a real TF Serving request
    port: int
    log: Path
    proc: subprocess.Popen | None = None
    seen: dict[int, str] = field(default_factory=dict)  # every process of its tree seen alive

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def wait_ready(self, probe_body: bytes, timeout: float) -> float:
        assert self.proc is not None
        started = time.perf_counter()
        deadline = started + timeout
        last = "no answer yet"
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} before it was ready")
            self.seen.update(process_tree(self.proc.pid))
            try:
                if self.ready == "health":
                    status, payload = await http_once(self.port, "GET", "/v2/health/ready", timeout=5)
                else:
                    status, payload = await http_once(self.port, "POST", TFS_PATH, probe_body, timeout=60)
                if status == 200:
                    return time.perf_counter() - started
                last = f"HTTP {status}: {payload[:200]!r}"
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.25)
        raise RuntimeError(f"{self.name} was not ready after {timeout:.0f} s (last probe: {last})")

    def stop(self) -> list[str]:
        """SIGTERM, wait, then kill whatever of its tree is left; returns a line per straggler."""
        if self.proc is None:
            return []
        notes = []
        if self.proc.poll() is None:
            self.seen.update(process_tree(self.proc.pid))
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                notes.append(f"{self.name} did not exit {STOP_TIMEOUT:.0f} s after SIGTERM: killed")
                self.proc.kill()
                self.proc.wait()
        # Children it started and did not reap (Ray's raylet and workers, a crashed server's
        # workers): only those whose start time still matches, so a reused PID is never hit.
        stragglers = {pid: start for pid, start in self.seen.items() if pid != self.proc.pid and _alive(pid, start)}
        stragglers.update(process_tree(self.proc.pid))
        stragglers.pop(self.proc.pid, None)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid, start in stragglers.items():
                if _alive(pid, start):
                    if sig == signal.SIGTERM:
                        notes.append(f"{self.name} left process {pid} ({_comm(pid)}) behind: SIGTERM, then SIGKILL if needed")
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(_alive(p, s) for p, s in stragglers.items()):
                time.sleep(0.1)
        self.proc = None
        return notes


def _alive(pid: int, start: str) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z" and stat[19] == start


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def server_for(name: str, args: argparse.Namespace, model_path: Path, tmp: Path) -> Server:
    port = free_port()
    env = {**os.environ, "KERAS_BACKEND": args.backend, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    log = tmp / f"{name}.log"
    if name == "kerasfleet":
        command = [sys.executable, "-m", "kerasfleet", "serve", f"mlp={model_path}", "--port", str(port)]
        command += ["--max-batch-size", str(args.max_batch_size), "--max-delay-ms", str(args.max_delay_ms)]
        command += shlex.split(args.kerasfleet_args)
        return Server(name, command, env, "health", port, log)
    if name.startswith("plain-"):
        env["BENCH_SERVE_MODEL"], env["BENCH_SERVE_METHOD"] = str(model_path), name.removeprefix("plain-")
        command = [sys.executable, "-m", "uvicorn", "_serve_peers:plain_app", "--factory", "--app-dir", str(HERE)]
        command += ["--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"]
        if importlib.util.find_spec("uvloop"):
            command += ["--loop", "uvloop"]
        if importlib.util.find_spec("httptools"):
            command += ["--http", "httptools"]
        return Server(name, command, env, "predict", port, log)
    if name == "ray-serve":
        command = [sys.executable, str(HERE / "_serve_peers.py"), "ray", "--model", str(model_path), "--port", str(port)]
        command += ["--max-batch-size", str(args.max_batch_size), "--max-delay-ms", str(args.max_delay_ms)]
        command += ["--num-cpus", str(args.ray_cpus), "--temp-dir", str(tmp / "ray")]
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        return Server(name, command, env, "predict", port, log)
    raise ValueError(f"Expected a server among {', '.join(SERVERS)}. Received: {name!r}")


def unavailable(name: str) -> str | None:
    """Why a server cannot run here, or None."""
    if name == "kerasfleet" and importlib.util.find_spec("kerasfleet.serving") is None:
        return "kerasfleet.serving is not in this tree yet"
    if name.startswith("plain-"):
        missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
        return f"not installed: {', '.join(missing)}" if missing else None
    if name == "ray-serve":
        try:
            import ray.serve  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any import failure means the peer is skipped, with its reason
            return f"ray[serve] does not import ({type(exc).__name__}: {exc}); install with pip install 'ray[serve]'"
    return None


# -- /metrics ----------------------------------------------------------------------------------
def metric_sum(text: str, name: str, model: str = "mlp") -> float | None:
    """Sum of the samples of `name` labelled model="mlp" in Prometheus text, or None if absent."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name) or line[len(name) : len(name) + 1] not in ("{", " "):
            continue
        labels, _, rest = line.partition("}") if "{" in line else ("", "", line[len(name) :])
        if labels and f'model="{model}"' not in labels:
            continue
        try:
            total += float(rest.split()[0])
            found = True
        except (IndexError, ValueError):
            continue
    return total if found else None


async def batch_counters(port: int) -> tuple[float, float] | None:
    try:
        status, payload = await http_once(port, "GET", "/metrics", timeout=10)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
        return None
    if status != 200:
        return None
    text = payload.decode(errors="replace")
    rows, execs = metric_sum(text, "nv_inference_count"), metric_sum(text, "nv_inference_exec_count")
    return None if rows is None or execs is None else (rows, execs)


# -- one cell ----------------------------------------------------------------------------------
@dataclass
class Cell:
    server: str
    concurrency: int
    rows: int
    seconds: float = 0.0
    requests: int = 0
    req_per_s: float = 0.0
    rows_per_s: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: dict[str, int] = field(default_factory=dict)
    checked: int = 0
    max_abs_diff: float | None = None
    first_error: str | None = None
    mean_batch: float | None = None
    client_cpu_pct: float = 0.0  # of one core, over the window
    client_cpu_us_per_req: float | None = None
    server_cpu_pct: float | None = None  # of one core, the server's whole process tree
    server_cpu_top: dict[str, float] = field(default_factory=dict)  # "comm pid" -> % of one core, its busiest processes


@dataclass
class Target:
    server: Server
    protocol: str  # "tfs" or "v2"
    input_name: str = ""
    metrics: bool = False


async def run_cell(target: Target, work: Workload, concurrency: int, rows: int, args: argparse.Namespace) -> Cell:
    port = target.server.port
    cell = Cell(target.server.name, concurrency, rows)
    path = TFS_PATH if target.protocol == "tfs" else V2_PATH
    starts = work.starts(rows)
    if target.protocol == "tfs":
        bodies = [work.tfs_body(s, rows) for s in starts]
    else:
        bodies = [work.v2_body(s, rows, target.input_name) for s in starts]
    clients = [make_client(args.client, port) for _ in range(concurrency)]
    for client in clients:
        await client.connect()

    latencies: list[float] = []
    errors: Counter[str] = Counter()
    state = {"checked": 0, "diff": 0.0}
    now = time.perf_counter()
    t0, t1 = now + args.warmup, now + args.warmup + args.duration

    def check(payload: bytes, start: int) -> None:
        state["checked"] += 1
        try:
            got = decode(payload, target.protocol)
            want = work.expected[work.indices(start, rows)]
            if got.shape != want.shape:
                raise ValueError(f"shape {got.shape}, expected {want.shape}")
            state["diff"] = max(state["diff"], float(np.abs(got - want).max()))
            if not np.allclose(got, want, rtol=RTOL, atol=ATOL):
                raise ValueError(f"max abs diff {float(np.abs(got - want).max()):.2e} vs model.predict")
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            errors["mismatch"] += 1
            cell.first_error = cell.first_error or f"mismatch: {exc}"

    async def virtual_client(i: int) -> None:
        client = clients[i]
        k = i * 7919  # clients start at different places in the bodies
        while True:
            j = k % len(bodies)
            k += 1
            sent = time.perf_counter()
            if sent >= t1:
                return
            try:
                status, payload = await client.request("POST", path, bodies[j])
            except Exception as exc:  # noqa: BLE001 - OSError, a short read, aiohttp's errors: all counted per kind
                done = time.perf_counter()
                if t0 <= done <= t1:
                    errors[f"conn:{type(exc).__name__}"] += 1
                cell.first_error = cell.first_error or f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(0.05)  # a refused connection must not become a busy loop
                continue
            done = time.perf_counter()
            if status == 200:
                if t0 <= done <= t1:
                    latencies.append(done - sent)
                if state["checked"] < CHECKED:
                    check(payload, starts[j])
            else:
                if t0 <= done <= t1:
                    errors[str(status)] += 1
                cell.first_error = cell.first_error or f"HTTP {status}: {payload[:200]!r}"

    async def meter() -> dict[str, Any]:
        """Samples CPU and the batch counters at the window's edges."""
        marks: dict[str, Any] = {}
        for edge, at in (("start", t0), ("end", t1)):
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            usage = resource.getrusage(resource.RUSAGE_SELF)
            proc = target.server.proc
            marks[edge] = {
                "wall": time.perf_counter(),
                "client": usage.ru_utime + usage.ru_stime,
                "server": tree_cpu_seconds(proc.pid) if proc is not None else None,
                "batches": await batch_counters(port) if target.metrics else None,
            }
        return marks

    meter_task = asyncio.ensure_future(meter())
    tasks = [asyncio.ensure_future(virtual_client(i)) for i in range(concurrency)]
    done, pending = await asyncio.wait(tasks, timeout=args.warmup + args.duration + DRAIN_TIMEOUT)
    for task in pending:
        task.cancel()
    if pending:
        errors["timeout"] += len(pending)
        cell.first_error = cell.first_error or f"{len(pending)} requests still unanswered {DRAIN_TIMEOUT:.0f} s after the window"
    for task in done:
        if task.exception() is not None:
            raise task.exception()
    marks = await meter_task
    for client in clients:
        await client.aclose()  # closed before the next cell: kerasfleet's batcher counts open connections

    start, end = marks["start"], marks["end"]
    window = end["wall"] - start["wall"]
    cell.seconds = window
    cell.requests = len(latencies)
    cell.req_per_s = cell.requests / window
    cell.rows_per_s = cell.req_per_s * rows
    if latencies:
        p50, p99 = np.percentile(np.asarray(latencies) * 1e3, [50, 99])
        cell.p50_ms, cell.p99_ms = float(p50), float(p99)
    cell.errors = dict(errors)
    cell.checked = state["checked"]
    cell.max_abs_diff = state["diff"] if cell.checked else None
    cpu = end["client"] - start["client"]
    cell.client_cpu_pct = 100 * cpu / window
    cell.client_cpu_us_per_req = 1e6 * cpu / cell.requests if cell.requests else None
    if start["server"] is not None and end["server"] is not None:
        # A process started inside the window counts from 0; one that ended inside it is not counted.
        used = {key: seconds - start["server"].get(key, 0.0) for key, seconds in end["server"].items()}
        cell.server_cpu_pct = 100 * sum(used.values()) / window
        busiest = sorted(used.items(), key=lambda kv: -kv[1])[:5]
        cell.server_cpu_top = {f"{comm} {pid}": round(100 * v / window, 1) for (pid, comm), v in busiest if v > 0}
    if start["batches"] and end["batches"]:
        d_rows, d_execs = end["batches"][0] - start["batches"][0], end["batches"][1] - start["batches"][1]
        cell.mean_batch = d_rows / d_execs if d_execs > 0 else None
    return cell


# -- one server --------------------------------------------------------------------------------
async def bench_server(name: str, args: argparse.Namespace, work: Workload, model_path: Path, tmp: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"server": name, "ready_s": None, "skipped": None, "cells": [], "notes": []}
    why = unavailable(name)
    if why:
        result["skipped"] = why
        print(f"\n{name}: skipped ({why})", flush=True)
        return result
    server = server_for(name, args, model_path, tmp)
    print(f"\n{name}: starting `{' '.join(server.command)}` (log {server.log})", flush=True)
    probe = work.tfs_body(0, 1)
    try:
        server.start()
        try:
            result["ready_s"] = await server.wait_ready(probe, READY_TIMEOUT)
        except RuntimeError as exc:
            result["skipped"] = str(exc)
            print(f"{name}: skipped ({exc}); its log ends with:\n{server.log_tail()}", flush=True)
            return result
        print(f"{name}: ready in {result['ready_s']:.1f} s", flush=True)
        target = Target(server, args.protocol if name == "kerasfleet" else "tfs")
        if name == "kerasfleet":
            # What runs the model and why (measured at start, or given): its start-up log line.
            chosen = [
                line for line in server.log.read_text(errors="replace").splitlines() if line.startswith("kerasfleet serve: mlp:")
            ]
            result["notes"].extend(chosen)
            for line in chosen:
                print(f"{name}: {line}", flush=True)
            if target.protocol == "v2":
                status, payload = await http_once(server.port, "GET", "/v2/models/mlp")
                if status != 200:
                    raise RuntimeError(f"GET /v2/models/mlp answered {status}: {payload[:200]!r}")
                target.input_name = json.loads(payload)["inputs"][0]["name"]
            target.metrics = await batch_counters(server.port) is not None
            if not target.metrics:
                result["notes"].append("no nv_inference_count / nv_inference_exec_count in /metrics: mean batch n/a")
                print(f"{name}: {result['notes'][-1]}", flush=True)
        for concurrency in args.concurrency:
            for rows in args.rows:
                if server.proc is None or server.proc.poll() is not None:
                    raise RuntimeError(f"{name} exited during the run; its log ends with:\n{server.log_tail()}")
                cell = await run_cell(target, work, concurrency, rows, args)
                result["cells"].append(asdict(cell))
                print(f"  {cell_line(cell)}", flush=True)
    except (RuntimeError, OSError, asyncio.TimeoutError, ValueError, KeyError) as exc:  # this server only: the run goes on
        result["notes"].append(f"{type(exc).__name__}: {exc}")
        print(f"{name}: {exc}", flush=True)
    finally:
        started = time.perf_counter()
        notes = server.stop()
        result["stop_s"] = time.perf_counter() - started
        result["notes"] += notes
        for note in notes:
            print(f"{name}: {note}", flush=True)
    return result


# -- output ------------------------------------------------------------------------------------
def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _errors(cell: dict[str, Any] | Cell) -> str:
    errors = cell.errors if isinstance(cell, Cell) else cell["errors"]
    return ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "0"


def cell_line(cell: Cell) -> str:
    return (
        f"{cell.concurrency} clients x {cell.rows} rows: {cell.req_per_s:,.0f} req/s, p50 {_num(cell.p50_ms, '.2f')} ms, "
        f"p99 {_num(cell.p99_ms, '.2f')} ms, errors {_errors(cell)}, load generator {cell.client_cpu_pct:.0f}% of a core"
        + (f", server tree {_num(cell.server_cpu_pct, '.0f')}%" if cell.server_cpu_top else "")
        + (
            f" (busiest: {', '.join(f'{k} {v:.0f}%' for k, v in list(cell.server_cpu_top.items())[:3])})"
            if cell.server_cpu_top
            else ""
        )
        + (f" (first error: {cell.first_error})" if cell.first_error and cell.errors else "")
    )


def print_tables(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\n## {args.model} over HTTP: {args.duration:g} s per cell after {args.warmup:g} s warm-up, closed loop")
    print(
        "| server | clients | rows/req | req/s | rows/s | p50 ms | p99 ms | errors | checked (max abs diff) | mean batch "
        "| load gen CPU % (us/req) | server CPU % |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for result in results:
        if result["skipped"]:
            print(f"| {result['server']} | - | - | - | - | - | - | skipped: {result['skipped'].splitlines()[0]} | | | | |")
        for c in result["cells"]:
            batch = _num(c["mean_batch"], ".1f") if result["server"] == "kerasfleet" else "-"
            print(
                f"| {c['server']} | {c['concurrency']} | {c['rows']} | {c['req_per_s']:,.0f} | {c['rows_per_s']:,.0f} "
                f"| {_num(c['p50_ms'], '.2f')} | {_num(c['p99_ms'], '.2f')} | {_errors(c)} "
                f"| {c['checked']} ({_num(c['max_abs_diff'], '.1e')}) | {batch} "
                f"| {c['client_cpu_pct']:.0f} ({_num(c['client_cpu_us_per_req'], '.0f')}) | {_num(c['server_cpu_pct'], '.0f')} |"
            )
    ready = ", ".join(f"{r['server']} {r['ready_s']:.1f} s" for r in results if r["ready_s"] is not None)
    print(f"\ntime from process start to ready: {ready or 'n/a'}")

    by_cell = {(r["server"], c["concurrency"], c["rows"]): c for r in results for c in r["cells"]}
    fleet = [c for r in results if r["server"] == "kerasfleet" for c in r["cells"]]
    peers = [r["server"] for r in results if r["server"] != "kerasfleet" and r["cells"]]
    if not fleet or not peers:
        print("\n(no ratios: kerasfleet or every peer is missing from this run)")
        return
    print("\n## kerasfleet req/s / peer req/s, same cell, same run")
    print("| clients | rows/req | " + " | ".join(peers) + " |")
    print("| ---: | ---: | " + " | ".join("---:" for _ in peers) + " |")
    for c in fleet:
        ratios = []
        for peer in peers:
            other = by_cell.get((peer, c["concurrency"], c["rows"]))
            ok = other is not None and other["req_per_s"] > 0
            ratios.append(f"{c['req_per_s'] / other['req_per_s']:.2f}x" if ok else "n/a")
        print(f"| {c['concurrency']} | {c['rows']} | " + " | ".join(ratios) + " |")


def _csv(kind: type, text: str) -> list:
    return [kind(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("jax", "tensorflow"), default=os.environ.get("KERAS_BACKEND", "jax"))
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--concurrency", type=lambda s: _csv(int, s), default=[1, 8, 64], help="comma list (default 1,8,64)")
    parser.add_argument(
        "--rows", type=lambda s: _csv(int, s), default=[1, 32], help="rows per request, comma list (default 1,32)"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds per cell before the window, not counted")
    parser.add_argument(
        "--servers", type=lambda s: _csv(str, s), default=list(SERVERS), help=f"comma list of {','.join(SERVERS)}"
    )
    parser.add_argument("--skip", type=lambda s: _csv(str, s), default=[], help="servers to leave out, e.g. --skip kerasfleet")
    parser.add_argument("--protocol", choices=("tfs", "v2"), default="tfs", help="kerasfleet's request format (peers: tfs)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="rows per merged batch (kerasfleet, ray-serve)")
    parser.add_argument(
        "--max-delay-ms", type=float, default=2.0, help="batch wait (kerasfleet --max-delay-ms, Ray's batch_wait_timeout_s)"
    )
    parser.add_argument(
        "--kerasfleet-args",
        default="",
        help='more options for `kerasfleet serve`, e.g. --kerasfleet-args="--engine onnx --execution in-process"',
    )
    parser.add_argument("--ray-cpus", type=int, default=2, help="ray.init(num_cpus=...) and the replica's num_cpus")
    parser.add_argument("--client", choices=("raw", "aiohttp"), default="raw", help="load generator's HTTP client")
    parser.add_argument("--json", type=Path, default=None, help="write every result to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (model, server logs, Ray's session)")
    args = parser.parse_args()
    unknown = (set(args.servers) | set(args.skip)) - set(SERVERS)
    if unknown:
        parser.error(f"unknown servers: {', '.join(sorted(unknown))} (expected some of {', '.join(SERVERS)})")
    servers = [s for s in args.servers if s not in args.skip]
    if args.client == "aiohttp" and importlib.util.find_spec("aiohttp") is None:
        parser.error("--client aiohttp needs aiohttp (pip install aiohttp)")

    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tmp = Path(tempfile.mkdtemp(prefix="kf-bench-serve-"))
    os.environ.setdefault("KERASFLEET_CACHE_DIR", str(tmp / "cache"))  # servers inherit it: no stray dirs
    try:
        import keras  # noqa: F401  (machine_facts reads its backend)

        from bulk import build

        print(machine_facts())
        seconds = min(1.0, max(0.2, args.duration / 10))
        (peak1, shape1), (peak, shape) = gemm_ceiling(1, seconds), gemm_ceiling(cores(), seconds)
        print(
            f"# fp32 GEMM peak, measured now (best ONNX Runtime MatMul of {', '.join('x'.join(map(str, s)) for s in CEILING_SHAPES)}): "
            f"{peak1:.0f} GFLOP/s on 1 thread ({'x'.join(map(str, shape1))}), {peak:.0f} GFLOP/s on {cores()} ({'x'.join(map(str, shape))})"
        )
        model = build(args.model)
        model_path = tmp / f"{args.model}.keras"
        model.save(model_path)
        flops = flops_per_row(model)
        work = make_workload(model)
        loop_name = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
        print(
            f"# {args.model}: {model.count_params():,} params, {flops / 1e6:.3f} MFLOP per row: at the all-core GEMM peak the "
            f"ceiling is {peak * 1e9 / flops:,.0f} rows/s\n# load generator: {args.client} HTTP/1.1 client on {loop_name}, "
            f"one keep-alive connection per client, one process; KERAS_BACKEND={args.backend} in every server"
        )
        sys.stdout.flush()

        results = []
        loop = importlib.import_module("uvloop").new_event_loop() if loop_name == "uvloop" else asyncio.new_event_loop()
        try:
            for name in servers:
                results.append(loop.run_until_complete(bench_server(name, args, work, model_path, tmp)))
        finally:
            loop.close()
        print_tables(results, args)
        if args.json:
            facts = {
                "machine": machine_facts(),
                "gemm_gflops": {"1": peak1, str(cores()): peak},
                "model": args.model,
                "params": model.count_params(),
                "flops_per_row": flops,
            }
            args.json.write_text(
                json.dumps({"facts": facts, "args": {k: str(v) for k, v in vars(args).items()}, "servers": results}, indent=1)
            )
            print(f"\nresults written to {args.json}")
    finally:
        if args.keep:
            print(f"\nkept {tmp} (model, server logs)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
