"""kerasfleet on Ray against Ray Data's `map_batches` and local kerasfleet, in one run.

    KERAS_BACKEND=jax python bench/ray.py [--quick] [--models mlp,cnn] [--rows N]

One machine, one local Ray (`ray.init(num_cpus=<usable cores>)`). For the bench MLP (32-256-256-10)
and small CNN (32x32x3) it times, on the same input:

- Ray Data, as its docs advise for batch inference: `ray.data.from_numpy(x).map_batches(Predictor,
  concurrency=<cores>, num_cpus=1, batch_size=B)`, a class whose `__init__` loads the Keras model
  once per actor and whose `__call__` runs `model.predict_on_batch` on the batch; results read
  back in order (`preserve_order=True`), at the best of B = 256, 1024, 4096. Each run starts its
  actor pool (Ray Data keeps no pool between executions);
- `kerasfleet.predict(path, x, cluster="ray")`: one-shot, its actors' start included, the same
  call inside `kerasfleet.keep_actors()` (opt-in: the actors of a first call in the
  block are reused), and a warm `Fleet(path, cluster="ray")` (best of three calls);
- local kerasfleet: one-shot `kerasfleet.predict(path, x)` and a warm `Fleet(path)`.

kerasfleet uses `engine="auto"` everywhere (the plan measured once per model on this machine,
before the timings; its duration is printed). Ratios compare like with like: one-shot with
one-shot (every start included), warm with warm.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "KERASFLEET_CACHE_DIR" not in os.environ:  # Ray's workers inherit it: no stray dirs
    os.environ["KERASFLEET_CACHE_DIR"] = tempfile.mkdtemp(prefix="kf-bench-cache-")

HERE = Path(__file__).resolve().parent
# This file is named ray.py: its folder must not shadow the ray package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
import numpy as np  # noqa: E402, I001
import ray  # noqa: E402

sys.path.append(str(HERE))
from _common import body_layers, cores, machine_facts  # noqa: E402

WORKERS = cores()


class Predictor:
    """The Ray Data UDF: the model loads once per actor."""

    def __init__(self, path: str) -> None:
        import keras

        self.model = keras.saving.load_model(path)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": np.asarray(self.model.predict_on_batch(batch["data"]))}


def ray_data(path: str, x: np.ndarray, batch_size: int) -> np.ndarray:
    # Blocks: a few per actor, else one block feeds one actor (Ray Data warns so).
    blocks = np.array_split(x, WORKERS * 4)
    ds = ray.data.from_numpy(blocks).map_batches(
        Predictor,
        fn_constructor_args=(path,),
        compute=ray.data.ActorPoolStrategy(size=WORKERS),
        num_cpus=1,
        batch_size=batch_size,
    )
    return np.concatenate([b["y"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")])


CALL_ROWS = 1024


def call_ms(fleet, x: np.ndarray) -> float:
    """Median ms of a warm call of CALL_ROWS rows: one chunk's round trip and its data movement."""
    part = x[:CALL_ROWS]
    fleet.predict(part, progress=False)
    times = []
    for _ in range(20):
        t = time.perf_counter()
        fleet.predict(part, progress=False)
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def timed(fn, rows: int) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = fn()
    return out, rows / (time.perf_counter() - start)


def best(fn, rows: int, repeat: int) -> tuple[np.ndarray, float]:
    runs = [timed(fn, rows) for _ in range(repeat)]
    return runs[0][0], max(r for _, r in runs)


def noop_overhead(tasks: int) -> tuple[float, float]:
    """us per no-op task through the runtime's supervisor: 2 Ray actors vs 2 local workers."""
    from kerasfleet.cluster import connect
    from kerasfleet.runtime import LocalWorker, Noop, Supervisor, WorkerInit, make_plan

    bare = WorkerInit("kerasfleet.runtime.worker:bare_handler", None)
    cluster = connect("ray")
    plan, nodes = cluster.plan(WORKERS, None, "cpu")
    results = []
    for spawn, slots in (
        (cluster.spawner(bare, "jax", nodes), plan.slots),
        (lambda slot: LocalWorker(slot, bare, {}), make_plan(WORKERS).slots),
    ):
        sup = Supervisor(spawn, slots)
        try:
            sup.wait_ready(120)
            for f in [sup.submit(Noop()) for _ in range(200)]:
                f.result()
            start = time.perf_counter()
            for f in [sup.submit(Noop()) for _ in range(tasks)]:
                f.result()
            results.append(1e6 * (time.perf_counter() - start) / tasks)
        finally:
            sup.close()
    return results[0], results[1]


def bench_model(name: str, rows: int, tmp: Path, repeat: int, batches: tuple[int, ...]) -> dict[str, float]:
    import keras

    import kerasfleet
    from kerasfleet import keep_actors

    keras.utils.set_random_seed(0)
    model = keras.Sequential([*body_layers(name), keras.layers.Dense(10)])
    path = str(tmp / f"{name}.keras")
    model.save(path)
    shape = model.input_shape[1:]
    x = np.random.default_rng(0).normal(size=(rows, *shape)).astype("float32")
    t = time.perf_counter()
    kerasfleet.predict(path, x[:10], progress=False)  # measures and caches the plan (engine="auto")
    tune_s = time.perf_counter() - t

    rates: dict[str, float] = {}
    reference, rates["local_once"] = best(lambda: kerasfleet.predict(path, x, progress=False), rows, repeat)
    with kerasfleet.Fleet(path) as fleet:
        fleet.wait_ready()
        local_plan = f"{fleet.plan.describe()}, engine {fleet.engine}, batch {fleet.batch_size}"
        _, rates["local_warm"] = best(lambda: fleet.predict(x, progress=False), rows, repeat)
    y, rates["ray_once"] = best(lambda: kerasfleet.predict(path, x, progress=False, cluster="ray"), rows, repeat)
    diff = float(np.max(np.abs(y - reference)))
    with keep_actors():  # opt-in: one-shot calls after the first reuse its actors
        kerasfleet.predict(path, x[: CALL_ROWS * 64], progress=False, cluster="ray")
        y, rates["ray_kept"] = best(lambda: kerasfleet.predict(path, x, progress=False, cluster="ray"), rows, repeat)
    diff = max(diff, float(np.max(np.abs(y - reference))))
    with kerasfleet.Fleet(path, cluster="ray") as fleet:
        fleet.wait_ready()
        ray_plan = f"{fleet.plan.describe()}, engine {fleet.engine}, batch {fleet.batch_size}"
        _, rates["ray_warm"] = best(lambda: fleet.predict(x, progress=False), rows, repeat)
        ray_call_ms = call_ms(fleet, x)
    with kerasfleet.Fleet(path) as fleet:
        fleet.wait_ready()
        local_call_ms = call_ms(fleet, x)
    data_rates = {}
    for b in batches:
        y, data_rates[b] = best(lambda b=b: ray_data(path, x, b), rows, 1)
        diff = max(diff, float(np.max(np.abs(y - reference))))
    top = max(data_rates, key=lambda b: data_rates[b])
    rates["data"] = data_rates[top]
    labels = {
        "data": f"Ray Data map_batches, {WORKERS} actors x 1 CPU, batch_size {top} (best), pool start included",
        "ray_once": 'kerasfleet.predict(cluster="ray"), one-shot, actor start included',
        "ray_kept": 'kerasfleet.predict(cluster="ray") inside keep_actors() (opt-in), the previous call\'s actors',
        "ray_warm": 'kerasfleet Fleet(cluster="ray"), warm',
        "local_once": "kerasfleet.predict (local), one-shot",
        "local_warm": "kerasfleet Fleet (local), warm",
    }

    print(f"\n## {name}: {rows:,} rows of {shape}, {model.count_params():,} params (max abs diff vs local: {diff:.1e})")
    print(f"plan measured once: {tune_s:.1f} s; local: {local_plan}; on Ray: {ray_plan}")
    print(
        f"one chunk ({CALL_ROWS} rows, through the object store on Ray, shared memory here), warm, median of 20: "
        f"{ray_call_ms:.1f} ms on Ray, {local_call_ms:.1f} ms local"
    )
    print("Ray Data by batch_size: " + ", ".join(f"{b}: {r:,.0f} rows/s" for b, r in data_rates.items()))
    print("| path | rows/s |")
    print("| --- | ---: |")
    for key, label in labels.items():
        print(f"| {label} | {rates[key]:,.0f} |")
    print(
        f"ratios: kerasfleet on Ray / Ray Data: one-shot {rates['ray_once'] / rates['data']:.2f}x, "
        f"warm {rates['ray_warm'] / rates['data']:.2f}x; kerasfleet on Ray / local kerasfleet: "
        f"one-shot {rates['ray_once'] / rates['local_once']:.2f}x, warm {rates['ray_warm'] / rates['local_warm']:.2f}x; "
        f"one-shot inside keep_actors() / local one-shot: {rates['ray_kept'] / rates['local_once']:.2f}x"
    )
    sys.stdout.flush()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny row counts (a smoke run, not a measurement)")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--rows", type=int, default=None)
    args = parser.parse_args()
    import keras  # noqa: F401  (machine_facts reads its backend)

    rows = {"mlp": 2_000, "cnn": 300} if args.quick else {"mlp": 400_000, "cnn": 30_000}
    if args.rows is not None:
        rows = dict.fromkeys(rows, args.rows)
    print(machine_facts())
    print(f"# ray {ray.__version__}: ray.init(num_cpus={WORKERS}) on this machine")
    ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # results in input order, as kerasfleet's
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="kf-bench-ray-"))
    try:
        try:
            on_ray, local = noop_overhead(500 if args.quick else 5000)
            print(
                f"\nno-op tasks through the supervisor, {WORKERS} workers: {on_ray:.0f} us per task on Ray actors, {local:.0f} us local"
            )
        except Exception as exc:  # noqa: BLE001 - the models' timings still run
            print(f"\nno-op overhead not measured: {type(exc).__name__}: {exc}")
        for name in args.models.split(","):
            bench_model(name, rows[name], tmp, 1 if args.quick else 3, (256, 1024) if args.quick else (256, 1024, 4096))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
