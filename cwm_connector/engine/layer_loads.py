"""One step's loads, layer by layer: each layer's attention waits for its own blocks only.

vLLM calls `wait_for_layer_load(layer)` just before a layer's attention reads the
paged cache. CUDA: every part's scatter is queued on the copy stream in layer
order with one event per layer, and the forward's stream waits on layer i's
event when layer i asks, so the first layers compute while later ones copy; the
host never blocks. CPU: a thread scatters layer by layer and sets one
`threading.Event` per layer; layer i's wait blocks until its blocks are written.

A forward that will not ask (a full CUDA graph replays without Python) must not
use this: the worker then loads the whole step up front. `finish()` makes sure
everything after the forward sees the loads complete, asked for or not.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cwm_connector.engine.kv_layout import KVLayout
from cwm_connector.engine.staging import StagingBuffer

logger = logging.getLogger("vllm.cwm.worker")


@dataclass(slots=True)
class LoadPart:
    """One request's verified staged blocks and where they go."""

    job_id: int
    block_ids: list[int]
    buffer: StagingBuffer
    digests: list[bytes]
    prestaged: bool = False


Done = Callable[[list[LoadPart], BaseException | None], None]


class LayerwiseLoad:
    """This step's loads, started on `start`; `wait(layer)` before that layer reads."""

    def __init__(self, layout: KVLayout, stream: torch.cuda.Stream | None, done: Done):
        self.layout = layout
        self.stream = stream
        self.done = done  # CPU: called on the load thread once every layer is written
        self._index = {name: i for i, name in enumerate(layout.layer_names)}
        self._events: list[torch.cuda.Event] = []  # CUDA: per layer, on the copy stream
        self._waited: set[int] = set()
        self._ready: list[threading.Event] = []  # CPU: per layer
        self._thread: threading.Thread | None = None
        self.waits = 0  # layers that asked while a load was in progress (a counter)

    def start(self, parts: list[LoadPart]) -> list[torch.cuda.Event]:
        """Begin the copies; CUDA: return the per-layer events (the last one ends all).

        A CUDA error while queueing propagates (nothing waits on a half-queued load);
        a CPU error reaches `done` after every layer's event is set.
        """
        self.finish()
        self._waited = set()
        pairs = [(p.block_ids, p.buffer) for p in parts]
        if self.stream is not None:
            self._events = self.layout.scatter_by_layer(pairs, self.stream)
            return self._events
        self._ready = [threading.Event() for _ in self.layout.layer_names]
        self._thread = threading.Thread(
            target=self._scatter_layers, args=(parts, self._ready), name="cwm-load", daemon=True
        )
        self._thread.start()
        return []

    def _scatter_layers(self, parts: list[LoadPart], ready: list[threading.Event]) -> None:
        error: BaseException | None = None
        try:
            for layer, event in enumerate(ready):
                for part in parts:
                    self.layout.scatter(part.block_ids, part.buffer, layers=[layer])
                event.set()
        except Exception as exc:  # reported as load errors; the forward must not hang
            logger.exception("cwm: layer-by-layer scatter failed")
            error = exc
        finally:
            for event in ready:
                event.set()
        self.done(parts, error)

    def wait(self, layer_name: str) -> None:
        """Make the caller (CPU) or the forward's stream (CUDA) wait for this layer's blocks.

        A name this layout does not know waits for every layer.
        """
        index = self._index.get(layer_name)
        if self._events:
            target = len(self._events) - 1 if index is None else index
            if target not in self._waited:
                self._waited.add(target)
                torch.cuda.current_stream(self.layout.device).wait_event(self._events[target])
        elif self._ready:
            for event in self._ready if index is None else self._ready[index : index + 1]:
                event.wait()
        else:
            return
        self.waits += 1

    def finish(self) -> None:
        """After the forward: the loads are complete for whatever comes next."""
        if self._events:
            last = len(self._events) - 1
            if last not in self._waited:  # a layer never asked: order the rest after all
                torch.cuda.current_stream(self.layout.device).wait_event(self._events[last])
            self._events = []
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._ready = []
