"""Loads: verified staged blocks into the paged cache, for the whole step or layer by layer.

The engine thread hands over each step's loads (`load`) before the forward.
CPU: a scatter done on return (or, layer by layer, on a thread). CUDA: the
scatter is queued on the copy stream and the forward's stream waits on its
event(s) on the GPU; the staging buffers return to the pool once their copy
completed (`step_begins` of a later step). Every failure becomes a load error
that vLLM recomputes; `take_errors` (after the forward) sees the loads complete.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import torch

from cwm_connector.engine.kv_layout import KVLayout
from cwm_connector.engine.layer_loads import LayerwiseLoad, LoadPart
from cwm_connector.engine.staging import StagingBuffer, StagingPool
from cwm_connector.stats import Stats
from cwm_connector.store.blob import digest_segments

logger = logging.getLogger("vllm.cwm.worker")


class BlockLoader:
    """Scatters staged blocks into the paged cache and counts what loaded or failed."""

    def __init__(
        self,
        layout: KVLayout,
        pool: StagingPool,
        stats: Stats,
        copy_stream: torch.cuda.Stream | None,
        verify: bool = False,
    ):
        self.layout = layout
        self.pool = pool
        self.stats = stats
        self.copy_stream = copy_stream
        self.verify = verify  # re-read restored blocks and compare digests (tests)
        self.in_flight: list[tuple[torch.cuda.Event, StagingBuffer]] = []
        self._by_layer = LayerwiseLoad(layout, copy_stream, self._loaded)
        self._lock = threading.Lock()
        self._errors: set[int] = set()

    def step_begins(self) -> None:
        """Close the last step's loads and give back the buffers whose copies completed."""
        self._by_layer.finish()
        still = []
        for event, buffer in self.in_flight:
            if event.query():
                self.pool.give(buffer)
            else:
                still.append((event, buffer))
        self.in_flight = still

    def add_errors(self, block_ids: Sequence[int]) -> None:
        """Promised blocks that will not be loaded: vLLM recomputes them."""
        with self._lock:
            self._errors.update(block_ids)
        self.stats.add("load_errors", len(block_ids))

    def load(self, parts: list[LoadPart], by_layer: bool) -> None:
        """Start this step's loads; by_layer: the forward calls `wait_for_layer` per layer."""
        started = time.perf_counter()
        try:
            if by_layer:
                events = self._by_layer.start(parts)
                if not events:
                    return  # CPU: the load thread reports through _loaded
                done: list[torch.cuda.Event | None] = [events[-1]] * len(parts)
            else:
                stream = self.copy_stream
                done = [self.layout.scatter(p.block_ids, p.buffer, stream) for p in parts]
        except Exception as exc:
            if self.copy_stream is not None:
                self.copy_stream.synchronize()  # nothing may still read a buffer given back
            self._loaded(parts, exc)
            return
        current = torch.cuda.current_stream(self.layout.device) if self.layout.is_cuda else None
        for part, event in zip(parts, done, strict=True):
            if event is None:
                self.pool.give(part.buffer)
                continue
            if current is not None and not by_layer:
                current.wait_event(event)  # the whole forward waits for the copy, on the GPU
            # The buffer goes back to the pool once the copy finished (a later step).
            self.in_flight.append((event, part.buffer))
        elapsed_ms = (time.perf_counter() - started) * 1e3
        logger.info("cwm: loaded %d blocks in %.1f ms", _blocks(parts), elapsed_ms)
        if self.verify and done[-1] is not None:
            done[-1].synchronize()  # a test option: the host reads the restored blocks
        self._loaded(parts, None, give_back=False)

    def wait_for_layer(self, layer_name: str) -> None:
        """Before a layer reads the cache: its blocks of this step's loads are in place."""
        self._by_layer.wait(layer_name)

    def take_errors(self) -> set[int]:
        """Block ids that failed to load since the last call (this step's loads complete)."""
        self._by_layer.finish()
        waits, self._by_layer.waits = self._by_layer.waits, 0
        if waits:
            self.stats.add("layer_load_waits", waits)
            self.stats.flush(force=True)
        with self._lock:
            errors, self._errors = self._errors, set()
        return errors

    def _loaded(
        self, parts: list[LoadPart], error: BaseException | None, give_back: bool = True
    ) -> None:
        """Count (or, on error, report) these loads; give back their buffers if asked."""
        if give_back:
            for part in parts:
                self.pool.give(part.buffer)
        if error is not None:
            jobs = [p.job_id for p in parts]
            logger.error("cwm: scatter failed for load jobs %s: %s", jobs, error)
            for part in parts:
                self.add_errors(part.block_ids)
            return
        self.stats.add("loaded_blocks", _blocks(parts))
        self.stats.add("loaded_prestaged_blocks", _blocks([p for p in parts if p.prestaged]))
        self.stats.add("loaded_bytes", _blocks(parts) * self.layout.block_bytes)
        if self.verify:
            for part in parts:
                self._verify_restored(part.block_ids, part.digests)

    def _verify_restored(self, block_ids: Sequence[int], digests: Sequence[bytes]) -> None:
        buffer = self.pool.take(len(block_ids))
        self.layout.gather(block_ids, buffer)
        bad = [i for i, d in enumerate(digests) if digest_segments(buffer.segments(i)) != d]
        self.pool.give(buffer)
        self.stats.add("restore_verified_blocks", len(digests) - len(bad))
        if bad:
            logger.error("cwm: %d restored blocks differ from their blobs", len(bad))
            self.stats.add("restore_mismatch_blocks", len(bad))
            with self._lock:
                self._errors.update(block_ids[i] for i in bad)


def _blocks(parts: Sequence[LoadPart]) -> int:
    return sum(len(p.block_ids) for p in parts)
