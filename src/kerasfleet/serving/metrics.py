"""Prometheus metrics at `GET /metrics`, with Triton's names where the meaning is the same.

| metric | type | meaning |
| --- | --- | --- |
| `nv_inference_request_success` | counter | requests answered 200 |
| `nv_inference_request_failure` | counter | requests answered with an error, by `reason` (bad_request, overloaded, timeout, unavailable, error) |
| `nv_inference_count` | counter | rows inferred (Triton: "inferences", one per batch element) |
| `nv_inference_exec_count` | counter | batches executed; mean batch size = `nv_inference_count / nv_inference_exec_count` |
| `nv_inference_request_duration_us` | counter | cumulative request time, arrival to answer (us) |
| `nv_inference_queue_duration_us` | counter | cumulative time requests waited for their batch (us) |
| `nv_inference_compute_infer_duration_us` | counter | cumulative batch compute time (us) |
| `nv_inference_pending_request_count` | gauge | requests waiting for a batch (the queue depth) |
| `kerasfleet_requests_in_flight` | gauge | requests received and not yet answered |
| `kerasfleet_queue_seconds` | histogram | per request: time waiting for its batch |
| `kerasfleet_compute_seconds` | histogram | per batch: time running it |
| `kerasfleet_batch_rows` | histogram | per batch: rows in it |

Every metric carries `model` and `version` labels (`version` is always "1"), as Triton's do.
Each server has its own registry: two servers in one process never mix their counts.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LABELS = ("model", "version")
_SECONDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        def counter(name: str, doc: str, *extra: str) -> Counter:
            return Counter(name, doc, [*_LABELS, *extra], registry=r)

        # prometheus-client appends "_total" to counters; Triton's names have none, so the
        # exposition below strips it back (the names then match Triton's dashboards).
        self.success = counter("nv_inference_request_success", "Requests answered 200")
        self.failure = counter("nv_inference_request_failure", "Requests answered with an error", "reason")
        self.rows = counter("nv_inference_count", "Rows inferred")
        self.batches = counter("nv_inference_exec_count", "Batches executed")
        self.request_us = counter("nv_inference_request_duration_us", "Cumulative request time (us)")
        self.queue_us = counter("nv_inference_queue_duration_us", "Cumulative queue time (us)")
        self.compute_us = counter("nv_inference_compute_infer_duration_us", "Cumulative batch compute time (us)")
        self.pending = Gauge("nv_inference_pending_request_count", "Requests waiting for a batch", _LABELS, registry=r)
        self.in_flight = Gauge("kerasfleet_requests_in_flight", "Requests received and not yet answered", _LABELS, registry=r)
        self.queue_s = Histogram(
            "kerasfleet_queue_seconds", "Time a request waited for its batch", _LABELS, buckets=_SECONDS, registry=r
        )
        self.compute_s = Histogram("kerasfleet_compute_seconds", "Time running one batch", _LABELS, buckets=_SECONDS, registry=r)
        self.batch_rows = Histogram("kerasfleet_batch_rows", "Rows per batch", _LABELS, buckets=_ROWS, registry=r)

    def model(self, name: str) -> ModelMetrics:
        return ModelMetrics(self, name)

    def exposition(self) -> bytes:
        # prometheus-client also writes a "_created" timestamp per counter, which Triton's
        # metrics do not have: dropped, like the "_total" suffix.
        lines = generate_latest(self.registry).split(b"\n")
        kept = [line for line in lines if b"_created{" not in line and b"_created " not in line]
        return b"\n".join(kept).replace(b"_total{", b"{").replace(b"_total ", b" ")


class ModelMetrics:
    """One model's children of every metric, bound once (label lookups cost microseconds)."""

    def __init__(self, m: Metrics, name: str) -> None:
        labels = (name, "1")
        self.success = m.success.labels(*labels)
        self._failure = m.failure
        self._labels = labels
        self.rows = m.rows.labels(*labels)
        self.batches = m.batches.labels(*labels)
        self.request_us = m.request_us.labels(*labels)
        self.queue_us = m.queue_us.labels(*labels)
        self.compute_us = m.compute_us.labels(*labels)
        self.pending = m.pending.labels(*labels)
        self.in_flight = m.in_flight.labels(*labels)
        self.queue_s = m.queue_s.labels(*labels)
        self.compute_s = m.compute_s.labels(*labels)
        self.batch_rows = m.batch_rows.labels(*labels)

    def failed(self, reason: str) -> None:
        self._failure.labels(*self._labels, reason).inc()

    def on_batch(self) -> Callable[[int, float], None]:
        def record(rows: int, seconds: float) -> None:
            self.rows.inc(rows)
            self.batches.inc()
            self.batch_rows.observe(rows)
            self.compute_s.observe(seconds)
            self.compute_us.inc(seconds * 1e6)

        return record

    def on_queued(self) -> Callable[[float], None]:
        def record(seconds: float) -> None:
            self.queue_s.observe(seconds)
            self.queue_us.inc(seconds * 1e6)

        return record
