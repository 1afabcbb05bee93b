"""cluster=: predict, evaluate and sweep on Ray actors give the local results, also when an
actor dies or a node is lost mid-run, and leave nothing behind.

One Ray per test class (Ray takes seconds to start): `ray.init(num_cpus=2)` for one node, then
`ray.cluster_utils.Cluster` with two simulated nodes of one CPU each. Models come from the
zoo (JAX backend), with the Keras engine (no export, no tuning trial).
"""

import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest

import kerasfleet
from conftest import HERE, assert_clean, assert_same, leftovers, load_x, load_y
from kerasfleet import keep_actors
from kerasfleet.cluster.layout import NodeFacts, cluster_plan
from kerasfleet.errors import FleetError, InputError, WorkerStartError
from kerasfleet.prediction.kept import kept_actors

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(240)

BACKEND = "jax"
KINDS = ["mlp", "multi_input", "multi_output"]
RAY_OPTIONS = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False}


def _wait_for_ray_to_exit(timeout=30.0):
    """Ray's own processes (raylet, GCS, workers) take a moment to exit after shutdown."""
    deadline = time.monotonic() + timeout
    while leftovers()[0] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert_clean()


@pytest.fixture(scope="module")
def folder(zoo):
    return zoo(BACKEND)


# -- no Ray running ---------------------------------------------------------------------------
def test_import_kerasfleet_never_imports_ray():
    code = "import sys, kerasfleet; kerasfleet.Fleet; kerasfleet.predict; kerasfleet.evaluate; kerasfleet.sweep; import kerasfleet.cluster; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=HERE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("cluster", [123, "not an address", "http://host:80", ""])
def test_a_bad_cluster_is_refused_before_any_work(folder, cluster):
    with pytest.raises(InputError, match=r"Expected cluster to be None \(this machine\), 'ray' .* or a Ray address"):
        kerasfleet.predict(folder / "mlp.keras", load_x(folder, "mlp"), cluster=cluster)
    with pytest.raises(InputError, match="Expected cluster"):
        kerasfleet.sweep("sweep_fns:score", {"x": [1]}, store=None, cluster=cluster)
    assert not ray.is_initialized()


def test_an_address_where_no_ray_listens_fails_fast_with_what_to_do(folder):
    start = time.monotonic()
    with pytest.raises(FleetError, match=r"Expected a running Ray cluster at cluster='127.0.0.1:9'.*ray start --head"):
        kerasfleet.Fleet(folder / "mlp.keras", engine="keras", cluster="127.0.0.1:9")
    assert time.monotonic() - start < 10 and not ray.is_initialized()


def test_the_cli_takes_cluster_and_refuses_a_bad_one(folder, tmp_path):
    np.save(tmp_path / "x.npy", load_x(folder, "mlp"))
    cmd = [sys.executable, "-m", "kerasfleet", "predict", str(folder / "mlp.keras"), str(tmp_path / "x.npy")]
    out = subprocess.run(
        [*cmd, "-o", str(tmp_path / "y.npy"), "--cluster", "not an address"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0 and "Expected cluster to be None" in out.stderr and not (tmp_path / "y.npy").exists()


def test_cluster_ray_without_ray_installed_says_how_to_install_it(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(InputError, match=r"Expected the `ray` extra.*Received: .*pip install 'kerasfleet\[ray\]'"):
        kerasfleet.Fleet(folder / "mlp.keras", engine="keras", cluster="ray")


def test_the_plan_spreads_workers_over_nodes_with_each_nodes_cores_and_gpus():
    two = [NodeFacts("a", 4, 0, 8 << 30), NodeFacts("b", 2, 0, 8 << 30)]
    plan, nodes = cluster_plan(two, None, None, "auto")
    assert plan.workers == 6 and nodes == ("a", "b", "a", "b", "a", "a")
    assert [s.cpus for s in plan.slots[:2]] == [(0,), (0,)]  # each node's own cores
    plan, nodes = cluster_plan(two, 2, None, "auto")
    assert nodes == ("a", "b")  # a few workers spread, not piled on the first node
    plan, nodes = cluster_plan(two, None, 2, "auto")
    assert [s.threads for s in plan.slots] == [2, 2, 2] and nodes == ("a", "b", "a")
    with pytest.raises(InputError, match="Expected at most 6 workers"):
        cluster_plan(two, 7, None, "auto")
    gpus = [NodeFacts("a", 8, 2, 64 << 30), NodeFacts("b", 8, 0, 64 << 30), NodeFacts("c", 8, 1, 64 << 30)]
    plan, nodes = cluster_plan(gpus, None, None, "auto")
    assert plan.device == "gpu" and nodes == ("a", "c", "a") and [s.threads for s in plan.slots] == [4, 8, 4]
    plan, nodes = cluster_plan(gpus, None, None, "cpu")
    assert plan.device == "cpu" and plan.workers == 24
    with pytest.raises(InputError, match="at least one GPU"):
        cluster_plan(two, None, None, "gpu")


# -- one node: ray.init(num_cpus=2) -------------------------------------------------------------
@pytest.fixture(scope="class")
def one_node():
    ray.init(num_cpus=2, **RAY_OPTIONS)
    yield
    ray.shutdown()
    _wait_for_ray_to_exit()


@pytest.mark.usefixtures("one_node")
class TestOneNode:
    @pytest.mark.parametrize("name", KINDS)
    def test_predict_and_evaluate_on_ray_actors_equal_model_predict(self, folder, name):
        x, y_pred = load_x(folder, name), load_y(folder, name)
        with kerasfleet.Fleet(folder / f"{name}.keras", engine="keras", backend=BACKEND, cluster="ray") as fleet:
            assert fleet.plan.workers == 2
            assert_same(fleet.predict(x), y_pred)  # chunks through the object store
            few = {k: v[:5] for k, v in x.items()} if isinstance(x, dict) else x[:5]
            assert_same(fleet.predict(few), {k: v[:5] for k, v in y_pred.items()})  # rows inside the message
            rng = np.random.default_rng(0)
            y_true = {k: v + rng.normal(size=v.shape).astype(v.dtype) for k, v in y_pred.items()}
            y = y_true if name == "multi_output" else y_true["output_0"]
            metrics = {k: ["mae"] for k in y_true} if name == "multi_output" else ["mae"]
            got = kerasfleet.evaluate(fleet, x, y, metrics=metrics)
        for k in y_true:
            expected = float(np.mean(np.abs(y_true[k] - y_pred[k])))
            np.testing.assert_allclose(got["mae" if name != "multi_output" else f"{k}_mae"], expected, rtol=1e-5)

    def test_an_actor_killed_mid_run_gives_results_identical_to_local(self, folder, tmp_path, monkeypatch):
        """predict(cluster=) and evaluate(cluster=) pass through, a SIGKILLed actor's chunk is
        redone on the other, and the bytes equal a local fleet's."""
        x = np.concatenate([load_x(folder, "mlp")] * 4)
        with kerasfleet.Fleet(folder / "mlp.keras", workers=2, batch_size=64, engine="keras", backend=BACKEND) as local:
            expected = local.predict(x)
        monkeypatch.setenv("KERASFLEET_FAULT", f"kill@5000@{tmp_path / 'fired'}")  # once, in whichever actor
        with kerasfleet.Fleet(folder / "mlp.keras", batch_size=64, engine="keras", backend=BACKEND, cluster="ray") as fleet:
            got = fleet.predict(x)
            assert fleet.restarts == 1 and (tmp_path / "fired").exists()
            np.testing.assert_array_equal(got, expected)
            np.save(tmp_path / "x.npy", x)  # a file every node reads: mapped by the actors
            out = fleet.predict(str(tmp_path / "x.npy"), out=str(tmp_path / "y.npy"))
            np.testing.assert_array_equal(out, expected)
            (tmp_path / "shards").mkdir()  # a folder of shards in, a folder out: mapped by path
            for i, part in enumerate(np.array_split(x, 3)):
                np.save(tmp_path / "shards" / f"{i}.npy", part)
            written = fleet.predict(str(tmp_path / "shards"), out=str(tmp_path / "preds"))
            np.testing.assert_array_equal(np.concatenate([np.load(p) for p in written]), expected)
        monkeypatch.delenv("KERASFLEET_FAULT")
        y = kerasfleet.predict(folder / "mlp.keras", x[:3001], batch_size=64, engine="keras", backend=BACKEND, cluster="ray")
        np.testing.assert_array_equal(y, expected[:3001])
        y_true = expected + 0.5
        got = kerasfleet.evaluate(folder / "mlp.keras", x, y_true, metrics=["mae"], batch_size=64, engine="keras", cluster="ray")
        np.testing.assert_allclose(got["mae"], float(np.mean(np.abs(y_true - expected))), rtol=1e-5)

    def test_a_first_call_stages_its_chunks_while_the_actors_start(self, folder):
        """The first large call does not wait for the actors' start to put its rows in the
        object store (its outputs are learnt from their warm-up when the first chunk is back)."""
        x = np.concatenate([load_x(folder, "mlp")] * 4)
        expected = np.concatenate([load_y(folder, "mlp")["output_0"]] * 4)
        with kerasfleet.Fleet(folder / "mlp.keras", engine="keras", backend=BACKEND, cluster="ray") as fleet:
            staged_ready = []
            stage = fleet._cluster.stage

            def watched(payload, label=""):
                staged_ready.append(any(w["ready"] for w in fleet._supervisor.workers()))
                return stage(payload, label)

            fleet._cluster.stage = watched
            assert_same(fleet.predict(x), {"output_0": expected})
            assert len(staged_ready) > 1 and not staged_ready[0]  # staged while no actor was ready
            assert_same(fleet.predict(x, batch_size=37), {"output_0": expected})  # another shape: probed first

    def test_onnx_actors_get_only_the_export_and_load_no_framework(self, folder, tmp_path, monkeypatch):
        monkeypatch.setenv("KERASFLEET_CACHE_DIR", str(tmp_path))  # actors write the shipped files here
        x = np.concatenate([load_x(folder, "mlp")] * 4)
        with kerasfleet.Fleet(folder / "mlp.keras", engine="onnx", backend=BACKEND, cluster="ray") as fleet:
            y = fleet.predict(x)
            fleet.wait_ready(60)  # the call may have ended before the second actor was ready
            for pid in fleet.pids:  # one node: the actors are processes of this machine
                with open(f"/proc/{pid}/maps") as f:
                    maps = f.read()
                assert "onnxruntime" in maps and "jaxlib" not in maps and "tensorflow" not in maps
        np.testing.assert_allclose(y, np.concatenate([load_y(folder, "mlp")["output_0"]] * 4), rtol=1e-5, atol=1e-6)
        shipped = sorted(p.suffix for p in (tmp_path / "ray-files").iterdir())
        assert shipped == [".onnx"]  # the model file is never read by the ONNX engine: not sent

    def test_keep_actors_reuses_the_previous_calls_actors_until_the_block_ends(self, folder):
        x = np.concatenate([load_x(folder, "mlp")] * 4)
        expected = {"output_0": np.concatenate([load_y(folder, "mlp")["output_0"]] * 4)}
        path, options = folder / "mlp.keras", {"engine": "keras", "backend": BACKEND, "cluster": "ray"}
        with keep_actors() as kept:
            assert_same(kerasfleet.predict(path, x, **options), expected)
            (fleet,) = kept.fleets()
            fleet.wait_ready(60)
            pids = sorted(fleet.pids)
            assert_same(kerasfleet.predict(path, x, **options), expected)  # no actor started
            assert kept.fleets() == [fleet] and sorted(fleet.pids) == pids and fleet.restarts == 0
            with keep_actors():  # nested: the same kept fleet, until the outer block ends
                assert_same(kerasfleet.predict(path, x[:10], **options), {"output_0": expected["output_0"][:10]})
            assert kept.fleets() == [fleet]
            # Other options: the kept fleet is closed first (its actors hold both CPUs), then replaced.
            assert_same(kerasfleet.predict(path, x, batch_size=16, **options), expected)
            (other,) = kept.fleets()
            assert other is not fleet and not fleet.usable and other.usable
        assert not other.usable and kept.fleets() == [] and kept_actors() is None
        deadline = time.monotonic() + 30
        while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(psutil.pid_exists(p) for p in pids)  # the actors' processes are gone

    def test_files_that_cannot_be_shipped_fail_the_start_with_the_reason(self, folder, monkeypatch):
        """The model's files are put in the object store by a thread while the actors start:
        a failure there still ends the fleet's start, and says why."""
        put = ray.put

        def refuse_files(value, **kwargs):
            if isinstance(value, bytes):  # the shipped files; chunks are PredictChunk objects
                raise OSError("object store full")
            return put(value, **kwargs)

        monkeypatch.setattr(ray, "put", refuse_files)
        with kerasfleet.Fleet(folder / "mlp.keras", engine="keras", backend=BACKEND, cluster="ray", max_retries=1) as fleet:
            with pytest.raises(WorkerStartError, match="could not be shipped: OSError: object store full"):
                fleet.wait_ready(60)

    def test_sweep_on_ray_actors_equals_local_with_deadlines_and_crashes(self, tmp_path):
        grid = {"mode": ["ok", "hang", "sigkill", "raise"]}
        local = kerasfleet.sweep("sweep_fns:behave", grid, seeds=(0,), timeout=2, store=None, workers=2)
        store = tmp_path / "ray.sqlite"
        remote = kerasfleet.sweep("sweep_fns:behave", grid, seeds=(0,), timeout=2, store=store, workers=2, cluster="ray")

        def summary(result):
            return {t["config"]["mode"]: (t["status"], t["metrics"]) for t in result.trials}

        assert summary(remote) == summary(local)
        assert summary(remote)["hang"][0] == "timeout" and summary(remote)["sigkill"][0] == "crashed"
        assert len(kerasfleet.sweeps.read_store(store)[1]) == 4  # recorded in the driver's SQLite


# -- two simulated nodes: ray.cluster_utils.Cluster ----------------------------------------------
@pytest.fixture(scope="class")
def two_nodes():
    from ray.cluster_utils import Cluster

    # A lost node is noticed within about a second (the default health check takes ~30 s).
    config = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 200, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": config})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, **{k: v for k, v in RAY_OPTIONS.items() if k != "include_dashboard"})
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()
    _wait_for_ray_to_exit()


class TestTwoNodes:
    def test_a_node_lost_mid_run_gives_identical_results(self, folder, two_nodes, monkeypatch):
        cluster, worker = two_nodes
        x = load_x(folder, "mlp")
        monkeypatch.setenv("KERASFLEET_FAULT", "slow@150")  # every chunk takes 150 ms: time to act
        with kerasfleet.Fleet(
            folder / "mlp.keras", batch_size=64, engine="keras", backend=BACKEND, cluster=cluster.address
        ) as fleet:
            fleet.wait_ready(120)
            ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            assert len(ids) == 2 and fleet.plan.workers == 2
            result = {}
            call = threading.Thread(target=lambda: result.setdefault("y", fleet.predict(x)))
            call.start()
            time.sleep(0.4)  # both actors are running chunks
            cluster.remove_node(worker, allow_graceful=False)
            call.join(120)
            assert not call.is_alive()
            assert_same(result["y"], load_y(folder, "mlp"))
            assert fleet.restarts >= 1
