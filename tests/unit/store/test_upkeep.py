"""Store upkeep (du, gc, verify) on a real store built through the catalog and window code."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from store_builder import FILE_BYTES, RAW_BYTES, build_store, orphan_file

from cwm_connector.errors import CwmError
from cwm_connector.store.catalog import Catalog
from cwm_connector.store.upkeep import collect_garbage, disk_usage, verify_store


def snapshot(store: Path) -> dict[str, tuple[int, float]]:
    """Every file under the store: (size, mtime)."""
    return {
        str(p.relative_to(store)): (p.stat().st_size, p.stat().st_mtime)
        for p in store.rglob("*")
        if p.is_file()
    }


def test_du_counts_each_kind_and_writes_nothing(tmp_path: Path) -> None:
    svc, _, _ = build_store(tmp_path)
    orphan_file(svc, seed=7)
    (tmp_path / "tmp" / "0-dead.tmp").write_bytes(b"x" * 100)
    (tmp_path / "quarantine" / f"{'ab' * 16}.blob").write_bytes(b"y" * 300)
    before = snapshot(tmp_path)
    du = disk_usage(tmp_path, disk_bytes=1 << 20)
    assert snapshot(tmp_path) == before  # read-only, catalog included
    assert (du["pinned_blobs"], du["pinned_bytes"]) == (3, 3 * FILE_BYTES)
    assert (du["cache_blobs"], du["cache_bytes"]) == (2, 2 * FILE_BYTES)
    assert (du["orphan_blobs"], du["orphan_bytes"]) == (1, FILE_BYTES)
    assert (du["tmp_files"], du["tmp_bytes"]) == (1, 100)
    assert (du["quarantined_files"], du["quarantined_bytes"]) == (1, 300)
    assert du["blob_bytes"] == 5 * FILE_BYTES and du["missing_blobs"] == 0
    assert du["windows"] == 2 and du["budget_bytes"] == 1 << 20
    assert du["budget_used_bytes"] == 5 * FILE_BYTES  # the catalog agrees with the files
    assert 0 < du["fs_free_bytes"] <= du["fs_total_bytes"] and du["catalog_bytes"] > 0


def test_du_sees_a_deleted_window_turn_pins_into_cache(tmp_path: Path) -> None:
    svc, _, _ = build_store(tmp_path)
    svc.core.delete("w2")  # w1 still pins the blobs
    assert disk_usage(tmp_path)["pinned_blobs"] == 3
    svc.records.sessions.record("s1", [], [])  # let go of the live session's blocks
    svc.core.delete("w1")
    du = disk_usage(tmp_path)
    assert (du["pinned_blobs"], du["cache_blobs"], du["windows"]) == (0, 2, 0)


def test_du_of_no_store_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CwmError) as err:
        disk_usage(tmp_path / "nowhere")
    assert err.value.code == "catalog_unavailable" and "no cwm store" in err.value.message
    assert not (tmp_path / "nowhere").exists()


def test_gc_removes_old_orphans_and_dangling_rows_only(tmp_path: Path) -> None:
    svc, pinned, cache = build_store(tmp_path)
    old = orphan_file(svc, seed=7, age_s=7200)
    fresh = orphan_file(svc, seed=8)
    dead_tmp = tmp_path / "tmp" / "0-dead.tmp"
    dead_tmp.write_bytes(b"x")
    with sqlite3.connect(tmp_path / "catalog.sqlite") as db:  # a row naming no blob row
        db.execute("INSERT INTO blocks VALUES ('fp-x', ?, ?, 0)", (b"h" * 32, b"d" * 16))
    dry = collect_garbage(tmp_path, grace_s=3600, dry_run=True)
    assert (dry["orphan_blobs_removed"], dry["block_rows_removed"]) == (1, 1)
    assert svc.records.disk.contains(old) and dead_tmp.exists()
    done = collect_garbage(tmp_path, grace_s=3600)
    assert done["orphan_blobs_removed"] == 1 and done["orphan_bytes_removed"] == FILE_BYTES
    assert (done["orphan_blobs_kept_fresh"], done["block_rows_removed"]) == (1, 1)
    assert done["tmp_files_removed"] == 1 and not dead_tmp.exists()
    assert not svc.records.disk.contains(old) and svc.records.disk.contains(fresh)
    assert all(svc.records.disk.contains(d) for d in pinned + cache)
    assert svc.core.status("w1")["complete"] and svc.core.status("w2")["complete"]
    assert collect_garbage(tmp_path, grace_s=0)["orphan_blobs_removed"] == 1  # the fresh one
    assert disk_usage(tmp_path)["orphan_blobs"] == 0
    assert list((tmp_path / "tmp").iterdir()) == []  # nothing left aside


def test_gc_keeps_a_file_a_window_names_without_a_blob_row(tmp_path: Path) -> None:
    # Import skips the blob row of a file already on disk: the window still pins it.
    svc, pinned, _ = build_store(tmp_path)
    with sqlite3.connect(tmp_path / "catalog.sqlite") as db:
        db.execute("DELETE FROM blobs WHERE digest = ?", (pinned[0],))
    os.utime(svc.records.disk.path_for(pinned[0]), (0, 0))
    assert collect_garbage(tmp_path, grace_s=0)["orphan_blobs_removed"] == 0
    assert svc.records.disk.contains(pinned[0])


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_quarantines_damage_and_drops_its_rows(tmp_path: Path) -> None:
    svc, pinned, cache = build_store(tmp_path)
    disk = svc.records.disk
    flip_byte(disk.path_for(pinned[1]), FILE_BYTES - 10)  # the payload: only the digest sees it
    disk.path_for(cache[0]).unlink()
    seen: list[tuple[int, int]] = []
    dry = verify_store(tmp_path, lambda d, t: seen.append((d, t)), dry_run=True)
    assert seen[-1] == (5, 5) and dry["damaged_blobs"] == 2 and disk.contains(pinned[1])
    report = verify_store(tmp_path)
    assert (report["checked_blobs"], report["ok_blobs"], report["damaged_blobs"]) == (5, 3, 2)
    assert (report["corrupt_blobs"], report["missing_blobs"], report["quarantined"]) == (1, 1, 1)
    assert report["checked_bytes"] == 3 * RAW_BYTES
    assert {(d["digest"], d["problem"]) for d in report["damaged"]} == {
        (pinned[1].hex(), "corrupt"), (cache[0].hex(), "missing")
    }  # fmt: skip
    assert report["windows_affected"] == ["w1", "w2"]
    assert (tmp_path / "quarantine" / f"{pinned[1].hex()}.blob").exists()
    assert not disk.contains(pinned[1])
    cat = Catalog(tmp_path / "catalog.sqlite")
    assert not cat.has_blob(pinned[1]) and not cat.has_blob(cache[0])
    assert all(cat.has_blob(d) for d in (pinned[0], pinned[2], cache[1]))
    cat.close()
    assert svc.core.status("w1")["damaged_blobs"] == 1
    again = verify_store(tmp_path)
    assert (again["checked_blobs"], again["damaged_blobs"]) == (3, 0)
