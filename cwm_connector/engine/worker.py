"""Worker-side byte moving: capture (gather + write-behind), staging (read + verify), loads.

Threads:
- the engine thread calls `submit` with each step's plan; loads (a scatter
  from already-verified host memory) start right there, before the forward,
  whole or layer by layer (loads.py, layer_loads.py);
- a capture thread gathers kept blocks into host memory, releases them to
  vLLM, then digests and writes the blobs and their catalog rows;
- a stage thread reads and verifies blobs for pending hits into host memory;
- prestage requests (a thaw, through the worker channel) read, verify and pin
  a window's blobs in the memory tier, so the next request stages by memcpy;
- at start, rank 0 checks every catalogued blob file once and drops the rows
  of missing or broken ones (store_check.py).
Every storage error is logged, counted and turned into a miss. A capture is
all or nothing: when a write fails (disk full, read-only, catalog locked) the
blobs it wrote are removed again and its blocks are reported as not stored.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from cwm_connector.config import CwmConfig
from cwm_connector.engine.kv_layout import KVLayout
from cwm_connector.engine.layer_loads import LoadPart
from cwm_connector.engine.loads import BlockLoader
from cwm_connector.engine.plans import CaptureJob, LoadJob, StageJob, StepPlan, WorkerReport
from cwm_connector.engine.staging import StagingBuffer
from cwm_connector.errors import BlobCorruptError, BlobMissingError, CwmError
from cwm_connector.stats import Stats
from cwm_connector.store.blob import digest_segments
from cwm_connector.store.budget import DiskBudget, blob_space, holds_for
from cwm_connector.store.catalog import Catalog, catalog_path
from cwm_connector.store.check import check_store
from cwm_connector.store.disk import DiskTier
from cwm_connector.store.eviction import NO_LIMIT
from cwm_connector.store.memory import MemoryTier
from cwm_connector.store.tiered import TieredStore

if TYPE_CHECKING:
    from cwm_connector.store.redis import RedisTier
    from cwm_connector.store.redis_pipe import Pending

logger = logging.getLogger("vllm.cwm.worker")

NUM_READERS = 2  # parallel blob reads while staging
CATALOG_RETRY_S = 10.0  # an unavailable catalog is reopened at most this often (capture)
PREWARM_BYTES = 256 << 20  # staging memory prefaulted at start (fresh pages cost more than a copy)
REDIS_COPY_TIMEOUT_S = 5.0  # write-behind copies to Redis (a background thread): patient
UPKEEP_S = 2.0  # the capture thread records blob use and checks the disk budget this often


@dataclass(slots=True)
class _Staged:
    buffer: StagingBuffer  # rows [0, len(digests)) hold verified blocks
    digests: list[bytes]
    expires_at: float = math.inf  # a thaw's prestaged job is released after thaw_pin_s
    prestaged: bool = False

    @property
    def num_blocks(self) -> int:
        return len(self.digests)


@dataclass(slots=True)
class _Capture:
    job: CaptureJob
    buffer: StagingBuffer | None = None  # CUDA: the gather was already queued into it
    event: torch.cuda.Event | None = None
    failed: bool = False


class CwmWorker:
    """Moves KV bytes between the paged cache, host memory and the store."""

    def __init__(
        self,
        cfg: CwmConfig,
        fp_id: str,
        layout: KVLayout,
        rank: int,
        *,
        group: int = 0,
        stats: Stats | None = None,
    ):
        self.cfg = cfg
        self.fp_id = fp_id
        self.layout = layout
        self.rank = rank
        self.group = group  # the KV-cache group whose layers `layout` holds
        root = cfg.store_path
        self.disk = DiskTier(root)
        self.memory = MemoryTier(cfg.memory_bytes)
        self.catalog_path = catalog_path(root)
        self.stats = stats or Stats(root / "stats" / f"worker-rank{rank}.json")
        self.store = TieredStore(
            self.memory, self.disk, redis_tier(cfg), self.stats,
            writer=redis_tier(cfg, REDIS_COPY_TIMEOUT_S),
        )  # fmt: skip
        self.budget = DiskBudget(self.disk, cfg.disk_bytes, cfg.disk_min_free, self.stats)
        self._used: set[bytes] = set()  # blobs staged or captured again since the last upkeep
        self._holds = holds_for(root)  # blobs being read or named now: never evicted
        self._full_logged = False  # the store-full line is logged once per episode
        self.pool = layout.new_pool(max_idle_bytes=min(cfg.memory_bytes, PREWARM_BYTES))
        self._lock = threading.Lock()
        self._staged: dict[int, _Staged] = {}
        self._staged_bytes = 0
        self._dropped: set[int] = set()
        self._capturing: set[str] = set()  # requests whose blocks vLLM keeps for us
        self._gathered: set[str] = set()
        self._finished_seen: set[str] = set()
        self._report = WorkerReport(rank, group)
        self._readers = ThreadPoolExecutor(
            NUM_READERS, thread_name_prefix="cwm-read", initializer=_leave_forward_cores
        )
        self._capture_q: queue.Queue[_Capture | None] = queue.Queue()
        # CUDA: copies run on their own stream, overlapping the forward passes.
        self._copy_stream = torch.cuda.Stream(layout.device) if layout.is_cuda else None
        self.loader = BlockLoader(
            layout, self.pool, self.stats, self._copy_stream, verify=cfg.verify_restore
        )
        self._stage_q: queue.Queue[StageJob | None] = queue.Queue()
        self._capture_failing = False  # the last capture failed (logged once it recovers)
        self._catalog_tried = 0.0  # monotonic time of the capture thread's last catalog open
        removed = self.disk.clean_orphan_tmp()
        if removed:
            logger.info("cwm: removed %d orphaned temp files", removed)
        self._threads = [
            threading.Thread(target=self._capture_loop, name="cwm-capture", daemon=True),
            threading.Thread(target=self._stage_loop, name="cwm-stage", daemon=True),
        ]
        if rank == 0 and group == 0:  # one is enough: the blob rows are shared
            self._threads.append(
                threading.Thread(target=self._check_store, name="cwm-check", daemon=True)
            )
        for thread in self._threads:
            thread.start()

    # -- engine thread -----------------------------------------------------
    def submit(self, plan: StepPlan, by_layer: bool = False) -> None:
        """Queue this step's captures and stages, apply drops, start the loads.

        by_layer: the forward will call `wait_for_layer` before each layer reads
        the cache, so loads go layer by layer (layer_loads.py); else they are
        complete (CPU) or ordered before the whole forward (CUDA) on return.
        """
        self.loader.step_begins()
        self._expire_staged()
        for job in plan.captures:
            with self._lock:
                self._capturing.add(job.req_id)
            self._capture_q.put(self._start_gather(job))
        for job in plan.stages:
            self._stage_q.put(job)
        with self._lock:
            for job_id in plan.drops:
                if self._release(job_id) is None:
                    self._dropped.add(job_id)  # still queued or being staged
        parts = [part for load in plan.loads if (part := self._load_part(load)) is not None]
        if parts:
            self.loader.load(parts, by_layer)
        self.stats.flush(force=bool(plan.loads))

    def wait_for_layer(self, layer_name: str) -> None:
        """Before a layer reads the cache: its blocks of this step's loads are in place."""
        self.loader.wait_for_layer(layer_name)

    def _load_part(self, load: LoadJob) -> LoadPart | None:
        """The staged blocks of one load; the promised ones not in hand are load errors."""
        with self._lock:
            staged = self._release(load.job_id)
        block_ids = load.block_ids
        num = min(0 if staged is None else staged.num_blocks, len(block_ids))
        if num < len(block_ids):
            # Promised but not in hand: vLLM recomputes these (kv_load_failure_policy).
            missing = len(block_ids) - num
            logger.error("cwm: load job %d lacks %d staged blocks", load.job_id, missing)
            self.loader.add_errors(block_ids[num:])
        if num == 0 or staged is None:
            return None
        return LoadPart(
            load.job_id, block_ids[:num], staged.buffer, staged.digests[:num], staged.prestaged
        )

    def _start_gather(self, job: CaptureJob) -> _Capture:
        """On CUDA, queue the gather on the copy stream now (it overlaps the next forward)."""
        if self._copy_stream is None:
            return _Capture(job)
        buffer = self.pool.take(len(job.block_ids))
        try:
            event = self.layout.gather(job.block_ids, buffer, stream=self._copy_stream)
        except Exception:
            logger.exception("cwm: gather failed for %s", job.req_id)
            return _Capture(job, buffer, None, failed=True)
        return _Capture(job, buffer, event)

    def _release(self, job_id: int) -> _Staged | None:
        staged = self._staged.pop(job_id, None)
        if staged is not None:
            self._staged_bytes -= staged.num_blocks * self.layout.block_bytes
        return staged

    def get_finished(self, finished_req_ids: set[str]) -> set[str]:
        """Requests whose kept blocks are copied out and may be freed."""
        with self._lock:
            # vLLM accepts a finished-sending id only once it announced it as finished.
            self._finished_seen.update(finished_req_ids & self._capturing)
            done = self._gathered & self._finished_seen
            self._gathered -= done
            self._finished_seen -= done
            self._capturing -= done
        return done

    def unregister(self, timeout_s: float = 30.0) -> None:
        """Before sleep mode: finish the gathers of kept blocks, then drop every KV view."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if self._capturing <= self._gathered:
                    break
            time.sleep(0.01)
        else:
            logger.warning("cwm: sleep mode went on with captures still gathering")
        if self._copy_stream is not None:
            self._copy_stream.synchronize()
        self.layout.release()

    def restore(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """After a wake-up: copy to and from the tensors vLLM registers now."""
        self.layout.rebind(kv_caches)

    def take_load_errors(self) -> set[int]:
        """Block ids that failed to load since the last call (this step's loads complete)."""
        return self.loader.take_errors()

    def take_report(self) -> WorkerReport | None:
        """What finished since the last report, or None."""
        with self._lock:
            report, self._report = self._report, WorkerReport(self.rank, self.group)
        return None if report.is_empty() else report

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop the threads, letting queued writes finish within the timeout."""
        self._capture_q.put(None)
        self._stage_q.put(None)
        for thread in self._threads:
            thread.join(timeout_s)
        self._readers.shutdown(wait=False)
        self.store.close()
        self.stats.flush(force=True)

    # -- capture thread ----------------------------------------------------
    def _check_store(self) -> None:
        _leave_forward_cores()
        check_store(
            self.catalog_path, self.disk, self.stats, skip_absent=self.store.redis is not None
        )
        self._flush_stats()

    def _capture_catalog(self, catalog: Catalog) -> Catalog:
        """The capture thread's catalog, reopened (at most every CATALOG_RETRY_S) if it was
        unavailable: a lock released or a file repaired lets capture resume."""
        if catalog.writable or time.monotonic() - self._catalog_tried < CATALOG_RETRY_S:
            return catalog
        self._catalog_tried = time.monotonic()
        fresh = Catalog(self.catalog_path)
        if not fresh.writable:
            fresh.close()
            return catalog
        catalog.close()
        logger.info("cwm: catalog %s is writable again; capture resumes", self.catalog_path)
        return fresh

    def _capture_loop(self) -> None:
        _leave_forward_cores()
        catalog = Catalog(self.catalog_path)
        self._catalog_tried = time.monotonic()
        next_upkeep = time.monotonic() + UPKEEP_S
        while True:
            try:
                capture = self._capture_q.get(timeout=max(0.0, next_upkeep - time.monotonic()))
            except queue.Empty:
                capture = None
                if catalog.writable:
                    self._upkeep(catalog)
                next_upkeep = time.monotonic() + UPKEEP_S
                continue
            if capture is None:
                break
            job = capture.job
            buffer = capture.buffer or self.pool.take(len(job.block_ids))
            try:
                if capture.failed:
                    raise RuntimeError("gather could not be queued")
                if capture.event is not None:
                    capture.event.synchronize()  # queued by the engine thread (CUDA)
                else:
                    self.layout.gather(job.block_ids, buffer)
                gathered = True
            except Exception:
                logger.exception("cwm: gather failed for %s", job.req_id)
                gathered = False
            with self._lock:
                self._gathered.add(job.req_id)  # vLLM may free the blocks now
            catalog = self._capture_catalog(catalog)
            if gathered and not catalog.writable:
                # The Catalog logged why, once; writing blobs nobody can find would only fill
                # the disk.
                self.stats.add("store_errors")
                self.stats.add("capture_skipped_blocks", len(job.block_hashes))
                self._report_stored([], job.block_hashes)
            elif gathered:
                self._store_rows(catalog, job.block_hashes, buffer)
            else:
                self._report_stored([], job.block_hashes)
            self.pool.give(buffer)
            self._flush_stats()
        catalog.close()

    def _upkeep(self, catalog: Catalog, incoming: int = 0) -> bool:
        """Record recent blob use (one write), then keep the disk within its budget with room
        for `incoming` more bytes; whether they fit."""
        with self._lock:
            used, self._used = self._used, set()
        try:
            if used:
                catalog.touch(list(used), time.time())
            fits, room = self.budget.make_room(
                catalog, incoming, self._holds.counts.keys(), self._holds.lock
            )
            self.stats.set("disk_used_bytes", room.used)
            self.stats.set("disk_pinned_bytes", room.pinned)
            self.stats.set("disk_limit_bytes", room.limit if room.limit < NO_LIMIT else 0)
        except CwmError as exc:  # a locked catalog: the next upkeep tries again
            logger.warning("cwm: store upkeep skipped: %s", exc)
            return incoming == 0
        if not fits and incoming and not self._full_logged:
            self._full_logged = True
            logger.error("cwm: capture skipped: %s", self.budget.full_error(room, "a capture"))
        elif fits and incoming:
            self._full_logged = False
        return fits

    def _store_rows(self, catalog: Catalog, hashes: list[bytes], buffer: StagingBuffer) -> None:
        digests = [digest_segments(buffer.segments(i)) for i in range(len(hashes))]
        with self._holds.lock:  # what this capture finds stored stays until its rows exist
            self._holds.hold(digests)
        try:
            self._store_new(catalog, hashes, digests, buffer)
        finally:
            self._holds.release(digests)

    def _store_new(
        self, catalog: Catalog, hashes: list[bytes], digests: list[bytes], buffer: StagingBuffer
    ) -> None:
        """Write the blobs the store lacks and every (hash, digest) row, within the budget."""
        blocks: list[tuple[bytes, bytes]] = []
        blobs: list[tuple[bytes, int, int, str]] = []
        written: set[bytes] = set()
        new = {d for d in digests if not (catalog.has_blob(d) and self.disk.contains(d))}
        with self._lock:
            self._used.update(set(digests) - new)  # stored already: used again now
        incoming = len(new) * blob_space(self.layout.block_bytes)
        if not self._upkeep(catalog, incoming):  # windows alone fill the budget
            self.stats.add("store_full_blocks", len(hashes))
            self._report_stored([], hashes)
            return
        try:
            for index, (block_hash, dig) in enumerate(zip(hashes, digests, strict=True)):
                if dig in new and dig not in written:
                    segments = buffer.segments(index)
                    stored = self.disk.put(dig, segments, self.cfg.compression)
                    blobs.append((dig, self.layout.block_bytes, stored, self.cfg.compression))
                    written.add(dig)
                    self.stats.add("stored_bytes", stored)
                blocks.append((block_hash, dig))
            catalog.add_blocks(self.fp_id, blocks, blobs)
            self.store.share(self.fp_id, blocks)
        except Exception as exc:  # a failed write (full, read-only, locked) is a future miss
            logger.error(
                "cwm: capture of %d blocks failed, nothing of it is kept: %s", len(hashes), exc
            )
            self.stats.add("store_errors")
            self._capture_failing = True
            self._undo_writes(catalog, written)
            self._report_stored([], hashes)
            return
        if self._capture_failing:
            self._capture_failing = False
            logger.info("cwm: capture works again (%d blocks stored)", len(hashes))
        self.stats.add("captured_blocks", len(hashes))
        self.stats.add("captured_raw_bytes", len(hashes) * self.layout.block_bytes)
        self._report_stored(hashes, [])

    def _undo_writes(self, catalog: Catalog, written: set[bytes]) -> None:
        """Remove the blob files a failed capture wrote and no catalog row names."""
        for dig in written:
            with contextlib.suppress(Exception):
                if not catalog.has_blob(dig):
                    self.disk.delete(dig)

    def _flush_stats(self) -> None:
        self.store.flush_stats()

    def _report_stored(self, stored: list[bytes], failed: list[bytes]) -> None:
        with self._lock:
            self._report.stored.extend(stored)
            self._report.store_failed.extend(failed)

    # -- stage thread ------------------------------------------------------
    def _stage_loop(self) -> None:
        _leave_forward_cores()
        catalog = Catalog(self.catalog_path)
        prewarm_bytes = min(self.cfg.memory_bytes, PREWARM_BYTES)
        self.pool.prewarm(min(self.layout.num_blocks, prewarm_bytes // self.layout.block_bytes))
        if self.store.redis is not None:
            self.store.redis.warm()  # the first restore from Redis pays no connects
        while (job := self._stage_q.get()) is not None:
            with self._lock:
                if job.job_id in self._dropped:
                    self._dropped.discard(job.job_id)
                    continue
            started = time.perf_counter()
            try:
                staged, _ = self._stage(catalog, job)
            except Exception:
                logger.exception("cwm: staging job %d failed", job.job_id)
                staged = None
            with self._lock:
                if job.job_id in self._dropped:
                    self._dropped.discard(job.job_id)
                    continue
                num = 0 if staged is None else staged.num_blocks
                if staged is not None and num:
                    self._staged[job.job_id] = staged
                    self._staged_bytes += num * self.layout.block_bytes
                elif staged is not None:
                    self.pool.give(staged.buffer)
                self._report.staged[job.job_id] = num
            logger.info(
                "cwm: staged %d/%d blocks (%.1f MB) in %.1f ms",
                num, len(job.block_hashes), num * self.layout.block_bytes / 1e6,
                (time.perf_counter() - started) * 1e3,
            )  # fmt: skip
            self._flush_stats()
        catalog.close()

    def _stage(self, catalog: Catalog, job: StageJob) -> tuple[_Staged, list[bytes]]:
        """Read and verify the leading blocks of a job; the staged run and what failed."""
        with self._lock:
            budget = self.cfg.memory_bytes - self._staged_bytes
        wanted = job.block_hashes[: max(0, budget // self.layout.block_bytes)]
        if len(wanted) < len(job.block_hashes):
            self.stats.add("stage_budget_cut_blocks", len(job.block_hashes) - len(wanted))
        with self._holds.lock:  # found and held in one step: eviction cannot come between
            found = self.store.digests_for(catalog, self.fp_id, wanted, job.remote.get(self.fp_id))
            digests = _leading([found.get(h) for h in wanted])
            self._holds.hold(digests)
        try:
            return self._read_staged(catalog, job, wanted, digests)
        finally:
            self._holds.release(digests)
            with self._lock:
                self._used.update(digests)

    def _read_staged(
        self, catalog: Catalog, job: StageJob, wanted: list[bytes], digests: list[bytes]
    ) -> tuple[_Staged, list[bytes]]:
        """Read the digests' blobs into a staging buffer (see `_stage`)."""
        remote = self.store.fetch_remote(digests)  # Redis chunks in flight while readers verify
        buffer = self.pool.take(len(digests))

        def read(index: int) -> str | None:
            return self._read_blob(wanted[index], digests[index], buffer.segments(index), remote)

        # Two readers overlap the kernel's page-cache copies (the GIL is released there).
        failures = list(self._readers.map(read, range(len(digests))))
        for dig, failure in zip(digests, failures, strict=True):
            if failure in ("corrupt", "missing"):
                try:
                    catalog.forget_blob(dig)  # the next capture of this content heals it
                except CwmError as exc:  # locked or unavailable: the digest check still holds
                    logger.warning("cwm: cannot drop the rows of blob %s: %s", dig.hex(), exc)
        num_ok = next((i for i, failure in enumerate(failures) if failure), len(failures))
        self.stats.add("staged_blocks", num_ok)
        failed = [d for d, failure in zip(digests, failures, strict=True) if failure]
        if len(digests) < len(wanted):  # a block this rank never stored
            failed.append(wanted[len(digests)])
        return _Staged(buffer, digests[:num_ok]), failed

    def _read_blob(
        self,
        block_hash: bytes,
        dig: bytes,
        segments: list[memoryview],
        remote: dict[bytes, bytes] | Pending | None = None,
    ) -> str | None:
        """Read one verified blob into segments (memory, disk, Redis); on failure log, count,
        return its kind."""
        try:
            self.store.read_into(dig, segments, remote)
            return None
        except BlobCorruptError as exc:
            logger.error(
                "cwm: blob %s of block %s failed verification (%s); not loading it, "
                "tokens will be recomputed",
                dig.hex(), block_hash.hex()[:16], exc,
            )  # fmt: skip
            self.stats.add("digest_errors")
            self.disk.quarantine(dig)
            return "corrupt"
        except BlobMissingError as exc:
            logger.error("cwm: %s (block %s); recomputing", exc, block_hash.hex()[:16])
            self.stats.add("missing_blobs")
            return "missing"
        except CwmError as exc:
            logger.error("cwm: cannot read blob %s: %s", dig.hex(), exc)
            self.stats.add("read_errors")
            return "io"

    # -- worker channel (thaw) ---------------------------------------------
    def prestage(self, block_hashes: Sequence[bytes], job_id: int) -> dict[str, Any]:
        """Stage these blocks now as job `job_id` (a thaw): read, verify, hold in host memory.

        Runs on a worker-channel thread. The scheduler promises the job's blocks to the
        next request with this prefix without asking again; unused, it is released
        after `thaw_pin_s`.
        """
        _leave_forward_cores()
        started = time.perf_counter()
        catalog = Catalog(self.catalog_path)
        try:
            staged, failed = self._stage(catalog, StageJob(job_id, list(block_hashes)))
        finally:
            catalog.close()
        staged.expires_at = time.monotonic() + self.cfg.thaw_pin_s
        staged.prestaged = True
        with self._lock:
            old = self._release(job_id)
            if old is not None:
                self.pool.give(old.buffer)
            if staged.num_blocks:
                self._staged[job_id] = staged
                self._staged_bytes += staged.num_blocks * self.layout.block_bytes
            else:
                self.pool.give(staged.buffer)
        self.stats.add("prestaged_blocks", staged.num_blocks)
        self._flush_stats()
        logger.info(
            "cwm: thaw staged %d/%d blocks in %.1f ms",
            staged.num_blocks, len(block_hashes), (time.perf_counter() - started) * 1e3,
        )  # fmt: skip
        return {
            "asked": len(block_hashes),
            "staged": staged.num_blocks,
            "failed": [d.hex() for d in failed],
        }

    def resident(self, block_hashes: Sequence[bytes]) -> int:
        """How many of these blocks are held in host memory (staged, or in the memory tier)."""
        catalog = Catalog(self.catalog_path)
        try:
            found = self.store.digests_for(catalog, self.fp_id, list(block_hashes))
        finally:
            catalog.close()
        with self._lock:
            staged = {d for st in self._staged.values() for d in st.digests}
        return sum(
            1
            for h in block_hashes
            if h in found and (found[h] in staged or self.memory.contains(found[h]))
        )

    def _expire_staged(self) -> None:
        """Release prestaged jobs nobody loaded in time (engine thread, every step)."""
        now = time.monotonic()
        with self._lock:
            expired = [j for j, st in self._staged.items() if st.expires_at < now]
            for job_id in expired:
                staged = self._release(job_id)
                if staged is not None:
                    self.pool.give(staged.buffer)
        if expired:
            self.stats.add("prestage_expired_jobs", len(expired))


def redis_tier(cfg: CwmConfig, socket_timeout_s: float = 0.25) -> RedisTier | None:
    """The Redis tier of cfg.redis_url with its TTL (None when unset); restores and window
    ops keep the short timeout, the scheduler's lookup a shorter one, copies a long one."""
    if not cfg.redis_url:
        return None
    from cwm_connector.store.redis import RedisTier

    return RedisTier(cfg.redis_url, ttl_s=cfg.redis_ttl_s, socket_timeout_s=socket_timeout_s)


def _leave_forward_cores() -> None:
    """Let this background thread run on any core.

    vLLM's CPU worker pins itself (and so every thread it starts) to the cores
    of the forward pass; I/O and hashing there would queue behind the model.
    """
    with contextlib.suppress(AttributeError, OSError, ValueError):
        os.sched_setaffinity(0, range(os.cpu_count() or 1))


def _leading(values: list[bytes | None]) -> list[bytes]:
    """The values before the first None."""
    out: list[bytes] = []
    for value in values:
        if value is None:
            break
        out.append(value)
    return out
