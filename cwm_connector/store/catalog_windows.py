"""Window listing in SQL: the summary columns a window keeps, their triggers, and pages.

A window row carries what `describe` and `list` need (blocks, bytes, stored bytes,
the session digest, the model, how many of its blobs are not on this disk) and its
tags sit in `window_tags`, so a page of a listing reads its own rows through
indices and never a window's blocks: it costs the same at 1,000 and 100,000
windows (issue 15). The sums are computed once when the window is inserted
(`SUMMARY_SQL`) and kept true by triggers when one of its blob rows changes
(a Redis-only mirror written to this disk, a damaged blob dropped by the check).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import xxhash

# The window columns issue 15 adds (catalog_db.WINDOW_COLUMNS_ADDED takes them).
SUMMARY_COLUMNS = {
    "num_blocks": "INTEGER NOT NULL DEFAULT 0",  # window_blocks rows (every group's)
    "num_bytes": "INTEGER NOT NULL DEFAULT 0",  # raw bytes of every block
    "stored_bytes": "INTEGER NOT NULL DEFAULT 0",  # stored bytes of each distinct block
    "off_disk": "INTEGER NOT NULL DEFAULT 0",  # distinct blobs with no row on this disk
    "session": "TEXT NOT NULL DEFAULT ''",  # the salt's digest (salt_digest)
    "model": "TEXT NOT NULL DEFAULT ''",  # the fingerprint's model
}

# Recompute one window's sums from its blocks (at insert, and when migrating).
SUMMARY_SQL = """
UPDATE windows SET
    num_blocks = (SELECT COUNT(*) FROM window_blocks WHERE name = :name),
    num_bytes = (SELECT COALESCE(SUM(b.raw_bytes), 0) FROM window_blocks w
        JOIN blobs b ON b.digest = w.digest WHERE w.name = :name),
    stored_bytes = (SELECT COALESCE(SUM(b.stored_bytes), 0) FROM
        (SELECT DISTINCT block_hash, digest FROM window_blocks WHERE name = :name) w
        JOIN blobs b ON b.digest = w.digest),
    off_disk = (SELECT COUNT(*) FROM (SELECT DISTINCT digest FROM window_blocks
        WHERE name = :name) w LEFT JOIN blobs b ON b.digest = w.digest
        WHERE b.digest IS NULL OR b.codec = 'redis')
WHERE name = :name
"""

# How many of a window's blocks name a digest: all of them (bytes), distinct hashes (stored).
_USES = "(SELECT COUNT(*) FROM window_blocks w WHERE w.name = windows.name AND w.digest = {d})"
_HASHES = (
    "(SELECT COUNT(DISTINCT block_hash) FROM window_blocks w "
    "WHERE w.name = windows.name AND w.digest = {d})"
)
_NAMING = "name IN (SELECT name FROM window_blocks WHERE digest = {d})"


def _blob_trigger(event: str, sign: str, row: str) -> str:
    """A blob row appears or goes: the windows naming it gain or lose its bytes."""
    return f"""
CREATE TRIGGER IF NOT EXISTS windows_blob_{event.lower()} AFTER {event} ON blobs BEGIN
    UPDATE windows SET
        num_bytes = num_bytes {sign} {row}.raw_bytes * {_USES.format(d=row + ".digest")},
        stored_bytes = stored_bytes {sign} {row}.stored_bytes * {_HASHES.format(d=row + ".digest")},
        off_disk = off_disk {"-" if sign == "+" else "+"} ({row}.codec != 'redis')
    WHERE {_NAMING.format(d=row + ".digest")};
END;"""


# Kept true whatever code path writes the rows (created after the migration adds columns).
INDEXES = f"""
CREATE INDEX IF NOT EXISTS windows_created ON windows (created, name);
CREATE INDEX IF NOT EXISTS windows_tokens ON windows (num_tokens, name);
CREATE INDEX IF NOT EXISTS windows_bytes ON windows (num_bytes, name);
CREATE INDEX IF NOT EXISTS windows_session ON windows (session, name);
CREATE INDEX IF NOT EXISTS window_tags_tag ON window_tags (tag, name);
CREATE TRIGGER IF NOT EXISTS window_tags_insert AFTER INSERT ON windows BEGIN
    INSERT OR IGNORE INTO window_tags (name, tag) SELECT NEW.name, value FROM json_each(NEW.tags);
END;
CREATE TRIGGER IF NOT EXISTS window_tags_update AFTER UPDATE OF tags ON windows BEGIN
    DELETE FROM window_tags WHERE name = OLD.name;
    INSERT OR IGNORE INTO window_tags (name, tag) SELECT NEW.name, value FROM json_each(NEW.tags);
END;
CREATE TRIGGER IF NOT EXISTS window_tags_delete AFTER DELETE ON windows BEGIN
    DELETE FROM window_tags WHERE name = OLD.name;
END;
{_blob_trigger("INSERT", "+", "NEW")}
{_blob_trigger("DELETE", "-", "OLD")}
CREATE TRIGGER IF NOT EXISTS windows_blob_update AFTER UPDATE OF codec, stored_bytes ON blobs
BEGIN
    UPDATE windows SET
        stored_bytes = stored_bytes + (NEW.stored_bytes - OLD.stored_bytes)
            * {_HASHES.format(d="NEW.digest")},
        off_disk = off_disk + (NEW.codec = 'redis') - (OLD.codec = 'redis')
    WHERE {_NAMING.format(d="NEW.digest")};
END;
"""
INDEX_NAMES = (
    "windows_created",
    "windows_tokens",
    "windows_bytes",
    "windows_session",
    "window_tags_tag",
    "window_tags_insert",
    "window_tags_update",
    "window_tags_delete",
    "windows_blob_insert",
    "windows_blob_delete",
    "windows_blob_update",
)
TAGS_TABLE = (
    "CREATE TABLE IF NOT EXISTS window_tags (name TEXT NOT NULL, tag TEXT NOT NULL, "
    "PRIMARY KEY (name, tag)) WITHOUT ROWID"
)

# What a listed window is described from (never its token ids or its blocks).
LISTED = (
    "name, salt, session, num_tokens, num_blocks, num_bytes, stored_bytes, created, parent, "
    "engine_fp, model, description, tags, off_disk"
)
SORT_COLUMNS = {"name": "name", "created": "created", "tokens": "num_tokens", "bytes": "num_bytes"}
# A tag held by fewer windows than this drives the page from window_tags (then sorted);
# a commoner one walks the sort order and checks each row (about page_end * N / count rows).
RARE_TAG = 2000
MAX_NAMES = 500  # names per IN (...) query
HAS_TAG = "EXISTS (SELECT 1 FROM window_tags g WHERE g.name = windows.name AND g.tag = ?)"


def salt_digest(salt: str) -> str:
    """The session handle of a salt: the same function as engine.sessions.salt_digest."""
    return xxhash.xxh3_64_hexdigest(salt.encode())


def model_of(fingerprint: str) -> str:
    """The model a window's fingerprint names (as `describe` printed it)."""
    return str(json.loads(fingerprint).get("model", ""))


def fill_summaries(conn: sqlite3.Connection) -> None:
    """Fill the summary columns and tags of a catalog made before them (a migration)."""
    conn.execute(TAGS_TABLE)
    rows = conn.execute("SELECT name, salt, fingerprint FROM windows").fetchall()
    for name, salt, fingerprint in rows:
        conn.execute(
            "UPDATE windows SET session = ?, model = ? WHERE name = ?",
            (salt_digest(str(salt)), model_of(str(fingerprint)), name),
        )
        conn.execute(SUMMARY_SQL, {"name": name})
    conn.execute(
        "INSERT OR IGNORE INTO window_tags (name, tag) "
        "SELECT windows.name, value FROM windows, json_each(windows.tags)"
    )


@dataclass(frozen=True, slots=True)
class PageSpec:
    """One page of a listing, in catalog terms (windows/query.py builds it)."""

    tags: tuple[str, ...] = ()
    model: str | None = None
    sessions: tuple[str, ...] = ()  # session digests to match (empty: any)
    search: str | None = None  # lower-cased already
    sort_by: str = "name"
    descending: bool = False
    limit: int | None = None
    offset: int = 0


def page_sql(spec: PageSpec, rare_tag: str | None = None) -> tuple[str, list[object]]:
    """The SELECT of one page; `rare_tag` (if any) drives it from window_tags."""
    where: list[str] = []
    params: list[object] = []
    source = "windows"
    if rare_tag is not None:
        source = "window_tags t CROSS JOIN windows ON windows.name = t.name"
        where.append("t.tag = ?")
        params.append(rare_tag)
    for tag in dict.fromkeys(spec.tags):
        if tag != rare_tag:
            where.append(HAS_TAG)
            params.append(tag)
    if len(spec.sessions) == 1:  # walks windows_session in name order: no sort
        where.append("session = ?")
        params += spec.sessions
    elif spec.sessions:
        where.append(f"session IN ({','.join('?' * len(spec.sessions))})")
        params += spec.sessions
    if spec.model is not None:
        where.append("instr(model, ?) > 0")
        params.append(spec.model)
    if spec.search:
        # Python's lower() (registered per connection): SQLite's lower() is ASCII only.
        where.append("instr(cwm_lower(windows.name || ' ' || description), ?) > 0")
        params.append(spec.search)
    column = SORT_COLUMNS[spec.sort_by]
    order = "DESC" if spec.descending else "ASC"
    sql = f"SELECT {', '.join('windows.' + c.strip() for c in LISTED.split(','))} FROM {source}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    by_name = f"windows.name {order}"
    sql += f" ORDER BY {by_name}" if column == "name" else f" ORDER BY {column} {order}, {by_name}"
    sql += " LIMIT ? OFFSET ?"
    params += [-1 if spec.limit is None else spec.limit, spec.offset]
    return sql, params


def rarest_tag(conn: sqlite3.Connection, tags: Sequence[str]) -> str | None:
    """The given tag held by the fewest windows, if fewer than RARE_TAG (counts are bounded)."""
    best: tuple[int, str] | None = None
    for tag in dict.fromkeys(tags):
        count = conn.execute(
            "SELECT COUNT(*) FROM (SELECT 1 FROM window_tags WHERE tag = ? LIMIT ?)",
            (tag, RARE_TAG),
        ).fetchone()[0]
        if count < RARE_TAG and (best is None or count < best[0]):
            best = (count, tag)
    return None if best is None else best[1]


def list_page(conn: sqlite3.Connection, spec: PageSpec) -> list[dict[str, object]]:
    """The rows of one page of windows (columns LISTED), filtered, sorted and paged."""
    conn.create_function("cwm_lower", 1, _lower, deterministic=True)
    if spec.sessions:  # a salt and its digest: keep the one that names windows
        spec = replace(spec, sessions=tuple(s for s in dict.fromkeys(spec.sessions) if conn.execute(
            "SELECT 1 FROM windows WHERE session = ? LIMIT 1", (s,)).fetchone()))  # fmt: skip
        if not spec.sessions:
            return []
    sql, params = page_sql(spec, rarest_tag(conn, spec.tags) if spec.tags else None)
    cur = conn.execute(sql, params)
    keys = [c[0] for c in cur.description]
    return [dict(zip(keys, row, strict=True)) for row in cur]


def summary(conn: sqlite3.Connection, name: str) -> dict[str, object] | None:
    """One window's listed columns, or None."""
    cur = conn.execute(f"SELECT {LISTED} FROM windows WHERE name = ?", (name,))
    found = cur.fetchone()
    return None if found is None else dict(zip([c[0] for c in cur.description], found, strict=True))


def known(conn: sqlite3.Connection, names: Sequence[str]) -> set[str]:
    """Those of `names` that have a window row."""
    out: set[str] = set()
    for start in range(0, len(names), MAX_NAMES):
        chunk = names[start : start + MAX_NAMES]
        marks = ",".join("?" * len(chunk))
        out.update(
            r[0] for r in conn.execute(f"SELECT name FROM windows WHERE name IN ({marks})", chunk)
        )
    return out


def remove_rows(
    conn: sqlite3.Connection, name: str, keep: Callable[[bytes], bool]
) -> tuple[list[bytes], int] | None:
    """Delete a window's rows and those of the blobs it alone pinned (inside the caller's
    transaction): (their digests, their stored bytes), or None if there is no such window."""
    digests = [
        r[0]
        for r in conn.execute("SELECT DISTINCT digest FROM window_blocks WHERE name = ?", (name,))
    ]
    if conn.execute("DELETE FROM windows WHERE name = ?", (name,)).rowcount == 0:
        return None
    conn.execute("DELETE FROM window_blocks WHERE name = ?", (name,))
    orphans: list[bytes] = []
    freed = 0
    for dig in digests:
        pinned = conn.execute("SELECT 1 FROM window_blocks WHERE digest = ? LIMIT 1", (dig,))
        if pinned.fetchone() is not None or keep(dig):
            continue
        size = conn.execute("SELECT stored_bytes FROM blobs WHERE digest = ?", (dig,)).fetchone()
        conn.execute("DELETE FROM blocks WHERE digest = ?", (dig,))
        conn.execute("DELETE FROM blobs WHERE digest = ?", (dig,))
        orphans.append(dig)  # unpinned: rows gone; the caller deletes the file after commit
        freed += 0 if size is None else int(size[0])
    return orphans, freed


def held(conn: sqlite3.Connection, engine_fp: str, live: set[bytes], digest: bytes) -> bool:
    """Whether one of the `live` block hashes names this blob under the engine's fingerprints."""
    if not live:
        return False
    rows = conn.execute(
        "SELECT block_hash FROM blocks WHERE digest = ? "
        "AND fp_id IN (SELECT fp_id FROM fingerprints WHERE engine_fp = ?)",
        (digest, engine_fp),
    )
    return any(bytes(r[0]) in live for r in rows)


def _lower(text: str | None) -> str:
    return "" if text is None else text.lower()


# A consistency check: stored sums that differ from a recount (a full scan; tests use it).
DRIFT_SQL = """
SELECT name FROM windows WHERE
    num_blocks != (SELECT COUNT(*) FROM window_blocks w WHERE w.name = windows.name)
    OR num_bytes != (SELECT COALESCE(SUM(b.raw_bytes), 0) FROM window_blocks w
        JOIN blobs b ON b.digest = w.digest WHERE w.name = windows.name)
    OR stored_bytes != (SELECT COALESCE(SUM(b.stored_bytes), 0) FROM
        (SELECT DISTINCT block_hash, digest FROM window_blocks w WHERE w.name = windows.name) x
        JOIN blobs b ON b.digest = x.digest)
    OR off_disk != (SELECT COUNT(*) FROM (SELECT DISTINCT digest FROM window_blocks w
        WHERE w.name = windows.name) x LEFT JOIN blobs b ON b.digest = x.digest
        WHERE b.digest IS NULL OR b.codec = 'redis')
    OR (SELECT COUNT(*) FROM window_tags t WHERE t.name = windows.name)
        != (SELECT COUNT(DISTINCT value) FROM json_each(windows.tags))
ORDER BY name
"""
