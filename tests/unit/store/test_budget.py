"""The bounded disk tier without vLLM (issue 15): the eviction policy, the catalog's running
byte totals, and a real worker capturing under `disk_bytes`."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest
from test_faults_disk import HASHES, caches, capture, leftovers

from cwm_connector.config import CwmConfig
from cwm_connector.engine.kv_layout import KVLayout
from cwm_connector.engine.worker import CwmWorker
from cwm_connector.store.budget import DiskBudget
from cwm_connector.store.catalog import Catalog, catalog_path
from cwm_connector.store.disk import DiskTier
from cwm_connector.store.eviction import NO_LIMIT, limit_bytes, pick_victims, room_for

pytestmark = pytest.mark.timeout(120)


# -- the policy (pure) ---------------------------------------------------------------


def test_room_frees_down_to_the_low_water_mark_and_never_windows() -> None:
    assert room_for(10, used=50, pinned=0, limit=100).free == 0
    room = room_for(30, used=90, pinned=20, limit=100)
    assert room.free == 90 + 30 - 90 and room.fits  # down to 90% of the limit
    room = room_for(30, used=90, pinned=80, limit=100)
    assert not room.fits and room.free == 10  # at most the unpinned bytes


def test_limit_is_the_tighter_of_budget_and_free_space() -> None:
    assert limit_bytes(used=10, budget=100, fs_free=1000, min_free=500) == 100
    assert limit_bytes(used=10, budget=100, fs_free=550, min_free=500) == 60
    assert limit_bytes(used=10, budget=0, fs_free=550, min_free=500) == 60
    assert limit_bytes(used=10, budget=0, fs_free=550, min_free=0) == NO_LIMIT


def test_victims_in_lru_order_skip_protected_and_stop_at_need() -> None:
    cands = [(b"a", 10), (b"b", 10), (b"c", 10), (b"d", 10)]
    assert pick_victims(cands, 15, {b"a"}) == ([b"b", b"c"], 20)
    assert pick_victims(cands, 100, set()) == ([b"a", b"b", b"c", b"d"], 40)


# -- the catalog's running totals -----------------------------------------------------


def window_row(name: str) -> dict[str, object]:
    return {"name": name, "salt": "s", "engine_fp": "e", "fingerprint": "{}",
            "token_ids": b"", "num_tokens": 0, "created": 0.0, "parent": None}  # fmt: skip


def test_usage_totals_stay_exact_through_any_sequence(tmp_path: Path) -> None:
    cat = Catalog(catalog_path(tmp_path))
    rng = random.Random(5)
    digests = [bytes([i]) * 16 for i in range(12)]
    windows: list[str] = []
    for step in range(300):
        op = rng.choice(["add", "add", "mirror", "window", "delete", "evict", "forget"])
        dig = rng.choice(digests)
        if op == "add":
            cat.add_blocks("fp", [(dig + b"h", dig)], [(dig, 100, rng.randint(1, 99), "none")])
        elif op == "mirror":  # a row of a blob only Redis holds
            cat.add_blocks("fp", [(dig + b"r", dig)], [(dig, 100, 50, "redis")])
        elif op == "window":
            name = f"w{step}"
            picked = rng.sample(digests, 3)
            cat.insert_window(window_row(name), [(d + b"h", d) for d in picked])
            windows.append(name)
        elif op == "delete" and windows:
            cat.remove_window(windows.pop(rng.randrange(len(windows))), lambda d: False)
        elif op == "evict":
            pinned = {d for (d,) in cat._db.execute("SELECT digest FROM window_blocks")}
            dropped = cat.evict([d for d, _ in cat.eviction_candidates(3)])
            assert not set(dropped) & pinned  # a window's blob is never evicted
        else:
            cat.forget_blob(dig)
        assert cat.usage_drift() == {}, (step, op)
    assert cat.usage()["pinned"] <= cat.usage()["disk"]


def test_old_catalog_is_migrated_with_exact_totals(tmp_path: Path) -> None:
    path = catalog_path(tmp_path)
    cat = Catalog(path)
    cat.add_blocks("fp", [(b"h1", b"d1"), (b"h2", b"d2")],
                   [(b"d1", 10, 100, "none"), (b"d2", 10, 40, "none")])  # fmt: skip
    cat.insert_window(window_row("w"), [(b"h1", b"d1")])
    cat.close()
    with sqlite3.connect(path) as db:  # back to the schema before issue 15
        for trigger in ("blobs_usage_insert", "blobs_usage_delete", "blobs_usage_update",
                        "window_blocks_pin", "window_blocks_unpin"):  # fmt: skip
            db.execute(f"DROP TRIGGER {trigger}")
        db.execute("DROP INDEX blobs_lru")
        db.execute("DROP TABLE usage")
        db.execute("ALTER TABLE blobs DROP COLUMN pinned")
        db.execute("ALTER TABLE blobs DROP COLUMN last_used")
    cat = Catalog(path)
    assert cat.usage() == {"disk": 140, "pinned": 100} and cat.usage_drift() == {}
    assert cat.eviction_candidates(10) == [(b"d2", 40)]


# -- a worker under a budget ----------------------------------------------------------


def blob_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in store.glob("blobs/**/*.blob"))


def budget_worker(store: Path, disk_bytes: int) -> CwmWorker:
    cat = Catalog(catalog_path(store))
    cat.register_fingerprint("fp", "engine", "{}")
    cat.close()
    cfg = CwmConfig(store_dir=str(store), disk_bytes=disk_bytes, disk_min_free=0)
    return CwmWorker(cfg, "fp", KVLayout(caches(), 16), 0)


def test_captures_stay_within_disk_bytes_evicting_lru(tmp_path: Path) -> None:
    one = 48 * 1024 + 4096  # a 48 KiB block's blob, in whole filesystem blocks
    worker = budget_worker(tmp_path, 5 * one)
    try:
        for block in range(12):
            report = capture(worker, f"r{block}", [b"h%d" % block], [block])
            assert report.stored == [b"h%d" % block]
            assert blob_bytes(tmp_path) <= 5 * one
        cat = Catalog(catalog_path(tmp_path))
        kept = set(cat.digests_for("fp", [b"h%d" % i for i in range(12)]))
        assert b"h11" in kept and b"h0" not in kept  # the oldest went first
        assert cat.usage()["disk"] == blob_bytes(tmp_path) and cat.usage_drift() == {}
        cat.close()
        assert worker.stats.snapshot()["evicted_blobs"] >= 7
    finally:
        worker.shutdown()


def test_windows_are_never_evicted_and_a_full_store_refuses_capture(tmp_path: Path) -> None:
    one = 48 * 1024 + 4096
    worker = budget_worker(tmp_path, 3 * one)
    try:
        for block in range(3):
            capture(worker, f"r{block}", [HASHES[block]], [block])
        cat = Catalog(catalog_path(tmp_path))
        found = cat.digests_for("fp", HASHES)
        cat.insert_window(window_row("w"), [(h, found[h]) for h in HASHES])  # pins all three
        files = leftovers(tmp_path)
        report = capture(worker, "r9", [b"new"], [9])
        assert report.store_failed == [b"new"] and report.stored == []
        assert leftovers(tmp_path) == files  # nothing written, nothing evicted
        assert worker.stats.snapshot()["store_full_blocks"] == 1
        assert worker.stats.snapshot().get("store_errors", 0) == 0
        cat.remove_window("w", lambda d: True)  # blobs kept as cache: the next capture evicts
        report = capture(worker, "r10", [b"new2"], [10])
        assert report.stored == [b"new2"] and blob_bytes(tmp_path) <= 3 * one
        cat.close()
    finally:
        worker.shutdown()


def test_blobs_being_read_are_not_evicted(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path)
    cat = Catalog(catalog_path(tmp_path))
    digests = [bytes([i]) * 16 for i in range(4)]
    for dig in digests:
        size = disk.put(dig, [b"x" * 1000])
        cat.add_blocks("fp", [(dig, dig)], [(dig, 1000, size, "none")])
    budget = DiskBudget(disk, disk_bytes := 2 * 1100, 0)
    fits, room = budget.make_room(cat, 0, protected={digests[0]})
    assert fits and room.used <= disk_bytes
    left = set(cat.digests_for("fp", digests))
    assert digests[0] in left and digests[1] not in left  # LRU, except the one being read
    assert all(disk.contains(d) == (d in left) for d in digests)  # rows and files agree
