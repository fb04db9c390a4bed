"""The SQLite catalog: which block hashes are stored, under which fingerprint, in which blob.

A row names a blob only after the blob file is durable (tier_disk writes and
fsyncs first), so a crash can leave an orphan blob but never a dangling row.
Each thread opens its own Catalog; WAL mode lets the scheduler read while a
worker writes.

A catalog that cannot be opened (garbage over the file, locked by another
process, an unreadable disk) never raises into vLLM: the Catalog is then
*unavailable*. One clear error is logged per process; block lookups answer
"not stored" (a miss: tokens are recomputed), writes and window reads raise
CatalogUnavailable, which the control ops return as a structured error. Opening
an up-to-date catalog writes nothing, so a writer lock held elsewhere does not
stop reads (WAL).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from cwm_connector.errors import StoreError

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
}


def _chunks(items: Sequence[bytes], size: int = MAX_SQL_VARS) -> Iterable[Sequence[bytes]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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


class Catalog:
    """One connection to `<store_dir>/catalog.sqlite`; not shared between threads."""

    def __init__(self, path: Path, timeout_s: float = 5.0):
        self.path = path
        self.error: str | None = None  # set when the catalog is unavailable
        self.read_only = False  # opened read-only: the store is not writable
        self._conn: sqlite3.Connection | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(path), timeout=timeout_s, isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            self._fail(exc)
            return
        try:
            self._open(conn)
        except (sqlite3.Error, OSError) as exc:
            conn.close()
            if not self._open_read_only():
                self._fail(exc)
            return
        self._conn = conn

    def _open_read_only(self) -> bool:
        """On an unwritable store, open the catalog read-only: restores work, capture is off."""
        if not self.path.exists() or os.access(self.path.parent, os.W_OK):
            return False
        uri = f"file:{urllib.parse.quote(str(self.path))}?mode=ro&immutable=1"
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None)
            if not _is_current(conn):
                conn.close()
                return False
        except sqlite3.Error:
            return False
        self.read_only = True
        self._conn = conn
        _log_once(
            self.path,
            f"catalog {self.path} is read-only (the store is not writable): restores work, "
            "cwm captures nothing until it is writable again",
            logging.WARNING,
        )
        return True

    def _fail(self, exc: BaseException) -> None:
        self.error = _explain(self.path, exc)
        _log_once(self.path, self.error)

    def _open(self, conn: sqlite3.Connection) -> None:
        """Set WAL mode; create or migrate the schema only when it is not current."""
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        if _is_current(conn):
            return  # nothing to write: a lock held by another process still allows reads
        conn.executescript(SCHEMA)
        self._migrate(conn)
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
            (SCHEMA_VERSION,),
        )

    @property
    def ok(self) -> bool:
        """Whether the catalog opened (perhaps read-only)."""
        return self._conn is not None

    @property
    def writable(self) -> bool:
        """Whether the catalog opened for writing."""
        return self._conn is not None and not self.read_only

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise CatalogUnavailable(self.error or f"catalog {self.path} is closed")
        return self._conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        """Add the columns later versions introduced to a catalog made by an earlier one."""
        columns = {row[1] for row in conn.execute("PRAGMA table_info(windows)")}
        for column, ddl in WINDOW_COLUMNS_ADDED.items():
            if column not in columns:
                conn.execute(f"ALTER TABLE windows ADD COLUMN {column} {ddl}")

    def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def register_fingerprint(self, fp_id: str, engine_fp: str, doc: str) -> bool:
        """Record a worker's full fingerprint under its engine fingerprint (best effort).

        Returns False when it could not be recorded (this engine then restores nothing).
        """
        try:
            known = self._db.execute("SELECT 1 FROM fingerprints WHERE fp_id = ?", (fp_id,))
            if known.fetchone() is not None:
                return True  # no write: works while another process holds the write lock
            self._db.execute(
                "INSERT OR IGNORE INTO fingerprints (fp_id, engine_fp, doc, created) "
                "VALUES (?, ?, ?, ?)",
                (fp_id, engine_fp, doc, time.time()),
            )
        except (sqlite3.Error, StoreError) as exc:
            logger.error("cwm: cannot register the worker fingerprint: %s", exc)
            return False
        return True

    def stored_hashes(self, engine_fp: str, hashes: Sequence[bytes]) -> set[bytes]:
        """The subset of hashes stored under any full fingerprint of this engine."""
        return set(self.digests_for_engine(engine_fp, hashes))

    def digests_for(self, fp_id: str, hashes: Sequence[bytes]) -> dict[bytes, bytes]:
        """Map each stored hash (for exactly this fingerprint) to its blob digest."""
        found: dict[bytes, bytes] = {}
        if self._conn is None:
            return found  # unavailable: a miss
        for chunk in _chunks(hashes):
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                "SELECT block_hash, digest FROM blocks WHERE fp_id = ? "
                "AND block_hash IN (" + marks + ")",
                (fp_id, *chunk),
            )
            found.update((row[0], row[1]) for row in rows)
        return found

    def add_blocks(
        self,
        fp_id: str,
        blocks: Sequence[tuple[bytes, bytes]],
        blobs: Sequence[tuple[bytes, int, int, str]],
    ) -> None:
        """Insert (hash, digest) rows and their (digest, raw, stored, codec) blobs atomically."""
        now = time.time()
        with self._transaction():
            self._db.executemany(
                "INSERT OR IGNORE INTO blobs (digest, raw_bytes, stored_bytes, codec, created) "
                "VALUES (?, ?, ?, ?, ?)",
                [(*blob, now) for blob in blobs],
            )
            self._db.executemany(
                "INSERT OR REPLACE INTO blocks (fp_id, block_hash, digest, created) "
                "VALUES (?, ?, ?, ?)",
                [(fp_id, h, d, now) for h, d in blocks],
            )

    def digests_for_engine(self, engine_fp: str, hashes: Sequence[bytes]) -> dict[bytes, bytes]:
        """Map each hash stored under any full fingerprint of this engine to its digest."""
        found: dict[bytes, bytes] = {}
        if self._conn is None:
            return found  # unavailable: a miss
        for chunk in _chunks(hashes):
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                "SELECT block_hash, digest FROM blocks WHERE block_hash IN (" + marks + ") "
                "AND fp_id IN (SELECT fp_id FROM fingerprints WHERE engine_fp = ?)",
                (*chunk, engine_fp),
            )
            found.update((row[0], row[1]) for row in rows)
        return found

    def engine_fp_ids(self, engine_fp: str) -> list[str]:
        """The full fingerprints (one per worker rank/layout) registered for an engine."""
        if self._conn is None:
            return []
        rows = self._db.execute("SELECT fp_id FROM fingerprints WHERE engine_fp = ?", (engine_fp,))
        return [row[0] for row in rows]

    def blob_sizes(self, digests: Sequence[bytes]) -> dict[bytes, tuple[int, int]]:
        """digest -> (raw bytes, stored bytes) for the blobs the catalog knows."""
        found: dict[bytes, tuple[int, int]] = {}
        if self._conn is None:
            return found
        for chunk in _chunks(digests):
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                "SELECT digest, raw_bytes, stored_bytes FROM blobs WHERE digest IN (" + marks + ")",
                tuple(chunk),
            )
            found.update((row[0], (row[1], row[2])) for row in rows)
        return found

    # -- windows -----------------------------------------------------------
    def insert_window(
        self,
        row: dict[str, object],
        blocks: Sequence[tuple[bytes, bytes]],
        *,
        replace: bool = False,
        block_rows: Sequence[tuple[str, bytes, bytes]] = (),
        blob_rows: Sequence[tuple[bytes, int, int, str]] = (),
    ) -> bool:
        """Add a window, its (hash, digest) list, and any block/blob rows it needs, atomically.

        Returns False (and writes nothing) when the name exists and replace is False.
        """
        now = time.time()
        with self._transaction():
            exists = self._db.execute("SELECT 1 FROM windows WHERE name = ?", (row["name"],))
            if exists.fetchone() is not None:
                if not replace:
                    return False
                self._db.execute("DELETE FROM window_blocks WHERE name = ?", (row["name"],))
                self._db.execute("DELETE FROM windows WHERE name = ?", (row["name"],))
            self._db.executemany(
                "INSERT OR IGNORE INTO blobs (digest, raw_bytes, stored_bytes, codec, created) "
                "VALUES (?, ?, ?, ?, ?)",
                [(*b, now) for b in blob_rows],
            )
            self._db.executemany(
                "INSERT OR IGNORE INTO blocks (fp_id, block_hash, digest, created) "
                "VALUES (?, ?, ?, ?)",
                [(*b, now) for b in block_rows],
            )
            self._db.execute(
                "INSERT INTO windows (name, salt, engine_fp, fingerprint, token_ids, num_tokens, "
                "created, parent, description, tags) VALUES (:name, :salt, :engine_fp, "
                ":fingerprint, :token_ids, :num_tokens, :created, :parent, :description, :tags)",
                {"description": "", "tags": "[]", **row},
            )
            self._db.executemany(
                "INSERT INTO window_blocks (name, idx, block_hash, digest) VALUES (?, ?, ?, ?)",
                [(row["name"], i, h, d) for i, (h, d) in enumerate(blocks)],
            )
        return True

    def get_window(self, name: str) -> tuple[dict[str, object], list[tuple[bytes, bytes]]] | None:
        """A window's row and its ordered (hash, digest) list, or None."""
        cur = self._db.execute(
            "SELECT name, salt, engine_fp, fingerprint, token_ids, num_tokens, created, parent, "
            "description, tags FROM windows WHERE name = ?",
            (name,),
        )
        found = cur.fetchone()
        if found is None:
            return None
        keys = [c[0] for c in cur.description]
        blocks = self._db.execute(
            "SELECT block_hash, digest FROM window_blocks WHERE name = ? ORDER BY idx", (name,)
        ).fetchall()
        return dict(zip(keys, found, strict=True)), [(h, d) for h, d in blocks]

    def window_names(self) -> list[str]:
        """Every window name, sorted."""
        return [row[0] for row in self._db.execute("SELECT name FROM windows ORDER BY name")]

    def delete_window(
        self, name: str, keep: set[bytes] | frozenset[bytes] = frozenset()
    ) -> list[bytes] | None:
        """Remove a window; return the digests no other window references (None if absent).

        Digests in `keep` (blocks a live session still holds) stay, rows and all.
        """
        with self._transaction():
            digests = [
                row[0]
                for row in self._db.execute(
                    "SELECT DISTINCT digest FROM window_blocks WHERE name = ?", (name,)
                )
            ]
            cur = self._db.execute("DELETE FROM windows WHERE name = ?", (name,))
            if cur.rowcount == 0:
                return None
            self._db.execute("DELETE FROM window_blocks WHERE name = ?", (name,))
            orphans = [
                d
                for d in digests
                if d not in keep
                and self._db.execute(
                    "SELECT 1 FROM window_blocks WHERE digest = ? LIMIT 1", (d,)
                ).fetchone()
                is None
            ]
            for dig in orphans:  # unpinned: drop the rows; the caller deletes the files
                self._db.execute("DELETE FROM blocks WHERE digest = ?", (dig,))
                self._db.execute("DELETE FROM blobs WHERE digest = ?", (dig,))
        return orphans

    def has_blob(self, digest: bytes) -> bool:
        """Whether a blob row exists for this digest."""
        if self._conn is None:
            return False
        row = self._db.execute("SELECT 1 FROM blobs WHERE digest = ?", (digest,)).fetchone()
        return row is not None

    def forget_blob(self, digest: bytes) -> int:
        """Drop a blob and every block row naming it; return the rows dropped."""
        with self._transaction():
            cur = self._db.execute("DELETE FROM blocks WHERE digest = ?", (digest,))
            self._db.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
        return cur.rowcount

    def blob_rows(self, batch: int = 1000) -> Iterator[list[tuple[bytes, str]]]:
        """Every (digest, codec) blob row, in batches (for the start-up check)."""
        last = b""
        while True:
            rows = self._db.execute(
                "SELECT digest, codec FROM blobs WHERE digest > ? ORDER BY digest LIMIT ?",
                (last, batch),
            ).fetchall()
            if not rows:
                return
            yield [(bytes(d), str(c)) for d, c in rows]
            last = rows[-1][0]

    def block_of(self, digest: bytes) -> bytes | None:
        """One block hash that names this blob (for log lines), or None."""
        if self._conn is None:
            return None
        row = self._db.execute("SELECT block_hash FROM blocks WHERE digest = ? LIMIT 1", (digest,))
        found = row.fetchone()
        return None if found is None else bytes(found[0])

    def totals(self) -> dict[str, int]:
        """Counts and byte totals for stats."""
        blocks = self._db.execute("SELECT COUNT(*) FROM blocks").fetchone()[0]
        blobs, raw, stored = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(raw_bytes), 0), COALESCE(SUM(stored_bytes), 0) "
            "FROM blobs"
        ).fetchone()
        return {"blocks": blocks, "blobs": blobs, "raw_bytes": raw, "stored_bytes": stored}

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


def _is_current(conn: sqlite3.Connection) -> bool:
    """Whether the schema is complete and migrated (then opening needs no write)."""
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not {"meta", "fingerprints", "blobs", "blocks", "windows", "window_blocks"} <= tables:
        return False
    columns = {row[1] for row in conn.execute("PRAGMA table_info(windows)")}
    if not set(WINDOW_COLUMNS_ADDED) <= columns:
        return False
    version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return version is not None


class _Transaction:
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
            raise _unavailable("cannot start a catalog write", exc) from exc

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
            raise _unavailable("catalog write failed", exc) from exc


def _unavailable(what: str, exc: sqlite3.Error) -> CatalogUnavailable:
    text = str(exc)
    if "locked" in text or "busy" in text:
        text = f"the catalog is locked by another process ({text})"
    return CatalogUnavailable(f"{what}: {text}", retryable=True)
