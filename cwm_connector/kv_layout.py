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
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch


class StagingBuffer:
    """Host memory for up to `capacity` blocks, one contiguous region per layer."""

    def __init__(self, layer_block_bytes: Sequence[int], capacity: int):
        self.capacity = capacity
        self.nbytes = capacity * sum(layer_block_bytes)
        self._flat = torch.empty(self.nbytes, dtype=torch.uint8)
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

    def __init__(self, layer_block_bytes: Sequence[int], max_idle_bytes: int):
        self._layer_block_bytes = list(layer_block_bytes)
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
        return StagingBuffer(self._layer_block_bytes, max(num_blocks, 1))

    def give(self, buffer: StagingBuffer) -> None:
        """Return a buffer for reuse (dropped if the idle budget is full)."""
        with self._lock:
            idle = sum(b.nbytes for b in self._idle)
            if idle + buffer.nbytes <= self._max_idle_bytes:
                self._idle.append(buffer)

    def prewarm(self, num_blocks: int) -> None:
        """Allocate and prefault one buffer ahead of the first restore."""
        if num_blocks > 0:
            buffer = StagingBuffer(self._layer_block_bytes, num_blocks)
            buffer.prefault()
            self.give(buffer)


class KVLayout:
    """The registered KV tensors and how one block maps onto them."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], num_blocks: int):
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
        return StagingPool(self.layer_block_bytes, max_idle_bytes)

    def gather(self, block_ids: Sequence[int], out: StagingBuffer) -> None:
        """Copy blocks out of the paged cache into rows [0, n) of `out`."""
        num = len(block_ids)
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        for tensor, dim, shape, rows in zip(
            self.tensors, self.block_dims, self.block_shapes, out.layers, strict=True
        ):
            dest = rows[:num].view(tensor.dtype).view(num, *shape)
            if dim == 0 and tensor.device.type == "cpu":
                torch.index_select(tensor, 0, ids, out=dest)
            else:
                dest.copy_(tensor.index_select(dim, ids).movedim(dim, 0))

    def scatter(self, block_ids: Sequence[int], src: StagingBuffer) -> None:
        """Write rows [0, n) of `src` into these paged blocks."""
        num = len(block_ids)
        if num > src.capacity:
            raise ValueError(f"{num} blocks requested, buffer holds {src.capacity}")
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        for tensor, dim, shape, rows in zip(
            self.tensors, self.block_dims, self.block_shapes, src.layers, strict=True
        ):
            values = rows[:num].to(self.device).view(tensor.dtype).view(num, *shape)
            tensor.index_copy_(dim, ids, values.movedim(0, dim))


def _block_dim(tensor: torch.Tensor, num_blocks: int) -> int:
    dims = [i for i, s in enumerate(tensor.shape) if s == num_blocks]
    if not dims:
        raise ValueError(f"no dimension of size {num_blocks} in KV tensor {tuple(tensor.shape)}")
    return dims[0]
