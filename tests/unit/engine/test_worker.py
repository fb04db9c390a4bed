"""The worker against real torch KV tensors and a real disk store (no vLLM needed)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from cwm_connector.config import CwmConfig
from cwm_connector.engine.kv_layout import KVLayout
from cwm_connector.engine.plans import CaptureJob, LoadJob, StageJob, StepPlan, WorkerReport
from cwm_connector.engine.worker import CwmWorker
from cwm_connector.store.catalog import Catalog, catalog_path

NUM_BLOCKS = 16
LAYOUTS = {
    "cpu": (NUM_BLOCKS, 2, 32, 128),  # (blocks, kv heads, block size, 2*head size)
    "flash": (2, NUM_BLOCKS, 32, 2, 64),  # (k/v, blocks, block size, heads, head size)
}


def make_caches(shape: tuple[int, ...], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        f"layer.{i}": torch.randn(shape, generator=gen, dtype=torch.float32).to(torch.bfloat16)
        for i in range(3)
    }


def block(t: torch.Tensor, dim: int, i: int) -> torch.Tensor:
    return t.select(dim, i)


def wait_report(worker: CwmWorker, pred, timeout_s: float = 10.0) -> WorkerReport:
    merged = WorkerReport(rank=0)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rep = worker.take_report()
        if rep is not None:
            merged.staged.update(rep.staged)
            merged.stored += rep.stored
            merged.store_failed += rep.store_failed
        if pred(merged):
            return merged
        time.sleep(0.01)
    raise AssertionError(f"worker did not report in time: {merged}")


def make_worker(tmp_path: Path, caches: dict[str, torch.Tensor], **cfg: object) -> CwmWorker:
    config = CwmConfig(store_dir=str(tmp_path), **cfg)
    Catalog(catalog_path(tmp_path)).register_fingerprint("fp", "engine", "{}")
    return CwmWorker(config, "fp", KVLayout(caches, NUM_BLOCKS), rank=0)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_capture_stage_load_round_trip_is_bit_exact(tmp_path: Path, layout: str, codec: str):
    shape = LAYOUTS[layout]
    dim = 0 if layout == "cpu" else 1
    source = make_caches(shape, seed=1)
    hashes = [b"h1", b"h2", b"h3"]
    writer = make_worker(tmp_path, source, compression=codec)
    writer.submit(StepPlan(captures=[CaptureJob("req", [3, 5, 7], hashes)]))
    deadline = time.monotonic() + 10
    while not writer.get_finished({"req"}) and time.monotonic() < deadline:
        time.sleep(0.01)
    wait_report(writer, lambda r: set(r.stored) == set(hashes))
    writer.shutdown()

    target = make_caches(shape, seed=2)  # a fresh engine after restart
    reader = make_worker(tmp_path, target, verify_restore=True, compression=codec)
    reader.submit(StepPlan(stages=[StageJob(7, hashes)]))
    assert wait_report(reader, lambda r: 7 in r.staged).staged[7] == 3
    reader.submit(StepPlan(loads=[LoadJob("req2", 7, [10, 11, 12])]))
    assert reader.take_load_errors() == set()
    for name in source:
        for src, dst in zip([3, 5, 7], [10, 11, 12], strict=True):
            assert torch.equal(block(target[name], dim, dst), block(source[name], dim, src))
    assert reader.stats.snapshot()["restore_verified_blocks"] == 3
    reader.shutdown()


def test_corrupt_blob_is_not_staged_and_missing_blocks_are_load_errors(tmp_path: Path) -> None:
    caches = make_caches(LAYOUTS["cpu"], seed=3)
    worker = make_worker(tmp_path, caches)
    hashes = [b"a", b"b", b"c"]
    worker.submit(StepPlan(captures=[CaptureJob("req", [0, 1, 2], hashes)]))
    wait_report(worker, lambda r: len(r.stored) == 3)
    digest_b = Catalog(catalog_path(tmp_path)).digests_for("fp", [b"b"])[b"b"]
    path = worker.disk.path_for(digest_b)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))

    before = caches["layer.0"][9].clone()
    worker.submit(StepPlan(stages=[StageJob(1, hashes)]))
    assert wait_report(worker, lambda r: 1 in r.staged).staged[1] == 1
    assert worker.stats.snapshot()["digest_errors"] == 1
    assert not path.exists()  # quarantined
    assert Catalog(catalog_path(tmp_path)).digests_for("fp", [b"b"]) == {}
    # A promise beyond what was staged is reported, and nothing unverified is written.
    worker.submit(StepPlan(loads=[LoadJob("req2", 1, [8, 9, 10])]))
    assert worker.take_load_errors() == {9, 10}
    assert torch.equal(caches["layer.0"][9], before)
    assert torch.equal(caches["layer.0"][8], caches["layer.0"][0])
    worker.shutdown()


def test_dropped_stage_job_frees_its_memory(tmp_path: Path) -> None:
    caches = make_caches(LAYOUTS["cpu"], seed=4)
    worker = make_worker(tmp_path, caches)
    worker.submit(StepPlan(captures=[CaptureJob("req", [0, 1], [b"x", b"y"])]))
    wait_report(worker, lambda r: len(r.stored) == 2)
    worker.submit(StepPlan(stages=[StageJob(5, [b"x", b"y"])]))
    wait_report(worker, lambda r: 5 in r.staged)
    assert worker._staged_bytes == 2 * worker.layout.block_bytes
    worker.submit(StepPlan(drops=[5]))
    assert worker._staged_bytes == 0
    worker.submit(StepPlan(loads=[LoadJob("req", 5, [3, 4])]))
    assert worker.take_load_errors() == {3, 4}
    worker.shutdown()


def test_memory_budget_limits_staging(tmp_path: Path) -> None:
    caches = make_caches(LAYOUTS["cpu"], seed=5)
    layout_bytes = KVLayout(caches, NUM_BLOCKS).block_bytes
    worker = make_worker(tmp_path, caches, memory_bytes=2 * layout_bytes)
    hashes = [b"p", b"q", b"r", b"s"]
    worker.submit(StepPlan(captures=[CaptureJob("req", [0, 1, 2, 3], hashes)]))
    wait_report(worker, lambda r: len(r.stored) == 4)
    worker.submit(StepPlan(stages=[StageJob(2, hashes)]))
    assert wait_report(worker, lambda r: 2 in r.staged).staged[2] == 2
    worker.shutdown()


def test_sleep_mode_drops_every_view_and_restores_into_the_new_tensors(tmp_path: Path) -> None:
    # vLLM 0.33 sleep mode (issue 14): unregister before the KV memory goes, restore after.
    import gc
    import weakref

    old = make_caches(LAYOUTS["cpu"], seed=6)
    worker = make_worker(tmp_path, old)
    hashes = [b"s1", b"s2"]
    worker.submit(StepPlan(captures=[CaptureJob("req", [1, 2], hashes)]))
    wait_report(worker, lambda r: len(r.stored) == 2)
    expected = {name: [t[1].clone(), t[2].clone()] for name, t in old.items()}
    worker.unregister()
    refs = [weakref.ref(t) for t in old.values()]
    del old
    gc.collect()
    assert all(ref() is None for ref in refs)  # nothing in cwm holds the old tensors
    with pytest.raises(RuntimeError, match="sleep mode"):
        worker.layout.gather([0], worker.layout.new_buffer(1))
    new = make_caches(LAYOUTS["cpu"], seed=7)
    worker.restore(new)
    worker.submit(StepPlan(stages=[StageJob(3, hashes)]))
    assert wait_report(worker, lambda r: 3 in r.staged).staged[3] == 2
    worker.submit(StepPlan(loads=[LoadJob("req2", 3, [5, 6])]))
    assert worker.take_load_errors() == set()
    for name, (b1, b2) in expected.items():
        assert torch.equal(new[name][5], b1) and torch.equal(new[name][6], b2)
    with pytest.raises(ValueError, match="differ"):
        worker.restore(make_caches((NUM_BLOCKS, 2, 32, 64), seed=8))  # another geometry
    worker.shutdown()


@pytest.mark.parametrize("ratio", [1, 4])
def test_mla_layers_round_trip_bit_exactly_with_a_smaller_kernel_block(
    tmp_path: Path, ratio: int
) -> None:
    # MLA (DeepSeek V2/V3, Kimi): per layer [num_blocks, block_size, 576] (512 latent +
    # 64 rope), one group, TP ranks identical. A backend whose kernel block is smaller
    # than vLLM's makes dim 0 num_blocks x ratio (issue 13): block b is kernel blocks
    # [b*ratio, (b+1)*ratio).
    gen = torch.Generator().manual_seed(9)

    def mla_caches() -> dict[str, torch.Tensor]:
        shape = (NUM_BLOCKS * ratio, 32 // ratio, 576)
        return {f"layer.{i}": torch.randn(shape, generator=gen).to(torch.bfloat16)
                for i in range(3)}  # fmt: skip

    source, target = mla_caches(), mla_caches()
    writer = make_worker(tmp_path, source)
    assert writer.layout.block_bytes == 3 * 32 * 576 * 2
    hashes = [b"m1", b"m2"]
    writer.submit(StepPlan(captures=[CaptureJob("req", [2, 9], hashes)]))
    wait_report(writer, lambda r: set(r.stored) == set(hashes))
    writer.shutdown()
    reader = make_worker(tmp_path, target, verify_restore=True)
    reader.submit(StepPlan(stages=[StageJob(4, hashes)]))
    assert wait_report(reader, lambda r: 4 in r.staged).staged[4] == 2
    before = target["layer.0"].clone()
    reader.submit(StepPlan(loads=[LoadJob("req2", 4, [5, 6])]))
    assert reader.take_load_errors() == set()
    for name in source:
        for src, dst in ((2, 5), (9, 6)):
            kernel = slice(dst * ratio, (dst + 1) * ratio)
            assert torch.equal(target[name][kernel], source[name][src * ratio : (src + 1) * ratio])
    untouched = [i for i in range(NUM_BLOCKS * ratio) if i // ratio not in (5, 6)]
    assert torch.equal(target["layer.0"][untouched], before[untouched])
    reader.shutdown()
