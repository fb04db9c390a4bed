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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cwm_connector.engine.hit_run import Rule, common_end, served_end, span
from cwm_connector.engine.kv_groups import NULL_BLOCK_ID
from cwm_connector.engine.plans import (
    CaptureJob,
    LoadJob,
    StageJob,
    StepPlan,
    WorkerReport,
)

logger = logging.getLogger("vllm.cwm.scheduler")
MAX_FAILURES_KEPT = 100_000
NO_JOB = -1  # a load with no staged blocks: every block in it is a load error


class StoredHashes(set[bytes]):
    """The block hashes a store lookup found, plus the digests it read from Redis on the
    way (fingerprint id -> block hash -> digest), so a worker need not ask Redis again."""

    def __init__(
        self, hashes: Iterable[bytes] = (), remote: dict[str, dict[bytes, bytes]] | None = None
    ):
        super().__init__(hashes)
        self.remote = remote or {}


class StoredLookup(Protocol):
    """Answers which block hashes the store holds for this engine (and KV-cache group)."""

    def __call__(self, hashes: Sequence[bytes], group: int = 0) -> set[bytes]:
        """The hashes held (a StoredHashes also names the digests Redis gave)."""


@dataclass(slots=True)
class _GroupStage:
    """One KV-cache group's share of a hit: its staged blocks [first_block, end)."""

    job_id: int
    first_block: int
    rank_results: dict[int, int] = field(default_factory=dict)
    num_blocks_ready: int | None = None  # set once every rank reported


@dataclass(slots=True)
class _PendingHit:
    start_block: int  # the engine's own hit, in blocks, when the lookup began
    end_block: int  # the boundary every group can serve
    submitted_at: float
    stages: list[_GroupStage]

    @property
    def is_ready(self) -> bool:
        return all(s.num_blocks_ready is not None for s in self.stages)


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
        windows: Sequence[Rule] = (None,),
        clock: Callable[[], float] = time.monotonic,
    ):
        self.block_size = block_size
        # One rule per KV-cache group (hit_run.py): None for full attention (a hit needs
        # every block before it), a sliding window's blocks, or a Chunk (issue 13).
        self.windows = list(windows)
        self.tp_size = tp_size
        self.capture = capture
        self.restore = restore
        self.stage_timeout_s = stage_timeout_s
        self._lookup = lookup
        self._clock = clock
        self._job_ids = itertools.count(1)
        self._pending: dict[str, _PendingHit] = {}
        self._job_to_req: dict[int, tuple[str, int]] = {}  # job -> (request, group)
        self._inflight_capture: set[tuple[int, bytes]] = set()
        self._plans = [StepPlan() for _ in self.windows]
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
            prestaged = start == 0 and self.windows == [None]
            if prestaged and (hit := self._take_ready(block_hashes[:max_blocks])) is not None:
                return self._promise_ready(req_id, *hit)
            return self._begin_lookup(req_id, block_hashes[start:max_blocks], start)
        if not pending.is_ready:
            if self._clock() - pending.submitted_at < self.stage_timeout_s:
                return None, False
            logger.warning("cwm: staging for %s timed out; recomputing", req_id)
            self.counters.stage_timeouts += 1
            self._forget(req_id)
            return 0, False
        end = served_end(
            start,
            pending.end_block,
            [s.first_block for s in pending.stages],
            [s.num_blocks_ready or 0 for s in pending.stages],
        )
        pending.end_block = end = min(end, max_blocks)
        if end <= start:
            self._forget(req_id)
            return 0, False
        return (end - start) * self.block_size, False

    def _begin_lookup(
        self, req_id: str, wanted: Sequence[bytes], start: int
    ) -> tuple[int | None, bool]:
        self.counters.lookups += 1
        try:
            stored = [self._lookup(wanted, g) for g in range(len(self.windows))]
        except Exception:  # a broken catalog is a miss, never an engine error
            logger.exception("cwm: store lookup failed; treating as a miss")
            self.counters.lookup_errors += 1
            return 0, False
        end = common_end([[h in s for h in wanted] for s in stored], start, self.windows)
        self.counters.miss_blocks += len(wanted) - (end - start)
        if end == start:
            return 0, False
        stages = []
        for group, window in enumerate(self.windows):
            first = span(start, end, window)
            if first == end:  # a chunk boundary: this group needs no block for the hit
                stages.append(_GroupStage(NO_JOB, first, num_blocks_ready=0))
                continue
            job_id = next(self._job_ids)
            stages.append(_GroupStage(job_id, first))
            self._job_to_req[job_id] = (req_id, group)
            hashes = list(wanted[first - start : end - start])
            known = stored[group].remote if isinstance(stored[group], StoredHashes) else {}
            remote = {fp: {h: m[h] for h in hashes if h in m} for fp, m in known.items()}
            self._plans[group].stages.append(StageJob(job_id, hashes, remote))
        self._pending[req_id] = _PendingHit(start, end, self._clock(), stages)
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
        stage = _GroupStage(entry.job_id, 0, num_blocks_ready=run)
        self._pending[req_id] = _PendingHit(0, run, self._clock(), [stage])
        self._job_to_req[entry.job_id] = (req_id, 0)
        self.counters.prestaged_hit_blocks += run
        return run * self.block_size, False

    def update_state_after_alloc(
        self, req_id: str, block_ids: Sequence[int], num_external_tokens: int
    ) -> None:
        """Turn a promised hit into a LoadJob onto the freshly allocated blocks."""
        self.update_state_after_alloc_groups(req_id, (block_ids,), num_external_tokens)

    def update_state_after_alloc_groups(
        self, req_id: str, block_ids: Sequence[Sequence[int]], num_external_tokens: int
    ) -> None:
        """Turn a promised hit into one LoadJob per KV-cache group."""
        pending = self._pending.get(req_id)
        if pending is None:
            return
        end = pending.start_block + num_external_tokens // self.block_size
        if end <= pending.start_block:
            self._forget(req_id)
            return
        del self._pending[req_id]
        for group, stage in enumerate(pending.stages):
            self._job_to_req.pop(stage.job_id, None)
            dest = list(block_ids[group][stage.first_block : end])
            if not dest:
                continue
            if NULL_BLOCK_ID in dest:
                # vLLM allocates real blocks inside the window, so this never happens; if
                # it did, nothing is written to the null block and the real ones are
                # reported as load errors (no staged job), so vLLM recomputes them.
                logger.error("cwm: %s got the null block for a promised load", req_id)
                self.counters.null_dest_loads += 1
                self._plans[group].drops.append(stage.job_id)
                real = [b for b in dest if b != NULL_BLOCK_ID]
                self._plans[group].loads.append(LoadJob(req_id, NO_JOB, real))
                continue
            self._plans[group].loads.append(LoadJob(req_id, stage.job_id, dest))
            self.counters.hit_blocks += len(dest)

    def _forget(self, req_id: str) -> None:
        pending = self._pending.pop(req_id, None)
        if pending is not None:
            for group, stage in enumerate(pending.stages):
                if stage.job_id != NO_JOB:
                    self._job_to_req.pop(stage.job_id, None)
                    self._plans[group].drops.append(stage.job_id)

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
        return self.request_finished_groups(
            req_id, cache_salt, block_hashes, num_computed_tokens, (block_ids,)
        )

    def request_finished_groups(
        self,
        req_id: str,
        cache_salt: str | None,
        block_hashes: Sequence[bytes],
        num_computed_tokens: int,
        block_ids: Sequence[Sequence[int]],
    ) -> bool:
        """Plan the capture of every KV-cache group's real blocks of a finished request."""
        self._forget(req_id)
        if self.capture == "off" or (self.capture == "salted" and not cache_salt):
            return False
        keep = False
        for group, ids in enumerate(block_ids[: len(self.windows)]):
            try:
                keep |= self._plan_capture(req_id, group, block_hashes, num_computed_tokens, ids)
            except Exception:
                logger.exception("cwm: store lookup failed; not capturing %s", req_id)
                self.counters.lookup_errors += 1
        return keep

    def _plan_capture(
        self,
        req_id: str,
        group: int,
        block_hashes: Sequence[bytes],
        num_computed_tokens: int,
        block_ids: Sequence[int],
    ) -> bool:
        # A hash can cover a block whose last token has no KV yet: only count computed ones.
        num_full = min(len(block_hashes), num_computed_tokens // self.block_size, len(block_ids))
        # A block that left a sliding window is vLLM's null block: never captured (issue 13).
        real = [i for i in range(num_full) if block_ids[i] != NULL_BLOCK_ID]
        self.counters.null_blocks_skipped += num_full - len(real)
        inflight = self._inflight_capture
        candidates = [i for i in real if (group, block_hashes[i]) not in inflight]
        stored = self._lookup([block_hashes[i] for i in candidates], group)
        todo = [i for i in candidates if block_hashes[i] not in stored]
        self.counters.skipped_stored_blocks += len(real) - len(todo)
        if not todo:
            return False
        hashes = [bytes(block_hashes[i]) for i in todo]
        self._plans[group].captures.append(CaptureJob(req_id, [block_ids[i] for i in todo], hashes))
        inflight.update((group, h) for h in hashes)
        self.counters.capture_jobs += 1
        self.counters.capture_blocks += len(todo)
        return True

    # -- step boundary -----------------------------------------------------
    def build_plan(self) -> StepPlan:
        """Hand over this step's jobs (one KV-cache group) and start a new plan."""
        return self.build_plans()[0]

    def build_plans(self) -> list[StepPlan]:
        """Hand over this step's jobs, one plan per KV-cache group, and start new ones."""
        if self._ready_drops:
            with self._ready_lock:
                drops, self._ready_drops = self._ready_drops, []
            self._plans[0].drops.extend(drops)
        plans, self._plans = self._plans, [StepPlan() for _ in self.windows]
        return plans

    def apply_report(self, report: WorkerReport) -> None:
        """Fold one worker's report into the pending hits and the capture set."""
        group = report.group
        for job_id, num_ready in report.staged.items():
            req_id, _ = self._job_to_req.get(job_id, ("", 0))
            pending = self._pending.get(req_id)
            stage = (
                next((s for s in pending.stages if s.job_id == job_id), None) if pending else None
            )
            if stage is None:
                continue
            stage.rank_results[report.rank] = num_ready
            if len(stage.rank_results) >= self.tp_size:
                stage.num_blocks_ready = min(stage.rank_results.values())
        for block_hash in (*report.stored, *report.store_failed):
            self._inflight_capture.discard((group, block_hash))
        if group == 0 and (report.stored or report.store_failed):  # what freeze waits on
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

    def captures_in_flight(self, hashes: Sequence[bytes]) -> int:
        """How many of these blocks (first group) a planned capture has not reported yet."""
        inflight = self._inflight_capture  # membership tests only: safe from another thread
        return sum(1 for h in hashes if (0, h) in inflight)

    @property
    def num_pending(self) -> int:
        """Requests waiting for staging results."""
        return len(self._pending)
