"""Scheduler-side planning: which requests hit, what to stage, load and capture.

Pure bookkeeping (no torch, no I/O of its own): the store lookup is injected,
and every decision becomes a job in the next StepPlan for the workers.

Lifecycle of a hit ("promise only what is in hand"):
1. `get_num_new_matched_tokens` finds the longest run of the request's block
   hashes the catalog holds, asks the workers to stage them, returns None.
2. Workers read and verify the blobs in the background and report how many
   leading blocks they hold (`apply_report`).
3. The next call returns exactly that many blocks' tokens; after allocation
   `update_state_after_alloc` turns them into a LoadJob (a memcpy).

A thaw stages a window before any request asks (`prepare_ready` names the job,
the workers stage it, `complete_ready` records it): a request whose first
blocks are that window's is promised them at the first call, no round trip.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cwm_connector.engine.hit_run import find_hit, ready_end
from cwm_connector.engine.kv_groups import NULL_BLOCK_ID
from cwm_connector.engine.plans import CaptureJob, LoadJob, StageJob, StepPlan, WorkerReport

logger = logging.getLogger("vllm.cwm.scheduler")
MAX_FAILURES_KEPT = 100_000
NO_JOB = -1  # a load with no staged blocks: every block in it is a load error


class StoredLookup(Protocol):
    """Answers which block hashes the store holds for this engine."""

    def __call__(self, hashes: Sequence[bytes]) -> set[bytes]: ...


@dataclass(slots=True)
class _PendingHit:
    job_id: int
    start_block: int  # the engine's own hit, in blocks, when the lookup began
    num_blocks_asked: int
    submitted_at: float
    first_block: int = -1  # where the staged blocks begin (< 0: at start_block)
    rank_results: dict[int, int] = field(default_factory=dict)
    num_blocks_ready: int | None = None  # set once every rank reported (or on timeout)


@dataclass(frozen=True, slots=True)
class _Ready:
    job_id: int
    block_hashes: tuple[bytes, ...]
    expires_at: float


@dataclass(slots=True)
class SchedulerCounters:
    """Counters the scheduler side keeps (blocks unless named otherwise)."""

    lookups: int = 0
    hit_blocks: int = 0
    miss_blocks: int = 0
    stage_timeouts: int = 0
    capture_jobs: int = 0
    capture_blocks: int = 0
    skipped_stored_blocks: int = 0
    stored_blocks: int = 0
    store_failed_blocks: int = 0
    lookup_errors: int = 0
    prestaged_hit_blocks: int = 0
    null_blocks_skipped: int = 0
    null_dest_loads: int = 0


class CwmScheduler:
    """Plans hits, staging, loads and captures for one engine."""

    def __init__(
        self,
        *,
        block_size: int,
        tp_size: int,
        lookup: StoredLookup,
        capture: str = "salted",
        restore: bool = True,
        stage_timeout_s: float = 10.0,
        window_blocks: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.block_size = block_size
        # None: full attention (a hit needs every block before it); else a sliding
        # window: a hit needs only this many blocks before its boundary (issue 13).
        self.window_blocks = window_blocks
        self.tp_size = tp_size
        self.capture = capture
        self.restore = restore
        self.stage_timeout_s = stage_timeout_s
        self._lookup = lookup
        self._clock = clock
        self._job_ids = itertools.count(1)
        self._pending: dict[str, _PendingHit] = {}
        self._job_to_req: dict[int, str] = {}
        self._inflight_capture: set[bytes] = set()
        self._plan = StepPlan()
        self.counters = SchedulerCounters()
        # Written by control-socket threads (thaw), read by the engine thread.
        self._ready_lock = threading.Lock()
        self._ready: dict[bytes, _Ready] = {}  # first block hash -> prestaged job
        self._ready_drops: list[int] = []
        # Blocks whose latest capture failed (disk full, read-only, catalog unavailable).
        self._failed_lock = threading.Lock()
        self._store_failures: dict[bytes, None] = {}

    # -- restore -----------------------------------------------------------
    def get_num_new_matched_tokens(
        self,
        req_id: str,
        block_hashes: Sequence[bytes],
        num_tokens: int,
        num_computed_tokens: int,
    ) -> tuple[int | None, bool]:
        """External tokens ready to load beyond num_computed_tokens; None while staging."""
        # The last token is always recomputed: vLLM needs its logits.
        max_blocks = min(len(block_hashes), (num_tokens - 1) // self.block_size)
        start = num_computed_tokens // self.block_size
        pending = self._pending.get(req_id)
        if pending is not None and pending.start_block != start:
            self._forget(req_id)
            pending = None
        if not self.restore or start >= max_blocks:
            return 0, False
        if pending is None:
            prestaged = start == 0 and self.window_blocks is None
            if prestaged and (hit := self._take_ready(block_hashes[:max_blocks])) is not None:
                return self._promise_ready(req_id, *hit)
            return self._begin_lookup(req_id, block_hashes[start:max_blocks], start)
        if pending.num_blocks_ready is None:
            if self._clock() - pending.submitted_at < self.stage_timeout_s:
                return None, False
            logger.warning("cwm: staging for %s timed out; recomputing", req_id)
            self.counters.stage_timeouts += 1
            self._forget(req_id)
            return 0, False
        first = pending.first_block if pending.first_block >= 0 else start
        end = ready_end(start, first, first + pending.num_blocks_asked, pending.num_blocks_ready)
        ready = max(0, min(end, max_blocks) - start)
        if ready == 0:
            self._forget(req_id)
        return ready * self.block_size, False

    def _begin_lookup(
        self, req_id: str, wanted: Sequence[bytes], start: int
    ) -> tuple[int | None, bool]:
        self.counters.lookups += 1
        try:
            stored = self._lookup(wanted)
        except Exception:  # a broken catalog is a miss, never an engine error
            logger.exception("cwm: store lookup failed; treating as a miss")
            self.counters.lookup_errors += 1
            return 0, False
        first, end = find_hit([h in stored for h in wanted], start, self.window_blocks)
        self.counters.miss_blocks += len(wanted) - (end - start)
        if end == start:
            return 0, False
        job_id = next(self._job_ids)
        self._pending[req_id] = _PendingHit(job_id, start, end - first, self._clock(), first)
        self._job_to_req[job_id] = req_id
        self._plan.stages.append(StageJob(job_id, list(wanted[first - start : end - start])))
        return None, False

    # -- thaw: prestaged jobs -------------------------------------------------
    def prepare_ready(self) -> int:
        """A job id for a thaw's staging (any thread)."""
        return next(self._job_ids)  # itertools.count is atomic under the GIL

    def complete_ready(self, job_id: int, block_hashes: Sequence[bytes], ttl_s: float) -> None:
        """Record that every worker holds these leading blocks as job `job_id` (any thread).

        The workers release the job after ttl_s; it is promised only within 90% of that.
        """
        if not block_hashes:
            return
        entry = _Ready(job_id, tuple(block_hashes), self._clock() + 0.9 * ttl_s)
        with self._ready_lock:
            old = self._ready.get(entry.block_hashes[0])
            if old is not None:
                self._ready_drops.append(old.job_id)  # a re-thaw replaces the older job
            self._ready[entry.block_hashes[0]] = entry

    def _take_ready(self, hashes: Sequence[bytes]) -> tuple[_Ready, int] | None:
        """The prestaged job these hashes start with, and how many blocks match (one use)."""
        if not hashes or not self._ready:
            return None
        with self._ready_lock:
            entry = self._ready.get(hashes[0])
            if entry is None:
                return None
            del self._ready[hashes[0]]
            if entry.expires_at < self._clock():
                self._ready_drops.append(entry.job_id)
                return None
        run = 0
        while run < min(len(hashes), len(entry.block_hashes)) and (
            hashes[run] == entry.block_hashes[run]
        ):
            run += 1
        return entry, run

    def _promise_ready(self, req_id: str, entry: _Ready, run: int) -> tuple[int, bool]:
        pending = _PendingHit(entry.job_id, 0, run, self._clock(), num_blocks_ready=run)
        self._pending[req_id] = pending
        self._job_to_req[entry.job_id] = req_id
        self.counters.prestaged_hit_blocks += run
        return run * self.block_size, False

    def update_state_after_alloc(
        self, req_id: str, block_ids: Sequence[int], num_external_tokens: int
    ) -> None:
        """Turn a promised hit into a LoadJob onto the freshly allocated blocks."""
        pending = self._pending.get(req_id)
        if pending is None:
            return
        num_blocks = num_external_tokens // self.block_size
        if num_blocks == 0:
            self._forget(req_id)
            return
        first = pending.first_block if pending.first_block >= 0 else pending.start_block
        dest = list(block_ids[first : pending.start_block + num_blocks])
        del self._pending[req_id]
        del self._job_to_req[pending.job_id]
        if NULL_BLOCK_ID in dest:
            # vLLM allocates real blocks inside the window, so this never happens; if it
            # did, nothing is written to the null block and the real ones are reported
            # as load errors (no staged job), so vLLM recomputes them.
            logger.error("cwm: %s got the null block for a promised load; recomputing", req_id)
            self.counters.null_dest_loads += 1
            self._plan.drops.append(pending.job_id)
            real = [b for b in dest if b != NULL_BLOCK_ID]
            self._plan.loads.append(LoadJob(req_id, NO_JOB, real))
            return
        self._plan.loads.append(LoadJob(req_id, pending.job_id, dest))
        self.counters.hit_blocks += len(dest)

    def _forget(self, req_id: str) -> None:
        pending = self._pending.pop(req_id, None)
        if pending is not None:
            self._job_to_req.pop(pending.job_id, None)
            self._plan.drops.append(pending.job_id)

    # -- capture -----------------------------------------------------------
    def request_finished(
        self,
        req_id: str,
        cache_salt: str | None,
        block_hashes: Sequence[bytes],
        num_computed_tokens: int,
        block_ids: Sequence[int],
    ) -> bool:
        """Plan the capture of a finished request; True keeps its blocks until copied."""
        self._forget(req_id)
        if self.capture == "off" or (self.capture == "salted" and not cache_salt):
            return False
        # A hash can cover a block whose last token has no KV yet: only count computed ones.
        num_full = min(len(block_hashes), num_computed_tokens // self.block_size, len(block_ids))
        # A block that left a sliding window is vLLM's null block: never captured (issue 13).
        real = [i for i in range(num_full) if block_ids[i] != NULL_BLOCK_ID]
        self.counters.null_blocks_skipped += num_full - len(real)
        candidates = [i for i in real if block_hashes[i] not in self._inflight_capture]
        try:
            stored = self._lookup([block_hashes[i] for i in candidates])
        except Exception:
            logger.exception("cwm: store lookup failed; not capturing %s", req_id)
            self.counters.lookup_errors += 1
            return False
        todo = [i for i in candidates if block_hashes[i] not in stored]
        self.counters.skipped_stored_blocks += len(real) - len(todo)
        if not todo:
            return False
        hashes = [bytes(block_hashes[i]) for i in todo]
        self._plan.captures.append(CaptureJob(req_id, [block_ids[i] for i in todo], hashes))
        self._inflight_capture.update(hashes)
        self.counters.capture_jobs += 1
        self.counters.capture_blocks += len(todo)
        return True

    # -- step boundary -----------------------------------------------------
    def build_plan(self) -> StepPlan:
        """Hand over this step's jobs and start a new plan."""
        if self._ready_drops:
            with self._ready_lock:
                drops, self._ready_drops = self._ready_drops, []
            self._plan.drops.extend(drops)
        plan, self._plan = self._plan, StepPlan()
        return plan

    def apply_report(self, report: WorkerReport) -> None:
        """Fold one worker's report into the pending hits and the capture set."""
        for job_id, num_ready in report.staged.items():
            req_id = self._job_to_req.get(job_id)
            pending = self._pending.get(req_id) if req_id is not None else None
            if pending is None:
                continue
            pending.rank_results[report.rank] = num_ready
            if len(pending.rank_results) >= self.tp_size:
                pending.num_blocks_ready = min(pending.rank_results.values())
        for block_hash in report.stored:
            self._inflight_capture.discard(block_hash)
        for block_hash in report.store_failed:
            self._inflight_capture.discard(block_hash)
        if report.stored or report.store_failed:
            with self._failed_lock:
                for block_hash in report.stored:
                    self._store_failures.pop(block_hash, None)
                for block_hash in report.store_failed:
                    self._store_failures[block_hash] = None
                while len(self._store_failures) > MAX_FAILURES_KEPT:  # oldest first
                    self._store_failures.pop(next(iter(self._store_failures)))
        self.counters.stored_blocks += len(report.stored)
        self.counters.store_failed_blocks += len(report.store_failed)

    def failed_captures(self, hashes: Sequence[bytes]) -> int:
        """How many of these blocks' latest capture failed (any thread; freeze fails fast)."""
        with self._failed_lock:
            return sum(1 for h in hashes if h in self._store_failures)

    @property
    def num_pending(self) -> int:
        """Requests waiting for staging results."""
        return len(self._pending)
