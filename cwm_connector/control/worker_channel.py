"""Thaw's side channel from the scheduler process to each worker.

An idle engine runs no steps, so the connector metadata cannot carry a staging
job at thaw time. Each worker serves a small Unix socket of its own,
`<control_socket>.rank<N>` (mode 0600, the control-socket protocol), with two
ops: `prestage` (read and verify the blobs of these block hashes into host
memory now, as a staging job whose id the scheduler chose) and `resident` (how
many of them are held in host memory). The scheduler then promises that job's
blocks to the next request with the same prefix at once: no staging round
trip, the load is a memcpy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from cwm_connector.control.client import ControlClient
from cwm_connector.control.server import ControlServer
from cwm_connector.errors import CwmError

logger = logging.getLogger("vllm.cwm.channel")

PRESTAGE_TIMEOUT_S = 120.0
MAX_HASHES = 100_000  # a frame of 100k 32-byte hashes stays far below the frame limit


class Prestager(Protocol):
    """What the worker offers the channel."""

    def prestage(self, block_hashes: Sequence[bytes], job_id: int) -> dict[str, Any]: ...

    def resident(self, block_hashes: Sequence[bytes]) -> int: ...


def _hashes(args: dict[str, Any]) -> list[bytes]:
    hashes = args.get("block_hashes")
    if not isinstance(hashes, list) or len(hashes) > MAX_HASHES:
        raise CwmError("block_hashes must be a list of bytes", code="bad_request")
    if not all(isinstance(h, bytes) and 0 < len(h) <= 64 for h in hashes):
        raise CwmError("block_hashes must be a list of bytes", code="bad_request")
    return hashes


def start_worker_channel(path: Path, worker: Prestager) -> ControlServer | None:
    """Serve prestage/resident for one worker; a failure disables only prestaging."""

    def handle(op: str, args: dict[str, Any], progress: Callable[[int, int], None]) -> Any:
        if op == "prestage":
            job_id = args.get("job_id")
            if not isinstance(job_id, int) or isinstance(job_id, bool) or job_id < 1:
                raise CwmError("job_id must be a positive integer", code="bad_request")
            return worker.prestage(_hashes(args), job_id)
        if op == "resident":
            return {"resident": worker.resident(_hashes(args))}
        raise CwmError(f"unknown worker op {op!r}", code="unknown_op")

    server = ControlServer(path, handle)
    try:
        server.start()
    except (CwmError, OSError) as exc:
        logger.error("cwm: worker channel disabled (%s); thaw will not prestage", exc)
        return None
    return server


class WorkerChannels:
    """The scheduler side: asks every TP rank's worker, merges the answers."""

    def __init__(self, paths: Sequence[Path], timeout_s: float = PRESTAGE_TIMEOUT_S):
        self.clients = [ControlClient(path, timeout_s=timeout_s) for path in paths]

    def prestage(self, block_hashes: Sequence[bytes], job_id: int) -> dict[str, Any]:
        """Stage on every rank as one job; `staged` is the least any rank holds.

        Raises CwmError (Unavailable) when a worker does not answer.
        """
        results = [
            c.call("prestage", block_hashes=list(block_hashes), job_id=job_id) for c in self.clients
        ]
        failed = sorted({f for r in results for f in r.get("failed", [])})
        return {"staged": min(int(r.get("staged", 0)) for r in results), "failed": failed}

    def resident(self, block_hashes: Sequence[bytes]) -> int | None:
        """Blocks resident in memory on every rank, or None if a worker does not answer."""
        try:
            counts = [
                int(c.call("resident", block_hashes=list(block_hashes))["resident"])
                for c in self.clients
            ]
        except (CwmError, KeyError, TypeError, ValueError):
            return None
        return min(counts)


class ReadyBook(Protocol):
    """The scheduler's record of prestaged jobs."""

    def prepare_ready(self) -> int: ...

    def complete_ready(self, job_id: int, block_hashes: Sequence[bytes], ttl_s: float) -> None: ...


class ThawStager:
    """Thaw's staging: the scheduler names a job, every worker stages it, the scheduler notes it."""

    def __init__(self, channels: WorkerChannels, book: ReadyBook, ttl_s: float):
        self.channels = channels
        self.book = book
        self.ttl_s = ttl_s

    def prestage(self, block_hashes: Sequence[bytes]) -> dict[str, Any]:
        """Stage a window's blocks on every rank; the next request with them loads at once."""
        job_id = self.book.prepare_ready()
        result = self.channels.prestage(block_hashes, job_id)
        if result["staged"]:
            self.book.complete_ready(job_id, block_hashes[: result["staged"]], self.ttl_s)
        return result

    def resident(self, block_hashes: Sequence[bytes]) -> int | None:
        """Blocks held in host memory on every rank (None if a worker does not answer)."""
        return self.channels.resident(block_hashes)
