"""Copy backends against index_select, byte for byte, on every supported KV layout.

The Triton kernel runs on the CPU under TRITON_INTERPRET=1 (set per test);
the CUDA tests skip without a GPU. Data is random and never zero, destinations
are poisoned, block ids are unsorted and include the last block.
"""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch
from torch.utils import cpp_extension

from cwm_connector.engine import gpu_copy, native_ext
from cwm_connector.engine.kv_layout import KVLayout
from cwm_connector.engine.staging import StagingBuffer
from cwm_connector.errors import ConfigError

NB = 13  # blocks per layer
NUM_LAYERS = 3
IDS = [NB - 1, 3, 0, 7, 5]  # unsorted, first and last block
POISON = 0xA5
# name -> (per-layer shape, block dim): vLLM 0.32's tensors, tiny
LAYOUTS = {
    "cpu": ((NB, 2, 4, 16), 0),  # (blocks, kv heads, block size, 2 * head size)
    "flash_attn": ((2, NB, 4, 2, 8), 1),  # (k/v, blocks, block size, kv heads, head size)
    "flashinfer_triton": ((NB, 2, 4, 2, 8), 0),  # (blocks, k/v, block size, kv heads, head size)
    "mla": ((NB, 4, 24), 0),  # (blocks, block size, latent + rope dim)
}
DTYPES = [torch.bfloat16, torch.float16, torch.uint8, torch.float32]  # uint8: fp8 storage

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random bytes in [1, 255] reinterpreted as `dtype` (no zero bytes anywhere)."""
    size = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for s in shape:
        numel *= s
    raw = torch.randint(1, 256, (numel * size,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).view(shape)


def make_caches(layout: str, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    shape, _ = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed)
    return {f"layer.{i}": random_tensor(shape, dtype, gen) for i in range(NUM_LAYERS)}


def poisoned(layout: KVLayout, capacity: int = len(IDS) + 2) -> StagingBuffer:
    buffer = layout.new_buffer(capacity)
    buffer._flat.fill_(POISON)
    return buffer


def expected_rows(tensor: torch.Tensor, dim: int, ids: list[int]) -> torch.Tensor:
    """The persistent byte format, computed independently of the code under test."""
    picked = tensor.index_select(dim, torch.tensor(ids)).movedim(dim, 0).contiguous()
    return picked.view(torch.uint8).reshape(len(ids), -1)


def assert_gathered(layout: KVLayout, buffer: StagingBuffer, ids: list[int]) -> None:
    for tensor, dim, rows in zip(layout.tensors, layout.block_dims, buffer.layers, strict=True):
        assert torch.equal(rows[: len(ids)], expected_rows(tensor, dim, ids))
        assert bool((rows[len(ids) :] == POISON).all()), "wrote past the gathered rows"


def assert_scattered(
    caches: dict[str, torch.Tensor], before: dict[str, torch.Tensor], src: StagingBuffer
) -> None:
    for (name, tensor), rows in zip(caches.items(), src.layers, strict=True):
        dim = gpu_copy_dim(tensor)
        want = before[name].clone()
        values = (
            rows[: len(IDS)]
            .view(tensor.dtype)
            .reshape(len(IDS), *[s for i, s in enumerate(tensor.shape) if i != dim])
        )
        want.index_copy_(dim, torch.tensor(IDS), values.movedim(0, dim))
        assert torch.equal(tensor.view(torch.uint8), want.view(torch.uint8)), name
        untouched = [b for b in range(NB) if b not in IDS]
        keep = torch.tensor(untouched)
        assert torch.equal(
            tensor.index_select(dim, keep).view(torch.uint8),
            before[name].index_select(dim, keep).view(torch.uint8),
        )


def gpu_copy_dim(tensor: torch.Tensor) -> int:
    return next(i for i, s in enumerate(tensor.shape) if s == NB)


def round_trip(caches: dict[str, torch.Tensor], backend: str, seed: int) -> KVLayout:
    """Gather IDS and check the bytes; scatter fresh rows back and check every block."""
    layout = KVLayout(caches, NB, backend=backend)
    out = poisoned(layout)
    assert layout.gather(IDS, out) is None  # CPU: synchronous, no event
    assert_gathered(layout, out, IDS)

    src = poisoned(layout)
    gen = torch.Generator().manual_seed(seed)
    src._flat.copy_(torch.randint(1, 256, (src.nbytes,), dtype=torch.uint8, generator=gen))
    before = {name: t.clone() for name, t in caches.items()}
    assert layout.scatter(IDS, src) is None
    assert_scattered(caches, before, src)
    return layout


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
def test_triton_matches_index_select(layout_name: str, dtype: torch.dtype) -> None:
    layout = round_trip(make_caches(layout_name, dtype, seed=1), "triton", seed=2)
    assert layout.backend == "triton"
    assert layout.copier.fallback == []
    assert len(layout.copier.groups) == 1  # one launch for all layers


def test_torch_backend_matches_index_select() -> None:
    for name in LAYOUTS:
        layout = round_trip(make_caches(name, torch.bfloat16, seed=3), "auto", seed=4)
        assert layout.backend == "torch"  # auto on CPU


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_triton_layers_in_one_storage_and_narrow_words() -> None:
    # vLLM's CPU backend: every layer is a view into one allocation.
    gen = torch.Generator().manual_seed(5)
    shape = (NB, 3, 5)  # 15 bytes per block of uint8: only 1-byte accesses are aligned
    flat = random_tensor((NUM_LAYERS * NB * 15,), torch.uint8, gen)
    caches = {f"l{i}": flat[i * NB * 15 : (i + 1) * NB * 15].view(shape) for i in range(3)}
    layout = round_trip(caches, "triton", seed=6)
    assert [g.word for g in layout.copier.groups] == [1]
    wide = round_trip(make_caches("flash_attn", torch.bfloat16, seed=7), "triton", seed=8)
    assert [g.word for g in wide.copier.groups] == [8]


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_non_contiguous_layer_falls_back_to_torch() -> None:
    # FlashInfer's HND stride order: logical (blocks, 2, block size, heads, head) over
    # physical (blocks, 2, heads, block size, head); the kernel cannot address it.
    caches = make_caches("flashinfer_triton", torch.bfloat16, seed=9)
    gen = torch.Generator().manual_seed(10)
    physical = random_tensor((NB, 2, 2, 4, 8), torch.bfloat16, gen)
    caches["layer.hnd"] = physical.permute(0, 1, 3, 2, 4)
    layout = round_trip(caches, "triton", seed=11)
    assert layout.copier.fallback == [NUM_LAYERS]
    assert sorted(i for g in layout.copier.groups for i in g.layers) == list(range(NUM_LAYERS))


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_staged_chunks_per_layer_launches_and_small_programs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cwm_connector.engine import triton_copy

    caches = make_caches("flash_attn", torch.float16, seed=12)
    block_bytes = KVLayout(caches, NB).block_bytes
    monkeypatch.setattr(gpu_copy, "STAGED_CHUNK_BYTES", 2 * block_bytes)  # 3 chunks of IDS
    monkeypatch.setattr(triton_copy, "BLOCK_WORDS", 4)  # several programs per run
    layout = KVLayout(caches, NB, backend="triton")
    layout.copier = gpu_copy.BlockCopier(
        layout.tensors, layout.block_dims, "triton", max_layers_per_launch=1
    )
    layout.copier.strategy = "staged"
    assert len(layout.copier.groups) == NUM_LAYERS
    out = poisoned(layout)
    layout.gather(IDS, out)
    assert_gathered(layout, out, IDS)
    assert layout.copier._scratch[True].chunk == 2
    src = poisoned(layout)
    src._flat.copy_(torch.randint(1, 256, (src.nbytes,), dtype=torch.uint8))
    before = {name: t.clone() for name, t in caches.items()}
    layout.scatter(IDS, src)
    assert_scattered(caches, before, src)


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("strategy", ["uva", "staged", "torch"])
def test_scatter_one_layer_at_a_time_touches_only_that_layer(
    monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    caches = make_caches("flash_attn", torch.float16, seed=14)
    gen = torch.Generator().manual_seed(15)
    physical = random_tensor((NB, 2, 2, 4, 8), torch.float16, gen)
    caches["layer.hnd"] = physical.permute(0, 1, 3, 2, 4)  # a torch-path layer among kernels
    block_bytes = KVLayout(caches, NB).block_bytes
    monkeypatch.setattr(gpu_copy, "STAGED_CHUNK_BYTES", 2 * block_bytes)  # several chunks
    layout = KVLayout(caches, NB, backend="torch" if strategy == "torch" else "triton")
    layout.copier.strategy = "uva" if strategy == "torch" else strategy
    src = poisoned(layout)
    src._flat.copy_(torch.randint(1, 256, (src.nbytes,), dtype=torch.uint8, generator=gen))
    before = {name: t.clone() for name, t in caches.items()}
    for index, name in enumerate(caches):
        layout.scatter(IDS, src, layers=[index])
        for later in list(caches)[index + 1 :]:
            same = torch.equal(caches[later].view(torch.uint8), before[later].view(torch.uint8))
            assert same, f"{name} wrote {later}"
    assert_scattered(caches, before, src)


def test_bad_requests_and_backends_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    caches = make_caches("cpu", torch.bfloat16, seed=13)
    layout = KVLayout(caches, NB)
    with pytest.raises(ValueError, match="outside"):
        layout.gather([0, NB], poisoned(layout))
    with pytest.raises(ValueError, match="buffer holds"):
        layout.scatter(list(range(4)), poisoned(layout, capacity=3))
    with pytest.raises(ConfigError, match="copy_backend"):
        KVLayout(caches, NB, backend="cuda-magic")
    monkeypatch.delenv(native_ext.BUILD_ENV, raising=False)
    with pytest.raises(ConfigError, match="CWM_BUILD_EXT=1"):
        KVLayout(caches, NB, backend="native")
    if importlib.util.find_spec("triton") is not None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="CUDA tensors"):
            KVLayout(caches, NB, backend="triton")


def test_run_geometry_of_vllm_layouts() -> None:
    fa = torch.empty(2, NB, 4, 2, 8, dtype=torch.bfloat16)
    assert gpu_copy.run_geometry(fa, 1) == gpu_copy.RunGeometry(2, NB * 128, 128, 128)
    cpu = torch.empty(NB, 2, 4, 16, dtype=torch.float16)
    assert gpu_copy.run_geometry(cpu, 0) == gpu_copy.RunGeometry(1, 0, 256, 256)
    assert gpu_copy.run_geometry(fa.permute(0, 1, 3, 2, 4), 1) is None
    assert gpu_copy.word_bytes(8, 24, 48) == 8 and gpu_copy.word_bytes(8, 6, 8) == 2


@pytest.mark.skipif(
    shutil.which("c++") is None or not cpp_extension.is_ninja_available(),
    reason="building csrc/ needs a C++ compiler and ninja",
)
def test_native_cpu_extension_matches_index_select(monkeypatch: pytest.MonkeyPatch) -> None:
    # Builds csrc/ (about 10 s on 2 cores without CUDA; cached by torch afterwards).
    monkeypatch.setenv(native_ext.BUILD_ENV, "1")
    for name in ("flash_attn", "cpu"):
        layout = round_trip(make_caches(name, torch.bfloat16, seed=14), "native", seed=15)
        assert layout.backend == "native" and layout.copier.groups


@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "triton", "native"])
@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
def test_cuda_async_gather_and_scatter(layout_name: str, backend: str) -> None:
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if backend == "native" and not native_ext.is_enabled():
        pytest.skip(f"native extension not enabled ({native_ext.BUILD_ENV}=1 builds it)")
    caches = {k: v.cuda() for k, v in make_caches(layout_name, torch.bfloat16, 16).items()}
    layout = KVLayout(caches, NB, backend=backend)
    out = poisoned(layout)
    assert out.is_pinned and out._flat.is_pinned()
    stream = torch.cuda.Stream()
    event = layout.gather(IDS, out, stream=stream)
    assert isinstance(event, torch.cuda.Event)
    event.synchronize()
    cpu = KVLayout({k: v.cpu() for k, v in caches.items()}, NB)
    assert_gathered(cpu, out, IDS)
    src = poisoned(layout)
    src._flat.copy_(torch.randint(1, 256, (src.nbytes,), dtype=torch.uint8))
    before = {name: t.cpu() for name, t in caches.items()}
    event = layout.scatter(IDS, src, stream=stream)
    torch.cuda.current_stream().wait_event(event)
    assert_scattered({name: t.cpu() for name, t in caches.items()}, before, src)
