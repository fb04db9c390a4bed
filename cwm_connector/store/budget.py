"""Keeping the disk tier within its budget: measure, evict, or refuse (applies eviction.py).

The catalog keeps the byte totals (`Catalog.usage`, exact by triggers); the
filesystem's free space comes from statvfs at each check. Eviction is
crash-safe: the rows go in one transaction, the files after its commit (a crash
leaves orphan files, which `cwm store gc` removes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable, Set
from contextlib import AbstractContextManager
from pathlib import Path

from cwm_connector.errors import StoreFullError
from cwm_connector.stats import Stats
from cwm_connector.store import blob
from cwm_connector.store.catalog import Catalog
from cwm_connector.store.disk import DiskTier
from cwm_connector.store.eviction import (
    BATCH,
    Room,
    limit_bytes,
    on_disk_bytes,
    pick_victims,
    room_for,
)

logger = logging.getLogger("vllm.cwm.store")

MAX_ROUNDS = 64  # eviction rounds per write (each frees up to BATCH blobs)


class BlobHolds:
    """Blobs this process reads or is about to name in rows: eviction leaves them alone.

    One per store directory and process (`holds_for`): every worker of the process (one
    per KV-cache group) holds through it, so one group's eviction never takes a blob
    another group is staging. Callers hold `lock` while they look blobs up and hold them,
    as an eviction round does while it picks and deletes; `release` takes it itself.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[bytes, int] = {}

    def hold(self, digests: Iterable[bytes]) -> None:
        """Keep these blobs (caller holds `lock`)."""
        for dig in digests:
            self.counts[dig] = self.counts.get(dig, 0) + 1

    def release(self, digests: Iterable[bytes]) -> None:
        """Undo `hold` (takes `lock` itself)."""
        with self.lock:
            for dig in digests:
                left = self.counts.pop(dig) - 1
                if left:
                    self.counts[dig] = left


_holds: dict[str, BlobHolds] = {}
_holds_lock = threading.Lock()


def holds_for(root: Path) -> BlobHolds:
    """This process's holds on the store at `root`."""
    with _holds_lock:
        return _holds.setdefault(str(root.resolve()), BlobHolds())


class DiskBudget:
    """`disk_bytes` and `disk_min_free` for one store directory."""

    def __init__(
        self, disk: DiskTier, budget_bytes: int, min_free: float, stats: Stats | None = None
    ):
        self.disk = disk
        self.budget_bytes = budget_bytes  # 0: no cap of its own
        self.min_free = min_free  # < 1: a fraction of the filesystem; else bytes
        self.stats = stats

    def fs_space(self) -> tuple[int, int]:
        """(free bytes for an unprivileged writer, total bytes) of the store's filesystem."""
        try:
            st = os.statvfs(self.disk.root)
        except OSError:
            return (1 << 62, 1 << 62)  # cannot tell: the budget alone bounds the tier
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def min_free_bytes(self, fs_total: int) -> int:
        """The free space always left on a filesystem of this size."""
        return int(self.min_free * fs_total) if self.min_free < 1 else int(self.min_free)

    def room(self, catalog: Catalog, incoming: int) -> Room:
        """What writing `incoming` bytes (as stored) needs now."""
        usage = catalog.usage()
        fs_free, fs_total = self.fs_space()
        used = usage.get("disk", 0)
        limit = limit_bytes(used, self.budget_bytes, fs_free, self.min_free_bytes(fs_total))
        return room_for(incoming, used, usage.get("pinned", 0), limit)

    def make_room(
        self,
        catalog: Catalog,
        incoming: int,
        protected: Set[bytes] = frozenset(),
        lock: AbstractContextManager[object] | None = None,
    ) -> tuple[bool, Room]:
        """Evict unpinned blobs (LRU, never `protected`) until `incoming` bytes fit;
        (whether they fit, the last measure).

        `protected` may be a live view: each round reads it, picks and evicts under
        `lock`, the lock its owner holds while it looks blobs up and adds them.
        """
        room = self.room(catalog, incoming)
        evicted = freed = 0
        for _ in range(MAX_ROUNDS):
            if room.free <= 0:
                break
            with lock or contextlib.nullcontext():
                candidates = catalog.eviction_candidates(BATCH)
                victims, _ = pick_victims(candidates, room.free, protected)
                dropped = catalog.evict(victims) if victims else []
                for digest in dropped:  # rows first, committed; then the files
                    self.disk.delete(digest)
            if not dropped:
                break
            sizes = dict(candidates)
            evicted += len(dropped)
            freed += sum(sizes[d] for d in dropped)
            room = self.room(catalog, incoming)
        if evicted:
            if self.stats is not None:
                self.stats.add("evicted_blobs", evicted)
                self.stats.add("evicted_bytes", freed)
            logger.info(
                "cwm: evicted %d unpinned blobs (%.1f MB) to stay within %.1f MB",
                evicted, freed / 1e6, room.limit / 1e6,
            )  # fmt: skip
        return room.used + room.incoming <= room.limit, room

    def full_error(self, room: Room, what: str) -> StoreFullError:
        """The `store_full` error of a write that could not fit, naming what limits it."""
        if self.budget_bytes and room.limit >= self.budget_bytes:
            limit = f"disk_bytes is {self.budget_bytes:,}"
        else:
            limit = (
                f"the filesystem must keep disk_min_free ({self.min_free:g}) free, which "
                f"leaves {max(room.limit, 0):,} bytes for blobs"
            )
        return StoreFullError(
            f"the store is full: {what} needs {room.incoming:,} bytes, {limit}, and windows "
            f"pin {room.pinned:,} bytes that are never evicted; delete windows, raise "
            "disk_bytes or free the filesystem"
        )


def blob_space(raw_bytes: int) -> int:
    """The most a blob of `raw_bytes` can take on disk (uncompressed, with its header, in
    whole filesystem blocks)."""
    return on_disk_bytes(blob.HEADER_SIZE + raw_bytes)
