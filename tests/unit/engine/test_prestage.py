"""Thaw's prestaging: the worker channel reads, verifies and pins blobs in host memory."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest
import torch
from test_worker import LAYOUTS, make_caches, make_worker, wait_report

from cwm_connector.control.worker_channel import WorkerChannels, start_worker_channel
from cwm_connector.engine.plans import CaptureJob, LoadJob, StepPlan
from cwm_connector.errors import CwmError
from cwm_connector.store.catalog import Catalog, catalog_path

pytestmark = pytest.mark.timeout(60)


def caches(seed: int) -> dict[str, torch.Tensor]:
    return make_caches(LAYOUTS["cpu"], seed)


def captured_store(store: Path, hashes: list[bytes]) -> dict[str, torch.Tensor]:
    source = caches(seed=1)
    writer = make_worker(store, source)
    writer.submit(StepPlan(captures=[CaptureJob("req", [2, 4, 6], hashes)]))
    wait_report(writer, lambda r: len(r.stored) >= 3)
    writer.shutdown()
    return source


def test_prestaged_job_restores_from_memory_even_if_the_disk_loses_them(tmp_path: Path) -> None:
    hashes = [b"h1", b"h2", b"h3"]
    source = captured_store(tmp_path, hashes)
    target = caches(seed=2)
    worker = make_worker(tmp_path, target, verify_restore=True)
    sock = Path(tempfile.mkdtemp(dir="/tmp")) / "control.sock.rank0"
    channel = start_worker_channel(sock, worker)
    assert channel is not None
    try:
        result = WorkerChannels([sock]).prestage(hashes, job_id=41)
        assert result == {"staged": 3, "failed": []}
        assert WorkerChannels([sock]).resident(hashes) == 3
        for blob_file in (tmp_path / "blobs").rglob("*.blob"):
            blob_file.unlink()  # only host memory can serve the restore now
        worker.submit(StepPlan(loads=[LoadJob("r", 41, [10, 11, 12])]))  # no stage step
        assert worker.take_load_errors() == set()
        for name in source:
            for src, dst in zip([2, 4, 6], [10, 11, 12], strict=True):
                assert torch.equal(target[name][dst], source[name][src])
        stats = worker.stats.snapshot()
        assert stats["loaded_prestaged_blocks"] == 3 and stats["restore_verified_blocks"] == 3
        assert WorkerChannels([sock]).resident(hashes) == 0  # the job's memory went back
    finally:
        channel.stop()
        worker.shutdown()


def test_prestage_reports_corrupt_and_unknown_blocks(tmp_path: Path) -> None:
    hashes = [b"a1", b"a2", b"a3"]
    captured_store(tmp_path, hashes)
    worker = make_worker(tmp_path, caches(seed=3))
    digest = Catalog(catalog_path(tmp_path)).digests_for("fp", [b"a2"])[b"a2"]
    path = worker.disk.path_for(digest)
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x01
    path.write_bytes(bytes(data))
    result = worker.prestage(hashes, job_id=5)
    assert result["staged"] == 1 and result["failed"] == [digest.hex()]
    assert worker.stats.snapshot()["digest_errors"] == 1
    assert worker.prestage([b"never-stored"], job_id=6)["failed"] == [b"never-stored".hex()]
    worker.shutdown()


def test_an_unused_prestaged_job_is_released_after_thaw_pin_s(tmp_path: Path) -> None:
    hashes = [b"e1", b"e2", b"e3"]
    captured_store(tmp_path, hashes)
    worker = make_worker(tmp_path, caches(seed=5), thaw_pin_s=0.2)
    assert worker.prestage(hashes, job_id=7)["staged"] == 3
    assert worker._staged_bytes == 3 * worker.layout.block_bytes
    time.sleep(0.3)
    worker.submit(StepPlan())  # any engine step releases expired jobs
    assert worker._staged_bytes == 0
    assert worker.stats.snapshot()["prestage_expired_jobs"] == 1
    worker.submit(StepPlan(loads=[LoadJob("late", 7, [1, 2, 3])]))
    assert worker.take_load_errors() == {1, 2, 3}  # promised too late: recomputed
    worker.shutdown()


def test_channel_refuses_bad_arguments_and_unknown_ops(tmp_path: Path) -> None:
    worker = make_worker(tmp_path, caches(seed=4))
    sock = Path(tempfile.mkdtemp(dir="/tmp")) / "control.sock.rank0"
    channel = start_worker_channel(sock, worker)
    assert channel is not None
    try:
        client = WorkerChannels([sock]).clients[0]
        for bad in (["text"], "x", [b""], [b"x" * 65]):
            with pytest.raises(CwmError) as err:
                client.call("prestage", block_hashes=bad, job_id=1)
            assert err.value.code == "bad_request"
        for job_id in (0, "1", True, None):
            with pytest.raises(CwmError) as err:
                client.call("prestage", block_hashes=[b"x"], job_id=job_id)
            assert err.value.code == "bad_request"
        with pytest.raises(CwmError) as err:
            client.call("rm", block_hashes=[])
        assert err.value.code == "unknown_op"
        assert WorkerChannels([sock.with_name("nobody")]).resident([b"x"]) is None
    finally:
        channel.stop()
        worker.shutdown()
