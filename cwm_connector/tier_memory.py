"""The host-memory tier: verified blobs in RAM, least recently used first out.

Entries are raw (decoded, digest-verified) blob bytes keyed by digest. The
byte budget is never exceeded: a put that cannot fit after evicting every
unpinned entry is refused (a miss later, never an error). A pinned entry (the
blobs of a thawed window, until its next request loaded them or the pin
expired) is never evicted.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class _Entry:
    data: np.ndarray  # uint8, the raw blob bytes
    pinned_until: float = 0.0


class MemoryTier:
    """An LRU map digest -> raw blob bytes with a byte budget and expiring pins."""

    def __init__(self, budget_bytes: int, clock: Callable[[], float] = time.monotonic):
        self.budget_bytes = budget_bytes
        self._clock = clock
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        """Bytes held now (never above the budget)."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def contains(self, digest: bytes) -> bool:
        """True when the blob is held (does not touch the LRU order)."""
        with self._lock:
            return digest in self._entries

    def get(self, digest: bytes) -> np.ndarray | None:
        """The blob's bytes (now most recently used), or None."""
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(digest)
            self.hits += 1
            return entry.data

    def put(self, digest: bytes, data: np.ndarray, pin_s: float = 0.0) -> bool:
        """Hold a verified blob (pinned for pin_s seconds); False if it cannot fit."""
        size = int(data.nbytes)
        with self._lock:
            old = self._entries.pop(digest, None)
            if old is not None:
                self._nbytes -= old.data.nbytes
                pin_s = max(pin_s, old.pinned_until - self._clock())
            if not self._make_room(size):
                if old is not None:  # put the old one back: refusing must lose nothing
                    self._entries[digest] = old
                    self._nbytes += old.data.nbytes
                return False
            until = self._clock() + pin_s if pin_s > 0 else 0.0
            self._entries[digest] = _Entry(data, until)
            self._nbytes += size
            return True

    def unpin(self, digests: Iterable[bytes]) -> None:
        """Let these blobs be evicted again."""
        with self._lock:
            for digest in digests:
                entry = self._entries.get(digest)
                if entry is not None:
                    entry.pinned_until = 0.0

    def delete(self, digest: bytes) -> bool:
        """Drop a blob; True if it was held."""
        with self._lock:
            entry = self._entries.pop(digest, None)
            if entry is None:
                return False
            self._nbytes -= entry.data.nbytes
            return True

    def num_pinned(self) -> int:
        """Entries whose pin has not expired."""
        now = self._clock()
        with self._lock:
            return sum(1 for e in self._entries.values() if e.pinned_until > now)

    def _make_room(self, size: int) -> bool:
        """Evict unpinned entries, oldest first, until size fits (lock held)."""
        if size > self.budget_bytes:
            return False
        now = self._clock()
        for digest in list(self._entries):
            if self._nbytes + size <= self.budget_bytes:
                break
            entry = self._entries[digest]
            if entry.pinned_until > now:
                continue
            del self._entries[digest]
            self._nbytes -= entry.data.nbytes
            self.evictions += 1
        return self._nbytes + size <= self.budget_bytes
