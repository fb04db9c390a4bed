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

from collections.abc import Callable, Sequence
from typing import Any

import torch

from cwm_connector.engine.gpu_copy import BlockCopier
from cwm_connector.engine.staging import StagingBuffer, StagingPool


class KVLayout:
    """The registered KV tensors and how one block maps onto them."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], num_blocks: int, backend: str = "auto"):
        if not kv_caches:
            raise ValueError("no KV cache tensors registered")
        self.num_blocks = num_blocks
        self.layer_names = list(kv_caches)
        self.tensors = [manager_blocks(t, num_blocks) for t in kv_caches.values()]
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
        self.copier: BlockCopier | None = BlockCopier(self.tensors, self.block_dims, backend)
        self.backend = self.copier.backend  # resolved: torch | triton | native
        self._description = self._describe()

    def release(self) -> None:
        """Drop every view of the KV tensors (vLLM's sleep mode frees their memory)."""
        self.tensors = []
        self.copier = None

    def rebind(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Use the tensors vLLM registers again after a wake-up (same geometry, new memory)."""
        fresh = KVLayout(kv_caches, self.num_blocks, self.backend)
        if fresh.describe() != self._description or fresh.layer_names != self.layer_names:
            raise ValueError("the KV caches after wake-up differ from the registered ones")
        self.tensors, self.copier, self.device = fresh.tensors, fresh.copier, fresh.device

    def describe(self) -> dict[str, Any]:
        """The layout facts that go into the fingerprint."""
        return self._description

    def _live_copier(self) -> BlockCopier:
        if self.copier is None:
            raise RuntimeError("the KV caches are unregistered (vLLM sleep mode)")
        return self.copier

    def _describe(self) -> dict[str, Any]:
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
            block_ids, stream, lambda ids: self._live_copier().gather(ids, len(block_ids), out)
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
            block_ids,
            stream,
            lambda ids: self._live_copier().scatter(ids, len(block_ids), src, layers),
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
                    self._live_copier().scatter(ids, num, src, [layer])
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


def manager_blocks(tensor: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """A view whose dim 0 is vLLM's block, for a backend whose kernel block is smaller.

    Such a backend (FlashMLA and others, VLLM_NOTES "Kernel-block splitting") makes
    dim 0 `num_blocks x ratio`; manager block b is kernel blocks [b*ratio, (b+1)*ratio),
    contiguous, so the view merges them. Any other tensor is returned as it is.
    """
    if num_blocks in tensor.shape:
        return tensor
    size = tensor.shape[0] if tensor.dim() > 1 else 0
    if size and size % num_blocks == 0 and tensor.is_contiguous():
        ratio = size // num_blocks
        return tensor.view(num_blocks, ratio * tensor.shape[1], *tensor.shape[2:])
    return tensor


def _block_dim(tensor: torch.Tensor, num_blocks: int) -> int:
    dims = [i for i, s in enumerate(tensor.shape) if s == num_blocks]
    if not dims:
        raise ValueError(f"no dimension of size {num_blocks} in KV tensor {tuple(tensor.shape)}")
    return dims[0]
