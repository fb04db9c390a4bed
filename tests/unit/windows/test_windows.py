"""Window ops on a real catalog and disk tier, without vLLM running."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cwm_connector.engine.fingerprint import fingerprint_id
from cwm_connector.engine.hash_chain import block_hash_chain
from cwm_connector.engine.sessions import SessionTable, salt_digest
from cwm_connector.errors import CwmError
from cwm_connector.store.blob import digest
from cwm_connector.store.catalog import Catalog
from cwm_connector.windows.args import validate_name
from cwm_connector.windows.service import WindowService

BS = 32
ENGINE = {"model": "tiny", "dtype": "bfloat16", "block_size": BS}


def make_service(store: Path, engine: dict[str, Any] | None = None) -> WindowService:
    engine = engine or ENGINE
    engine_id = fingerprint_id(engine)
    Catalog(store / "catalog.sqlite").register_fingerprint("fp-" + engine_id, engine_id, "{}")
    return WindowService(
        store_dir=store,
        engine_fp=engine,
        engine_fp_id=engine_id,
        block_size=BS,
        hash_algo="sha256",
        sessions=SessionTable(),
        detokenize=lambda ids: " ".join(map(str, ids)),
        stats=lambda: {"scheduler": {}, "worker": {}},
        freeze_timeout_s=1.0,
    )


def capture(svc: WindowService, salt: str, token_ids: list[int], seed: int = 0) -> list[bytes]:
    """What the worker does at request end: blobs + block rows; and the session entry."""
    hashes = block_hash_chain(token_ids, BS, salt, "sha256")
    rng = np.random.default_rng(seed)
    fp = svc.records.catalog.engine_fp_ids(svc.records.engine_fp_id)[0]
    rows, blobs = [], []
    for h in hashes:
        raw = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
        dig = digest(raw)
        stored = svc.records.disk.put(dig, [raw])
        rows.append((h, dig))
        blobs.append((dig, len(raw), stored, "none"))
    svc.records.catalog.add_blocks(fp, rows, blobs)
    svc.records.sessions.record(salt, token_ids, hashes)
    return [d for _, d in rows]


@pytest.mark.parametrize(
    "name", ["", "../x", "a/b", "x\x00y", ".hidden", "-flag", "a" * 129, 7, None, "a b"]
)
def test_hostile_names_are_refused(name: object) -> None:
    with pytest.raises(CwmError) as err:
        validate_name(name)
    assert err.value.code == "bad_name"


def test_freeze_thaw_status_list(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    tokens = list(range(100))
    capture(svc, "salt-1", tokens)
    with pytest.raises(CwmError) as err:
        svc.core.freeze("nobody", "w1")
    assert err.value.code == "unknown_session"
    win = svc.core.freeze("salt-1", "w1")
    assert (win["tokens"], win["blocks"], win["bytes"]) == (100, 3, 3 * 4096)
    with pytest.raises(CwmError) as err:
        svc.core.freeze("salt-1", "w1")
    assert err.value.code == "window_exists"
    thawed = svc.core.thaw("w1")
    assert thawed["token_ids"] == tokens and thawed["salt"] == "salt-1"
    assert svc.core.status("w1")["complete"] is True
    assert [w["name"] for w in svc.core.list()] == ["w1"]


def test_freeze_waits_for_durability_then_times_out(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    tokens = list(range(64))
    svc.records.sessions.record("s", tokens, block_hash_chain(tokens, BS, "s", "sha256"))
    with pytest.raises(CwmError) as err:
        svc.core.freeze("s", "w")
    assert err.value.code == "not_durable" and err.value.retryable


def test_thaw_refuses_other_engine_and_names_fields(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    capture(svc, "s", list(range(70)))
    svc.core.freeze("s", "w")
    other = make_service(tmp_path, {**ENGINE, "dtype": "float16"})
    with pytest.raises(CwmError) as err:
        other.core.thaw("w")
    assert err.value.code == "fingerprint_mismatch" and "dtype" in err.value.message


class RecordingStager:
    """A worker channel that records what it was asked to stage (nothing is staged)."""

    def __init__(self) -> None:
        self.asked: list[list[bytes]] = []

    def prestage(self, hashes: list[bytes]) -> dict[str, object]:
        self.asked.append(list(hashes))
        return {"staged": len(hashes), "failed": []}

    def resident(self, hashes: list[bytes]) -> int:
        return 0


def test_thaw_refuses_a_changed_hash_probe_and_promises_nothing(tmp_path: Path) -> None:
    # Issue 14: a vLLM whose block hashing changed gives another probe; the catalog's
    # engine id ignores the probe and the vLLM version, so old windows stay reachable.
    svc = make_service(tmp_path, {**ENGINE, "hash_probe": "p1", "vllm_version": "0.32.0"})
    capture(svc, "s", list(range(70)))
    svc.core.freeze("s", "w")
    patch = make_service(tmp_path, {**ENGINE, "hash_probe": "p1", "vllm_version": "0.32.1"})
    assert patch.core.thaw("w")["blocks"] == 2  # a patch release with the same hashes
    changed = make_service(tmp_path, {**ENGINE, "hash_probe": "p2", "vllm_version": "0.33.0"})
    changed.core.channels = stager = RecordingStager()
    with pytest.raises(CwmError) as err:
        changed.core.thaw("w")
    assert err.value.code == "fingerprint_mismatch" and "hash_probe" in err.value.message
    assert "vllm_version" not in err.value.message and stager.asked == []
    # A window frozen before probes existed is checked by the other fields only.
    old = make_service(tmp_path / "old")
    capture(old, "s", list(range(70)))
    old.core.freeze("s", "w")
    probed = make_service(tmp_path / "old", {**ENGINE, "hash_probe": "p3"})
    assert probed.core.thaw("w")["blocks"] == 2


def test_corrupt_blob_makes_window_damaged(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    digests = capture(svc, "s", list(range(70)))
    svc.core.freeze("s", "w")
    path = svc.records.disk.path_for(digests[1])
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))
    assert svc.core.status("w")["damaged_blobs"] == 1
    with pytest.raises(CwmError) as err:
        svc.core.thaw("w")
    assert err.value.code == "window_damaged"


def test_clone_with_new_salt_rekeys_without_copying(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    tokens = list(range(96))
    capture(svc, "s", tokens)
    svc.core.freeze("s", "w")
    files_before = sorted(p.name for p in (tmp_path / "blobs").rglob("*.blob"))
    clone = svc.core.clone("w", "w2", salt="new-salt")
    assert clone["salt"] == "new-salt" and clone["blocks"] == 3
    assert sorted(p.name for p in (tmp_path / "blobs").rglob("*.blob")) == files_before
    new_hashes = block_hash_chain(tokens, BS, "new-salt", "sha256")
    assert len(svc.records.catalog.digests_for_engine(svc.records.engine_fp_id, new_hashes)) == 3


def test_delete_frees_unshared_blobs_and_keeps_shared(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    capture(svc, "s", list(range(96)))
    svc.core.freeze("s", "w")
    svc.core.clone("w", "w-copy")  # shares every blob
    capture(svc, "t", list(range(500, 564)), seed=9)
    svc.core.freeze("t", "other")
    svc.records.sessions.record("s", [7] * 10, [])  # session s moved on: its blocks are not live
    assert svc.core.delete("w")["freed_bytes"] == 0  # still pinned by w-copy
    result = svc.core.delete("w-copy")
    assert result["freed_blobs"] == 3 and result["freed_bytes"] == 3 * (4096 + 40)
    assert len(list((tmp_path / "blobs").rglob("*.blob"))) == 2
    assert svc.core.status("other")["complete"] is True
    with pytest.raises(CwmError) as err:
        svc.core.delete("w")
    assert err.value.code == "window_not_found"


def test_export_import_round_trip_and_refusals(tmp_path: Path) -> None:
    src = make_service(tmp_path / "a")
    tokens = list(range(80))
    digests = capture(src, "s", tokens)
    src.core.freeze("s", "w")
    out = tmp_path / "w.cwm"
    src.transfer.export("w", str(out))
    dst = make_service(tmp_path / "b")
    win = dst.transfer.import_(str(out), name="restored")
    assert win["blocks"] == 2 and dst.core.thaw("restored")["token_ids"] == tokens
    assert all(dst.records.disk.contains(d) for d in digests)
    # A manifest whose hashes belong to another salt is refused.
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    with safe_open(str(out), framework="np") as fh:
        manifest = json.loads(fh.metadata()["cwm"])
    manifest["salt"] = "victim-salt"
    forged = tmp_path / "forged.cwm"
    save_file(load_file(str(out)), str(forged), metadata={"cwm": json.dumps(manifest)})
    with pytest.raises(CwmError) as err:
        dst.transfer.import_(str(forged), name="forged")
    assert err.value.code == "bad_import"
    garbage = tmp_path / "garbage.cwm"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(CwmError) as err:
        dst.transfer.import_(str(garbage))
    assert err.value.code == "bad_import"
    other = make_service(tmp_path / "c", {**ENGINE, "model": "another"})
    with pytest.raises(CwmError) as err:
        other.transfer.import_(str(out))
    assert err.value.code == "fingerprint_mismatch" and "model" in err.value.message


def test_long_ops_report_progress_through_handle(tmp_path: Path) -> None:
    src = make_service(tmp_path / "a")
    capture(src, "s", list(range(200)))  # 6 full blocks
    seen: dict[str, list[tuple[int, int]]] = {"freeze": [], "export": [], "import": []}
    src.handle("freeze", {"salt": "s", "name": "w"}, lambda d, t: seen["freeze"].append((d, t)))
    out = str(tmp_path / "w.cwm")
    src.handle("export", {"name": "w", "file": out}, lambda d, t: seen["export"].append((d, t)))
    dst = make_service(tmp_path / "b")
    dst.handle("import", {"file": out}, lambda d, t: seen["import"].append((d, t)))
    assert seen["freeze"][-1] == (6, 6)
    assert seen["export"] == [(i, 6) for i in range(1, 7)]
    assert seen["import"] == [(i, 12) for i in range(1, 13)]
    with pytest.raises(CwmError) as err:  # the callback slot cannot be filled by a client
        src.handle("export", {"name": "w", "file": out, "_progress": 1})
    assert err.value.code == "bad_request"


def test_descriptions_tags_lineage_filters_and_sessions(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    capture(svc, "s1", list(range(100)))
    capture(svc, "s2", list(range(100, 200)), seed=1)
    svc.core.freeze("s1", "w1", description="The first run", tags=["exp", "a"])
    svc.core.freeze(salt_digest("s2"), "w2", tags=["exp"])  # a session digest works as well
    svc.core.clone("w1", "w1b")
    svc.core.clone("w1b", "w1c", description="branch", tags=["b"])
    assert svc.core.status(name="w1b")["tags"] == ["a", "exp"]  # a clone keeps its source's
    assert svc.core.status(name="w1c")["lineage"] == {"parent": "w1b", "root": "w1", "depth": 2}
    assert svc.core.status(name="w1")["lineage"] == {"parent": None, "root": "w1", "depth": 0}
    assert "cache_stats" in svc.core.status(name="w1", include_cache_stats=True)
    assert [w["name"] for w in svc.core.list(tags=["exp"])] == ["w1", "w1b", "w2"]
    assert [w["name"] for w in svc.core.list(search="first")] == ["w1", "w1b"]  # inherited
    assert [w["name"] for w in svc.core.list(session="s2")] == ["w2"]
    assert [w["name"] for w in svc.core.list(sort_by="created", sort_order="desc", limit=1)] == [
        "w1c"
    ]
    with pytest.raises(CwmError) as err:
        svc.core.freeze("s1", "w9", tags=["no spaces"])
    assert err.value.code == "bad_tag"
    listed = svc.admin.sessions_list()
    assert {s["session"] for s in listed} == {salt_digest("s1"), salt_digest("s2")}
    assert all("salt" not in s for s in listed)  # salts are secrets: only when asked
    assert {s["salt"] for s in svc.admin.sessions_list(reveal=True)} == {"s1", "s2"}
    by_session = svc.core.status(session="s1")
    assert by_session["tokens"] == 100 and by_session["windows"] == ["w1", "w1b", "w1c"]
    with pytest.raises(CwmError):
        svc.core.status(name="w1", session="s1")


def test_thaw_under_a_new_salt_rekeys_without_copying(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    tokens = list(range(100))
    capture(svc, "s1", tokens)
    svc.core.freeze("s1", "w1")
    blobs_before = svc.records.catalog.totals()["blobs"]
    thawed = svc.core.thaw("w1", new_salt="other")
    assert thawed["salt"] == "other" and thawed["token_ids"] == tokens
    assert (
        thawed["name"] != "w1" and svc.core.status(name=thawed["name"])["lineage"]["parent"] == "w1"
    )
    expected = block_hash_chain(tokens, BS, "other", "sha256")[: thawed["blocks"]]
    fp = svc.records.catalog.engine_fp_ids(svc.records.engine_fp_id)[0]
    assert set(svc.records.catalog.digests_for(fp, expected)) == set(expected)  # the new salt hits
    assert svc.records.catalog.totals()["blobs"] == blobs_before
    assert svc.core.thaw("w1", new_salt="other")["name"] == thawed["name"]  # made once, reused


def test_health_metrics_text_and_catalog_migration(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    health = svc.admin.health()
    assert health["components"]["disk"]["writable"] is True
    assert health["components"]["redis"] == {"ok": True, "configured": False}
    assert health["ok"] is (health["components"]["disk"]["free_bytes"] >= 1 << 30)
    assert "# TYPE cwm:loaded_blocks_total counter" in svc.admin.prometheus()["text"]
    old = tmp_path / "old"
    old.mkdir()
    import sqlite3

    db = sqlite3.connect(old / "catalog.sqlite")  # a catalog made before issue 8's columns
    db.execute(
        "CREATE TABLE windows (name TEXT PRIMARY KEY, salt TEXT NOT NULL, engine_fp TEXT NOT "
        "NULL, fingerprint TEXT NOT NULL, token_ids BLOB NOT NULL, num_tokens INTEGER NOT NULL, "
        "created REAL NOT NULL, parent TEXT)"
    )
    db.commit()
    db.close()
    migrated = Catalog(old / "catalog.sqlite")
    columns = {row[1] for row in migrated._db.execute("PRAGMA table_info(windows)")}
    assert {"description", "tags", "first_block"} <= columns


def test_auto_freeze_ops_trigger_and_keep_last(tmp_path: Path) -> None:
    from cwm_connector.engine.auto_freeze import AutoFreezePolicy, AutoFreezer

    svc = make_service(tmp_path)
    svc.admin.auto = AutoFreezer(AutoFreezePolicy(), max_model_len=4096)
    with pytest.raises(CwmError):
        svc.admin.auto_freeze_config(update={"threshold_tokens": -5})
    policy = svc.admin.auto_freeze_config(update={"threshold_tokens": 64, "keep_last": 2,
                                            "cooldown_s": 0})  # fmt: skip
    assert policy["enabled"] is True and policy["threshold_tokens"] == 64
    capture(svc, "s1", list(range(100)))
    check = svc.admin.auto_freeze_check(salt_digest("s1"))
    assert check["would_freeze"] is True and check["window"] is None and check["tokens"] == 100
    assert svc.admin.auto_freeze_check("s1", tokens=10)["would_freeze"] is False
    names = [svc.admin.auto_freeze_check("s1", trigger=True)["window"]["name"] for _ in range(3)]
    kept = [w["name"] for w in svc.core.list(tags=["auto"])]
    assert len(set(names)) == 3 and sorted(kept) == sorted(names[1:])  # keep_last = 2


def test_delete_keeps_what_a_live_session_needs_for_its_next_freeze(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    digests = capture(svc, "s", list(range(96)))
    svc.core.freeze("s", "w1")
    assert svc.core.delete("w1")["freed_blobs"] == 0  # session s still holds these blocks
    assert all(svc.records.disk.contains(d) for d in digests)
    assert svc.core.freeze("s", "w2")["blocks"] == 3  # durable at once: nothing to recapture
    svc.records.sessions.record("s", [1, 2, 3], [])  # the session moved on
    assert svc.core.delete("w2")["freed_blobs"] == 3
    assert not any(svc.records.disk.contains(d) for d in digests)


def test_freeze_fails_fast_when_the_capture_failed(tmp_path: Path) -> None:
    import time

    svc = make_service(tmp_path)
    svc.core.freeze_timeout_s = 30.0
    hashes = block_hash_chain(list(range(96)), BS, "s", "sha256")
    svc.records.sessions.record("s", list(range(96)), hashes)  # finished, but nothing was stored
    svc.core._failed_captures = lambda wanted: len(wanted)
    started = time.monotonic()
    with pytest.raises(CwmError) as err:
        svc.core.freeze("s", "w")
    assert err.value.code == "capture_failed" and err.value.retryable
    assert time.monotonic() - started < 5  # not the 30 s durability timeout
    assert svc.records.catalog.get_window("w") is None


def test_freeze_of_evicted_blocks_fails_at_once_unless_a_capture_runs(tmp_path: Path) -> None:
    import time

    svc = make_service(tmp_path)
    svc.core.freeze_timeout_s = 30.0
    hashes = block_hash_chain(list(range(96)), BS, "s", "sha256")
    svc.records.sessions.record("s", list(range(96)), hashes)  # its blocks left the store
    running = {hashes[2]}
    svc.core._in_flight = lambda wanted: sum(1 for h in wanted if h in running)
    svc.core.freeze_timeout_s = 0.5  # a capture in flight is waited for (here: in vain)
    with pytest.raises(CwmError) as err:
        svc.core.freeze("s", "w")
    assert "not durable after" in err.value.message
    running.clear()  # nothing will bring them back: refused at once
    svc.core.freeze_timeout_s = 30.0
    started = time.monotonic()
    with pytest.raises(CwmError) as err:
        svc.core.freeze("s", "w")
    assert err.value.code == "not_durable" and "no longer in the store" in err.value.message
    assert time.monotonic() - started < 5 and svc.records.catalog.get_window("w") is None


def test_sliding_window_session_freezes_clones_and_travels_from_its_first_block(
    tmp_path: Path,
) -> None:
    # A sliding window let go of blocks 0..2: the session is blocks 3..4 (issue 13).
    src = make_service(tmp_path / "a")
    tokens = list(range(5 * BS + 7))
    hashes = block_hash_chain(tokens, BS, "s", "sha256")
    fp = src.records.catalog.engine_fp_ids(src.records.engine_fp_id)[0]
    raws = [bytes([i]) * 4096 for i in range(5)]
    rows = [(hashes[i], digest(raws[i])) for i in (3, 4)]
    for i in (3, 4):
        src.records.disk.put(digest(raws[i]), [raws[i]])
    src.records.catalog.add_blocks(fp, rows, [(d, 4096, 4096, "none") for _, d in rows])
    src.records.sessions.record("s", tokens, hashes[3:5], first_block=3)
    win = src.core.freeze("s", "w")  # durable: only the real blocks are waited for
    assert win["blocks"] == 2
    assert src.records.catalog.get_window("w")[0]["first_block"] == 3
    thawed = src.core.thaw("w")
    assert thawed["token_ids"] == tokens and thawed["staged_blocks"] == 0
    # A clone under a new salt re-keys positions 3..4 of the new salt's chain.
    src.core.clone("w", "w2", salt="t")
    row, blocks = src.records.catalog.get_window("w2")
    assert row["first_block"] == 3
    assert [h for h, _ in blocks] == block_hash_chain(tokens, BS, "t", "sha256")[3:5]
    assert [d for _, d in blocks] == [d for _, d in rows]
    # Export and import keep the position; the import checks the chain there.
    out = tmp_path / "w.cwm"
    src.transfer.export("w", str(out))
    dst = make_service(tmp_path / "b")
    dst.transfer.import_(str(out), name="back")
    row, blocks = dst.records.catalog.get_window("back")
    assert row["first_block"] == 3 and [h for h, _ in blocks] == hashes[3:5]


def test_hybrid_window_holds_each_groups_blocks_and_clones_them_per_group(
    tmp_path: Path,
) -> None:
    # Issue 13: with the hybrid allocator on, a full group holds every block and a
    # sliding-window group its tail; each group's blocks are keyed by its own engine id.
    svc = make_service(tmp_path / "store")
    groups = [fingerprint_id({**ENGINE, "kv_group": g}) for g in range(2)]
    svc.records.group_engine_ids = groups
    tokens = list(range(4 * BS + 5))
    chain = block_hash_chain(tokens, BS, "s", "sha256")
    runs = [(0, chain[:4]), (2, chain[2:4])]
    for group, (_, hashes) in enumerate(runs):
        fp = f"fp-g{group}"
        svc.records.catalog.register_fingerprint(fp, groups[group], "{}")
        rows = []
        for h in hashes:
            raw = bytes([group]) * 64 + h
            svc.records.disk.put(digest(raw), [raw])
            rows.append((h, digest(raw)))
        svc.records.catalog.add_blocks(fp, rows, [(d, len(h) + 64, len(h) + 64, "none")
                                                  for h, d in rows])  # fmt: skip
    svc.records.sessions.record("s", tokens, chain[:4], group_runs=runs)
    win = svc.core.freeze("s", "w")
    assert win["blocks"] == 6  # every group's blocks
    row, blocks = svc.records.catalog.get_window("w")
    assert row["num_groups"] == 2
    assert svc.records.positions("w", row, len(blocks)) == [
        (0, 0), (0, 1), (0, 2), (0, 3), (1, 2), (1, 3)
    ]  # fmt: skip
    assert svc.core.thaw("w")["token_ids"] == tokens
    svc.core.clone("w", "w2", salt="t")  # re-keyed per group under the new salt
    new_chain = block_hash_chain(tokens, BS, "t", "sha256")
    for group, (first, hashes) in enumerate(runs):
        stored = svc.records.catalog.digests_for_engine(groups[group], new_chain)
        assert set(stored) == set(new_chain[first : first + len(hashes)])
    assert svc.core.thaw("w2")["salt"] == "t"
    # Export and import keep each block's group and position (the chain is checked there).
    svc.transfer.export("w2", str(tmp_path / "w2.cwm"))
    twin = make_service(tmp_path / "twin")
    twin.records.group_engine_ids = groups
    for group in range(2):
        twin.records.catalog.register_fingerprint(f"fp-g{group}", groups[group], "{}")
    twin.transfer.import_(str(tmp_path / "w2.cwm"), name="back")
    row, blocks = twin.records.catalog.get_window("back")
    assert row["num_groups"] == 2 and row["salt"] == "t"
    assert twin.records.positions("back", row, len(blocks)) == svc.records.positions(
        "w2", *svc.records.catalog.get_window("w2")[:1], len(blocks)
    )
    assert twin.core.thaw("back")["token_ids"] == tokens
    plain = make_service(tmp_path / "plain")  # one KV-cache group: not this window's engine
    with pytest.raises(CwmError) as err:
        plain.transfer.import_(str(tmp_path / "w2.cwm"), name="back")
    assert err.value.code == "bad_import"
    # A group whose block went missing makes the window damaged, not a wrong restore.
    svc.records.catalog._db.execute(
        "DELETE FROM blocks WHERE fp_id = 'fp-g1' AND block_hash = ?", (chain[3],)
    )
    with pytest.raises(CwmError) as err:
        svc.core.thaw("w")
    assert err.value.code == "window_damaged"
    assert svc.core.delete("w2")["deleted"] and svc.core.delete("w")["deleted"]


def test_hybrid_window_travels_through_redis_with_its_groups(tmp_path: Path) -> None:
    # Two servers share one real Redis: a hybrid window frozen on one thaws on the other,
    # each block mirrored under its own group's fingerprint at its own position.
    import uuid

    from redis_servers import RedisServer, redis_available

    if not redis_available():
        pytest.fail("redis-server is not installed (make setup installs it)")
    from cwm_connector.stats import Stats
    from cwm_connector.store.memory import MemoryTier
    from cwm_connector.store.redis import RedisTier
    from cwm_connector.store.tiered import TieredStore
    from cwm_connector.windows.share import SharedWindows

    groups = [fingerprint_id({**ENGINE, "kv_group": g}) for g in range(2)]
    tokens = list(range(3 * BS + 1))
    chain = block_hash_chain(tokens, BS, "s", "sha256")
    prefix = f"t{uuid.uuid4().hex[:8]}"
    with RedisServer() as redis:
        services = []
        for name in ("a", "b"):
            svc = make_service(tmp_path / name)
            svc.records.group_engine_ids = groups
            for group in range(2):
                svc.records.catalog.register_fingerprint(f"fp-g{group}", groups[group], "{}")
            tier = RedisTier(redis.url, prefix=prefix)
            svc.records.store = TieredStore(
                MemoryTier(1), svc.records.disk, tier, Stats(None), promote=False
            )
            svc.records.shared = SharedWindows(
                tier, svc.records.store, lambda ids, salt: block_hash_chain(ids, BS, salt, "sha256")
            )
            services.append(svc)
        a, b = services
        runs = [(0, chain[:3]), (2, chain[2:3])]
        for group, (_, hashes) in enumerate(runs):
            rows = []
            for h in hashes:
                raw = bytes([group + 1]) * 64
                a.records.disk.put(digest(raw), [raw])
                rows.append((h, digest(raw)))
            a.records.catalog.add_blocks(f"fp-g{group}", rows, [(d, 64, 64, "none")
                                                                for _, d in rows])  # fmt: skip
        a.records.sessions.record("s", tokens, chain[:3], group_runs=runs)
        a.core.freeze("s", "shared")
        thawed = b.core.thaw("shared")  # fetched from Redis, checked, mirrored
        assert thawed["blocks"] == 4 and "redis" in thawed["tiers"]
        row, blocks = b.records.catalog.get_window("shared")
        assert b.records.positions("shared", row, len(blocks)) == [(0, 0), (0, 1), (0, 2), (1, 2)]
        assert set(b.records.catalog.digests_for_engine(groups[1], chain)) == {chain[2]}
