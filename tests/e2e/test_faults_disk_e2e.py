"""Fault matrix, storage rows, on real vLLM servers: kill -9 mid-capture, damaged blobs, a
corrupt or locked catalog, a full disk and an unwritable store.

Each fault is caused for real: SIGKILL to vLLM's whole process group, bytes cut from or files
removed under store/blobs, garbage over catalog.sqlite, `BEGIN EXCLUSIVE` held by another
process, a small tmpfs filled to the last page, a read-only bind mount. Replies must stay
correct (tokens equal to vLLM's own prefix-cache hit), errors counted and logged, and the
store consistent afterwards.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from e2e_tools import BLOCK, EXTERNAL_HITS, cwm, metric_at_least, outputs, server
from fault_tools import locked, tmpfs

from cwm_connector.demo.tiny_model import make_prompt
from cwm_connector.demo.vllm_process import VllmServer
from cwm_connector.stats import read_stats
from cwm_connector.store.disk import DiskTier

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

PROMPT_TOKENS = 1500
STORE_ERRORS = "cwm:store_errors_total"


def wait_for(pred: Any, timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout_s:.0f}s"
        time.sleep(0.1)


def kill9(srv: VllmServer) -> None:
    """SIGKILL vLLM's whole process group (API server, EngineCore, worker) at once."""
    assert srv.proc is not None
    os.killpg(os.getpgid(srv.proc.pid), signal.SIGKILL)
    srv.proc.wait(30)


def catalog_rows(store: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(store / "catalog.sqlite") as db:
        return db.execute(sql).fetchall()


def window_digests(store: Path, name: str) -> list[bytes]:
    return [
        bytes(row[0])
        for row in catalog_rows(
            store, f"SELECT digest FROM window_blocks WHERE name = '{name}' ORDER BY idx"
        )
    ]


def temp_files(store: Path) -> list[Path]:
    return [p for p in store.rglob("*") if p.is_file() and p.name.endswith(".tmp")]


def check_consistent(store: Path, sock: Path) -> None:
    """Every catalogued blob exists and verifies; every listed window is complete."""
    disk = DiskTier(store)
    blobs = catalog_rows(store, "SELECT digest, raw_bytes FROM blobs")
    for dig, raw in blobs:
        disk.read_into(bytes(dig), [memoryview(bytearray(raw))])  # raises if not whole
    dangling = catalog_rows(
        store, "SELECT COUNT(*) FROM blocks WHERE digest NOT IN (SELECT digest FROM blobs)"
    )
    assert dangling == [(0,)]
    code, listed = cwm(sock, "list")
    assert code == 0
    for window in listed:
        code, status = cwm(sock, "status", window["name"])
        assert code == 0 and status["complete"] is True, status


def test_kill9_mid_capture_then_truncated_and_deleted_blobs(
    tiny_model: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    sock = store / "control.sock"
    prompt = make_prompt(tiny_model, PROMPT_TOKENS, seed=21)
    srv = server(tiny_model, store, tmp_path, "A").start()
    try:
        srv.complete(prompt, salt="s1", max_tokens=4)
        code, w1 = cwm(sock, "freeze", "s1", "w1")
        assert code == 0, w1
        reference = srv.complete(prompt, salt="s1", max_tokens=4)  # vLLM's own prefix hit
        before = read_stats(store).get("captured_blocks", 0)
        # Many blocks in flight: four sessions finish together, a freeze waits on one of them.
        prompts = [make_prompt(tiny_model, PROMPT_TOKENS, seed=30 + i) for i in range(4)]
        threads = [
            threading.Thread(target=srv.complete, args=(p, f"k{i}", 2))
            for i, p in enumerate(prompts)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        freezer = subprocess.Popen(
            [sys.executable, "-m", "cwm_connector.cli", "freeze", "k0", "wk",
             "--socket", str(sock), "--json"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        # Kill once the first capture job is durable and the others are still being written.
        wait_for(lambda: read_stats(store).get("captured_blocks", 0) > before, 30, "capture")
        kill9(srv)
        freezer.wait(30)
        in_flight = 4 * (PROMPT_TOKENS // BLOCK)
        done = read_stats(store).get("captured_blocks", 0) - before
        print(f"kill -9 with {done} of ~{in_flight} captured blocks written")
    finally:
        srv.stop()
    # A writer killed mid-blob leaves its temp file (named after its pid, now dead).
    (store / "tmp" / f"{srv.proc.pid}-0123456789abcdef.tmp").write_bytes(b"half a blob")
    # A blob lost behind the catalog's back (not part of any window).
    lost = catalog_rows(
        store,
        "SELECT digest FROM blobs WHERE digest NOT IN (SELECT digest FROM window_blocks) LIMIT 1",
    )
    if lost:
        DiskTier(store).path_for(bytes(lost[0][0])).unlink()

    srv = server(tiny_model, store, tmp_path, "B").start()
    try:
        assert temp_files(store) == []  # orphaned temp files removed at start
        if lost:  # the start-up check drops the rows of the missing blob
            wait_for(
                lambda: (
                    catalog_rows(
                        store,
                        f"SELECT 1 FROM blobs WHERE hex(digest) = '{lost[0][0].hex().upper()}'",
                    )
                    == []
                ),
                what="start-up check",
            )
        check_consistent(store, sock)  # nothing half-visible, nothing dangling
        code, listed = cwm(sock, "list")
        assert "w1" in [w["name"] for w in listed]
        # The next capture and freeze work.
        srv.complete(make_prompt(tiny_model, 600, seed=40), salt="s9", max_tokens=2)
        code, w9 = cwm(sock, "freeze", "s9", "w9")
        assert code == 0 and w9["blocks"] > 0, w9

        # Damage w1: block 10's blob truncated, block 20's blob deleted, while vLLM serves.
        digests = window_digests(store, "w1")
        disk = DiskTier(store)
        truncated, deleted = disk.path_for(digests[10]), disk.path_for(digests[20])
        os.truncate(truncated, truncated.stat().st_size - 1000)
        deleted.unlink()
        code, status = cwm(sock, "status", "w1")
        assert code == 0 and status["complete"] is False and status["damaged_blobs"] == 2
        stats = read_stats(store)
        resp = srv.complete(prompt, salt="s1", max_tokens=4)
        assert outputs(resp)[0] == outputs(reference)[0]  # tokens recomputed, reply correct
        assert srv.metric(EXTERNAL_HITS) == 10 * BLOCK  # only the blocks before the damage
        after = read_stats(store)
        assert after["digest_errors"] - stats.get("digest_errors", 0) == 1
        assert after["missing_blobs"] - stats.get("missing_blobs", 0) == 1
        assert after.get("load_errors", 0) == 0  # refused before any promise
        log = (tmp_path / "B.log").read_text()
        assert digests[10].hex() in log and digests[20].hex() in log
        # The recomputed blocks are captured again: same content, same digests, w1 healed.
        wait_for(lambda: cwm(sock, "status", "w1")[1]["complete"], what="w1 healed")
    finally:
        srv.stop()


def test_locked_and_corrupt_catalog_serve_correct_replies(tiny_model: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    sock = store / "control.sock"
    prompt = make_prompt(tiny_model, PROMPT_TOKENS, seed=51)
    srv = server(tiny_model, store, tmp_path, "C").start()
    try:
        srv.complete(prompt, salt="s1", max_tokens=4)
        reference = srv.complete(prompt, salt="s1", max_tokens=4)
        wait_for(lambda: read_stats(store).get("captured_blocks", 0) > 0, what="capture")
    finally:
        srv.stop()

    with locked(store / "catalog.sqlite"):
        srv = server(tiny_model, store, tmp_path, "D").start()  # starts under the lock
        try:
            resp = srv.complete(prompt, salt="s1", max_tokens=4)
            assert outputs(resp)[0] == outputs(reference)[0]
            # A freeze needs a catalog write: a clear, retryable error, not a hang.
            code, err = cwm(sock, "freeze", "s1", "w-locked")
            assert code == 1 and err["error"]["code"] == "catalog_unavailable", err
            assert "locked by another process" in err["error"]["message"]
            assert err["error"]["retryable"] is True
        finally:
            srv.stop()
    assert "cwm_connector/" not in (tmp_path / "D.log").read_text()  # no traceback through cwm

    catalog = store / "catalog.sqlite"
    catalog.write_bytes(os.urandom(max(catalog.stat().st_size, 16384)))  # garbage over it
    for side in ("-wal", "-shm"):
        Path(f"{catalog}{side}").unlink(missing_ok=True)
    srv = server(tiny_model, store, tmp_path, "E").start()
    try:
        cold = srv.complete(prompt, salt="s1", max_tokens=4)  # nothing restored: recomputed
        again = srv.complete(prompt, salt="s1", max_tokens=4)  # vLLM's own prefix hit
        assert outputs(cold)[0] == outputs(again)[0] == outputs(reference)[0]
        assert srv.metric(EXTERNAL_HITS) == 0
        code, err = cwm(sock, "freeze", "s1", "w-corrupt")
        assert code == 1 and err["error"]["code"] == "catalog_unavailable", err
        assert "corrupt" in err["error"]["message"]
    finally:
        srv.stop()
    log = (tmp_path / "E.log").read_text()
    assert "is unavailable: it is corrupt" in log and "cwm_connector/" not in log


@contextmanager
def read_only(path: Path) -> Iterator[None]:
    """A read-only bind mount over path: new files cannot be made there (EROFS)."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def fill(path: Path, keep_free: int) -> Path:
    """A filler file that takes every free byte but `keep_free`."""
    filler = path / "filler"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(chunk)
                fh.flush()
        except OSError:
            pass  # ENOSPC: full
    os.truncate(filler, max(0, filler.stat().st_size - keep_free))
    return filler


def blob_count(store: Path) -> int:
    return len(list((store / "blobs").rglob("*.blob")))


def test_disk_full_and_unwritable_store(tiny_model: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "store", "16m") as store:
        sock = store / "control.sock"
        # disk_min_free 0: the disk fills to the last page and the writes themselves fail
        # (with the default margin cwm refuses first: test_budget_e2e.py)
        srv = server(tiny_model, store, tmp_path, "F", disk_min_free=0).start()
        try:
            prompt = make_prompt(tiny_model, PROMPT_TOKENS, seed=61)
            filler = fill(store, keep_free=200 << 10)  # a few blobs fit, the session does not
            first = srv.complete(prompt, salt="f1", max_tokens=4)
            metric_at_least(srv, STORE_ERRORS, 1)  # capture stopped, counted
            assert blob_count(store) == 0 and temp_files(store) == []  # nothing half-written
            second = srv.complete(prompt, salt="f1", max_tokens=4)  # serving goes on
            assert outputs(second)[0] == outputs(first)[0]
            started = time.monotonic()
            code, err = cwm(sock, "freeze", "f1", "w-full")
            assert code == 1 and err["error"]["code"] == "capture_failed", err
            assert err["error"]["retryable"] is True and "capture of" in err["error"]["message"]
            assert time.monotonic() - started < 30  # at once, not after the durability timeout
            log = (tmp_path / "F.log").read_text()
            assert "No space left on device" in log

            filler.unlink()  # space freed: the next request's capture goes through
            srv.complete(prompt, salt="f1", max_tokens=4)
            code, window = cwm(sock, "freeze", "f1", "w-full")
            assert code == 0 and window["blocks"] > 0, window
            stored = blob_count(store)

            errors = srv.metric(STORE_ERRORS)
            with read_only(store / "blobs"), read_only(store / "tmp"):
                srv.complete(make_prompt(tiny_model, 600, seed=62), salt="r1", max_tokens=4)
                metric_at_least(srv, STORE_ERRORS, errors + 1)
                assert blob_count(store) == stored and temp_files(store) == []
            assert "Read-only file system" in (tmp_path / "F.log").read_text()
            srv.complete(make_prompt(tiny_model, 600, seed=62), salt="r1", max_tokens=4)
            code, window = cwm(sock, "freeze", "r1", "w-ro")  # writable again: resumes
            assert code == 0 and window["blocks"] > 0, window
        finally:
            srv.stop()
