"""Thread-safe counters, mirrored to `<store_dir>/stats/<name>.json` for tools and tests."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

FLUSH_INTERVAL_S = 0.5


class Stats:
    """Named integer counters for one process role."""

    def __init__(self, path: Path | None):
        self._path = path
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._seq = self._written_seq = 0
        self._counts: Counter[str] = Counter()
        self._dirty = False
        self._last_flush = 0.0

    def add(self, name: str, value: int = 1) -> None:
        """Increase a counter."""
        with self._lock:
            self._counts[name] += value
            self._dirty = True

    def set(self, name: str, value: int) -> None:
        """Set a counter kept elsewhere (marks the file dirty only on change)."""
        with self._lock:
            if self._counts.get(name) != value:
                self._counts[name] = value
                self._dirty = True

    def snapshot(self) -> dict[str, int]:
        """A copy of every counter."""
        with self._lock:
            return dict(self._counts)

    def flush(self, force: bool = False) -> None:
        """Write the counters atomically if they changed (throttled unless forced)."""
        if self._path is None:
            return
        now = time.monotonic()
        with self._lock:
            if not self._dirty or (not force and now - self._last_flush < FLUSH_INTERVAL_S):
                return
            data = json.dumps(dict(self._counts), sort_keys=True)
            self._dirty = False
            self._seq += 1
            seq = self._seq
            self._last_flush = now
        # One writer at a time: threads sharing the temp name would lose a write.
        with self._write_lock:
            if self._written_seq > seq:
                return  # a newer snapshot is already on disk
            self._written_seq = seq
            try:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self._path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(data)
                os.replace(tmp, self._path)
            except OSError:
                pass  # stats are best effort


def read_stats(store_dir: Path, name: str = "worker-rank0") -> dict[str, int]:
    """The last counters a process role wrote under a store (empty if none yet)."""
    path = store_dir / "stats" / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
