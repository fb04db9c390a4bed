"""Worker-side byte moving: capture (gather + write-behind), staging (read + verify), loads.

Threads:
- the engine thread calls `submit` with each step's plan; loads (a scatter
  from already-verified host memory) run right there, before the forward;
- a capture thread gathers kept blocks into host memory, releases them to
  vLLM, then digests and writes the blobs and their catalog rows;
- a stage thread reads and verifies blobs for pending hits into host memory.
Every storage error is logged, counted and turned into a miss.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cwm_connector.blob import digest
from cwm_connector.catalog import Catalog
from cwm_connector.config import CwmConfig
from cwm_connector.errors import BlobCorruptError, BlobMissingError, CwmError
from cwm_connector.kv_layout import KVLayout
from cwm_connector.plans import CaptureJob, StageJob, StepPlan, WorkerReport
from cwm_connector.stats import Stats
from cwm_connector.tier_disk import DiskTier

logger = logging.getLogger("vllm.cwm.worker")

CATALOG_FILE = "catalog.sqlite"


@dataclass(slots=True)
class _Staged:
    rows: torch.Tensor  # (num_ready, block_bytes) uint8, verified
    digests: list[bytes]


class CwmWorker:
    """Moves KV bytes between the paged cache, host memory and the store."""

    def __init__(self, cfg: CwmConfig, fp_id: str, layout: KVLayout, rank: int):
        self.cfg = cfg
        self.fp_id = fp_id
        self.layout = layout
        self.rank = rank
        root = cfg.store_path
        self.disk = DiskTier(root)
        self.catalog_path = root / CATALOG_FILE
        self.stats = Stats(root / "stats" / f"worker-rank{rank}.json")
        self._lock = threading.Lock()
        self._staged: dict[int, _Staged] = {}
        self._staged_bytes = 0
        self._dropped: set[int] = set()
        self._gathered: set[str] = set()
        self._finished_seen: set[str] = set()
        self._load_errors: set[int] = set()
        self._report = WorkerReport(rank)
        self._capture_q: queue.Queue[CaptureJob | None] = queue.Queue()
        self._stage_q: queue.Queue[StageJob | None] = queue.Queue()
        removed = self.disk.clean_orphan_tmp()
        if removed:
            logger.info("cwm: removed %d orphaned temp files", removed)
        self._threads = [
            threading.Thread(target=self._capture_loop, name="cwm-capture", daemon=True),
            threading.Thread(target=self._stage_loop, name="cwm-stage", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # -- engine thread -----------------------------------------------------
    def submit(self, plan: StepPlan) -> None:
        """Queue this step's captures and stages, apply drops, run loads now."""
        for job in plan.captures:
            self._capture_q.put(job)
        for job in plan.stages:
            self._stage_q.put(job)
        with self._lock:
            for job_id in plan.drops:
                if self._release(job_id) is None:
                    self._dropped.add(job_id)  # still queued or being staged
        for load in plan.loads:
            self._load(load.job_id, load.block_ids)
        self.stats.flush(force=bool(plan.loads))

    def _load(self, job_id: int, block_ids: list[int]) -> None:
        with self._lock:
            staged = self._release(job_id)
        num_ready = 0 if staged is None else staged.rows.shape[0]
        num = min(num_ready, len(block_ids))
        if num < len(block_ids):
            # Promised but not in hand: vLLM recomputes these (kv_load_failure_policy).
            logger.error("cwm: load job %d lacks %d staged blocks", job_id, len(block_ids) - num)
            self._load_errors.update(block_ids[num:])
            self.stats.add("load_errors", len(block_ids) - num)
        if num == 0 or staged is None:
            return
        started = time.perf_counter()
        try:
            self.layout.scatter(block_ids[:num], staged.rows[:num])
        except Exception:
            logger.exception("cwm: scatter failed for load job %d", job_id)
            self._load_errors.update(block_ids[:num])
            self.stats.add("load_errors", num)
            return
        logger.info("cwm: loaded %d blocks in %.1f ms", num, (time.perf_counter() - started) * 1e3)
        self.stats.add("loaded_blocks", num)
        self.stats.add("loaded_bytes", num * self.layout.block_bytes)
        if self.cfg.verify_restore:
            self._verify_restored(block_ids[:num], staged.digests[:num])

    def _verify_restored(self, block_ids: Sequence[int], digests: Sequence[bytes]) -> None:
        rows = self.layout.gather(block_ids)
        bad = [i for i, d in enumerate(digests) if digest(rows[i].numpy()) != d]
        self.stats.add("restore_verified_blocks", len(digests) - len(bad))
        if bad:
            logger.error("cwm: %d restored blocks differ from their blobs", len(bad))
            self.stats.add("restore_mismatch_blocks", len(bad))
            self._load_errors.update(block_ids[i] for i in bad)

    def _release(self, job_id: int) -> _Staged | None:
        staged = self._staged.pop(job_id, None)
        if staged is not None:
            self._staged_bytes -= staged.rows.numel()
        return staged

    def get_finished(self, finished_req_ids: set[str]) -> set[str]:
        """Requests whose kept blocks are copied out and may be freed."""
        with self._lock:
            self._finished_seen.update(finished_req_ids)
            done = self._gathered & self._finished_seen
            self._gathered -= done
            self._finished_seen -= done
        return done

    def take_load_errors(self) -> set[int]:
        """Block ids that failed to load since the last call."""
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_report(self) -> WorkerReport | None:
        """What finished since the last report, or None."""
        with self._lock:
            report, self._report = self._report, WorkerReport(self.rank)
        return None if report.is_empty() else report

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop the threads, letting queued writes finish within the timeout."""
        self._capture_q.put(None)
        self._stage_q.put(None)
        for thread in self._threads:
            thread.join(timeout_s)
        self.stats.flush(force=True)

    # -- capture thread ----------------------------------------------------
    def _capture_loop(self) -> None:
        catalog = Catalog(self.catalog_path)
        while (job := self._capture_q.get()) is not None:
            try:
                rows = self.layout.gather(job.block_ids)
            except Exception:
                logger.exception("cwm: gather failed for %s", job.req_id)
                rows = None
            with self._lock:
                self._gathered.add(job.req_id)
            if rows is None:
                self._report_stored([], job.block_hashes)
                continue
            self._store_rows(catalog, job.block_hashes, rows)
            self.stats.flush(force=True)
        catalog.close()

    def _store_rows(self, catalog: Catalog, hashes: list[bytes], rows: torch.Tensor) -> None:
        blocks: list[tuple[bytes, bytes]] = []
        blobs: list[tuple[bytes, int, int, str]] = []
        written: set[bytes] = set()
        try:
            for block_hash, row in zip(hashes, rows, strict=True):
                raw = row.numpy()
                dig = digest(raw)
                if dig not in written and not (catalog.has_blob(dig) and self.disk.contains(dig)):
                    stored = self.disk.put(dig, raw, self.cfg.compression)
                    blobs.append((dig, raw.nbytes, stored, self.cfg.compression))
                    written.add(dig)
                    self.stats.add("stored_bytes", stored)
                blocks.append((block_hash, dig))
            catalog.add_blocks(self.fp_id, blocks, blobs)
        except (CwmError, OSError, Exception) as exc:  # a failed write is a future miss
            logger.error("cwm: capture of %d blocks failed: %s", len(hashes), exc)
            self.stats.add("store_errors")
            self._report_stored([], hashes)
            return
        self.stats.add("captured_blocks", len(hashes))
        self.stats.add("captured_raw_bytes", len(hashes) * self.layout.block_bytes)
        self._report_stored(hashes, [])

    def _report_stored(self, stored: list[bytes], failed: list[bytes]) -> None:
        with self._lock:
            self._report.stored.extend(stored)
            self._report.store_failed.extend(failed)

    # -- stage thread ------------------------------------------------------
    def _stage_loop(self) -> None:
        catalog = Catalog(self.catalog_path)
        while (job := self._stage_q.get()) is not None:
            with self._lock:
                if job.job_id in self._dropped:
                    self._dropped.discard(job.job_id)
                    continue
            started = time.perf_counter()
            try:
                staged = self._stage(catalog, job)
            except Exception:
                logger.exception("cwm: staging job %d failed", job.job_id)
                staged = None
            with self._lock:
                if job.job_id in self._dropped:
                    self._dropped.discard(job.job_id)
                    continue
                num = 0 if staged is None else staged.rows.shape[0]
                if staged is not None and num:
                    self._staged[job.job_id] = staged
                    self._staged_bytes += staged.rows.numel()
                self._report.staged[job.job_id] = num
            logger.info(
                "cwm: staged %d/%d blocks (%.1f MB) in %.1f ms",
                num, len(job.block_hashes), num * self.layout.block_bytes / 1e6,
                (time.perf_counter() - started) * 1e3,
            )  # fmt: skip
            self.stats.flush(force=True)
        catalog.close()

    def _stage(self, catalog: Catalog, job: StageJob) -> _Staged:
        with self._lock:
            budget = self.cfg.memory_bytes - self._staged_bytes
        wanted = job.block_hashes[: max(0, budget // self.layout.block_bytes)]
        if len(wanted) < len(job.block_hashes):
            self.stats.add("stage_budget_cut_blocks", len(job.block_hashes) - len(wanted))
        found = catalog.digests_for(self.fp_id, wanted)
        rows = torch.empty((len(wanted), self.layout.block_bytes), dtype=torch.uint8)
        digests: list[bytes] = []
        for i, block_hash in enumerate(wanted):
            dig = found.get(block_hash)
            if dig is None or not self._read_blob(catalog, block_hash, dig, rows[i]):
                break
            digests.append(dig)
        self.stats.add("staged_blocks", len(digests))
        return _Staged(rows[: len(digests)], digests)

    def _read_blob(
        self, catalog: Catalog, block_hash: bytes, dig: bytes, row: torch.Tensor
    ) -> bool:
        try:
            self.disk.read_into(dig, memoryview(row.numpy()))
            return True
        except BlobCorruptError as exc:
            logger.error(
                "cwm: blob %s of block %s failed verification (%s); not loading it, "
                "tokens will be recomputed",
                dig.hex(),
                block_hash.hex()[:16],
                exc,
            )
            self.stats.add("digest_errors")
            self.disk.quarantine(dig)
        except BlobMissingError as exc:
            logger.error("cwm: %s (block %s); recomputing", exc, block_hash.hex()[:16])
            self.stats.add("missing_blobs")
        except CwmError as exc:
            logger.error("cwm: cannot read blob %s: %s", dig.hex(), exc)
            self.stats.add("read_errors")
            return False
        catalog.forget_blob(dig)
        return False


def catalog_path(store_dir: Path) -> Path:
    """Where the catalog of a store lives."""
    return store_dir / CATALOG_FILE
