"""Plain dataclasses that cross the scheduler/worker boundary (pickled by vLLM each step).

They carry block ids, block hashes, digests and job ids: never KV bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class CaptureJob:
    """Copy these finished-request blocks out of the paged cache and store them."""

    req_id: str
    block_ids: list[int]
    block_hashes: list[bytes]


@dataclass(slots=True)
class StageJob:
    """Read and verify the blobs of these block hashes into host memory.

    `remote`: digests the scheduler's lookup already read from Redis, by the rank's
    fingerprint id (only blocks the local catalog lacked); the worker skips that
    round trip for them.
    """

    job_id: int
    block_hashes: list[bytes]
    remote: dict[str, dict[bytes, bytes]] = field(default_factory=dict)


@dataclass(slots=True)
class LoadJob:
    """Scatter the first len(block_ids) staged blocks of a job into these paged blocks."""

    req_id: str
    job_id: int
    block_ids: list[int]


@dataclass(slots=True)
class StepPlan:
    """Everything the workers must do this step."""

    captures: list[CaptureJob] = field(default_factory=list)
    stages: list[StageJob] = field(default_factory=list)
    loads: list[LoadJob] = field(default_factory=list)
    drops: list[int] = field(default_factory=list)  # stage jobs no longer wanted

    def is_empty(self) -> bool:
        """True when there is nothing to do."""
        return not (self.captures or self.stages or self.loads or self.drops)


@dataclass(slots=True)
class WorkerReport:
    """What one worker finished since its last report."""

    rank: int
    group: int = 0  # the KV-cache group this worker copies
    staged: dict[int, int] = field(default_factory=dict)  # job id -> leading blocks verified
    stored: list[bytes] = field(default_factory=list)  # block hashes now durable
    store_failed: list[bytes] = field(default_factory=list)

    def is_empty(self) -> bool:
        """True when the report carries nothing."""
        return not (self.staged or self.stored or self.store_failed)
