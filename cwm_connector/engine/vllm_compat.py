"""The vLLM names cwm imports, each guarded where vLLM may move it (issue 14).

The connector base classes are required: without them there is no connector,
and the ImportError says so, naming cwm and the vLLM version. The rest are
optional: where a vLLM release moved one, cwm runs without that feature
(metrics, the cache-hit source label, worker reports) and logs it once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from cwm_connector.version import vllm_version

logger = logging.getLogger("vllm.cwm")
TESTED_VERSIONS = ("0.32",)  # run end to end (CPU); 0.33 checked by reading its source


try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
    )
except ImportError as exc:  # pragma: no cover - only with an incompatible vLLM
    raise ImportError(
        f"cwm: vLLM {vllm_version()} has no KVConnectorBase_V1 API ({exc}); cwm needs vLLM "
        f"0.32 or 0.33"
    ) from exc

missing: list[str] = []

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import SupportsHMA
except ImportError:
    missing.append("SupportsHMA (the hybrid allocator stays off with cwm)")

    class SupportsHMA:  # type: ignore[no-redef]
        """Stand-in where vLLM has no hybrid-allocator support for connectors."""


try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
except ImportError:
    missing.append("KVConnectorWorkerMetadata (restores are off: staging cannot be reported)")

    @dataclass
    class KVConnectorWorkerMetadata:  # type: ignore[no-redef]
        """Stand-in where vLLM has no worker metadata."""

        def aggregate(self, other: Any) -> Any:
            return self


try:
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
    )

    HAS_METRICS = True
except ImportError:
    missing.append("KVConnectorStats/KVConnectorPromMetrics (cwm counters not in /metrics)")
    HAS_METRICS = False

    @dataclass
    class KVConnectorStats:  # type: ignore[no-redef]
        """Stand-in where vLLM has no connector stats."""

        data: dict[str, Any]

    class KVConnectorPromMetrics:  # type: ignore[no-redef]
        """Stand-in where vLLM has no connector Prometheus metrics."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.per_engine_labelvalues: dict[int, list[object]] = {}


try:
    from vllm.v1.metrics.cache_hit_source import CacheHitSource

    DISK_HIT_SOURCE: Any = CacheHitSource.DISK
except (ImportError, AttributeError):
    missing.append("CacheHitSource (hits are not labelled by source)")
    DISK_HIT_SOURCE = None


def metric_class(metric_types: dict[type, type], name: str, owner: Any, private: str) -> Any:
    """vLLM's class for a Prometheus metric type ('Counter', 'Histogram'), or None.

    Read from the `metric_types` vLLM passes (public), else from the base class's
    private attribute where it still exists.
    """
    for key, cls in metric_types.items():
        if getattr(key, "__name__", "") == name:
            return cls
    return getattr(owner, private, None)


def log_missing() -> None:
    """One line per optional vLLM name this vLLM lacks."""
    for what in missing:
        logger.warning("cwm: vLLM %s lacks %s", vllm_version(), what)


__all__ = [
    "DISK_HIT_SOURCE",
    "HAS_METRICS",
    "KVConnectorBase_V1",
    "KVConnectorMetadata",
    "KVConnectorPromMetrics",
    "KVConnectorRole",
    "KVConnectorStats",
    "KVConnectorWorkerMetadata",
    "SupportsHMA",
    "log_missing",
    "metric_class",
    "vllm_version",
]
