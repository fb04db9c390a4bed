"""The SQLite catalog: which block hashes are stored, under which fingerprint, in which blob.

A row names a blob only after the blob file is durable (tier_disk writes and
fsyncs first), so a crash can leave an orphan blob but never a dangling row.
Each thread opens its own Catalog; WAL mode lets the scheduler read while a
worker writes.

A catalog that cannot be opened (catalog_db.py) never raises into vLLM: the
Catalog is then *unavailable*. Block lookups answer "not stored" (a miss:
tokens are recomputed), writes and window reads raise CatalogUnavailable, which
the control ops return as a structured error.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from cwm_connector.errors import StoreError
from cwm_connector.store import catalog_windows, wal_checkpoint
from cwm_connector.store.catalog_db import (
    MAX_SQL_VARS,
    USAGE_SQL,
    CatalogUnavailable,
    Transaction,
    catalog_path,
    open_db,
)

__all__ = ["Catalog", "CatalogUnavailable", "catalog_path"]

logger = logging.getLogger("vllm.cwm.catalog")


class Catalog:
    """One connection to `<store_dir>/catalog.sqlite`; not shared between threads."""

    def __init__(self, path: Path, timeout_s: float = 5.0):
        self.path = path
        opened = open_db(path, timeout_s)
        self._conn: sqlite3.Connection | None = opened.conn
        self.read_only = opened.read_only  # opened read-only: the store is not writable
        self.error = opened.error  # set when the catalog is unavailable

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

    def defer_checkpoints(self) -> None:
        """Leave WAL checkpoints to a store.wal_checkpoint.Checkpointer (control ops)."""
        if self._conn is not None:
            wal_checkpoint.defer_checkpoints(self._conn)

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
                "INSERT OR IGNORE INTO blobs (digest, raw_bytes, stored_bytes, codec, created, "
                "last_used) VALUES (?, ?, ?, ?, ?, ?)",
                [(*blob, now, now) for blob in blobs],
            )
            self._db.executemany(  # a Redis-only mirror row now also on this disk
                "UPDATE blobs SET codec = ?, stored_bytes = ?, last_used = ? "
                "WHERE digest = ? AND codec = 'redis'",
                [(codec, stored, now, dig) for dig, _, stored, codec in blobs],
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
        indices: Sequence[int] | None = None,
    ) -> bool:
        """Add a window, its (hash, digest) list, and any block/blob rows it needs, atomically.

        `indices` orders the blocks (default 0, 1, ...; a hybrid model's window uses
        group * GROUP_STRIDE + position). Returns False (and writes nothing) when the
        name exists and replace is False.
        """
        order = list(range(len(blocks))) if indices is None else list(indices)
        now = time.time()
        with self._transaction():
            exists = self._db.execute("SELECT 1 FROM windows WHERE name = ?", (row["name"],))
            if exists.fetchone() is not None:
                if not replace:
                    return False
                self._db.execute("DELETE FROM window_blocks WHERE name = ?", (row["name"],))
                self._db.execute("DELETE FROM windows WHERE name = ?", (row["name"],))
            self._db.executemany(
                "INSERT OR IGNORE INTO blobs (digest, raw_bytes, stored_bytes, codec, created, "
                "last_used) VALUES (?, ?, ?, ?, ?, ?)",
                [(*b, now, now) for b in blob_rows],
            )
            self._db.executemany(
                "INSERT OR IGNORE INTO blocks (fp_id, block_hash, digest, created) "
                "VALUES (?, ?, ?, ?)",
                [(*b, now) for b in block_rows],
            )
            self._db.execute(
                "INSERT INTO windows (name, salt, engine_fp, fingerprint, token_ids, num_tokens, "
                "created, parent, description, tags, first_block, num_groups, session, model) "
                "VALUES (:name, :salt, :engine_fp, :fingerprint, :token_ids, :num_tokens, "
                ":created, :parent, :description, :tags, :first_block, :num_groups, :session, "
                ":model)",
                {
                    **{"description": "", "tags": "[]", "first_block": 0, "num_groups": 1},
                    **row,
                    "session": catalog_windows.salt_digest(str(row["salt"])),
                    "model": catalog_windows.model_of(str(row["fingerprint"])),
                },
            )
            self._db.executemany(
                "INSERT INTO window_blocks (name, idx, block_hash, digest) VALUES (?, ?, ?, ?)",
                [(row["name"], i, h, d) for i, (h, d) in zip(order, blocks, strict=True)],
            )
            # what list and describe read: computed once here, kept by triggers after
            self._db.execute(catalog_windows.SUMMARY_SQL, {"name": row["name"]})
        return True

    def get_window(self, name: str) -> tuple[dict[str, object], list[tuple[bytes, bytes]]] | None:
        """A window's row and its ordered (hash, digest) list, or None."""
        cur = self._db.execute(
            "SELECT name, salt, engine_fp, fingerprint, token_ids, num_tokens, created, parent, "
            "description, tags, first_block, num_groups FROM windows WHERE name = ?",
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

    def window_block_indices(self, name: str) -> list[int]:
        """A window's block indices in order (see insert_window's `indices`)."""
        rows = self._db.execute(
            "SELECT idx FROM window_blocks WHERE name = ? ORDER BY idx", (name,)
        ).fetchall()
        return [int(r[0]) for r in rows]

    def window_names(self) -> list[str]:
        """Every window name, sorted."""
        return [row[0] for row in self._db.execute("SELECT name FROM windows ORDER BY name")]

    def remove_window(
        self, name: str, keep: Callable[[bytes], bool]
    ) -> tuple[list[bytes], int] | None:
        """Remove a window: (digests no other window pins and `keep` spares, their stored
        bytes), their rows gone (the caller deletes the files), or None if absent."""
        with self._transaction():
            return catalog_windows.remove_rows(self._db, name, keep)

    def live_keeper(self, engine_fp: str, live: set[bytes]) -> Callable[[bytes], bool]:
        """Whether a blob is named by one of `live` block hashes of this engine (by its rows)."""
        return lambda digest: catalog_windows.held(self._db, engine_fp, live, digest)

    def list_windows(self, spec: catalog_windows.PageSpec) -> list[dict[str, object]]:
        """One page of window summaries (catalog_windows.LISTED), in SQL with indices."""
        return catalog_windows.list_page(self._db, spec)

    def window_summary(self, name: str) -> dict[str, object] | None:
        """One window's summary (the columns a page lists), or None."""
        return catalog_windows.summary(self._db, name)

    def count_windows(self) -> int:
        """How many windows the catalog holds."""
        return int(self._db.execute("SELECT COUNT(*) FROM windows").fetchone()[0])

    def known_windows(self, names: Sequence[str]) -> set[str]:
        """Those of `names` the catalog holds."""
        return catalog_windows.known(self._db, names)

    # -- the disk tier's budget (issue 15) ----------------------------------
    def usage(self) -> dict[str, int]:
        """Bytes of blobs on this disk (`disk`) and of those windows pin (`pinned`)."""
        rows = self._db.execute("SELECT key, bytes FROM usage").fetchall()
        return {str(k): int(v) for k, v in rows}

    def usage_drift(self) -> dict[str, tuple[int, int]]:
        """Totals whose running value differs from a full recount: {key: (kept, counted)}.

        Empty when the triggers kept them exact (a consistency check; a full scan).
        """
        kept = self.usage()
        counted = {k: int(self._db.execute(q).fetchone()[0]) for k, q in USAGE_SQL.items()}
        return {k: (kept.get(k, 0), v) for k, v in counted.items() if kept.get(k, 0) != v}

    def any_blob_raw_bytes(self) -> int:
        """The raw size of one stored blob (0 if none): a block's size, for estimates."""
        row = self._db.execute("SELECT raw_bytes FROM blobs LIMIT 1").fetchone()
        return 0 if row is None else int(row[0])

    def touch(self, digests: Sequence[bytes], when: float) -> None:
        """Mark blobs used now (captured again, staged or loaded): they evict last."""
        with self._transaction():
            for chunk in _chunks(digests):
                marks = ",".join("?" * len(chunk))
                self._db.execute(
                    "UPDATE blobs SET last_used = ? WHERE digest IN (" + marks + ")",
                    (when, *chunk),
                )

    def eviction_candidates(self, limit: int) -> list[tuple[bytes, int]]:
        """Up to `limit` (digest, stored bytes) of unpinned blobs on this disk, least
        recently used first (the partial index `blobs_lru`: never walks windows' blobs)."""
        rows = self._db.execute(
            "SELECT digest, stored_bytes FROM blobs INDEXED BY blobs_lru WHERE pinned = 0 "
            "AND codec != 'redis' ORDER BY last_used LIMIT ?",
            (limit,),
        )
        return [(bytes(d), int(n)) for d, n in rows]

    def evict(self, digests: Sequence[bytes]) -> list[bytes]:
        """Drop the rows of these blobs if still unpinned; return those dropped (the caller
        deletes their files after this commit: a crash leaves only orphan files)."""
        dropped = []
        with self._transaction():
            for dig in digests:
                cur = self._db.execute(
                    "DELETE FROM blobs WHERE digest = ? AND pinned = 0 AND codec != 'redis'",
                    (dig,),
                )
                if cur.rowcount:
                    self._db.execute("DELETE FROM blocks WHERE digest = ?", (dig,))
                    dropped.append(dig)
        return dropped

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

    def blob_rows_from(self, after: int, batch: int) -> list[tuple[int, bytes, str]]:
        """(rowid, digest, codec) of up to `batch` blob rows after `after`, in write order."""
        rows = self._db.execute(
            "SELECT rowid, digest, codec FROM blobs WHERE rowid > ? ORDER BY rowid LIMIT ?",
            (after, batch),
        )
        return [(int(r), bytes(d), str(c)) for r, d, c in rows]

    def max_blob_rowid(self) -> int:
        """The largest blob rowid (0 when there is none)."""
        return int(self._db.execute("SELECT COALESCE(MAX(rowid), 0) FROM blobs").fetchone()[0])

    def meta(self, key: str, value: str | None = None) -> str | None:
        """A meta value; with `value`, write it first (one statement, autocommit)."""
        if value is not None:
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

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

    def _transaction(self) -> Transaction:
        return Transaction(self._db)


def _chunks(items: Sequence[bytes], size: int = MAX_SQL_VARS) -> Iterable[Sequence[bytes]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
