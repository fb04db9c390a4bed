"""GPU copy benchmark: KV blocks between a paged CUDA cache and pinned host memory.

For each layout, block count and copy variant: gather (GPU -> pinned host) and
scatter (pinned host -> GPU) bandwidth through `KVLayout`, as a ratio to a
plain cudaMemcpy of the same bytes (one contiguous pinned <-> device
`copy_(non_blocking=True)`), measured in the same run. Also a Triton launch
sweep and a capture-cost proxy: bf16 matmul throughput on the default stream
alone vs while gathers run on a side stream (a proxy for decode throughput,
not a decode measurement). Every variant's bytes are checked against torch's.
Prints Markdown tables and writes JSON; exits 0 without CUDA (nothing to do).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cwm_connector.engine import gpu_copy, native_ext
from cwm_connector.engine.kv_layout import KVLayout
from cwm_connector.engine.staging import StagingBuffer

# name -> (backend, strategy, max layers per launch; 0: all in one launch)
VARIANTS = {
    "torch": ("torch", "uva", 0),
    "triton-uva": ("triton", "uva", 0),
    "triton-uva-per-layer": ("triton", "uva", 1),
    "triton-staged": ("triton", "staged", 0),
    "native-uva": ("native", "uva", 0),
    "native-staged": ("native", "staged", 0),
}
LAYOUTS = {  # vLLM 0.32 CUDA backends: per-layer shape and block dim
    "flash_attn": (lambda nb, bs, h, d: (2, nb, bs, h, d), 1),
    "flashinfer": (lambda nb, bs, h, d: (nb, 2, bs, h, d), 0),
}
SWEEP_CHUNK_MB = [32, 64, 128, 256]  # gpu_copy.STAGED_CHUNK_BYTES
SWEEP_KERNEL = [(512, 4), (1024, 4), (2048, 8)]  # triton_copy.(BLOCK_WORDS, NUM_WARPS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--sizes", default="256,1024,2048", help="blocks per copy")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--matmul", type=int, default=8192, help="matmul size of the proxy")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_copy.json"))
    return p.parse_args(argv)


def make_kv(layout: str, args: argparse.Namespace, num_blocks: int) -> dict[str, torch.Tensor]:
    """Random bf16 layer tensors in one vLLM CUDA layout."""
    shape_of, _ = LAYOUTS[layout]
    shape = shape_of(num_blocks, args.block_size, args.kv_heads, args.head_size)
    return {
        f"layers.{i}": torch.randn(shape, dtype=torch.bfloat16, device="cuda")
        for i in range(args.layers)
    }


def build(kv: dict[str, torch.Tensor], num_blocks: int, variant: str) -> KVLayout:
    """A KVLayout that copies with this variant (ConfigError if unavailable)."""
    backend, strategy, per_launch = VARIANTS[variant]
    layout = KVLayout(kv, num_blocks, backend=backend)
    if per_launch:
        layout.copier = gpu_copy.BlockCopier(layout.tensors, layout.block_dims, backend, per_launch)
    layout.copier.strategy = strategy
    return layout


def wall(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median wall seconds of fn() followed by a device synchronize."""
    return wall_pair(fn, None, repeats, warmup)[0]


def wall_pair(
    fn: Callable[[], Any], base: Callable[[], Any] | None, repeats: int, warmup: int = 2
) -> tuple[float, float]:
    """Median wall seconds of fn and of base, sampled alternately (drift hits both)."""
    samples: dict[int, list[float]] = {0: [], 1: []}
    for i in range(warmup + repeats):
        for k, f in enumerate((fn, base)):
            if f is None:
                continue
            torch.cuda.synchronize()
            start = time.perf_counter()
            f()
            torch.cuda.synchronize()
            if i >= warmup:
                samples[k].append(time.perf_counter() - start)
    return statistics.median(samples[0]), statistics.median(samples[1] or [0.0])


def memcpy_fns(nbytes: int) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """One contiguous pinned<->device copy of nbytes: (d2h, h2d)."""
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return (lambda: host.copy_(dev, non_blocking=True)), (
        lambda: dev.copy_(host, non_blocking=True)
    )


def rows_equal(a: StagingBuffer, b: StagingBuffer, num: int) -> bool:
    return all(torch.equal(x[:num], y[:num]) for x, y in zip(a.layers, b.layers, strict=True))


def check_variant(layout: KVLayout, ref: KVLayout, out: StagingBuffer, tmp: StagingBuffer) -> bool:
    """Gather and scatter of this variant produce torch's bytes."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randperm(layout.num_blocks, generator=gen)[:256].tolist()
    layout.gather(ids, out)
    ref.gather(ids, tmp)
    gathered = rows_equal(out, tmp, len(ids))
    back = torch.randperm(layout.num_blocks, generator=gen)[:256].tolist()
    layout.scatter(back, tmp)  # rows of `ids`, written to blocks `back`
    ref.gather(back, out)
    return gathered and rows_equal(out, tmp, len(ids))


def bench_copies(args: argparse.Namespace, sizes: list[int]) -> tuple[list[dict], list[dict]]:
    """Bandwidth rows and correctness checks for every layout x variant x size."""
    rows: list[dict] = []
    checks: list[dict] = []
    for layout_name in args.layouts.split(","):
        bench_layout(args, layout_name, sizes, rows, checks)
        torch.cuda.empty_cache()
    return rows, checks


def bench_layout(
    args: argparse.Namespace, layout_name: str, sizes: list[int], rows: list, checks: list
) -> None:
    """One layout: every variant, every size, against the memcpy baseline."""
    num_blocks = 2 * max(sizes)
    kv = make_kv(layout_name, args, num_blocks)
    ref = build(kv, num_blocks, "torch")
    out, tmp = ref.new_buffer(max(sizes)), ref.new_buffer(max(sizes))
    baselines = {n: memcpy_fns(n * ref.block_bytes) for n in sizes}
    for variant in args.variants.split(","):
        try:
            layout = build(kv, num_blocks, variant)
        except Exception as exc:  # e.g. native without nvcc: recorded, not fatal
            checks.append({"layout": layout_name, "variant": variant, "error": str(exc)})
            continue
        ok = check_variant(layout, ref, out, tmp)
        checks.append({"layout": layout_name, "variant": variant, "bytes_equal": ok})
        for n in sizes:
            ids = torch.randperm(num_blocks)[:n].tolist()
            nbytes = n * layout.block_bytes
            d2h_fn, h2d_fn = baselines[n]
            g, d2h = wall_pair(
                lambda ids=ids, layout=layout: layout.gather(ids, out), d2h_fn, args.repeats
            )
            s, h2d = wall_pair(
                lambda ids=ids, layout=layout: layout.scatter(ids, out), h2d_fn, args.repeats
            )
            rows.append({
                "layout": layout_name, "variant": variant, "blocks": n, "bytes": nbytes,
                "gather_gbps": nbytes / g / 1e9, "memcpy_d2h_gbps": nbytes / d2h / 1e9,
                "gather_ratio": d2h / g, "scatter_gbps": nbytes / s / 1e9,
                "memcpy_h2d_gbps": nbytes / h2d / 1e9, "scatter_ratio": h2d / s,
            })  # fmt: skip


def bench_sweep(args: argparse.Namespace, sizes: list[int]) -> list[dict]:
    """triton-staged for a few scratch chunk sizes and kernel launch shapes."""
    from cwm_connector.engine import triton_copy

    num_blocks = 2 * max(sizes)
    kv = make_kv("flash_attn", args, num_blocks)
    layout = build(kv, num_blocks, "triton-staged")
    out = layout.new_buffer(max(sizes))
    saved = (gpu_copy.STAGED_CHUNK_BYTES, triton_copy.BLOCK_WORDS, triton_copy.NUM_WARPS)
    configs = [(mb, *saved[1:]) for mb in SWEEP_CHUNK_MB]
    configs += [(saved[0] >> 20, words, warps) for words, warps in SWEEP_KERNEL]
    rows = []
    for chunk_mb, words, warps in configs:
        gpu_copy.STAGED_CHUNK_BYTES = chunk_mb << 20
        triton_copy.BLOCK_WORDS, triton_copy.NUM_WARPS = words, warps
        layout.copier._scratch.clear()
        for n in sizes:
            ids = torch.randperm(num_blocks)[:n].tolist()
            g = wall(lambda ids=ids: layout.gather(ids, out), args.repeats)
            s = wall(lambda ids=ids: layout.scatter(ids, out), args.repeats)
            nbytes = n * layout.block_bytes
            rows.append({
                "chunk_mb": chunk_mb, "block_words": words, "num_warps": warps, "blocks": n,
                "gather_gbps": nbytes / g / 1e9, "scatter_gbps": nbytes / s / 1e9,
            })  # fmt: skip
    gpu_copy.STAGED_CHUNK_BYTES, triton_copy.BLOCK_WORDS, triton_copy.NUM_WARPS = saved
    layout.copier._scratch.clear()
    return rows


def bench_capture_cost(args: argparse.Namespace, num: int, variants: list[str]) -> list[dict]:
    """Matmul TFLOPS alone vs with gathers of `num` blocks looping on a side stream."""
    n = args.matmul
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    c = torch.empty_like(a)
    iters = 50

    def matmuls() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            torch.matmul(a, b, out=c)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    flops = 2 * n**3 * iters
    matmuls()
    alone = statistics.median(matmuls() for _ in range(3))
    kv = make_kv("flash_attn", args, 2 * num)
    ids = torch.randperm(2 * num)[:num].tolist()
    side = torch.cuda.Stream()
    rows = [{"variant": "none", "matmul_tflops": flops / alone / 1e12, "ratio": 1.0}]
    for variant in variants:
        try:
            layout = build(kv, 2 * num, variant)
        except Exception:
            continue
        out = layout.new_buffer(num)
        one = wall(lambda layout=layout, out=out: layout.gather(ids, out), 3)
        reps = int(alone / one) + 2  # keep the side stream busy for the whole matmul loop
        torch.cuda.synchronize()
        events = [layout.gather(ids, out, stream=side) for _ in range(reps)]  # queued first
        busy = matmuls()
        events[-1].synchronize()
        rows.append({
            "variant": variant, "matmul_tflops": flops / busy / 1e12, "ratio": alone / busy,
            "gathers_alone_gbps": num * layout.block_bytes / one / 1e9,
        })  # fmt: skip
    return rows


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark")
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"device: {torch.cuda.get_device_name()}  native ext: {native_ext.is_enabled()}")
    rows, checks = bench_copies(args, sizes)
    sweep = bench_sweep(args, [256, 1024])
    variants = [v for v in args.variants.split(",") if v != "triton-uva-per-layer"]
    cost = bench_capture_cost(args, 1024, variants)
    cols = ["layout", "variant", "blocks", "gather_gbps", "memcpy_d2h_gbps", "gather_ratio",
            "scatter_gbps", "memcpy_h2d_gbps", "scatter_ratio"]  # fmt: skip
    print(table(rows, cols))
    print(table(sweep, list(sweep[0])))
    print(table(cost, ["variant", "matmul_tflops", "ratio", "gathers_alone_gbps"]))
    print(json.dumps(checks))
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "host": platform.node(),
        "shape": {k: getattr(args, k) for k in ("layers", "kv_heads", "head_size", "block_size")},
        "copies": rows, "checks": checks, "sweep": sweep, "capture_cost_proxy": cost,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return 0 if all(c.get("bytes_equal", True) for c in checks) else 1


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return ""


if __name__ == "__main__":
    raise SystemExit(main())
