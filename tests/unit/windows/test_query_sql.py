"""`list` in SQL (issue 15): the same windows, fields and order as the Python rules it
replaced, on a catalog made today and on one migrated from the previous schema; the
summary columns stay true through every op; and the statements of list, status,
clone, delete, thaw and the engine lookup use indices (EXPLAIN QUERY PLAN)."""

from __future__ import annotations

import gc
import json
import random
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from test_windows import capture, make_service

from cwm_connector.engine.sessions import salt_digest
from cwm_connector.store import catalog_windows
from cwm_connector.store.catalog import Catalog
from cwm_connector.store.catalog_db import SCHEMA
from cwm_connector.windows.query import WindowQuery
from cwm_connector.windows.service import WindowService

TAGS = ["a", "b", "c", "exp", "x:1"]
WORDS = ["Plan", "plan", "ΣΟΦΊΑ", "alpha", "beta", "run 7", ""]


def old_describe(svc: WindowService, name: str) -> dict[str, Any]:
    """`WindowRecords.describe` before issue 15: every block, sizes and a stat per blob."""
    row, blocks = svc.records.catalog.get_window(name)  # type: ignore[misc]
    sizes = svc.records.catalog.blob_sizes([d for _, d in blocks])
    on_disk = all(svc.records.disk.contains(d) for d in dict.fromkeys(d for _, d in blocks))
    return {
        "name": row["name"],
        "salt": row["salt"],
        "session": salt_digest(str(row["salt"])),
        "tokens": row["num_tokens"],
        "blocks": len(blocks),
        "bytes": sum(sizes.get(d, (0, 0))[0] for _, d in blocks),
        "stored_bytes": sum(sizes.get(d, (0, 0))[1] for _, d in set(blocks)),
        "created": row["created"],
        "parent": row["parent"],
        "fingerprint": str(row["engine_fp"])[:16],
        "model": str(json.loads(str(row["fingerprint"])).get("model", "")),
        "description": str(row.get("description") or ""),
        "tags": json.loads(str(row.get("tags") or "[]")),
        "tiers": ["disk"] if on_disk else [],
    }


def random_store(tmp: Path, seed: int, count: int = 60) -> WindowService:
    """Windows with random tags, descriptions, sizes and ties in every sort key."""
    rng = random.Random(seed)
    svc = make_service(tmp)
    for s in range(6):  # sessions of 1 to 6 blocks; some blobs shared between them
        capture(svc, f"salt-{s}", list(range(32 * (s + 1) + 5)), seed=s % 3)
    for i in range(count):
        salt = f"salt-{rng.randrange(6)}"
        session = svc.records.sessions.get(salt)
        assert session is not None
        cut = rng.randrange(1, len(session.block_hashes) + 1)
        hashes = session.block_hashes[:cut]
        found = svc.records.catalog.digests_for_engine(svc.records.engine_fp_id, hashes)
        tags = rng.sample(TAGS, rng.randrange(len(TAGS) + 1))
        words = " ".join(rng.sample(WORDS, 2))
        name = f"{rng.choice(['w', 'W', 'run', 'plan'])}{i:03d}"
        row = svc.records.row(name, salt, list(session.token_ids[: cut * 32]), None, words, tags)
        row["created"] = 1000.0 + rng.randrange(10)  # ties in created
        svc.records.insert(row, [(h, found[h]) for h in hashes])
    return svc


def random_queries(rng: random.Random, count: int) -> list[dict[str, Any]]:
    queries: list[dict[str, Any]] = [{}]
    for _ in range(count):
        q: dict[str, Any] = {}
        if rng.random() < 0.4:
            q["tags"] = rng.sample([*TAGS, "none"], rng.randrange(1, 3))
        if rng.random() < 0.2:
            q["model"] = rng.choice(["tiny", "ti", "", "other"])
        if rng.random() < 0.3:
            salt = f"salt-{rng.randrange(7)}"
            q["session"] = salt if rng.random() < 0.5 else salt_digest(salt)
        if rng.random() < 0.3:
            q["search"] = rng.choice(["plan", "PLAN", "σοφία", "w0", "1 alpha", "n 7", "zzz"])
        q["sort_by"] = rng.choice(["name", "created", "tokens", "bytes"])
        q["sort_order"] = rng.choice(["asc", "desc"])
        if rng.random() < 0.7:
            q["limit"] = rng.randrange(0, 20)
        if rng.random() < 0.5:
            q["offset"] = rng.randrange(0, 40)
        queries.append(q)
    return queries


def assert_lists_match_python(svc: WindowService, seed: int) -> None:
    everything = [old_describe(svc, n) for n in svc.records.catalog.window_names()]
    assert svc.core.list() == WindowQuery.parse().apply(everything)  # every field, in order
    for query in random_queries(random.Random(seed), 150):
        want = [w["name"] for w in WindowQuery.parse(**query).apply(everything)]
        assert [w["name"] for w in svc.core.list(**query)] == want, query


@pytest.mark.parametrize(("seed", "rare_tag"), [(1, 2000), (2, 0)])
def test_sql_list_equals_the_python_rules(
    tmp_path: Path, seed: int, rare_tag: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # rare_tag 0: every tag is common, so tag filters walk the sort order (the other plan)
    monkeypatch.setattr(catalog_windows, "RARE_TAG", rare_tag)
    svc = random_store(tmp_path, seed)
    assert_lists_match_python(svc, seed)
    # a damaged blob (its rows dropped by the start-up check) and a clone: still equal
    victim = svc.core.list(limit=1)[0]["name"]
    _, blocks = svc.records.catalog.get_window(victim)  # type: ignore[misc]
    svc.records.catalog.forget_blob(blocks[0][1])
    svc.records.disk.delete(blocks[0][1])
    svc.core.clone(victim, "clone-1", tags=["exp"])
    assert_lists_match_python(svc, seed + 10)
    assert svc.records.catalog._db.execute(catalog_windows.DRIFT_SQL).fetchall() == []


def test_summaries_follow_blob_rows_and_deletes(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    digests = capture(svc, "s", list(range(100)))
    svc.core.freeze("s", "w", tags=["t"])
    svc.core.clone("w", "w2")
    cat = svc.records.catalog
    # A Redis-only mirror row of the first blob: off this disk, then written here again.
    cat.forget_blob(digests[0])
    cat.insert_window(
        cat.get_window("w")[0],  # type: ignore[index]
        cat.get_window("w")[1],  # type: ignore[index]
        replace=True,
        blob_rows=[(digests[0], 4096, 999, "redis")],
    )
    assert svc.core.status(name="w")["tiers"] == []
    assert svc.core.status(name="w")["stored_bytes"] == 2 * (4096 + 40) + 999
    fp = cat.engine_fp_ids(svc.records.engine_fp_id)[0]
    first = svc.records.sessions.get("s").block_hashes[0]  # type: ignore[union-attr]
    cat.add_blocks(fp, [(first, digests[0])], [(digests[0], 4096, 4096 + 40, "none")])  # again
    assert [w["tiers"] for w in svc.core.list()] == [["disk"], ["disk"]]
    assert cat._db.execute(catalog_windows.DRIFT_SQL).fetchall() == []
    assert svc.core.delete("w")["freed_bytes"] == 0  # w2 still pins every blob
    assert svc.core.list(tags=["t"])[0]["name"] == "w2"
    assert svc.core.delete("w2")["freed_bytes"] == 0  # the live session keeps its blocks
    svc.core.freeze("s", "w3")
    svc.records.sessions.record("s", [7] * 10, [])  # the session moved on: nothing is live
    assert svc.core.delete("w3") == {
        "name": "w3", "deleted": True, "freed_blobs": 3, "freed_bytes": 3 * (4096 + 40)
    }  # fmt: skip
    assert cat._db.execute("SELECT COUNT(*) FROM window_tags").fetchone()[0] == 0
    assert svc.core.stats()["store"]["windows"] == 0


OLD_WINDOW_COLUMNS = (  # the windows columns the schema before issue 15 added
    "description TEXT NOT NULL DEFAULT ''",
    "tags TEXT NOT NULL DEFAULT '[]'",
    "first_block INTEGER NOT NULL DEFAULT 0",
    "num_groups INTEGER NOT NULL DEFAULT 1",
)


def test_migration_fills_the_summaries_of_an_older_catalog(tmp_path: Path) -> None:
    made = random_store(tmp_path / "new", seed=3, count=30)
    made.records.catalog.close()
    source = sqlite3.connect(tmp_path / "new" / "catalog.sqlite")
    old = sqlite3.connect(tmp_path / "old.sqlite")  # the previous schema, rows as it wrote them
    old.executescript(SCHEMA)
    present = {r[1] for r in old.execute("PRAGMA table_info(windows)")}
    for column in OLD_WINDOW_COLUMNS:
        if column.split()[0] not in present:
            old.execute(f"ALTER TABLE windows ADD COLUMN {column}")
    old.execute("ALTER TABLE blobs ADD COLUMN last_used REAL NOT NULL DEFAULT 0")
    for table in ("meta", "fingerprints", "blobs", "blocks", "windows", "window_blocks"):
        columns = [r[1] for r in old.execute(f"PRAGMA table_info({table})")]
        rows = source.execute(f"SELECT {', '.join(columns)} FROM {table}").fetchall()
        marks = ",".join("?" * len(columns))
        insert = f"INSERT OR IGNORE INTO {table} ({', '.join(columns)}) VALUES ({marks})"
        old.executemany(insert, rows)
    old.commit()
    old.close()
    source.close()
    store = tmp_path / "migrated"
    store.mkdir()
    (tmp_path / "old.sqlite").rename(store / "catalog.sqlite")
    for folder in ("blobs",):
        (tmp_path / "new" / folder).rename(store / folder)
    Catalog(store / "catalog.sqlite").close()  # opening migrates
    svc = make_service(store)
    columns = {r[1] for r in svc.records.catalog._db.execute("PRAGMA table_info(windows)")}
    assert set(catalog_windows.SUMMARY_COLUMNS) <= columns
    assert svc.records.catalog._db.execute(catalog_windows.DRIFT_SQL).fetchall() == []
    assert svc.records.catalog._db.execute("SELECT COUNT(*) FROM window_tags").fetchone()[0] > 0
    assert_lists_match_python(svc, seed=4)


# -- every statement on these paths uses an index -----------------------------------
TABLES = r"(windows|window_blocks|window_tags|blobs|blocks)"
FULL_SCAN = re.compile(rf"^SCAN {TABLES}\b(?! USING (COVERING )?INDEX)")


def plans(db: sqlite3.Connection, statement: str, params: tuple[Any, ...] = ()) -> list[str]:
    return [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + statement, params)]


def trigger_bodies(db: sqlite3.Connection) -> list[str]:
    """The statements inside every trigger, NEW/OLD columns made parameters."""
    out = []
    for (sql,) in db.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger'"):
        body = sql[sql.index("BEGIN") + len("BEGIN") : sql.rindex("END")]
        out += [re.sub(r"\b(NEW|OLD)\.\w+", "?", s) for s in body.split(";") if s.strip()]
    return out


def test_control_paths_use_indices(tmp_path: Path) -> None:
    svc = random_store(tmp_path, seed=5, count=20)
    capture(svc, "fz", list(range(300, 400)), seed=7)
    cat = svc.records.catalog
    first = svc.core.list(limit=1)[0]["name"]
    traced: list[str] = []
    cat._db.set_trace_callback(traced.append)
    engine = svc.records.engine_fp_id
    ops = {
        "list": lambda: svc.core.list(limit=5),
        "list by tokens": lambda: svc.core.list(sort_by="tokens", sort_order="desc", limit=5),
        "list by created": lambda: svc.core.list(sort_by="created", limit=5),
        "list by bytes": lambda: svc.core.list(sort_by="bytes", limit=5),
        "list by session": lambda: svc.core.list(session="salt-1"),
        "list by tag": lambda: svc.core.list(tags=["a", "b"], limit=5),
        "status": lambda: svc.core.status(name=first),
        "freeze": lambda: svc.core.freeze("fz", "frozen"),
        "clone": lambda: svc.core.clone("frozen", "cloned", salt="other"),
        "thaw": lambda: svc.core.thaw("cloned"),
        "delete": lambda: svc.core.delete("frozen"),
        "count": svc.core._count_windows,
        "lookup": lambda: cat.digests_for_engine(engine, [bytes([i]) * 32 for i in range(128)]),
        "lookup fp": lambda: cat.digests_for(cat.engine_fp_ids(engine)[0], [b"x" * 32] * 128),
    }
    seen = 0
    for op, run in ops.items():
        traced.clear()
        run()
        for statement in traced:
            if statement.startswith(("BEGIN", "COMMIT", "--")):
                continue
            seen += 1
            plan = plans(cat._db, statement)
            assert not [p for p in plan if FULL_SCAN.match(p)], (op, statement, plan)
            if op.startswith("list") and op != "list by tag" and statement.startswith("SELECT"):
                assert "USE TEMP B-TREE FOR ORDER BY" not in plan, (op, statement, plan)
    assert seen > 30
    cat._db.set_trace_callback(None)
    for statement in trigger_bodies(cat._db):  # what inserts and deletes run beside
        params = (None,) * statement.count("?")
        plan = plans(cat._db, statement, params)
        assert not [p for p in plan if FULL_SCAN.match(p)], (statement, plan)


def test_ops_leave_wal_checkpoints_to_a_thread_that_ends_with_them(tmp_path: Path) -> None:

    svc = make_service(tmp_path)
    capture(svc, "s", list(range(100)))
    svc.core.freeze("s", "w")
    db = svc.records.catalog._db
    assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0  # no op pays for one
    thread = svc.records._checkpointer._thread  # type: ignore[union-attr]
    assert thread.is_alive()
    del svc, db
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()
