"""Upkeep of a store directory, with vLLM down or serving from it: du, gc and verify.

They work on the blob files and the catalog only (no engine):
- `disk_usage` only reads (a read-only SQLite connection beside the server's WAL):
  blob bytes pinned by windows, cache (blob rows no window pins), orphans (files
  no row names), temp files, quarantined files, the filesystem's free space.
- `collect_garbage` removes orphan blob files older than a grace period (a live
  server writes a blob before its row, so a fresh rowless file is a write in
  flight), temp files of dead writers (`DiskTier.clean_orphan_tmp`) and block
  rows whose blob row is gone. A file is moved aside before it is deleted and
  put back if a row appeared meanwhile.
- `verify_store` re-reads every catalogued blob on this disk and checks its
  digest; a damaged one loses its catalog rows and a corrupt file is quarantined,
  as the start-up check (store/check.py) does. Something that looks damaged is
  looked at again first: a file evicted or replaced right now is not damage.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cwm_connector.errors import BlobCorruptError, BlobMissingError, StoreError
from cwm_connector.store.catalog import Catalog, CatalogUnavailable, catalog_path
from cwm_connector.store.catalog_db import MAX_SQL_VARS, Transaction
from cwm_connector.store.check import RECHECK_S
from cwm_connector.store.disk import ORPHAN_TMP_AGE_S, DiskTier

GC_GRACE_S = ORPHAN_TMP_AGE_S  # no capture takes this long between its file and its row
BLOB_SUFFIX = ".blob"
DIGEST_BYTES = 16  # xxh3-128
SQL_TIMEOUT_S = 5.0  # wait this long for a live server's write lock
T = TypeVar("T")
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class BlobFile:
    """One file under blobs/: its digest (from its name), size and modification time."""

    digest: bytes
    path: str
    size: int
    mtime: float


def disk_usage(store_dir: Path, disk_bytes: int = 0) -> dict[str, Any]:
    """Bytes by kind on the disk tier, and the filesystem's space; reads only."""
    counts = dict.fromkeys(
        ("pinned_blobs", "pinned_bytes", "cache_blobs", "cache_bytes", "orphan_blobs",
         "orphan_bytes"), 0,
    )  # fmt: skip
    with _connect(store_dir, read_only=True) as conn:
        disk = DiskTier(store_dir)  # a store's folders exist already: this creates nothing
        disk_rows = conn.execute("SELECT COUNT(*) FROM blobs WHERE codec != 'redis'").fetchone()[0]
        windows = conn.execute("SELECT COUNT(*) FROM windows").fetchone()[0]
        budget_used = _budget_used(conn)
        matched = 0
        for batch in _batched(blob_files(disk), MAX_SQL_VARS):
            rows = _blob_rows(conn, [f.digest for f in batch])
            pinned = _pinned(conn, [f.digest for f in batch])
            for f in batch:
                kind = "pinned" if f.digest in pinned else "cache" if f.digest in rows else "orphan"
                counts[f"{kind}_blobs"] += 1
                counts[f"{kind}_bytes"] += f.size
                matched += rows.get(f.digest, "redis") != "redis"
    tmp_files, tmp_bytes = _folder_usage(disk.tmp_dir)
    quarantined, quarantined_bytes = _folder_usage(disk.quarantine_dir)
    fs = shutil.disk_usage(store_dir)
    return {
        **counts,
        "blob_bytes": counts["pinned_bytes"] + counts["cache_bytes"],  # what the budget counts
        "missing_blobs": disk_rows - matched,  # rows whose file is gone (`verify` drops them)
        "tmp_files": tmp_files,
        "tmp_bytes": tmp_bytes,
        "quarantined_files": quarantined,
        "quarantined_bytes": quarantined_bytes,
        "catalog_bytes": sum(
            _size(Path(f"{catalog_path(store_dir)}{s}")) for s in ("", "-wal", "-shm")
        ),
        "windows": windows,
        "budget_bytes": disk_bytes or None,
        "budget_used_bytes": budget_used,  # the catalog's running total the budget enforces
        "fs_total_bytes": fs.total,
        "fs_free_bytes": fs.free,
    }


def collect_garbage(
    store_dir: Path, grace_s: float = GC_GRACE_S, dry_run: bool = False
) -> dict[str, Any]:
    """Remove orphan blob files older than grace_s, dead writers' temp files, dangling rows."""
    disk = DiskTier(store_dir)
    now = time.time()
    removed = removed_bytes = kept_fresh = 0
    with _connect(store_dir, read_only=dry_run) as conn:
        for batch in _batched(blob_files(disk), MAX_SQL_VARS):
            named = _named(conn, [f.digest for f in batch])
            for f in batch:
                if f.digest in named:
                    continue
                if now - f.mtime < grace_s:
                    kept_fresh += 1
                elif dry_run or _remove_orphan(conn, disk, f):
                    removed += 1
                    removed_bytes += f.size
        block_rows = _drop_dangling_blocks(conn, dry_run)
    return {
        "dry_run": dry_run,
        "grace_s": grace_s,
        "orphan_blobs_removed": removed,
        "orphan_bytes_removed": removed_bytes,
        "orphan_blobs_kept_fresh": kept_fresh,
        "tmp_files_removed": 0 if dry_run else disk.clean_orphan_tmp(),
        "block_rows_removed": block_rows,
    }


def verify_store(
    store_dir: Path,
    progress: Progress | None = None,
    dry_run: bool = False,
    skip_absent: bool = False,
) -> dict[str, Any]:
    """Re-read every catalogued blob on disk and check its digest; drop and quarantine damage.

    skip_absent: a blob not on this disk may live in Redis (a shared store): not damage.
    """
    disk = DiskTier(store_dir)
    catalog = Catalog(catalog_path(store_dir), timeout_s=SQL_TIMEOUT_S)
    if not catalog.ok:
        raise CatalogUnavailable(catalog.error or f"catalog of {store_dir} cannot be opened")
    done = checked = checked_bytes = skipped = 0
    suspects: list[tuple[bytes, int]] = []
    try:
        total = catalog.totals()["blobs"]
        for rows in catalog.blob_rows():
            sizes = catalog.blob_sizes([d for d, _ in rows])
            for dig, codec in rows:
                raw_len = sizes.get(dig, (0, 0))[0]
                if codec == "redis" or (skip_absent and not disk.contains(dig)):
                    skipped += 1  # Redis holds it, not this disk
                elif (problem := _problem(disk, dig, raw_len)) is None:
                    checked += 1
                    checked_bytes += raw_len
                elif problem != "unreadable":
                    suspects.append((dig, raw_len))
                done += 1
                if progress is not None:
                    progress(done, total)
        damaged = _confirm(catalog, disk, suspects)
        with _connect(store_dir, read_only=True) as conn:
            report = [
                {"digest": dig.hex(), "problem": problem, "windows": _windows_of(conn, dig)}
                for dig, problem in damaged
            ]
        if not dry_run:
            for dig, problem in damaged:
                catalog.forget_blob(dig)  # rows first: a crash leaves a file, never a row
                if problem == "corrupt":
                    disk.quarantine(dig)
    finally:
        catalog.close()
    return {
        "dry_run": dry_run,
        "checked_blobs": checked + len(damaged),
        "checked_bytes": checked_bytes,
        "ok_blobs": checked,
        "skipped_blobs": skipped,
        "damaged_blobs": len(damaged),
        "missing_blobs": sum(p == "missing" for _, p in damaged),
        "corrupt_blobs": sum(p == "corrupt" for _, p in damaged),
        "quarantined": 0 if dry_run else sum(p == "corrupt" for _, p in damaged),
        "damaged": report,
        "windows_affected": sorted({w for item in report for w in item["windows"]}),
    }


def blob_files(disk: DiskTier) -> Iterator[BlobFile]:
    """Every blobs/ab/cd/<digest>.blob file (others are not the store's: left alone)."""
    for top in _scan(disk.blob_dir):
        for mid in _scan(top.path):
            for entry in _scan(mid.path, dirs=False):
                if not entry.name.endswith(BLOB_SUFFIX):
                    continue
                try:
                    digest = bytes.fromhex(entry.name[: -len(BLOB_SUFFIX)])
                    st = entry.stat()
                except (ValueError, OSError):
                    continue
                if len(digest) == DIGEST_BYTES:
                    yield BlobFile(digest, entry.path, st.st_size, st.st_mtime)


def redis_usage(url: str, ttl_s: float) -> dict[str, Any]:
    """The Redis tier's keys and bytes by kind (windows, pinned, cache, block maps)."""
    return _redis_call(url, ttl_s, "usage")


def redis_gc(url: str, ttl_s: float) -> dict[str, Any]:
    """Orphan block maps removed and cache keys given `ttl_s` in Redis now."""
    return _redis_call(url, ttl_s, "gc")


def _redis_call(url: str, ttl_s: float, method: str) -> dict[str, Any]:
    from cwm_connector.store.redis import RedisTier  # redis-py only when a URL is given

    tier = RedisTier(url, socket_timeout_s=5.0, ttl_s=ttl_s)
    try:
        if not hasattr(tier, method):  # older tiers: say so rather than guess
            raise StoreError(f"this Redis tier has no {method}()", code="unsupported")
        result = getattr(tier, method)()
    finally:
        tier.close()
    return dict(result)


def _problem(disk: DiskTier, dig: bytes, raw_len: int) -> str | None:
    """None when the blob reads back and verifies; else missing, corrupt or unreadable."""
    try:
        disk.read_into(dig, [memoryview(bytearray(raw_len))])
    except BlobMissingError:
        return "missing"
    except BlobCorruptError:
        return "corrupt"
    except StoreError:
        return "unreadable"  # an I/O error now is not proof of damage
    return None


def _confirm(
    catalog: Catalog, disk: DiskTier, suspects: list[tuple[bytes, int]]
) -> list[tuple[bytes, str]]:
    """The suspects still damaged a moment later whose row still exists (not just evicted)."""
    if not suspects:
        return []
    time.sleep(RECHECK_S)
    damaged = []
    for dig, raw_len in suspects:
        problem = _problem(disk, dig, raw_len)
        if problem in ("missing", "corrupt") and catalog.has_blob(dig):
            damaged.append((dig, problem))
    return damaged


def _remove_orphan(conn: sqlite3.Connection, disk: DiskTier, f: BlobFile) -> bool:
    """Move the file aside, and delete it unless a row named it meanwhile (then put it back)."""
    # Named with this live pid: the server's own temp cleanup leaves it alone meanwhile.
    aside = disk.tmp_dir / f"{os.getpid()}-gc-{f.digest.hex()}.tmp"
    try:
        os.replace(f.path, aside)
    except OSError:
        return False
    if _named(conn, [f.digest]):
        os.replace(aside, f.path)  # same digest, same bytes: safe over a fresh copy
        return False
    aside.unlink(missing_ok=True)
    return True


def _drop_dangling_blocks(conn: sqlite3.Connection, dry_run: bool) -> int:
    """Block rows whose blob row is gone: lookups would promise a blob that is not there."""
    dangling = "NOT EXISTS (SELECT 1 FROM blobs WHERE blobs.digest = blocks.digest)"
    rowids = [r[0] for r in conn.execute(f"SELECT rowid FROM blocks WHERE {dangling}")]
    if dry_run:
        return len(rowids)
    dropped = 0
    for batch in _batched(rowids, MAX_SQL_VARS):  # short write transactions beside a server
        marks = ",".join("?" * len(batch))
        with Transaction(conn):
            cur = conn.execute(
                f"DELETE FROM blocks WHERE rowid IN ({marks}) AND {dangling}", tuple(batch)
            )
            dropped += cur.rowcount
    return dropped


def _budget_used(conn: sqlite3.Connection) -> int | None:
    """The catalog's running total of blob bytes on this disk (None: a store without one)."""
    try:
        row = conn.execute("SELECT bytes FROM usage WHERE key = 'disk'").fetchone()
    except sqlite3.Error:
        return None
    return None if row is None else int(row[0])


def _named(conn: sqlite3.Connection, digests: list[bytes]) -> set[bytes]:
    """The digests a blob row or a window names (a window pins even a rowless blob)."""
    return set(_blob_rows(conn, digests)) | _pinned(conn, digests)


def _blob_rows(conn: sqlite3.Connection, digests: list[bytes]) -> dict[bytes, str]:
    marks = ",".join("?" * len(digests))
    rows = conn.execute(f"SELECT digest, codec FROM blobs WHERE digest IN ({marks})", digests)
    return {bytes(d): str(c) for d, c in rows}


def _pinned(conn: sqlite3.Connection, digests: list[bytes]) -> set[bytes]:
    marks = ",".join("?" * len(digests))
    rows = conn.execute(
        f"SELECT DISTINCT digest FROM window_blocks WHERE digest IN ({marks})", digests
    )
    return {bytes(r[0]) for r in rows}


def _windows_of(conn: sqlite3.Connection, dig: bytes) -> list[str]:
    rows = conn.execute("SELECT DISTINCT name FROM window_blocks WHERE digest = ?", (dig,))
    return sorted(str(r[0]) for r in rows)


class _connect:
    """A plain SQLite connection to the catalog (read-only when asked), closed on exit."""

    def __init__(self, store_dir: Path, read_only: bool):
        path = catalog_path(store_dir)
        if not path.is_file():
            raise CatalogUnavailable(f"no cwm store at {store_dir} (no {path.name})")
        uri = f"file:{urllib.parse.quote(str(path))}" + ("?mode=ro" if read_only else "")
        try:
            self.conn = sqlite3.connect(uri, uri=True, timeout=SQL_TIMEOUT_S, isolation_level=None)
            self.conn.execute("SELECT 1 FROM blobs LIMIT 1")
        except sqlite3.Error as exc:
            raise CatalogUnavailable(f"catalog {path} cannot be read: {exc}") from exc

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


def _scan(folder: Path | str, dirs: bool = True) -> list[os.DirEntry[str]]:
    """A folder's entries (only sub-folders when dirs); an unreadable folder is empty."""
    try:
        with os.scandir(folder) as entries:
            return [e for e in entries if not dirs or e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _folder_usage(folder: Path) -> tuple[int, int]:
    """(files, bytes) directly inside a folder."""
    files = total = 0
    for entry in _scan(folder, dirs=False):
        try:
            if entry.is_file(follow_symlinks=False):
                files += 1
                total += entry.stat().st_size
        except OSError:
            continue
    return files, total


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
