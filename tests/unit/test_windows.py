"""Window ops on a real catalog and disk tier, without vLLM running."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cwm_connector.blob import digest
from cwm_connector.catalog import Catalog
from cwm_connector.errors import CwmError
from cwm_connector.fingerprint import canonical_id
from cwm_connector.hash_chain import block_hash_chain
from cwm_connector.sessions import SessionTable
from cwm_connector.windows import WindowService, validate_name

BS = 32
ENGINE = {"model": "tiny", "dtype": "bfloat16", "block_size": BS}


def make_service(store: Path, engine: dict[str, Any] | None = None) -> WindowService:
    engine = engine or ENGINE
    engine_id = canonical_id(engine)
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
    fp = svc.catalog.engine_fp_ids(svc.engine_fp_id)[0]
    rows, blobs = [], []
    for h in hashes:
        raw = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
        dig = digest(raw)
        stored = svc.disk.put(dig, [raw])
        rows.append((h, dig))
        blobs.append((dig, len(raw), stored, "none"))
    svc.catalog.add_blocks(fp, rows, blobs)
    svc.sessions.record(salt, token_ids, hashes)
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
        svc.freeze("nobody", "w1")
    assert err.value.code == "unknown_session"
    win = svc.freeze("salt-1", "w1")
    assert (win["tokens"], win["blocks"], win["bytes"]) == (100, 3, 3 * 4096)
    with pytest.raises(CwmError) as err:
        svc.freeze("salt-1", "w1")
    assert err.value.code == "window_exists"
    thawed = svc.thaw("w1")
    assert thawed["token_ids"] == tokens and thawed["salt"] == "salt-1"
    assert svc.status("w1")["complete"] is True
    assert [w["name"] for w in svc.list()] == ["w1"]


def test_freeze_waits_for_durability_then_times_out(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    tokens = list(range(64))
    svc.sessions.record("s", tokens, block_hash_chain(tokens, BS, "s", "sha256"))
    with pytest.raises(CwmError) as err:
        svc.freeze("s", "w")
    assert err.value.code == "not_durable" and err.value.retryable


def test_thaw_refuses_other_engine_and_names_fields(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    capture(svc, "s", list(range(70)))
    svc.freeze("s", "w")
    other = make_service(tmp_path, {**ENGINE, "dtype": "float16"})
    with pytest.raises(CwmError) as err:
        other.thaw("w")
    assert err.value.code == "fingerprint_mismatch" and "dtype" in err.value.message


def test_corrupt_blob_makes_window_damaged(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    digests = capture(svc, "s", list(range(70)))
    svc.freeze("s", "w")
    path = svc.disk.path_for(digests[1])
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))
    assert svc.status("w")["damaged_blobs"] == 1
    with pytest.raises(CwmError) as err:
        svc.thaw("w")
    assert err.value.code == "window_damaged"


def test_clone_with_new_salt_rekeys_without_copying(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    tokens = list(range(96))
    capture(svc, "s", tokens)
    svc.freeze("s", "w")
    files_before = sorted(p.name for p in (tmp_path / "blobs").rglob("*.blob"))
    clone = svc.clone("w", "w2", salt="new-salt")
    assert clone["salt"] == "new-salt" and clone["blocks"] == 3
    assert sorted(p.name for p in (tmp_path / "blobs").rglob("*.blob")) == files_before
    new_hashes = block_hash_chain(tokens, BS, "new-salt", "sha256")
    assert len(svc.catalog.digests_for_engine(svc.engine_fp_id, new_hashes)) == 3


def test_delete_frees_unshared_blobs_and_keeps_shared(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    capture(svc, "s", list(range(96)))
    svc.freeze("s", "w")
    svc.clone("w", "w-copy")  # shares every blob
    capture(svc, "t", list(range(500, 564)), seed=9)
    svc.freeze("t", "other")
    assert svc.delete("w")["freed_bytes"] == 0  # still pinned by w-copy
    result = svc.delete("w-copy")
    assert result["freed_blobs"] == 3 and result["freed_bytes"] == 3 * (4096 + 40)
    assert len(list((tmp_path / "blobs").rglob("*.blob"))) == 2
    assert svc.status("other")["complete"] is True
    with pytest.raises(CwmError) as err:
        svc.delete("w")
    assert err.value.code == "window_not_found"


def test_export_import_round_trip_and_refusals(tmp_path: Path) -> None:
    src = make_service(tmp_path / "a")
    tokens = list(range(80))
    digests = capture(src, "s", tokens)
    src.freeze("s", "w")
    out = tmp_path / "w.cwm"
    src.export("w", str(out))
    dst = make_service(tmp_path / "b")
    win = dst.import_(str(out), name="restored")
    assert win["blocks"] == 2 and dst.thaw("restored")["token_ids"] == tokens
    assert all(dst.disk.contains(d) for d in digests)
    # A manifest whose hashes belong to another salt is refused.
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    with safe_open(str(out), framework="np") as fh:
        manifest = json.loads(fh.metadata()["cwm"])
    manifest["salt"] = "victim-salt"
    forged = tmp_path / "forged.cwm"
    save_file(load_file(str(out)), str(forged), metadata={"cwm": json.dumps(manifest)})
    with pytest.raises(CwmError) as err:
        dst.import_(str(forged), name="forged")
    assert err.value.code == "bad_import"
    garbage = tmp_path / "garbage.cwm"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(CwmError) as err:
        dst.import_(str(garbage))
    assert err.value.code == "bad_import"
    other = make_service(tmp_path / "c", {**ENGINE, "model": "another"})
    with pytest.raises(CwmError) as err:
        other.import_(str(out))
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
