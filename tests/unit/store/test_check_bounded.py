"""The start-up check's bounded rule (store/check.py, issue 15): each start looks at the
blobs written since the last one and a rotating slice of the older ones, so every blob
is looked at within a few starts and no start walks the whole store."""

from __future__ import annotations

from pathlib import Path

import pytest

from cwm_connector.stats import Stats
from cwm_connector.store import check
from cwm_connector.store.blob import digest
from cwm_connector.store.catalog import Catalog, catalog_path
from cwm_connector.store.check import CheckLimits, check_store
from cwm_connector.store.disk import DiskTier

LIMITS = CheckLimits(new=5, slice=7, batch=3, pause=False)


def add_blobs(store: Path, first: int, count: int) -> list[bytes]:
    """Blob files and their rows (one block each); their digests."""
    disk, cat = DiskTier(store), Catalog(catalog_path(store))
    cat.register_fingerprint("fp", "engine", "{}")
    digests = []
    for i in range(first, first + count):
        raw = i.to_bytes(4, "little") * 64
        dig = digest(raw)
        stored = disk.put(dig, [raw])
        cat.add_blocks("fp", [(b"h%d" % i, dig)], [(dig, len(raw), stored, "none")])
        digests.append(dig)
    cat.close()
    return digests


def rows(store: Path) -> int:
    cat = Catalog(catalog_path(store))
    try:
        return int(cat.totals()["blobs"])
    finally:
        cat.close()


def start(store: Path) -> int:
    return check_store(catalog_path(store), DiskTier(store), Stats(None), False, LIMITS)


def test_each_start_looks_at_new_blobs_and_a_rotating_slice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(check, "RECHECK_S", 0.0)
    old = add_blobs(tmp_path, 0, 20)
    for _ in range(4):  # 5 new blobs a start: every row is marked after four
        assert start(tmp_path) == 0
    fresh = add_blobs(tmp_path, 100, 3)  # written since: looked at first, at the next start
    for dig in fresh:
        DiskTier(tmp_path).delete(dig)
    assert start(tmp_path) == 3 and rows(tmp_path) == 20
    for dig in old:  # a hand on the disk removes every older file
        DiskTier(tmp_path).delete(dig)
    dropped = []
    while rows(tmp_path):
        dropped.append(start(tmp_path))
        assert len(dropped) <= 3, dropped  # ceil(20 / 7) starts: never the whole store at once
    assert sum(dropped) == 20 and max(dropped) <= LIMITS.slice
