"""The Triton kernel behind `copy_backend="triton"`: whole KV blocks between paged and staging.

Imported only when that backend is chosen (Triton is optional). One launch
copies every layer of a group that shares one block geometry: the paged and
staging base addresses come from per-layer int64 tables, so the staging side
can be pinned host memory addressed directly from the GPU (UVA) or a device
scratch buffer. On CPU tensors the kernel runs only under `TRITON_INTERPRET=1`
(the unit tests).

Geometry, in words of the chosen width: a block of a layer is `outer` runs of
`inner` contiguous words; run o of block b starts at
`paged + o * outer_stride + b * block_stride`; staging row i holds block
`ids[i]` as its runs back to back, at `host + i * row + o * inner`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

BLOCK_WORDS = 1024  # words copied per program (8 KiB of int64)
NUM_WARPS = 4

_WORD_TYPES = {8: tl.int64, 4: tl.int32, 2: tl.int16, 1: tl.int8}


def _copy_blocks(
    paged_bases,
    host_bases,
    ids,
    outer,
    outer_stride,
    block_stride,
    inner,
    row,
    chunks,
    WORD: tl.constexpr,
    GATHER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # No loops: each program copies one BLOCK-word chunk of one run, which also keeps
    # the kernel within what older Triton interpreters can run.
    pid = tl.program_id(0)  # (i * outer + o) * chunks + chunk
    layer = tl.program_id(1)
    run = pid // chunks
    i = (run // outer).to(tl.int64)
    o = (run % outer).to(tl.int64)
    offs = (pid % chunks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inner
    block = tl.load(ids + i)
    paged = tl.load(paged_bases + layer).to(tl.pointer_type(WORD))
    host = tl.load(host_bases + layer).to(tl.pointer_type(WORD))
    paged += o * outer_stride + block * block_stride + offs
    host += i * row + o * inner + offs
    if GATHER:
        tl.store(host, tl.load(paged, mask=mask), mask=mask)
    else:
        tl.store(paged, tl.load(host, mask=mask), mask=mask)


_kernels: dict[bool, Any] = {}


def _kernel(device: torch.device) -> Any:
    """The jitted kernel; on CPU tensors, the interpreter's (TRITON_INTERPRET=1 only)."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type != "cuda" and not interpret:
        raise ValueError("the Triton copy kernel needs CUDA tensors (or TRITON_INTERPRET=1)")
    if interpret not in _kernels:
        # triton.jit picks the interpreter from the environment at decoration time.
        _kernels[interpret] = triton.jit(_copy_blocks)
    return _kernels[interpret]


def copy_blocks(
    paged_bases: torch.Tensor,
    host_bases: torch.Tensor,
    ids: torch.Tensor,
    geometry: tuple[int, int, int, int],
    word: int,
    gather: bool,
) -> None:
    """Copy blocks `ids` of every layer in the tables (queued on the current stream).

    `geometry` is (outer, outer_stride, block_stride, inner) in bytes; each must
    be a multiple of `word`, as must every base address.
    """
    outer, outer_stride, block_stride, inner = geometry
    num_layers, num = paged_bases.numel(), ids.numel()
    if num == 0 or num_layers == 0:
        return
    kernel = _kernel(ids.device)
    chunks = triton.cdiv(inner // word, BLOCK_WORDS)
    grid = (num * outer * chunks, num_layers)
    kernel[grid](
        paged_bases,
        host_bases,
        ids,
        outer,
        outer_stride // word,
        block_stride // word,
        inner // word,
        outer * inner // word,
        chunks,
        WORD=_WORD_TYPES[word],
        GATHER=gather,
        BLOCK=BLOCK_WORDS,
        num_warps=NUM_WARPS,
    )
