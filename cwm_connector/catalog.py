"""The SQLite catalog: which block hashes are stored, under which fingerprint, in which blob.

A row names a blob only after the blob file is durable (tier_disk writes and
fsyncs first), so a crash can leave an orphan blob but never a dangling row.
Each thread opens its own Catalog; WAL mode lets the scheduler read while a
worker writes.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

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


class Catalog:
    """One connection to `<store_dir>/catalog.sqlite`; not shared between threads."""

    def __init__(self, path: Path, timeout_s: float = 5.0):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(str(path), timeout=timeout_s, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._migrate()
        self._db.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
            (SCHEMA_VERSION,),
        )

    def _migrate(self) -> None:
        """Add the columns later versions introduced to a catalog made by an earlier one."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(windows)")}
        for column, ddl in WINDOW_COLUMNS_ADDED.items():
            if column not in columns:
                self._db.execute(f"ALTER TABLE windows ADD COLUMN {column} {ddl}")

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    def register_fingerprint(self, fp_id: str, engine_fp: str, doc: str) -> None:
        """Record a worker's full fingerprint under its engine fingerprint."""
        self._db.execute(
            "INSERT OR IGNORE INTO fingerprints (fp_id, engine_fp, doc, created) "
            "VALUES (?, ?, ?, ?)",
            (fp_id, engine_fp, doc, time.time()),
        )

    def stored_hashes(self, engine_fp: str, hashes: Sequence[bytes]) -> set[bytes]:
        """The subset of hashes stored under any full fingerprint of this engine."""
        return set(self.digests_for_engine(engine_fp, hashes))

    def digests_for(self, fp_id: str, hashes: Sequence[bytes]) -> dict[bytes, bytes]:
        """Map each stored hash (for exactly this fingerprint) to its blob digest."""
        found: dict[bytes, bytes] = {}
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
        rows = self._db.execute("SELECT fp_id FROM fingerprints WHERE engine_fp = ?", (engine_fp,))
        return [row[0] for row in rows]

    def blob_sizes(self, digests: Sequence[bytes]) -> dict[bytes, tuple[int, int]]:
        """digest -> (raw bytes, stored bytes) for the blobs the catalog knows."""
        found: dict[bytes, tuple[int, int]] = {}
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

    def delete_window(self, name: str) -> list[bytes] | None:
        """Remove a window; return the digests no other window references (None if absent)."""
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
                if self._db.execute(
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
        row = self._db.execute("SELECT 1 FROM blobs WHERE digest = ?", (digest,)).fetchone()
        return row is not None

    def forget_blob(self, digest: bytes) -> int:
        """Drop a blob and every block row naming it; return the rows dropped."""
        with self._transaction():
            cur = self._db.execute("DELETE FROM blocks WHERE digest = ?", (digest,))
            self._db.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
        return cur.rowcount

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


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on error."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
