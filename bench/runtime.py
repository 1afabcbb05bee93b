"""The runtime's own overhead: no-op tasks per second and one-row round trips, in one run.

    KERAS_BACKEND=jax .venv/bin/python bench/runtime.py [--quick] [--parts noop,latency,start] [--engines keras,onnx]

(a) no-op tasks per second through the task supervisor and 2 bare workers
    (`kerasfleet.runtime.worker:bare_handler`, no model): N `Noop()` tasks submitted from one
    thread, then all awaited; and the same N split over 4 threads submitting at once. Each is
    the best of 3 rounds.
(b) the round trip of a 1-row prediction through a warm `Fleet(workers=2)` on the MLP
    32-256-256-10 (bench/bulk.py's build("mlp"), saved to a temporary .keras file), for
    engine="keras" and engine="onnx": 200 warm-up calls, then 2,000 timed calls of
    `fleet.predict(x[i:i+1])` -> p50, p90, p99 in ms. Its peers, in the same run and on the same
    rows: `model.predict(x1, verbose=0)` (100 calls), `model(x1)` eager, and the in-process
    `kerasfleet.Predictor(path, engine="onnx").predict(x1)`.

(c) `--parts start` (JAX): what a worker's start costs a one-shot call, each in a fresh
    Python process as a script runs it, whole process timed, best of 3 (the variants
    alternate): a plain script (`import keras`, `load_model`, `model.predict` of 1,000 rows),
    and `kerasfleet.predict(path, x, engine="keras", workers=2)` with XLA's persistent
    compilation cache off (`JAX_ENABLE_COMPILATION_CACHE=false`, as every worker started before
    the cache) and read back (the same cache folder, filled by an untimed first call).

It prints the machine's facts, a table, and the issue's targets with PASS/FAIL:
">= 5,000 no-op tasks/s through 2 workers" (one submitting thread) and "1-row p50 <= 0.5 ms"
(for each warm fleet). `--quick` makes every count small: a smoke run, not a measurement.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "KERASFLEET_CACHE_DIR" not in os.environ:  # spawned children inherit it: no stray dirs
    os.environ["KERASFLEET_CACHE_DIR"] = tempfile.mkdtemp(prefix="kf-bench-cache-")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_facts  # noqa: E402
from bulk import build  # noqa: E402

NOOP_TARGET = 5_000  # tasks/s through 2 workers
P50_TARGET_MS = 0.5  # one-row round trip through a warm fleet
WORKERS = 2


# -- (a) no-op tasks ----------------------------------------------------------------------------
def _submit_all(supervisor, n: int) -> None:
    from kerasfleet.runtime import Noop

    futures = [supervisor.submit(Noop()) for _ in range(n)]
    for f in futures:
        f.result(60)


def _round(supervisor, n: int, threads: int) -> float:
    """Tasks per second for n no-op tasks submitted from `threads` threads at once."""
    if threads == 1:
        started = time.perf_counter()
        _submit_all(supervisor, n)
        return n / (time.perf_counter() - started)
    share = n // threads
    errors: list[BaseException] = []
    gate = threading.Barrier(threads + 1)

    def work() -> None:
        gate.wait()
        try:
            _submit_all(supervisor, share)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    gate.wait()
    started = time.perf_counter()
    for t in pool:
        t.join()
    seconds = time.perf_counter() - started
    if errors:
        raise errors[0]
    return share * threads / seconds


def noop_rates(n: int, rounds: int = 3) -> dict[str, float]:
    from kerasfleet.runtime import LocalWorker, Supervisor, WorkerInit, make_plan

    init = WorkerInit("kerasfleet.runtime.worker:bare_handler", None)
    plan = make_plan(WORKERS)
    supervisor = Supervisor(lambda slot: LocalWorker(slot, init, {}), plan.slots, start_timeout=60)
    try:
        supervisor.wait_ready(60)
        _submit_all(supervisor, 200)  # the first round trips are not counted
        return {
            "1 thread": max(_round(supervisor, n, 1) for _ in range(rounds)),
            "4 threads": max(_round(supervisor, n, 4) for _ in range(rounds)),
        }
    finally:
        supervisor.close()


# -- (b) one-row latency ------------------------------------------------------------------------
def latency(fn, x, calls: int, warmup: int) -> tuple[float, float, float]:
    """p50, p90, p99 in ms of fn(x[i:i+1]) over `calls` calls after `warmup` untimed ones."""
    n = len(x)
    for i in range(warmup):
        fn(x[i % n : i % n + 1])
    times = np.empty(calls)
    for i in range(calls):
        one = x[i % n : i % n + 1]
        started = time.perf_counter()
        fn(one)
        times[i] = time.perf_counter() - started
    p50, p90, p99 = np.percentile(times * 1e3, [50, 90, 99])
    return float(p50), float(p90), float(p99)


def latency_rows(engines: list[str], calls: int, warmup: int, predict_calls: int) -> tuple[dict[str, tuple], dict[str, float]]:
    import keras

    import kerasfleet

    tmp = Path(tempfile.mkdtemp(prefix="kf-bench-runtime-"))
    model = build("mlp")
    path = tmp / "mlp.keras"
    model.save(path)
    x = np.random.default_rng(0).normal(size=(max(calls, 1000), 32)).astype("float32")
    reference = model.predict(x[:1], verbose=0)
    rows: dict[str, tuple] = {}
    fleet_p50: dict[str, float] = {}

    rows[f"model.predict(x1, verbose=0) ({predict_calls:,} calls)"] = latency(
        lambda one: model.predict(one, verbose=0), x, predict_calls, min(10, predict_calls)
    )
    rows[f"model(x1) eager ({calls:,} calls)"] = latency(lambda one: model(one, training=False), x, calls, warmup)
    predictor = kerasfleet.Predictor(path, engine="onnx")  # exports once; the onnx fleet reuses the file
    assert np.allclose(predictor.predict(x[:1]), reference, rtol=1e-4, atol=1e-5)
    rows[f"Predictor(engine='onnx').predict(x1), in-process ({calls:,} calls)"] = latency(predictor.predict, x, calls, warmup)
    for engine in engines:
        started = time.perf_counter()
        with kerasfleet.Fleet(path, workers=WORKERS, engine=engine, backend=keras.backend.backend()) as fleet:
            fleet.wait_ready()
            ready_s = time.perf_counter() - started
            assert np.allclose(fleet.predict(x[:1], progress=False), reference, rtol=1e-4, atol=1e-5)
            result = latency(lambda one, fleet=fleet: fleet.predict(one, progress=False), x, calls, warmup)
            where = f"{fleet.engine}, {fleet.plan.workers}x{fleet.plan.threads_per_worker}"
        rows[f"warm Fleet.predict(x1), engine={engine} ({where}; ready in {ready_s:.2f} s; {calls:,} calls)"] = result
        fleet_p50[engine] = result[0]
    return rows, fleet_p50


# -- (c) a worker's start, in a one-shot call -------------------------------------------------
_PLAIN = """
import keras, numpy as np
model = keras.saving.load_model({path!r})
model.predict(np.load({x!r}), verbose=0)
"""
_ONE_SHOT = """
import kerasfleet, numpy as np
if __name__ == "__main__":
    kerasfleet.predict({path!r}, np.load({x!r}), engine="keras", workers=2, progress=False)
"""


def start_rows(rounds: int) -> dict[str, float]:
    """Seconds (best of `rounds`) of each variant's whole process."""
    import subprocess

    tmp = Path(tempfile.mkdtemp(prefix="kf-bench-start-"))
    path, x_path = tmp / "mlp.keras", tmp / "x.npy"
    build("mlp").save(path)
    np.save(x_path, np.random.default_rng(0).normal(size=(1000, 32)).astype("float32"))
    env = {**os.environ, "KERASFLEET_CACHE_DIR": str(tmp / "cache")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    variants = {
        "plain script: import keras, load_model, model.predict": (_PLAIN, env),
        "kerasfleet.predict one-shot, workers without the compilation cache": (
            _ONE_SHOT,
            {**env, "JAX_ENABLE_COMPILATION_CACHE": "false"},
        ),
        "kerasfleet.predict one-shot, workers reading the compilation cache": (_ONE_SHOT, env),
    }

    def run(code: str, variant_env: dict[str, str]) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code.format(path=str(path), x=str(x_path))], env=variant_env, check=True)
        return time.perf_counter() - started

    run(_ONE_SHOT, env)  # fills the cache (and the tuned plan is not involved: engine="keras")
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(rounds):
        for label, (code, variant_env) in variants.items():
            best[label] = min(best[label], run(code, variant_env))
    return best


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small counts everywhere (a smoke run, not a measurement)")
    parser.add_argument("--parts", default="noop,latency", help="comma list: noop, latency")
    parser.add_argument("--engines", default="keras,onnx", help="fleet engines for the latency part")
    args = parser.parse_args()
    parts = {p for p in args.parts.split(",") if p}
    engines = [e for e in args.engines.split(",") if e]
    import keras  # machine_facts reads its backend

    n_noop, calls, warmup, predict_calls = (1_000, 200, 20, 20) if args.quick else (20_000, 2_000, 200, 100)
    print(machine_facts())
    sys.stdout.flush()

    rates: dict[str, float] = {}
    if "noop" in parts:
        rates = noop_rates(n_noop)
        print(f"\n## no-op tasks through the supervisor and {WORKERS} bare workers ({n_noop:,} tasks, best of 3 rounds)")
        print("| submitted from | tasks/s | us per task |")
        print("| --- | ---: | ---: |")
        for label, rate in rates.items():
            print(f"| {label} | {rate:,.0f} | {1e6 / rate:.0f} |")
        sys.stdout.flush()

    fleet_p50: dict[str, float] = {}
    if "latency" in parts:
        rows, fleet_p50 = latency_rows(engines, calls, warmup, predict_calls)
        print("\n## one-row round trip on the MLP 32-256-256-10")
        print("| path | p50 ms | p90 ms | p99 ms |")
        print("| --- | ---: | ---: | ---: |")
        for label, (p50, p90, p99) in rows.items():
            print(f"| {label} | {p50:.3f} | {p90:.3f} | {p99:.3f} |")

    if "start" in parts:
        if keras.backend.backend() != "jax":
            print("\n## a worker's start: JAX only (the compilation cache is XLA's)")
        else:
            start = start_rows(1 if args.quick else 3)
            plain = start["plain script: import keras, load_model, model.predict"]
            print("\n## a one-shot call of 1,000 rows on the MLP, whole fresh process (best of 3)")
            print("| path | s | vs plain script |")
            print("| --- | ---: | ---: |")
            for label, seconds in start.items():
                print(f"| {label} | {seconds:.2f} | {plain / seconds:.2f}x |")
            off = start["kerasfleet.predict one-shot, workers without the compilation cache"]
            on = start["kerasfleet.predict one-shot, workers reading the compilation cache"]
            print(f"# reading the cache back: {off / on:.2f}x the one-shot call without it ({off - on:.2f} s less)")

    print("\n## targets")
    if rates:
        one, four = rates["1 thread"], rates["4 threads"]
        print(
            f"- >= {NOOP_TARGET:,} no-op tasks/s through {WORKERS} workers: {one:,.0f}/s from one thread {verdict(one >= NOOP_TARGET)}; "
            f"{four:,.0f}/s from 4 threads {verdict(four >= NOOP_TARGET)}"
        )
    else:
        print(f"- >= {NOOP_TARGET:,} no-op tasks/s through {WORKERS} workers: not measured (--parts)")
    for engine in engines:
        if engine in fleet_p50:
            p50 = fleet_p50[engine]
            print(f"- 1-row p50 <= {P50_TARGET_MS} ms, warm Fleet engine={engine}: {p50:.3f} ms {verdict(p50 <= P50_TARGET_MS)}")
        else:
            print(f"- 1-row p50 <= {P50_TARGET_MS} ms, warm Fleet engine={engine}: not measured (--parts)")


if __name__ == "__main__":
    main()
