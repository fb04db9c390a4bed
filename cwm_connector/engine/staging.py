"""Host memory for KV blocks: layer-major staging buffers and a pool that reuses them.

One contiguous `(capacity, layer_block_bytes)` region per layer, so a gather or
scatter is one copy per layer and a blob is read or written with one vectored
syscall over the block's per-layer segments. Shared by `kv_layout` and the copy
backends (`gpu_copy`), which import it and not each other.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch


class StagingBuffer:
    """Host memory for up to `capacity` blocks, one contiguous region per layer."""

    def __init__(self, layer_block_bytes: Sequence[int], capacity: int, pin_memory: bool = False):
        self.capacity = capacity
        self.nbytes = capacity * sum(layer_block_bytes)
        # Pinned (page-locked) on CUDA hosts: the GPU reads and writes it directly.
        self._flat = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pin_memory)
        self.is_pinned = pin_memory
        self.layers: list[torch.Tensor] = []
        offset = 0
        for nbytes in layer_block_bytes:
            size = capacity * nbytes
            self.layers.append(self._flat[offset : offset + size].view(capacity, nbytes))
            offset += size
        self._arrays = [layer.numpy() for layer in self.layers]  # cheap per-block views

    def segments(self, index: int) -> list[memoryview]:
        """The per-layer byte ranges that make up block `index`, in blob order."""
        return [memoryview(array[index]) for array in self._arrays]

    def prefault(self) -> None:
        """Touch every page now, so the first restore does not pay page faults."""
        self._flat.fill_(0)


class StagingPool:
    """Reuses staging buffers (page faults on fresh memory cost more than the copy)."""

    def __init__(
        self, layer_block_bytes: Sequence[int], max_idle_bytes: int, pin_memory: bool = False
    ):
        self._layer_block_bytes = list(layer_block_bytes)
        self._pin_memory = pin_memory
        self._max_idle_bytes = max_idle_bytes
        self._idle: list[StagingBuffer] = []
        self._lock = threading.Lock()

    def take(self, num_blocks: int) -> StagingBuffer:
        """A buffer with room for at least num_blocks blocks."""
        with self._lock:
            fits = [b for b in self._idle if b.capacity >= num_blocks]
            if fits:
                best = min(fits, key=lambda b: b.capacity)
                self._idle.remove(best)
                return best
        return StagingBuffer(self._layer_block_bytes, max(num_blocks, 1), self._pin_memory)

    def give(self, buffer: StagingBuffer) -> None:
        """Return a buffer for reuse (dropped if the idle budget is full)."""
        with self._lock:
            idle = sum(b.nbytes for b in self._idle)
            if idle + buffer.nbytes <= self._max_idle_bytes:
                self._idle.append(buffer)

    def prewarm(self, num_blocks: int) -> None:
        """Allocate and prefault one buffer ahead of the first restore."""
        if num_blocks > 0:
            buffer = StagingBuffer(self._layer_block_bytes, num_blocks, self._pin_memory)
            buffer.prefault()
            self.give(buffer)
