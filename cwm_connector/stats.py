"""Thread-safe counters, mirrored to `<store_dir>/stats/<name>.json` for tools and tests."""

from __future__ import annotations

import contextlib
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
        if path is not None:
            clean_stale_tmp(path)
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
            tmp = self._path.with_suffix(f".{os.getpid()}.tmp")
            try:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(data)
                os.replace(tmp, self._path)
            except OSError:  # stats are best effort; a full disk must not keep a partial file
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)


def clean_stale_tmp(path: Path) -> int:
    """Remove temp files of this counter file left by processes that died mid-write."""
    removed = 0
    try:
        entries = list(path.parent.glob(f"{path.stem}.*.tmp"))
    except OSError:
        return 0
    for entry in entries:
        pid_text = entry.name[len(path.stem) + 1 : -len(".tmp")]
        if pid_text.isdigit() and _pid_alive(int(pid_text)):
            continue
        with contextlib.suppress(OSError):
            entry.unlink(missing_ok=True)
            removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def read_stats(store_dir: Path, name: str = "worker-rank0") -> dict[str, int]:
    """The last counters a process role wrote under a store (empty if none yet)."""
    path = store_dir / "stats" / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
