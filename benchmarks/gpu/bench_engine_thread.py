"""How long the engine thread is held by a capture and by a load, sync vs on the copy stream.

A ~1B-parameter-like KV cache (16 layers, FlashAttention layout, 8 KV heads, head 128,
block 16, bf16: 1 MiB per block) on CUDA. `sync` is KVLayout.gather/scatter waiting for
the copy; `worker` is CwmWorker.submit, which queues the gather (or scatter) on its own
stream and returns. Medians of --repeats. Exits 0 without CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cwm_connector.config import CwmConfig
from cwm_connector.engine.kv_layout import KVLayout
from cwm_connector.engine.plans import CaptureJob, LoadJob, StageJob, StepPlan
from cwm_connector.engine.worker import CwmWorker
from cwm_connector.store.catalog import Catalog, catalog_path


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_engine_thread.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA: nothing to measure")
        return 0
    num_blocks, n = 4 * args.blocks, args.blocks
    kv = {f"l{i}": torch.randn(2, num_blocks, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
          for i in range(16)}  # fmt: skip
    store = Path(tempfile.mkdtemp())
    Catalog(catalog_path(store)).register_fingerprint("fp", "e", "{}")
    cfg = CwmConfig(store_dir=str(store), memory_bytes=8 << 30)
    layout = KVLayout(kv, num_blocks)
    worker = CwmWorker(cfg, "fp", layout, 0)
    buf = layout.new_buffer(n)
    res: dict[str, list[float]] = {"sync_gather": [], "sync_scatter": [], "submit_capture": [],
                                   "submit_load": []}  # fmt: skip
    for r in range(args.repeats + 1):  # repeat 0 warms up (kernel compile, pinned pool)
        ids = torch.randperm(num_blocks)[:n].tolist()
        torch.cuda.synchronize()
        t = time.perf_counter()
        layout.gather(ids, buf)
        sync_gather = time.perf_counter() - t
        t = time.perf_counter()
        layout.scatter(ids, buf)
        sync_scatter = time.perf_counter() - t
        hashes = [f"{r}-{i}".encode() for i in range(n)]
        torch.cuda.synchronize()
        t = time.perf_counter()
        worker.submit(StepPlan(captures=[CaptureJob(f"req{r}", ids, hashes)]))
        submit_capture = time.perf_counter() - t
        stored: list[bytes] = []
        deadline = time.monotonic() + 60
        while len(stored) < n and time.monotonic() < deadline:
            report = worker.take_report()
            stored += report.stored if report else []
            time.sleep(0.01)  # write-behind: durable before the stage below
        worker.submit(StepPlan(stages=[StageJob(r + 1, hashes)]))
        while r + 1 not in worker._staged and time.monotonic() < deadline:
            worker.take_report()
            time.sleep(0.01)
        dest = torch.randperm(num_blocks)[:n].tolist()
        torch.cuda.synchronize()
        t = time.perf_counter()
        worker.submit(StepPlan(loads=[LoadJob("r", r + 1, dest)]))
        submit_load = time.perf_counter() - t
        torch.cuda.synchronize()
        assert worker.take_load_errors() == set(), "load failed"
        sample = {"sync_gather": sync_gather, "sync_scatter": sync_scatter,
                  "submit_capture": submit_capture, "submit_load": submit_load}  # fmt: skip
        print(f"repeat {r}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in sample.items()),
              flush=True)  # fmt: skip
        if r > 0:
            for key, value in sample.items():
                res[key].append(value)
    worker.shutdown()
    out = {k: median_ms(v) for k, v in res.items()}
    out["blocks"], out["mib"] = n, n * layout.block_bytes / 2**20
    out["device"] = torch.cuda.get_device_name()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"{out['device']}, {n} blocks = {out['mib']:.0f} MiB; engine thread held (median ms):")
    for key in ("sync_gather", "submit_capture", "sync_scatter", "submit_load"):
        print(f"  {key:<16} {out[key]:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
