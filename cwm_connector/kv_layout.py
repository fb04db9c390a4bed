"""Gather and scatter whole KV blocks across every registered layer tensor.

Layout-agnostic: each tensor's block dimension is the one whose size is the
engine's number of blocks (dim 0 on the CPU backend, dim 1 for FlashAttention's
`(2, num_blocks, ...)`). A block's bytes are the concatenation, layer by layer
in registration order, of that layer's slice along the block dimension.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class KVLayout:
    """The registered KV tensors and how one block maps onto them."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], num_blocks: int):
        if not kv_caches:
            raise ValueError("no KV cache tensors registered")
        self.layer_names = list(kv_caches)
        self.tensors = list(kv_caches.values())
        self.block_dims = [_block_dim(t, num_blocks) for t in self.tensors]
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
                (tuple(s for i, s in enumerate(t.shape) if i != d), str(t.dtype), d)
                for t, d in zip(self.tensors, self.block_dims, strict=True)
            }
        )
        return {
            "num_layers": len(self.tensors),
            "block_bytes": self.block_bytes,
            "shapes": [[list(shape), dtype, dim] for shape, dtype, dim in shapes],
        }

    def gather(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Copy blocks out into a host tensor of shape (len(block_ids), block_bytes) uint8."""
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        out = torch.empty((len(block_ids), self.block_bytes), dtype=torch.uint8)
        offset = 0
        for tensor, dim, nbytes in zip(
            self.tensors, self.block_dims, self.layer_block_bytes, strict=True
        ):
            picked = tensor.index_select(dim, ids).movedim(dim, 0).contiguous()
            out[:, offset : offset + nbytes].copy_(
                picked.view(len(block_ids), -1).view(torch.uint8)
            )
            offset += nbytes
        return out

    def scatter(self, block_ids: Sequence[int], src: torch.Tensor) -> None:
        """Write rows of a (n, block_bytes) uint8 host tensor into these paged blocks."""
        num = len(block_ids)
        if src.shape != (num, self.block_bytes):
            raise ValueError(f"expected {(num, self.block_bytes)}, got {tuple(src.shape)}")
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        offset = 0
        for tensor, dim, nbytes in zip(
            self.tensors, self.block_dims, self.layer_block_bytes, strict=True
        ):
            part = src[:, offset : offset + nbytes].contiguous().to(self.device)
            block_shape = [s for i, s in enumerate(tensor.shape) if i != dim]
            values = part.view(tensor.dtype).view(num, *block_shape).movedim(0, dim)
            tensor.index_copy_(dim, ids, values)
            offset += nbytes


def _block_dim(tensor: torch.Tensor, num_blocks: int) -> int:
    dims = [i for i, s in enumerate(tensor.shape) if s == num_blocks]
    if not dims:
        raise ValueError(f"no dimension of size {num_blocks} in KV tensor {tuple(tensor.shape)}")
    return dims[0]
