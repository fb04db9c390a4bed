"""The worker on CUDA KV tensors: async capture and load on the copy stream (skips without CUDA)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from cwm_connector.config import CwmConfig
from cwm_connector.engine.kv_layout import KVLayout
from cwm_connector.engine.plans import CaptureJob, LoadJob, StageJob, StepPlan
from cwm_connector.engine.worker import CwmWorker
from cwm_connector.store.catalog import Catalog, catalog_path

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
NUM_BLOCKS = 64
SHAPE = (2, NUM_BLOCKS, 16, 8, 128)  # FlashAttention: (k/v, blocks, block size, heads, head)


def caches(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return {
        f"layer.{i}": torch.randn(SHAPE, generator=gen, device="cuda", dtype=torch.bfloat16)
        for i in range(4)
    }


def worker(store: Path, kv: dict[str, torch.Tensor], backend: str) -> CwmWorker:
    Catalog(catalog_path(store)).register_fingerprint("fp", "engine", "{}")
    cfg = CwmConfig(store_dir=str(store), verify_restore=True, copy_backend=backend)
    return CwmWorker(cfg, "fp", KVLayout(kv, NUM_BLOCKS, backend=backend), 0)


def until(pred, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("by_layer", [False, True], ids=["whole", "by-layer"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_async_capture_and_load_round_trip_on_cuda(
    tmp_path: Path, backend: str, by_layer: bool
) -> None:
    source = caches(seed=1)
    ids, hashes = [5, 40, 7, 63], [b"c1", b"c2", b"c3", b"c4"]
    writer = worker(tmp_path, source, backend)
    assert writer._copy_stream is not None
    writer.submit(StepPlan(captures=[CaptureJob("req", ids, hashes)]))
    stored: list[bytes] = []

    def all_stored() -> bool:
        report = writer.take_report()
        stored.extend(report.stored if report else [])
        return len(stored) == len(hashes)

    until(all_stored)
    until(lambda: writer.get_finished({"req"}) == {"req"})
    writer.shutdown()

    target = caches(seed=2)
    reader = worker(tmp_path, target, backend)
    reader.submit(StepPlan(stages=[StageJob(3, hashes)]))
    staged: dict[int, int] = {}

    def all_staged() -> bool:
        report = reader.take_report()
        staged.update(report.staged if report else {})
        return 3 in staged

    until(all_staged)
    assert staged[3] == len(hashes)
    dest = [10, 11, 12, 0]
    reader.submit(StepPlan(loads=[LoadJob("r2", 3, dest)]), by_layer=by_layer)
    for name in source:
        # Layer by layer, the current stream is ordered after this layer's copy only,
        # as vLLM's attention is; the reads below run on that stream, no host sync.
        reader.wait_for_layer(name)
        for src, dst in zip(ids, dest, strict=True):
            assert torch.equal(target[name][:, dst], source[name][:, src])
    assert reader.take_load_errors() == set()
    if by_layer:
        assert reader.stats.snapshot()["layer_load_waits"] == len(source)
    assert reader.stats.snapshot()["restore_verified_blocks"] == len(hashes)
    reader.submit(StepPlan())  # the next step gives the load's staging buffer back
    assert reader.loader.in_flight == []
    reader.shutdown()
