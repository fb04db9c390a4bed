"""The tiered blob store: host memory -> local disk -> Redis, behind one interface.

Reads go through the tiers in order; a blob found in Redis is verified and
promoted to memory (read-through). A disk hit is not: the OS page cache holds
recently read blob files already, and a second copy would lengthen every
restore (measured: 32 MB staged in 15.7 ms without, 39.3 ms with promotion).
Writes are durable on disk first, then copied to Redis by a background thread (write-behind): the
capture thread never waits for Redis, and a Redis that is down only makes the
copy a future miss (counted). Block maps (hash -> digest) follow the same
order: the local SQLite catalog, then Redis.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from cwm_connector.errors import BlobMissingError, CwmError, StoreError
from cwm_connector.stats import Stats
from cwm_connector.store import blob
from cwm_connector.store.blob import Buffer
from cwm_connector.store.catalog import Catalog
from cwm_connector.store.disk import DiskTier
from cwm_connector.store.memory import MemoryTier

if TYPE_CHECKING:
    from cwm_connector.store.redis import RedisTier
    from cwm_connector.store.redis_pipe import Pending

logger = logging.getLogger("vllm.cwm.store")

TIERS = ("memory", "disk", "redis")
SHARED_SLACK = 64  # bytes a reply's buffer may hold beyond the raw blob (header, CRLF)
REDIS_QUEUE_MAX = 4096  # pending write-behind jobs; beyond this a copy is dropped (a future miss)


class TieredStore:
    """Blobs by digest over memory, disk and (optionally) Redis."""

    def __init__(
        self,
        memory: MemoryTier,
        disk: DiskTier,
        redis: RedisTier | None,
        stats: Stats,
        *,
        promote: bool = True,
        writer: RedisTier | None = None,
    ):
        self.memory = memory
        self.disk = disk
        self.redis = redis
        # Copies to Redis run in the background: their own connections and a longer
        # timeout than restores' (a 500-block copy timed out at 0.25 s under load: issue 16)
        self.writer = writer or redis
        self.stats = stats
        self.promote = promote
        self._redis_q: queue.Queue[tuple[str, list[tuple[bytes, bytes]]] | None] = queue.Queue(
            REDIS_QUEUE_MAX
        )
        self._redis_thread: threading.Thread | None = None
        if redis is not None:
            self._redis_thread = threading.Thread(
                target=self._redis_loop, name="cwm-redis", daemon=True
            )
            self._redis_thread.start()

    # -- block maps ------------------------------------------------------------
    def digests_for(
        self,
        catalog: Catalog,
        fp_id: str,
        hashes: Sequence[bytes],
        known: Mapping[bytes, bytes] | None = None,
    ) -> dict[bytes, bytes]:
        """hash -> digest from the local catalog, then `known` (what Redis told the
        scheduler a moment ago), then Redis for the rest."""
        found = catalog.digests_for(fp_id, hashes)
        if known and len(found) < len(hashes):
            found.update((h, known[h]) for h in hashes if h not in found and h in known)
        if self.redis is not None and len(found) < len(hashes):
            rest = [h for h in hashes if h not in found]
            found.update(self.redis.get_blocks(fp_id, rest))
        return found

    # -- reads -----------------------------------------------------------------
    def fetch_remote(self, digests: Sequence[bytes]) -> dict[bytes, bytes] | Pending:
        """Start reading from Redis (chunks over parallel pipelines, no per-blob round trip)
        the blobs neither memory nor disk holds; `read_into` waits for each one's chunk."""
        if self.redis is None:
            return {}
        remote = [d for d in digests if not self.memory.contains(d) and not self.disk.contains(d)]
        return self.redis.prefetch_blobs(remote) if remote else {}

    def read_into(
        self,
        digest: bytes,
        segments: Sequence[memoryview],
        remote: dict[bytes, bytes] | Pending | None = None,
    ) -> str:
        """Read and verify one blob into segments; return the tier that served it.

        Raises BlobMissingError when no tier has it, BlobCorruptError when the
        only copy found does not verify, StoreError on I/O errors.
        """
        held = self.memory.get(digest)
        if held is not None and held.nbytes == sum(len(s) for s in segments):
            offset = 0
            for segment in segments:  # verified when it entered the tier
                segment[:] = memoryview(held[offset : offset + len(segment)])
                offset += len(segment)
            return self._served("memory")
        # fetch_remote found no local copy of a blob it asked Redis for: no disk lookup
        # first (a failed open per blob hands the GIL to the engine's thread each time)
        data = remote.get(digest) if remote is not None and digest in remote else None
        if data is None:
            try:
                # A disk hit is not promoted: the copy would sit on the restore's critical
                # path (+24 ms median for 32 MB) while the OS page cache keeps the blob.
                self.disk.read_into(digest, segments)
                return self._served("disk")
            except BlobMissingError:
                if self.redis is None:
                    raise
            if remote is None or digest not in remote:  # a batch asked already: absent is a miss
                data = self.redis.get_blobs([digest]).get(digest)
        if data is None:
            raise BlobMissingError(f"blob {digest.hex()} is in no tier")
        raw = blob.unpack_into(data, digest, segments)
        if self.promote:
            self.memory.put(digest, _held(raw))
        return self._served("redis")

    def _served(self, tier: str) -> str:
        self.stats.add(f"{tier}_hit_blocks")
        return tier

    # -- writes ----------------------------------------------------------------
    def put(self, digest: bytes, segments: Sequence[Buffer], codec: str) -> int:
        """Write a blob durably to disk; return its stored size."""
        return self.disk.put(digest, segments, codec)

    def share(self, fp_id: str, rows: list[tuple[bytes, bytes]]) -> None:
        """Queue (hash, digest) rows and their blobs for Redis (write-behind; never blocks)."""
        if self.redis is None or not rows:
            return
        try:
            self._redis_q.put_nowait((fp_id, rows))
        except queue.Full:
            self.stats.add("redis_copy_dropped_blocks", len(rows))

    def upload(self, fp_id: str | None, rows: Sequence[tuple[bytes, bytes]]) -> int:
        """Copy these blocks' blobs (from disk) and rows to Redis now; return blobs written.

        Raises StoreError when Redis fails, BlobMissingError when a blob is on no disk.
        """
        redis = self.writer
        assert redis is not None
        digests = list(dict.fromkeys(d for _, d in rows))
        present = redis.has_blobs(digests) if digests else set()
        if not redis.available():
            raise StoreError("redis is unavailable", retryable=True)
        items = []
        for dig in digests:
            if dig not in present:
                try:
                    items.append((dig, self.disk.path_for(dig).read_bytes()))
                except FileNotFoundError as exc:
                    raise BlobMissingError(f"blob {dig.hex()} is not on this disk") from exc
        written = redis.put_blobs(items) if items else 0
        if fp_id is not None:
            redis.put_blocks(fp_id, list(rows))
        self.stats.add("redis_written_blobs", written)
        self.stats.add("redis_written_bytes", sum(len(v) for _, v in items))
        return written

    def _redis_loop(self) -> None:
        while (job := self._redis_q.get()) is not None:
            fp_id, rows = job
            try:
                self.upload(fp_id, rows)
            except (CwmError, OSError) as exc:
                self.stats.add("redis_copy_errors")
                self.stats.add("redis_copy_dropped_blocks", len(rows))
                logger.warning("cwm: copy of %d blocks to redis failed: %s", len(rows), exc)
            self.flush_stats()

    def close(self, timeout_s: float = 5.0) -> None:
        """Let queued Redis copies finish (bounded), then stop."""
        if self._redis_thread is not None:
            try:
                self._redis_q.put(None, timeout=timeout_s)
            except queue.Full:
                return
            self._redis_thread.join(timeout_s)

    def flush_stats(self) -> None:
        """Write the counters, with the tiers' current sizes and Redis's own counters."""
        for tier, values in self.tier_stats().items():
            for key, value in values.items():
                if not key.endswith("hit_blocks"):
                    self.stats.set(f"{tier}_{key}", value)
        self.stats.flush(force=True)

    def tier_stats(self) -> dict[str, dict[str, int]]:
        """Per-tier sizes and hits of this process."""
        counts = self.stats.snapshot()
        out = {
            "memory": {
                "bytes": self.memory.nbytes,
                "blobs": len(self.memory),
                "evictions": self.memory.evictions,
            }
        }
        for tier in TIERS:
            out.setdefault(tier, {})["hit_blocks"] = counts.get(f"{tier}_hit_blocks", 0)
        if self.redis is not None:
            out["redis"].update(self.redis.counters())
            if self.writer is not self.redis and self.writer is not None:
                for key, value in self.writer.counters().items():
                    out["redis"][key] = out["redis"].get(key, 0) + value
        return out


def _held(raw: memoryview) -> np.ndarray:
    """A verified Redis blob's raw bytes for the memory tier, without a copy when possible.

    redis_bulk reads each large value into a buffer of its own, and nothing writes to it
    once read: the tier keeps that buffer (saves ~10 ms a 32 MB restore, GIL held). A
    view into a buffer shared with other replies is copied: the tier counts bytes, and
    a kept view would keep the whole buffer alive.
    """
    if memoryview(raw.obj).nbytes <= raw.nbytes + SHARED_SLACK:
        return np.frombuffer(raw, dtype=np.uint8)
    return np.frombuffer(raw, dtype=np.uint8).copy()
