"""Copy backends between the paged KV tensors and a layer-major staging buffer.

The bytes are a persistent format (blobs are digested over them): row i of a
layer's staging region is `tensor.index_select(dim, ids).movedim(dim, 0)[i]`,
contiguous. Every backend writes exactly those bytes.

- `torch`: index_select / index_copy_ per layer (any device, any strides).
- `triton`: one kernel launch per group of layers that share a block geometry
  (triton_copy.py). On CUDA, strategy `staged` (the default) gathers into a
  device scratch buffer and moves it with one cudaMemcpyAsync per layer and
  chunk (scatter: the reverse); strategy `uva` reads and writes the pinned host
  memory from the kernel directly, a few % faster but it holds SMs for the
  whole PCIe transfer (see benchmarks/README.md).
- `native`: the optional csrc/ extension (native_ext.py), same geometry.
- `auto`: `triton` when it imports and the tensors are CUDA, else `torch`.

A kernel needs each layer's dims after the block dim to be one contiguous run
and the dims before it to merge into one stride; a layer that is not (say a
permuted view) is copied by the torch path, and the rest still by the kernel.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from cwm_connector.engine import native_ext
from cwm_connector.errors import ConfigError

if TYPE_CHECKING:
    from cwm_connector.engine.staging import StagingBuffer

logger = logging.getLogger("vllm.cwm.copy")

BACKENDS = ("auto", "triton", "torch", "native")
STRATEGIES = ("uva", "staged")
STAGED_CHUNK_BYTES = 128 << 20  # device scratch per direction (`staged`; 128 MiB was best)


@dataclass(frozen=True, slots=True)
class RunGeometry:
    """One layer's block as `outer` runs of `inner` contiguous bytes (see triton_copy)."""

    outer: int
    outer_stride: int
    block_stride: int
    inner: int

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.outer, self.outer_stride, self.block_stride, self.inner)


def run_geometry(tensor: torch.Tensor, dim: int) -> RunGeometry | None:
    """The tensor's block geometry in bytes, or None if a kernel cannot address it."""
    shape, stride, size = tensor.shape, tensor.stride(), tensor.element_size()
    expected = 1
    for k in range(tensor.dim() - 1, dim, -1):  # dims after the block dim: one run
        if shape[k] != 1 and stride[k] != expected:
            return None
        expected *= shape[k]
    outer_dims = [k for k in range(dim) if shape[k] != 1]
    for a, b in itertools.pairwise(outer_dims):  # dims before it: one stride
        if stride[a] != stride[b] * shape[b]:
            return None
    outer = math.prod(shape[:dim])
    outer_stride = stride[outer_dims[-1]] * size if outer_dims else 0
    return RunGeometry(outer, outer_stride, stride[dim] * size, expected * size)


def word_bytes(max_word: int, *values: int) -> int:
    """The widest power-of-two access width up to max_word dividing every value."""
    word = max_word
    while word > 1 and any(v % word for v in values):
        word //= 2
    return word


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend that `name` means for tensors on `device`; ConfigError if unusable."""
    if name not in BACKENDS:
        raise ConfigError(f"copy_backend must be one of {BACKENDS}, got {name!r}")
    has_triton = importlib.util.find_spec("triton") is not None
    if name == "auto":
        return "triton" if device.type == "cuda" and has_triton else "torch"
    if name == "triton" and not has_triton:
        raise ConfigError("copy_backend 'triton' but triton is not installed")
    return name


@dataclass(slots=True)
class _Group:
    layers: list[int]  # indices into the layout's tensors
    geometry: RunGeometry
    word: int  # widest access the paged side allows
    paged_bases: torch.Tensor  # int64 addresses, on the KV device


@dataclass(slots=True)
class _Scratch:
    """Device rows for the `staged` strategy; reuse is ordered on the GPU by `event`."""

    layers: dict[int, torch.Tensor]  # layer index -> (chunk, row) uint8 on device
    chunk: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    event: Any = None


class BlockCopier:
    """Moves whole blocks of every layer between the paged tensors and staging rows."""

    def __init__(
        self,
        tensors: list[torch.Tensor],
        block_dims: list[int],
        backend: str = "auto",
        max_layers_per_launch: int = 0,
    ):
        self.tensors = tensors
        self.block_dims = block_dims
        self.device = tensors[0].device
        self.backend = resolve_backend(backend, self.device)
        # CUDA: `staged` by default; on an H100 `uva` copies a few % faster but its kernel
        # holds SMs while PCIe is slow, halving a concurrent matmul (benchmarks/README.md).
        # CPU (interpreter): the kernel addresses the staging rows directly.
        self.strategy = "staged" if self.device.type == "cuda" else "uva"
        self.groups: list[_Group] = []
        self.layer_groups: dict[int, _Group] = {}  # one launch per layer (layer-by-layer loads)
        self.fallback: list[int] = list(range(len(tensors)))
        self._launch: Callable[..., None] | None = None
        self._scratch: dict[bool, _Scratch] = {}
        if self.backend == "torch":
            return
        self._launch = self._load_launcher()
        self._plan(max_layers_per_launch)

    def _load_launcher(self) -> Callable[..., None]:
        if self.backend == "native":
            return _native_launcher(native_ext.load(need_cuda=self.device.type == "cuda"))
        from cwm_connector.engine import triton_copy

        triton_copy._kernel(self.device)  # fail now (not at the first copy) if unusable
        return triton_copy.copy_blocks

    def _plan(self, max_layers_per_launch: int) -> None:
        by_geometry: dict[RunGeometry, list[int]] = {}
        self.fallback = []
        for index, (tensor, dim) in enumerate(zip(self.tensors, self.block_dims, strict=True)):
            geometry = run_geometry(tensor, dim)
            if geometry is None:
                self.fallback.append(index)
            else:
                by_geometry.setdefault(geometry, []).append(index)
        if self.fallback:
            logger.warning(
                "cwm: %d KV tensors are not one contiguous run per block (e.g. %s, strides %s); "
                "the torch path copies them",
                len(self.fallback), tuple(self.tensors[self.fallback[0]].shape),
                self.tensors[self.fallback[0]].stride(),
            )  # fmt: skip
        step = max_layers_per_launch or len(self.tensors)
        max_word = 16 if self.backend == "native" and self.device.type == "cuda" else 8
        for geometry, layers in by_geometry.items():
            for start in range(0, len(layers), step):
                self.groups.append(self._group(layers[start : start + step], geometry, max_word))
            for index in layers:
                self.layer_groups[index] = self._group([index], geometry, max_word)

    def _group(self, layers: list[int], geometry: RunGeometry, max_word: int) -> _Group:
        bases = [self.tensors[i].data_ptr() for i in layers]
        word = word_bytes(max_word, *geometry.as_tuple()[1:], *bases)
        table = torch.tensor(bases, dtype=torch.int64).to(self.device)
        return _Group(layers, geometry, word, table)

    # -- copies (queued on the current stream) -----------------------------
    def gather(self, ids: torch.Tensor, num: int, out: StagingBuffer) -> None:
        """Blocks `ids` (on the KV device) into rows [0, num) of `out`."""
        self._copy(ids, num, out, gather=True)

    def scatter(
        self, ids: torch.Tensor, num: int, src: StagingBuffer, layers: list[int] | None = None
    ) -> None:
        """Rows [0, num) of `src` into blocks `ids` (on the KV device); only `layers` if given."""
        self._copy(ids, num, src, gather=False, layers=layers)

    def _copy(
        self,
        ids: torch.Tensor,
        num: int,
        buffer: StagingBuffer,
        gather: bool,
        layers: list[int] | None = None,
    ) -> None:
        fallback, groups = self.fallback, self.groups
        if layers is not None:
            fallback = [i for i in layers if i not in self.layer_groups]
            groups = [self.layer_groups[i] for i in layers if i in self.layer_groups]
        for index in fallback:
            layer = (self.tensors[index], self.block_dims[index], buffer.layers[index])
            (torch_gather if gather else torch_scatter)(*layer, ids, num)
        if not groups or num == 0:
            return
        if self.strategy == "uva" and (self.device.type != "cuda" or buffer.is_pinned):
            for group in groups:
                self._run(group, [buffer.layers[i] for i in group.layers], ids, gather)
        else:  # staged, or a pageable buffer the GPU cannot address
            self._copy_staged(ids, num, buffer, gather, groups)

    def _run(
        self, group: _Group, rows: list[torch.Tensor], ids: torch.Tensor, gather: bool
    ) -> None:
        bases = [r.data_ptr() for r in rows]
        word = word_bytes(group.word, *bases)
        host = torch.tensor(bases, dtype=torch.int64)
        if self.device.type == "cuda":
            host = host.pin_memory().to(self.device, non_blocking=True)
        assert self._launch is not None
        self._launch(group.paged_bases, host, ids, group.geometry.as_tuple(), word, gather)

    def _copy_staged(
        self, ids: torch.Tensor, num: int, buffer: StagingBuffer, gather: bool, groups: list[_Group]
    ) -> None:
        scratch = self._scratch_for(gather)
        layers = [i for group in groups for i in group.layers]
        is_cuda = self.device.type == "cuda"
        with scratch.lock:
            if is_cuda and scratch.event is not None:
                # The previous user's copies (maybe on another stream) must be done.
                torch.cuda.current_stream(self.device).wait_event(scratch.event)
            for start in range(0, num, scratch.chunk):
                stop = min(num, start + scratch.chunk)
                if not gather:
                    for index in layers:
                        scratch.layers[index][: stop - start].copy_(
                            buffer.layers[index][start:stop], non_blocking=True
                        )
                for group in groups:
                    rows = [scratch.layers[i] for i in group.layers]
                    self._run(group, rows, ids[start:stop], gather)
                if gather:
                    for index in layers:
                        buffer.layers[index][start:stop].copy_(
                            scratch.layers[index][: stop - start], non_blocking=True
                        )
            if is_cuda:
                scratch.event = torch.cuda.Event()
                scratch.event.record(torch.cuda.current_stream(self.device))

    def _scratch_for(self, gather: bool) -> _Scratch:
        if gather not in self._scratch:
            row_bytes = {
                i: g.geometry.outer * g.geometry.inner for g in self.groups for i in g.layers
            }
            chunk = max(1, STAGED_CHUNK_BYTES // sum(row_bytes.values()))
            layers = {
                i: torch.empty(chunk, row, dtype=torch.uint8, device=self.device)
                for i, row in row_bytes.items()
            }
            self._scratch[gather] = _Scratch(layers, chunk)
        return self._scratch[gather]


def _native_launcher(op: Any) -> Callable[..., None]:
    def launch(
        paged: torch.Tensor,
        host: torch.Tensor,
        ids: torch.Tensor,
        geometry: tuple[int, int, int, int],
        word: int,
        gather: bool,
    ) -> None:
        outer, outer_stride, block_stride, inner = geometry
        op(paged, host, ids, outer, outer_stride, block_stride, inner, outer * inner, word, gather)

    return launch


def torch_gather(
    tensor: torch.Tensor, dim: int, rows: torch.Tensor, ids: torch.Tensor, num: int
) -> None:
    """One layer's blocks into staging rows with index_select (the reference bytes)."""
    shape = [s for i, s in enumerate(tensor.shape) if i != dim]
    dest = rows[:num].view(tensor.dtype).view(num, *shape)
    if dim == 0 and tensor.device.type == "cpu":
        torch.index_select(tensor, 0, ids, out=dest)
    else:
        dest.copy_(tensor.index_select(dim, ids).movedim(dim, 0), non_blocking=True)


def torch_scatter(
    tensor: torch.Tensor, dim: int, rows: torch.Tensor, ids: torch.Tensor, num: int
) -> None:
    """Staging rows into one layer's blocks with index_copy_."""
    shape = [s for i, s in enumerate(tensor.shape) if i != dim]
    values = rows[:num].to(tensor.device, non_blocking=True).view(tensor.dtype).view(num, *shape)
    tensor.index_copy_(dim, ids, values.movedim(0, dim))
