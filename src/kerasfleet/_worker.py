"""The worker process: load once, warm up, then predict chunks into shared buffers.

    caller (supervisor)                         worker
    ───────────────────                         ──────
                                   <- ("ready", WorkerInfo)    model loaded, warm shape compiled
    ("job", id, JobSpec)         ->                            attach the job's buffers
    ("chunk", id, chunk, a, b)   ->                            rows [a, b): read inputs by index,
                                   <- ("done", id, chunk)      write outputs by index
    ("probe", key)               ->  <- ("probed", key, Outputs | None, error)
    ("drop", id)                 ->                            detach the job's buffers
    ("stop",) or EOF             ->                            exit

Only these small tuples cross the pipe. An exception in a chunk goes back as ("error", ...)
with the formatted traceback and the worker carries on; a failure to load goes back as
("fatal", ...) and the worker exits.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from ._buffers import BufferSpec, OpenBuffer
from ._engine import Key, Outputs


@dataclass(frozen=True)
class WorkerInit:
    model_path: str
    input_structure: str
    input_names: tuple[str, ...] | None
    custom_objects: dict[str, Any] | None
    modules: tuple[str, ...]
    safe_mode: bool
    warm_key: Key | None
    engine: str = "keras"  # or "onnx"
    onnx_path: str | None = None
    onnx_meta: dict[str, Any] | None = None
    threads: int = 1


@dataclass(frozen=True)
class WorkerInfo:
    pid: int
    backend: str
    warm_key: Key | None
    warm_outputs: Outputs | None
    startup_s: float


@dataclass(frozen=True)
class JobSpec:
    key: Key
    inputs: tuple[BufferSpec, ...]
    outputs: tuple[BufferSpec, ...]


@dataclass
class _Job:
    spec: JobSpec
    inputs: list[OpenBuffer] = field(default_factory=list)
    outputs: list[OpenBuffer] = field(default_factory=list)

    def close(self) -> None:
        for buf in self.inputs + self.outputs:
            buf.close()


class _Fault:
    """Test-only fault injection (KERASFLEET_FAULT="kind@row[@marker]"), read once at start.

    kinds: kill (SIGKILL), segfault, exit, raise, badpickle; with a marker path the fault fires
    only while that file does not exist (it is created on firing), i.e. once across restarts.
    """

    def __init__(self, text: str | None) -> None:
        self.kind, self.row, self.marker = None, -1, None
        if text:
            parts = text.split("@")
            self.kind, self.row = parts[0], int(parts[1])
            self.marker = parts[2] if len(parts) > 2 else None

    def maybe_fire(self, conn: Any, start: int, stop: int) -> None:
        if self.kind is None or not start <= self.row < stop:
            return
        if self.marker is not None:
            if os.path.exists(self.marker):
                return
            open(self.marker, "w").close()
        if self.kind == "kill":
            os.kill(os.getpid(), 9)
        elif self.kind == "segfault":
            import ctypes

            ctypes.string_at(0)
        elif self.kind == "exit":
            os._exit(3)
        elif self.kind == "badpickle":
            conn.send_bytes(b"\x80\x05not a pickle")
        elif self.kind == "raise":
            raise RuntimeError(f"injected fault at row {self.row}")


def serve(conn: Any, init: WorkerInit) -> None:
    started = time.perf_counter()
    try:
        from ._engine import KerasEngine, OnnxEngine

        engine: KerasEngine | OnnxEngine
        if init.engine == "onnx":
            assert init.onnx_path is not None and init.onnx_meta is not None
            gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1")
            engine = OnnxEngine(init.onnx_path, init.onnx_meta, threads=init.threads, gpu=gpu)
        else:
            engine = KerasEngine(
                init.model_path,
                input_structure=init.input_structure,
                input_names=init.input_names,
                custom_objects=init.custom_objects,
                modules=init.modules,
                safe_mode=init.safe_mode,
            )
        warm = engine.outputs(init.warm_key) if init.warm_key is not None else None
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the caller
        conn.send(("fatal", type(exc).__name__, str(exc), traceback.format_exc()))
        return
    conn.send(("ready", WorkerInfo(os.getpid(), engine.backend, init.warm_key, warm, time.perf_counter() - started)))
    fault = _Fault(os.environ.get("KERASFLEET_FAULT"))
    jobs: dict[int, _Job] = {}
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return  # the caller is gone
            tag = msg[0]
            if tag == "chunk":
                _, job_id, chunk_id, start, stop = msg
                job = jobs[job_id]
                try:
                    fault.maybe_fire(conn, start, stop)
                    engine.predict_rows(job.spec.key, [b.array for b in job.inputs], [b.array for b in job.outputs], start, stop)
                except Exception as exc:  # noqa: BLE001
                    conn.send(("error", job_id, chunk_id, type(exc).__name__, str(exc), traceback.format_exc()))
                else:
                    conn.send(("done", job_id, chunk_id))
            elif tag == "job":
                _, job_id, spec = msg
                jobs[job_id] = _Job(spec, [OpenBuffer(b) for b in spec.inputs], [OpenBuffer(b) for b in spec.outputs])
            elif tag == "drop":
                dropped = jobs.pop(msg[1], None)
                if dropped is not None:
                    dropped.close()
            elif tag == "probe":
                key = msg[1]
                try:
                    conn.send(("probed", key, engine.outputs(key), None))
                except Exception as exc:  # noqa: BLE001
                    conn.send(("probed", key, None, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
            elif tag == "stop":
                return
    finally:
        for job in jobs.values():
            job.close()
        sys.stdout.flush()
