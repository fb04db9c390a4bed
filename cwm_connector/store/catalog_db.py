"""Opening the catalog's SQLite file: schema and migration, a read-only fallback, one
clear error per process when it cannot be used, and write transactions.

`open_db` never raises: a catalog that cannot be opened (garbage over the file,
locked by another process, an unreadable disk) comes back without a connection
and with one sentence saying why, logged once per process and path. On a store
that is not writable an up-to-date catalog opens read-only (restores work,
capture is off). Opening an up-to-date catalog writes nothing, so a writer lock
held elsewhere does not stop reads (WAL).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from cwm_connector.errors import StoreError
from cwm_connector.store import catalog_windows

logger = logging.getLogger("vllm.cwm.catalog")

SCHEMA_VERSION = "1"
CATALOG_FILE = "catalog.sqlite"
MAX_SQL_VARS = 500  # hashes per IN (...) query

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS fingerprints (
    fp_id TEXT PRIMARY KEY,
    engine_fp TEXT NOT NULL,
    doc TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS fingerprints_engine ON fingerprints (engine_fp);
CREATE TABLE IF NOT EXISTS blobs (
    digest BLOB PRIMARY KEY,
    raw_bytes INTEGER NOT NULL,
    stored_bytes INTEGER NOT NULL,
    codec TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS blocks (
    fp_id TEXT NOT NULL,
    block_hash BLOB NOT NULL,
    digest BLOB NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (fp_id, block_hash)
);
CREATE INDEX IF NOT EXISTS blocks_digest ON blocks (digest);
CREATE TABLE IF NOT EXISTS windows (
    name TEXT PRIMARY KEY,
    salt TEXT NOT NULL,
    engine_fp TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    token_ids BLOB NOT NULL,
    num_tokens INTEGER NOT NULL,
    created REAL NOT NULL,
    parent TEXT,
    description TEXT NOT NULL DEFAULT '',
    tags TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS window_blocks (
    name TEXT NOT NULL,
    idx INTEGER NOT NULL,
    block_hash BLOB NOT NULL,
    digest BLOB NOT NULL,
    PRIMARY KEY (name, idx)
);
CREATE INDEX IF NOT EXISTS window_blocks_digest ON window_blocks (digest);
"""


# window columns added after schema version 1 (description and tags: issue 8)
WINDOW_COLUMNS_ADDED = {
    "description": "TEXT NOT NULL DEFAULT ''",
    "tags": "TEXT NOT NULL DEFAULT '[]'",
    # position of the window's first block: > 0 when a sliding window let go (issue 13)
    "first_block": "INTEGER NOT NULL DEFAULT 0",
    # KV-cache groups of the window's blocks: > 1 for a hybrid-allocator model, whose
    # window_blocks.idx is group * GROUP_STRIDE + block position (issue 13)
    "num_groups": "INTEGER NOT NULL DEFAULT 1",
    # what list and describe read instead of a window's blocks (catalog_windows, issue 15)
    **catalog_windows.SUMMARY_COLUMNS,
}
GROUP_STRIDE = 1 << 32
# blob columns added after schema version 1 (the bounded store, issue 15)
BLOB_COLUMNS_ADDED = {
    # when the blob was last captured, staged or loaded: the disk tier's LRU order
    "last_used": "REAL NOT NULL DEFAULT 0",
    # 1 while a window names the blob (kept by the window_blocks triggers below)
    "pinned": "INTEGER NOT NULL DEFAULT 0",
}
# Running byte totals of the disk tier, kept exact by triggers in the same transactions
# that change the rows (whatever code path writes them): `disk` = blob rows stored on this
# disk (codec other than 'redis', a Redis-only mirror), `pinned` = those a window names.
USAGE_TABLE = "CREATE TABLE IF NOT EXISTS usage (key TEXT PRIMARY KEY, bytes INTEGER NOT NULL)"
USAGE_SQL = {
    "disk": "SELECT COALESCE(SUM(stored_bytes), 0) FROM blobs WHERE codec != 'redis'",
    "pinned": "SELECT COALESCE(SUM(stored_bytes), 0) FROM blobs WHERE codec != 'redis' "
    "AND digest IN (SELECT digest FROM window_blocks)",
}
_ON_DISK = "(CASE WHEN {row}.codec != 'redis' THEN {row}.stored_bytes ELSE 0 END)"
_NEW, _OLD = _ON_DISK.format(row="NEW"), _ON_DISK.format(row="OLD")
# Created after the migration (the columns must exist first). The partial index is the
# eviction order: unpinned blobs by last use, so eviction never walks past windows' blobs.
INDEXES = f"""
CREATE INDEX IF NOT EXISTS blobs_lru ON blobs (last_used) WHERE pinned = 0;
CREATE TRIGGER IF NOT EXISTS blobs_usage_insert AFTER INSERT ON blobs BEGIN
    UPDATE usage SET bytes = bytes + {_NEW} WHERE key = 'disk';
    UPDATE blobs SET pinned = 1 WHERE digest = NEW.digest
        AND EXISTS (SELECT 1 FROM window_blocks WHERE digest = NEW.digest);
END;
CREATE TRIGGER IF NOT EXISTS blobs_usage_delete AFTER DELETE ON blobs BEGIN
    UPDATE usage SET bytes = bytes - {_OLD} WHERE key = 'disk';
    UPDATE usage SET bytes = bytes - {_OLD} * OLD.pinned WHERE key = 'pinned';
END;
CREATE TRIGGER IF NOT EXISTS blobs_usage_update AFTER UPDATE OF pinned, codec, stored_bytes
ON blobs BEGIN
    UPDATE usage SET bytes = bytes + {_NEW} - {_OLD} WHERE key = 'disk';
    UPDATE usage SET bytes = bytes + {_NEW} * NEW.pinned - {_OLD} * OLD.pinned
        WHERE key = 'pinned';
END;
CREATE TRIGGER IF NOT EXISTS window_blocks_pin AFTER INSERT ON window_blocks BEGIN
    UPDATE blobs SET pinned = 1 WHERE digest = NEW.digest AND pinned = 0;
END;
CREATE TRIGGER IF NOT EXISTS window_blocks_unpin AFTER DELETE ON window_blocks
WHEN NOT EXISTS (SELECT 1 FROM window_blocks WHERE digest = OLD.digest) BEGIN
    UPDATE blobs SET pinned = 0 WHERE digest = OLD.digest;
END;
"""
INDEX_NAMES = (
    "blobs_lru",
    "blobs_usage_insert",
    "blobs_usage_delete",
    "blobs_usage_update",
    "window_blocks_pin",
    "window_blocks_unpin",
    *catalog_windows.INDEX_NAMES,
)
INDEXES += catalog_windows.INDEXES  # window listing: sort indices, tags, summary triggers


def catalog_path(store_dir: Path) -> Path:
    """Where the catalog of a store lives."""
    return store_dir / CATALOG_FILE


class CatalogUnavailable(StoreError):
    """The catalog cannot be opened or written (corrupt, locked, unwritable)."""

    code = "catalog_unavailable"


_logged_paths: set[tuple[str, int]] = set()
_logged_lock = threading.Lock()


def _log_once(path: Path, message: str, level: int = logging.ERROR) -> None:
    """Log an unusable catalog once per process and path (every thread opens its own)."""
    with _logged_lock:
        first = (str(path), level) not in _logged_paths
        _logged_paths.add((str(path), level))
    logger.log(level if first else logging.DEBUG, "cwm: %s", message)


def _explain(path: Path, exc: BaseException) -> str:
    """One clear sentence for an unusable catalog."""
    text = str(exc)
    if "locked" in text or "busy" in text:
        cause = f"it is locked by another process ({text})"
    elif isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
        cause = f"it is corrupt ({text}); move it aside to start an empty catalog"
    else:
        cause = f"it cannot be opened ({text})"
    return (
        f"catalog {path} is unavailable: {cause}. cwm restores and captures nothing "
        "until it is fixed; vLLM serves on and recomputes"
    )


@dataclass(slots=True)
class OpenedDb:
    """What `open_db` got: a connection, or None and the reason."""

    conn: sqlite3.Connection | None
    read_only: bool = False
    error: str | None = None


def open_db(path: Path, timeout_s: float) -> OpenedDb:
    """Open (creating or migrating) the catalog at path; never raises."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=timeout_s, isolation_level=None)
    except (sqlite3.Error, OSError) as exc:
        return _failed(path, exc)
    try:
        _prepare(conn)
    except (sqlite3.Error, OSError) as exc:
        conn.close()
        return _open_read_only(path) or _failed(path, exc)
    return OpenedDb(conn)


def _failed(path: Path, exc: BaseException) -> OpenedDb:
    error = _explain(path, exc)
    _log_once(path, error)
    return OpenedDb(None, error=error)


def _open_read_only(path: Path) -> OpenedDb | None:
    """On an unwritable store, open the catalog read-only: restores work, capture is off."""
    if not path.exists() or os.access(path.parent, os.W_OK):
        return None
    uri = f"file:{urllib.parse.quote(str(path))}?mode=ro&immutable=1"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        if not is_current(conn):
            conn.close()
            return None
    except sqlite3.Error:
        return None
    _log_once(
        path,
        f"catalog {path} is read-only (the store is not writable): restores work, "
        "cwm captures nothing until it is writable again",
        logging.WARNING,
    )
    return OpenedDb(conn, read_only=True)


def _prepare(conn: sqlite3.Connection) -> None:
    """Set WAL mode; create or migrate the schema only when it is not current."""
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    if is_current(conn):
        return  # nothing to write: a lock held by another process still allows reads
    conn.executescript(SCHEMA)
    conn.execute("BEGIN IMMEDIATE")  # two processes starting at once migrate one at a time
    try:
        _migrate(conn)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.executescript(INDEXES)
    conn.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
        (SCHEMA_VERSION,),
    )


def _migrate(conn: sqlite3.Connection) -> None:
    """Add the columns later versions introduced to a catalog made by an earlier one."""
    summed = {row[1] for row in conn.execute("PRAGMA table_info(windows)")} | {
        row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
    }
    for table, added in (("windows", WINDOW_COLUMNS_ADDED), ("blobs", BLOB_COLUMNS_ADDED)):
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        for column, ddl in added.items():
            if column not in columns:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}")
    if "last_used" not in columns:  # blobs of an older catalog: LRU from their creation
        conn.execute("UPDATE blobs SET last_used = created")
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "usage" not in tables:  # before the triggers exist: they would count twice
        conn.execute(USAGE_TABLE)
        conn.execute(
            "UPDATE blobs SET pinned = EXISTS (SELECT 1 FROM window_blocks "
            "WHERE window_blocks.digest = blobs.digest)"
        )
        for key, query in USAGE_SQL.items():
            total = conn.execute(query).fetchone()[0]
            conn.execute("INSERT INTO usage (key, bytes) VALUES (?, ?)", (key, total))
    if not {"num_blocks", "window_tags"} <= summed:  # windows listed before issue 15
        catalog_windows.fill_summaries(conn)


def is_current(conn: sqlite3.Connection) -> bool:
    """Whether the schema is complete and migrated (then opening needs no write)."""
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    expected = {"meta", "fingerprints", "blobs", "blocks", "windows", "window_blocks", "usage"}
    if not expected <= tables:
        return False
    for table, added in (("windows", WINDOW_COLUMNS_ADDED), ("blobs", BLOB_COLUMNS_ADDED)):
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if not set(added) <= columns:
            return False
    indices = {
        row[0]
        for row in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('index', 'trigger')")
    }
    if not set(INDEX_NAMES) <= indices:
        return False
    version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return version is not None


class Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on error.

    SQLite errors (locked by another process, disk full, read-only) become
    CatalogUnavailable: a structured, retryable store error, never a crash.
    """

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise unavailable("cannot start a catalog write", exc) from exc

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
                return
            except sqlite3.Error as err:
                exc = err
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):  # the original error says more
                self._db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise unavailable("catalog write failed", exc) from exc


def unavailable(what: str, exc: sqlite3.Error) -> CatalogUnavailable:
    text = str(exc)
    if "locked" in text or "busy" in text:
        text = f"the catalog is locked by another process ({text})"
    return CatalogUnavailable(f"{what}: {text}", retryable=True)
