"""pytest-benchmark GPU suite: gather/scatter of 1,024 blocks vs cudaMemcpy of the same bytes.

Skips without CUDA or without pytest-benchmark. Shape: bench_copy.py's defaults
(16 layers, 8 KV heads, head size 128, block size 16, bf16: 1 MiB per block).
Run: `python -m pytest benchmarks/gpu --benchmark-columns=median,ops`.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

# This folder is on sys.path under pytest's default (prepend) import mode.
import bench_copy

from cwm_connector.engine.kv_layout import KVLayout
from cwm_connector.engine.staging import StagingBuffer

NUM = 1024
VARIANTS = ["torch", "triton-uva", "triton-staged"]


@pytest.fixture(scope="module", params=sorted(bench_copy.LAYOUTS))
def setup(request: pytest.FixtureRequest) -> tuple[dict, KVLayout, StagingBuffer, list[int]]:
    args = bench_copy.parse_args([])
    kv = bench_copy.make_kv(request.param, args, 2 * NUM)
    ref = bench_copy.build(kv, 2 * NUM, "torch")
    ids = torch.randperm(2 * NUM)[:NUM].tolist()
    expected = ref.new_buffer(NUM)
    ref.gather(ids, expected)
    return kv, ref, expected, ids


def _record(benchmark, nbytes: int) -> None:  # type: ignore[no-untyped-def]
    median = benchmark.stats.stats.median
    benchmark.extra_info["gbps"] = nbytes / median / 1e9


@pytest.mark.parametrize("direction", ["d2h", "h2d"])
def test_memcpy_baseline(benchmark, setup, direction: str) -> None:  # type: ignore[no-untyped-def]
    _, ref, _, _ = setup
    nbytes = NUM * ref.block_bytes
    dev = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True)
    dst, src = (host, dev) if direction == "d2h" else (dev, host)

    def copy() -> None:
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()

    benchmark.pedantic(copy, rounds=7, warmup_rounds=2)
    _record(benchmark, nbytes)
    assert torch.equal(dst.cpu() if dst.is_cuda else dst, src.cpu())


@pytest.mark.parametrize("variant", VARIANTS)
def test_gather(benchmark, setup, variant: str) -> None:  # type: ignore[no-untyped-def]
    kv, _, expected, ids = setup
    layout = bench_copy.build(kv, 2 * NUM, variant)
    out = layout.new_buffer(NUM)
    benchmark.pedantic(lambda: layout.gather(ids, out), rounds=7, warmup_rounds=2)
    _record(benchmark, NUM * layout.block_bytes)
    assert bench_copy.rows_equal(out, expected, NUM)


@pytest.mark.parametrize("variant", VARIANTS)
def test_scatter(benchmark, setup, variant: str) -> None:  # type: ignore[no-untyped-def]
    kv, ref, expected, ids = setup
    layout = bench_copy.build(kv, 2 * NUM, variant)
    benchmark.pedantic(lambda: layout.scatter(ids, expected), rounds=7, warmup_rounds=2)
    _record(benchmark, NUM * layout.block_bytes)
    check = ref.new_buffer(NUM)
    ref.gather(ids, check)
    assert bench_copy.rows_equal(check, expected, NUM)  # same bytes written back
