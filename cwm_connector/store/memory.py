"""The host-memory tier: verified blobs in RAM, least recently used first out.

Entries are raw (decoded, digest-verified) blob bytes keyed by digest. The
byte budget is never exceeded: a put that cannot fit (a blob larger than the
whole budget) is refused (a miss later, never an error). A thawed window's
blobs are not held here but in a staged job of the worker, until its next
request loads them or `thaw_pin_s` runs out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np


class MemoryTier:
    """An LRU map digest -> raw blob bytes (uint8 arrays) with a byte budget."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[bytes, np.ndarray] = OrderedDict()
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
            data = self._entries.get(digest)
            if data is None:
                self.misses += 1
                return None
            self._entries.move_to_end(digest)
            self.hits += 1
            return data

    def put(self, digest: bytes, data: np.ndarray) -> bool:
        """Hold a verified blob, evicting the least recently used; False if it cannot fit."""
        size = int(data.nbytes)
        if size > self.budget_bytes:
            return False  # refused before anything is evicted: refusing loses nothing
        with self._lock:
            old = self._entries.pop(digest, None)
            if old is not None:
                self._nbytes -= old.nbytes
            while self._entries and self._nbytes + size > self.budget_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._nbytes -= evicted.nbytes
                self.evictions += 1
            self._entries[digest] = data
            self._nbytes += size
            return True

    def delete(self, digest: bytes) -> bool:
        """Drop a blob; True if it was held."""
        with self._lock:
            data = self._entries.pop(digest, None)
            if data is None:
                return False
            self._nbytes -= data.nbytes
            return True
