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
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cwm_connector.plans import CaptureJob, LoadJob, StageJob, StepPlan, WorkerReport

logger = logging.getLogger("vllm.cwm.scheduler")


class StoredLookup(Protocol):
    """Answers which block hashes the store holds for this engine."""

    def __call__(self, hashes: Sequence[bytes]) -> set[bytes]: ...


@dataclass(slots=True)
class _PendingHit:
    job_id: int
    start_block: int
    num_blocks_asked: int
    submitted_at: float
    rank_results: dict[int, int] = field(default_factory=dict)
    num_blocks_ready: int | None = None  # set once every rank reported (or on timeout)


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
        clock: Callable[[], float] = time.monotonic,
    ):
        self.block_size = block_size
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
            return self._begin_lookup(req_id, block_hashes[start:max_blocks], start)
        if pending.num_blocks_ready is None:
            if self._clock() - pending.submitted_at < self.stage_timeout_s:
                return None, False
            logger.warning("cwm: staging for %s timed out; recomputing", req_id)
            self.counters.stage_timeouts += 1
            self._forget(req_id)
            return 0, False
        ready = min(pending.num_blocks_ready, max_blocks - start)
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
        run = 0
        while run < len(wanted) and wanted[run] in stored:
            run += 1
        self.counters.miss_blocks += len(wanted) - run
        if run == 0:
            return 0, False
        job_id = next(self._job_ids)
        self._pending[req_id] = _PendingHit(job_id, start, run, self._clock())
        self._job_to_req[job_id] = req_id
        self._plan.stages.append(StageJob(job_id, list(wanted[:run])))
        return None, False

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
        dest = list(block_ids[pending.start_block : pending.start_block + num_blocks])
        self._plan.loads.append(LoadJob(req_id, pending.job_id, dest))
        self.counters.hit_blocks += len(dest)
        del self._pending[req_id]
        del self._job_to_req[pending.job_id]

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
        candidates = [i for i in range(num_full) if block_hashes[i] not in self._inflight_capture]
        try:
            stored = self._lookup([block_hashes[i] for i in candidates])
        except Exception:
            logger.exception("cwm: store lookup failed; not capturing %s", req_id)
            self.counters.lookup_errors += 1
            return False
        todo = [i for i in candidates if block_hashes[i] not in stored]
        self.counters.skipped_stored_blocks += num_full - len(todo)
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
        self.counters.stored_blocks += len(report.stored)
        self.counters.store_failed_blocks += len(report.store_failed)

    @property
    def num_pending(self) -> int:
        """Requests waiting for staging results."""
        return len(self._pending)
