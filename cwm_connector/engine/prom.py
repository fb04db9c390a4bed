"""cwm's counters in vLLM's own `/metrics`, through the connector stats hooks.

Each step the worker (and the scheduler side) hands vLLM a `CwmStats` holding
the counter increments since its last report, plus freeze/thaw latencies;
vLLM sums them across ranks and passes them to `CwmPromMetrics.observe` in the
API server, which adds them to Prometheus counters and histograms named
`cwm:<counter>_total`, `cwm:freeze_seconds`, `cwm:thaw_seconds`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cwm_connector.engine.vllm_compat import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    metric_class,
)

# Counters exported, by where they are counted (worker stats file or scheduler counters).
COUNTERS = {
    "hit_blocks": "blocks promised to requests as external hits",
    "miss_blocks": "looked-up blocks the store did not hold",
    "prestaged_hit_blocks": "blocks promised from a thaw's staged job",
    "stage_timeouts": "staging jobs given up (recomputed)",
    "captured_blocks": "blocks copied out of the paged cache and stored",
    "captured_raw_bytes": "raw KV bytes captured",
    "stored_bytes": "bytes written to the disk tier (after compression)",
    "loaded_blocks": "blocks scattered into the paged cache",
    "loaded_bytes": "KV bytes scattered into the paged cache",
    "memory_hit_blocks": "blocks staged from the host-memory tier",
    "disk_hit_blocks": "blocks staged from the disk tier",
    "redis_hit_blocks": "blocks staged from the Redis tier",
    "digest_errors": "blobs refused by their digest",
    "load_errors": "promised blocks not loaded (recomputed)",
    "store_errors": "captures that failed to write",
    "redis_copy_errors": "write-behind copies to Redis that failed",
    "auto_freezes": "windows frozen by the auto-freeze policy",
    "auto_freeze_store_full": "auto-freezes refused: windows fill the disk budget",
    "evicted_blobs": "unpinned blobs evicted from the disk tier (LRU, issue 15)",
    "evicted_bytes": "bytes evicted from the disk tier",
    "store_full_blocks": "blocks not captured: windows alone fill the disk budget",
}
# Gauges: the worker's last measure of its disk tier (`cwm:<name>`); ranks report the same
# shared store, so vLLM's sum across ranks is replaced by the largest.
GAUGES = {
    "disk_used_bytes": "bytes of blobs in the disk tier",
    "disk_pinned_bytes": "bytes of the disk tier that windows pin (never evicted)",
    "disk_limit_bytes": "the most the disk tier may hold now (disk_bytes, disk_min_free)",
}
LATENCIES = ("freeze_seconds", "thaw_seconds")
BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class CwmStats(KVConnectorStats):
    """Counter increments and latency samples since the last report."""

    data: dict[str, Any] = field(default_factory=dict)

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, value in other.data.items():
            if isinstance(value, list):
                self.data.setdefault(key, []).extend(value)
            elif key in GAUGES:
                self.data[key] = max(self.data.get(key, 0), value)
            else:
                self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k: (len(v) if isinstance(v, list) else v) for k, v in self.data.items()}

    def is_empty(self) -> bool:
        return not any(self.data.values())


class DeltaTracker:
    """Turns running totals into increments since the last call (thread-safe)."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}
        self._gauges: dict[str, int] = {}
        self._samples: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def observe(self, name: str, seconds: float) -> None:
        """Record one latency sample (freeze_seconds, thaw_seconds)."""
        with self._lock:
            self._samples.setdefault(name, []).append(seconds)

    def take(self, totals: Mapping[str, int]) -> CwmStats | None:
        """The increments of the exported counters, and pending samples; None if nothing."""
        data: dict[str, Any] = {}
        with self._lock:
            for name in COUNTERS:
                value = int(totals.get(name, 0))
                delta = value - self._last.get(name, 0)
                if delta > 0:
                    data[name] = delta
                self._last[name] = value
            for name in GAUGES:
                if name in totals and totals[name] != self._gauges.get(name):
                    data[name] = self._gauges[name] = int(totals[name])
            for name, samples in self._samples.items():
                if samples:
                    data[name] = samples
            self._samples = {}
        return CwmStats(data) if data else None


class CwmPromMetrics(KVConnectorPromMetrics):
    """Registers cwm's counters and histograms with vLLM's Prometheus registry."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        counter_cls = metric_class(metric_types, "Counter", self, "_counter_cls")
        histogram_cls = metric_class(metric_types, "Histogram", self, "_histogram_cls")
        gauge_cls = metric_class(metric_types, "Gauge", self, "_gauge_cls")
        self._gauges: dict[str, dict[int, Any]] = {}
        if counter_cls is None or histogram_cls is None:  # a vLLM that moved them: no metrics
            self._counters: dict[str, dict[int, Any]] = {}
            self._histograms: dict[str, dict[int, Any]] = {}
            return
        if gauge_cls is not None:
            self._gauges = {
                name: self._per_engine(
                    gauge_cls(
                        name=f"cwm:{name}",
                        documentation=doc,
                        labelnames=labelnames,
                        multiprocess_mode="mostrecent",
                    )
                )
                for name, doc in GAUGES.items()
            }
        self._counters = {
            name: self._per_engine(
                counter_cls(name=f"cwm:{name}", documentation=doc, labelnames=labelnames)
            )
            for name, doc in COUNTERS.items()
        }
        self._histograms = {
            name: self._per_engine(
                histogram_cls(
                    name=f"cwm:{name}",
                    documentation=f"cwm {name.split('_')[0]} latency",
                    labelnames=labelnames,
                    buckets=BUCKETS,
                )
            )
            for name in LATENCIES
        }

    def _per_engine(self, metric: Any) -> dict[int, Any]:
        return {idx: metric.labels(*values) for idx, values in self.per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, value in transfer_stats_data.items():
            if name in self._counters and value:
                self._counters[name][engine_idx].inc(value)
            elif name in self._gauges:
                self._gauges[name][engine_idx].set(value)
            elif name in self._histograms:
                for sample in value:
                    self._histograms[name][engine_idx].observe(sample)


def prometheus_text(totals: Mapping[str, int]) -> str:
    """cwm's counters in the Prometheus text format (for `cwm metrics --prometheus`)."""
    lines = []
    for name, doc in COUNTERS.items():
        lines += [
            f"# HELP cwm:{name}_total {doc}",
            f"# TYPE cwm:{name}_total counter",
            f"cwm:{name}_total {int(totals.get(name, 0))}",
        ]
    for name, doc in GAUGES.items():
        if name in totals:
            lines += [f"# HELP cwm:{name} {doc}", f"# TYPE cwm:{name} gauge",
                      f"cwm:{name} {int(totals[name])}"]  # fmt: skip
    return "\n".join(lines) + "\n"
