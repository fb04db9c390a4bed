"""Fault matrix, storage rows, without vLLM: a corrupt or locked catalog, orphaned temp files,
blob files lost or truncated behind the catalog's back, a full and a read-only store.

"Full" and "read-only" are real: a small tmpfs mounted for the test (we run as root, as CI
does), filled with a file or remounted read-only. They skip only where mounting is refused.
"""

from __future__ import annotations

import errno
import gc
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fault_tools import locked, tmpfs

from cwm_connector.config import CwmConfig
from cwm_connector.engine import worker as worker_module
from cwm_connector.engine.kv_layout import KVLayout
from cwm_connector.engine.plans import CaptureJob, StepPlan, WorkerReport
from cwm_connector.engine.worker import CwmWorker
from cwm_connector.errors import StoreError
from cwm_connector.stats import Stats
from cwm_connector.store.catalog import Catalog, CatalogUnavailable, catalog_path
from cwm_connector.store.disk import DiskTier

pytestmark = pytest.mark.timeout(120)

NUM_BLOCKS = 16
SHAPE = (NUM_BLOCKS, 2, 32, 128)  # CPU layout; 3 layers of bf16: 48 KiB per block
HASHES = [b"h1", b"h2", b"h3"]


def caches(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"layer.{i}": torch.randn(SHAPE, generator=gen).to(torch.bfloat16) for i in range(3)}


def make_worker(store: Path, seed: int = 1, min_free: float = 0.0) -> CwmWorker:
    """A worker on `store`; min_free 0 by default: these tests fill the disk past cwm's own
    margin to reach the write errors themselves (test_budget.py tests the margin)."""
    catalog = Catalog(catalog_path(store))
    catalog.register_fingerprint("fp", "engine", "{}")
    catalog.close()
    cfg = CwmConfig(store_dir=str(store), disk_min_free=min_free)
    return CwmWorker(cfg, "fp", KVLayout(caches(seed), NUM_BLOCKS), 0)


def capture(worker: CwmWorker, req: str, hashes: list[bytes], ids: list[int]) -> WorkerReport:
    """Capture blocks `ids` under `hashes`; the merged report once every hash is settled."""
    worker.submit(StepPlan(captures=[CaptureJob(req, ids, hashes)]))
    merged = WorkerReport(rank=0)
    deadline = time.monotonic() + 30
    while set(merged.stored) | set(merged.store_failed) != set(hashes):
        assert time.monotonic() < deadline, merged
        report = worker.take_report()
        if report is not None:
            merged.stored += report.stored
            merged.store_failed += report.store_failed
        time.sleep(0.01)
    return merged


def leftovers(store: Path) -> list[Path]:
    """Blob and temp files in a store."""
    return sorted([*store.glob("blobs/**/*.blob"), *store.glob("tmp/*"), *store.glob("**/*.tmp")])


def remount(path: Path, mode: str) -> None:
    """Remount read-only or read-write; a file still open for writing (a connection that
    a stopped worker's thread closes late on a loaded machine) makes `ro` busy: retry."""
    for _ in range(40):
        gc.collect()  # SQLite connections nobody closed explicitly
        proc = subprocess.run(
            ["mount", "-o", f"remount,{mode}", str(path)], capture_output=True, text=True
        )
        if proc.returncode == 0:
            return
        time.sleep(0.25)
    raise AssertionError(f"remount {mode} of {path} failed: {proc.stderr}")


def fill(path: Path, keep_free: int = 0) -> Path:
    """Write a filler file until the disk is full, then free `keep_free` bytes of it."""
    filler = path / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(chunk)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    if keep_free:
        os.truncate(filler, max(0, filler.stat().st_size - keep_free))
    return filler


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- the catalog -------------------------------------------------------------------


def test_corrupt_catalog_is_unavailable_with_one_clear_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = catalog_path(tmp_path)
    good = Catalog(path)
    good.add_blocks("fp", [(b"h", b"d" * 16)], [(b"d" * 16, 10, 50, "none")])
    good.close()
    path.write_bytes(os.urandom(path.stat().st_size or 8192))  # garbage over it
    for side in ("-wal", "-shm"):
        Path(f"{path}{side}").unlink(missing_ok=True)
    catalog = Catalog(path)  # never raises
    again = Catalog(path)
    assert not catalog.ok and "corrupt" in (catalog.error or "")
    errors = [r for r in caplog.records if r.levelname == "ERROR" and "catalog" in r.message]
    assert len(errors) == 1 and "recomputes" in errors[0].message  # once per process
    # Lookups are misses; window ops and writes get a structured error; nothing else raises.
    assert catalog.stored_hashes("engine", [b"h"]) == set()
    assert catalog.digests_for("fp", [b"h"]) == {} and catalog.engine_fp_ids("engine") == []
    assert catalog.register_fingerprint("fp", "engine", "{}") is False
    with pytest.raises(CatalogUnavailable) as err:
        catalog.get_window("w")
    assert err.value.code == "catalog_unavailable" and "corrupt" in err.value.message
    with pytest.raises(CatalogUnavailable):
        again.add_blocks("fp", [(b"h", b"d" * 16)], [])
    catalog.close()


def test_locked_catalog_still_reads_and_refuses_writes_with_a_clear_error(tmp_path: Path) -> None:
    path = catalog_path(tmp_path)
    first = Catalog(path)
    first.register_fingerprint("fp", "engine", "{}")
    first.add_blocks("fp", [(b"h", b"d" * 16)], [(b"d" * 16, 10, 50, "none")])
    first.close()
    with locked(path):
        catalog = Catalog(path, timeout_s=0.3)  # opening an up-to-date catalog writes nothing
        assert catalog.ok
        assert catalog.stored_hashes("engine", [b"h", b"x"]) == {b"h"}  # WAL: reads go on
        assert catalog.register_fingerprint("fp", "engine", "{}") is True  # known: no write
        with pytest.raises(CatalogUnavailable) as err:
            catalog.add_blocks("fp", [(b"h2", b"e" * 16)], [])
        assert err.value.retryable and "locked by another process" in err.value.message
    catalog.add_blocks("fp", [(b"h2", b"e" * 16)], [])  # released: writes work again
    assert catalog.stored_hashes("engine", [b"h2"]) == {b"h2"}


def test_worker_capture_with_a_corrupt_catalog_writes_nothing(tmp_path: Path) -> None:
    catalog_path(tmp_path).write_bytes(b"garbage" * 4096)
    worker = CwmWorker(  # starts: register_kv_caches' catalog calls do not raise either
        CwmConfig(store_dir=str(tmp_path)), "fp", KVLayout(caches(), NUM_BLOCKS), 0
    )
    try:
        report = capture(worker, "r", HASHES, [1, 2, 3])
        assert report.store_failed == HASHES and report.stored == []
        assert leftovers(tmp_path) == []  # no blob nobody could find
        assert worker.stats.snapshot()["store_errors"] == 1
    finally:
        worker.shutdown()


# -- crash leftovers -----------------------------------------------------------------


def test_orphaned_temp_files_are_removed_at_start(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path)
    dead = dead_pid()
    orphan = disk.tmp_dir / f"{dead}-0123456789abcdef.tmp"
    live = disk.tmp_dir / f"{os.getpid()}-fedcba9876543210.tmp"
    stale = disk.tmp_dir / f"{os.getpid()}-00000000aaaaaaaa.tmp"
    for path in (orphan, live, stale):
        path.write_bytes(b"half a blob")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))  # pid reused after a restart
    stats_tmp = tmp_path / "stats" / f"worker-rank0.{dead}.tmp"
    stats_tmp.parent.mkdir()
    stats_tmp.write_text("{")
    worker = make_worker(tmp_path)
    try:
        assert not orphan.exists() and not stale.exists() and not stats_tmp.exists()
        assert live.exists()  # a write in flight of a running process
    finally:
        worker.shutdown()


def test_start_up_check_drops_rows_of_missing_and_truncated_blobs(tmp_path: Path) -> None:
    worker = make_worker(tmp_path)
    assert capture(worker, "r", HASHES, [1, 2, 3]).stored == HASHES
    worker.shutdown()
    catalog = Catalog(catalog_path(tmp_path))
    digests = catalog.digests_for("fp", HASHES)
    disk = DiskTier(tmp_path)
    disk.path_for(digests[b"h1"]).unlink()  # deleted
    truncated = disk.path_for(digests[b"h2"])
    os.truncate(truncated, truncated.stat().st_size // 2)
    restarted = make_worker(tmp_path)
    try:
        deadline = time.monotonic() + 10
        while len(catalog.digests_for("fp", HASHES)) > 1:
            assert time.monotonic() < deadline, "start-up check did not run"
            time.sleep(0.05)
        assert set(catalog.digests_for("fp", HASHES)) == {b"h3"}
        assert catalog.totals()["blobs"] == 1  # no row for a blob that is not there
        assert (tmp_path / "quarantine" / truncated.name).exists()
        deadline = time.monotonic() + 5
        while restarted.stats.snapshot().get("digest_errors", 0) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert restarted.stats.snapshot()["missing_blobs"] == 1
    finally:
        restarted.shutdown()
        catalog.close()


# -- a full disk and a read-only store (real tmpfs) -------------------------------------


def test_disk_full_capture_keeps_nothing_then_resumes(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "store", "2m") as store:
        worker = make_worker(store)
        try:
            filler = fill(store, keep_free=64 << 10)  # room for one blob, not three
            report = capture(worker, "r1", HASHES, [1, 2, 3])
            assert report.store_failed == HASHES and report.stored == []
            assert leftovers(store) == []  # the blob that fitted was removed again
            assert worker.stats.snapshot()["store_errors"] == 1
            with pytest.raises(StoreError, match="No space left"):
                DiskTier(store).put(b"x" * 16, [b"y" * 100_000])
            assert leftovers(store) == []
            Stats(store / "stats" / "probe.json").flush(force=True)  # best effort, no tmp left
            filler.unlink()  # space freed: the next capture goes through
            assert capture(worker, "r2", HASHES, [1, 2, 3]).stored == HASHES
            assert len(list(store.glob("blobs/**/*.blob"))) == 3
        finally:
            worker.shutdown()


def test_read_only_store_starts_captures_nothing_then_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_module, "CATALOG_RETRY_S", 0.0)  # reopen at once, not in 10 s
    with tmpfs(tmp_path / "store", "2m") as store:
        first = make_worker(store)
        assert capture(first, "r0", [b"h0"], [0]).stored == [b"h0"]
        first.shutdown()
        (store / "tmp" / f"{dead_pid()}-0000000000000000.tmp").write_bytes(b"x")
        remount(store, "ro")
        try:
            worker = CwmWorker(  # start-up on an unwritable store: no exception
                CwmConfig(store_dir=str(store)), "fp", KVLayout(caches(), NUM_BLOCKS), 0
            )
            catalog = Catalog(catalog_path(store))
            assert catalog.ok and not catalog.writable, catalog.error
            assert catalog.stored_hashes("engine", [b"h0"]) == {b"h0"}  # reads still work
            report = capture(worker, "r1", HASHES, [1, 2, 3])
            assert report.store_failed == HASHES
            assert worker.stats.snapshot()["store_errors"] == 1
        finally:
            remount(store, "rw")
        try:
            assert capture(worker, "r2", HASHES, [1, 2, 3]).stored == HASHES
            assert len(list(store.glob("blobs/**/*.blob"))) == 4
        finally:
            worker.shutdown()
            catalog.close()
