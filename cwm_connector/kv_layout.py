"""Gather and scatter whole KV blocks across every registered layer tensor.

Layout-agnostic: each tensor's block dimension is the one whose size is the
engine's number of blocks (dim 0 on the CPU backend, dim 1 for FlashAttention's
`(2, num_blocks, ...)`). A block's bytes (its blob) are the concatenation,
layer by layer in registration order, of that layer's slice along the block
dimension.

Host copies live in a StagingBuffer that is layer-major: one contiguous
`(capacity, layer_block_bytes)` region per layer, so a gather or scatter is one
`index_select`/`index_copy_` per layer with no intermediate copy, and a blob is
read or written with one vectored syscall over the block's per-layer segments.
On CUDA the staging memory is pinned and the copies are done by the backend
that `copy_backend` names (gpu_copy.py), optionally on a caller's stream.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from cwm_connector.gpu_copy import BlockCopier


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


class KVLayout:
    """The registered KV tensors and how one block maps onto them."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], num_blocks: int, backend: str = "auto"):
        if not kv_caches:
            raise ValueError("no KV cache tensors registered")
        self.num_blocks = num_blocks
        self.layer_names = list(kv_caches)
        self.tensors = list(kv_caches.values())
        self.block_dims = [_block_dim(t, num_blocks) for t in self.tensors]
        self.block_shapes = [
            [s for i, s in enumerate(t.shape) if i != d]
            for t, d in zip(self.tensors, self.block_dims, strict=True)
        ]
        self.layer_block_bytes = [
            t.numel() // t.shape[d] * t.element_size()
            for t, d in zip(self.tensors, self.block_dims, strict=True)
        ]
        self.block_bytes = sum(self.layer_block_bytes)
        self.device = self.tensors[0].device
        self.copier = BlockCopier(self.tensors, self.block_dims, backend)
        self.backend = self.copier.backend  # resolved: torch | triton | native

    def describe(self) -> dict[str, Any]:
        """The layout facts that go into the fingerprint."""
        shapes = sorted(
            {
                (tuple(shape), str(t.dtype), d)
                for t, d, shape in zip(
                    self.tensors, self.block_dims, self.block_shapes, strict=True
                )
            }
        )
        return {
            "num_layers": len(self.tensors),
            "block_bytes": self.block_bytes,
            "shapes": [[list(shape), dtype, dim] for shape, dtype, dim in shapes],
        }

    def new_pool(self, max_idle_bytes: int) -> StagingPool:
        """A staging pool shaped for this layout."""
        return StagingPool(self.layer_block_bytes, max_idle_bytes, self.is_cuda)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def new_buffer(self, capacity: int) -> StagingBuffer:
        """A staging buffer for `capacity` blocks (pinned when the KV cache is on CUDA)."""
        return StagingBuffer(self.layer_block_bytes, capacity, self.is_cuda)

    def gather(
        self, block_ids: Sequence[int], out: StagingBuffer, stream: torch.cuda.Stream | None = None
    ) -> torch.cuda.Event | None:
        """Copy blocks out of the paged cache into rows [0, n) of `out`.

        CPU: done on return, None. CUDA: queued on `stream` (default: the current
        stream) after the work already queued on the current stream (the
        forwards that wrote these blocks); returns the event that marks the end.
        With a stream the call does not wait: `event.synchronize()` before
        reading `out` or letting vLLM reuse the blocks. Without one it waits.
        """
        self._check(block_ids, out)
        return self._run(
            block_ids, stream, lambda ids: self.copier.gather(ids, len(block_ids), out)
        )

    def scatter(
        self,
        block_ids: Sequence[int],
        src: StagingBuffer,
        stream: torch.cuda.Stream | None = None,
        layers: list[int] | None = None,
    ) -> torch.cuda.Event | None:
        """Write rows [0, n) of `src` into these paged blocks (of `layers` only, if given).

        Same stream contract as `gather`; with a stream, make the forward wait
        (`torch.cuda.current_stream().wait_event(event)`) and keep `src` until
        the event completes.
        """
        self._check(block_ids, src)
        return self._run(
            block_ids, stream, lambda ids: self.copier.scatter(ids, len(block_ids), src, layers)
        )

    def scatter_by_layer(
        self, parts: Sequence[tuple[Sequence[int], StagingBuffer]], stream: torch.cuda.Stream
    ) -> list[torch.cuda.Event]:
        """CUDA: queue every part's scatter on `stream` in layer order, one event per layer.

        Event i marks layer i written in every part. Queued after the work already
        on the current stream; the caller makes the forward wait on event i before
        layer i reads the cache and keeps the buffers until the last event completes.
        """
        for block_ids, src in parts:
            self._check(block_ids, src)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        events = []
        with torch.cuda.stream(stream):
            on_device = [(self._device_ids(ids), len(ids), src) for ids, src in parts]
            for layer in range(len(self.tensors)):
                for ids, num, src in on_device:
                    self.copier.scatter(ids, num, src, [layer])
                event = torch.cuda.Event()
                event.record(stream)
                events.append(event)
        return events

    def _check(self, block_ids: Sequence[int], buffer: StagingBuffer) -> None:
        # Kernels do not bound-check: a wrong id must never become a wild write.
        if len(block_ids) > buffer.capacity:
            raise ValueError(f"{len(block_ids)} blocks requested, buffer holds {buffer.capacity}")
        if block_ids and not 0 <= min(block_ids) <= max(block_ids) < self.num_blocks:
            raise ValueError(f"block ids outside [0, {self.num_blocks})")

    def _run(
        self,
        block_ids: Sequence[int],
        stream: torch.cuda.Stream | None,
        work: Callable[[torch.Tensor], None],
    ) -> torch.cuda.Event | None:
        if not self.is_cuda:
            work(torch.tensor(block_ids, dtype=torch.long, device=self.device))
            return None
        current = torch.cuda.current_stream(self.device)
        side = current if stream is None else stream
        if side != current:
            side.wait_stream(current)
        with torch.cuda.stream(side):
            work(self._device_ids(block_ids))
            event = torch.cuda.Event()
            event.record(side)
        if stream is None:
            event.synchronize()
        return event

    def _device_ids(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Block ids on the KV device, copied on the current stream (pinned, async)."""
        ids = torch.tensor(block_ids, dtype=torch.long).pin_memory()
        return ids.to(self.device, non_blocking=True)


def _block_dim(tensor: torch.Tensor, num_blocks: int) -> int:
    dims = [i for i, s in enumerate(tensor.shape) if s == num_blocks]
    if not dims:
        raise ValueError(f"no dimension of size {num_blocks} in KV tensor {tuple(tensor.shape)}")
    return dims[0]
