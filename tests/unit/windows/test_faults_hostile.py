"""Fault matrix, hostile inputs and racing writers, on a real catalog, disk tier and Redis.

Hostile window names and crafted export files (bad safetensors headers, forged
manifests, another engine's fingerprint) are refused with `bad_name`,
`bad_import` or `fingerprint_mismatch`; the store and the target folder are
byte-for-byte as before, and nothing of another salt becomes readable. Two
window services on one store (or one Redis) freezing the same names from many
threads end with exactly one window per name, each its own session's.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file
from test_windows import BS, capture, make_service

from cwm_connector.engine.hash_chain import block_hash_chain
from cwm_connector.errors import CwmError
from cwm_connector.windows.export_file import EXPORT_FORMAT, ExportFile
from cwm_connector.windows.service import WindowService

pytestmark = pytest.mark.timeout(120)

HOSTILE_NAMES = ["../x", "../../etc/passwd", "a/b", "x\x00y", ".hidden", "-rf", "a" * 129,
                 "", " ", "a b", "\uff41", "w\n", 7, None, ["w"]]  # fmt: skip
VICTIM_TOKENS = list(range(7, 7 + 3 * BS + 5))


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root and its content (the SQLite files left out: a reader's
    checkpoint may rewrite them without changing a row; rows are compared apart)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith("catalog.sqlite")
    }


def refused(call: Callable[[], Any], code: str) -> str:
    """Run call, expect a CwmError with this code; its message."""
    with pytest.raises(CwmError) as err:
        call()
    assert err.value.code == code, err.value.message
    return err.value.message


@pytest.fixture
def victim(tmp_path: Path) -> tuple[WindowService, Path]:
    """A store holding the victim session's window, and a valid export of it."""
    svc = make_service(tmp_path / "store")
    capture(svc, "victim-salt", VICTIM_TOKENS)
    svc.core.freeze("victim-salt", "victim")
    export = tmp_path / "out" / "victim.cwm"
    export.parent.mkdir()
    svc.transfer.export("victim", str(export))
    return svc, export


def read_export_file(path: Path) -> tuple[dict[str, Any], np.ndarray]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as fh:
        return json.loads((fh.metadata() or {})["cwm"]), fh.get_tensor("blocks")


def write_export(path: Path, manifest: dict[str, Any], data: np.ndarray) -> Path:
    save_file({"blocks": data}, str(path), metadata={"cwm": json.dumps(manifest)})
    return path


def craft(path: Path, header: dict[str, Any], data: bytes, length: int | None = None) -> Path:
    """A safetensors file written by hand: 8-byte header length, JSON header, data."""
    text = json.dumps({"__metadata__": {"cwm": json.dumps({"format": EXPORT_FORMAT})}, **header})
    declared = len(text) if length is None else length
    path.write_bytes(struct.pack("<Q", declared) + text.encode() + data)
    return path


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_touch_nothing(victim: tuple[WindowService, Path], name: object) -> None:
    svc, export = victim
    before = tree(svc.records.store_dir)
    target = export.parent / "x.cwm"
    calls: list[Callable[[], Any]] = [
        lambda: svc.core.freeze("victim-salt", name),  # type: ignore[arg-type]
        lambda: svc.core.thaw(name),  # type: ignore[arg-type]
        lambda: svc.core.clone("victim", name),  # type: ignore[arg-type]
        lambda: svc.core.clone(name, "fine"),  # type: ignore[arg-type]
        lambda: svc.core.delete(name),  # type: ignore[arg-type]
        lambda: svc.transfer.export(name, str(target)),  # type: ignore[arg-type]
        lambda: svc.handle("thaw", {"name": name}),
    ]
    for call in calls:
        refused(call, "bad_name")
    # Without a name, status is a usage error and import takes the file's (taken) name.
    refused(lambda: svc.transfer.import_(str(export), name=name),  # type: ignore[arg-type]
            "window_exists" if name is None else "bad_name")  # fmt: skip
    refused(lambda: svc.core.status(name=name), "bad_request" if name is None else "bad_name")
    assert tree(svc.records.store_dir) == before and not target.exists()
    assert svc.records.catalog.window_names() == ["victim"]


def test_hostile_name_inside_an_export_file(victim: tuple[WindowService, Path]) -> None:
    svc, export = victim
    manifest, data = read_export_file(export)
    for name in ("../../evil", "x" * 200, "a\x00b"):
        forged = write_export(export.parent / "named.cwm", {**manifest, "name": name}, data)
        refused(lambda f=forged: svc.transfer.import_(str(f)), "bad_name")
    assert svc.records.catalog.window_names() == ["victim"]


def crafted_headers(folder: Path) -> list[tuple[str, Path]]:
    """Safetensors files whose header lies about lengths, offsets, dtype or shape."""
    blocks = {"dtype": "U8", "shape": [2, 8], "data_offsets": [0, 16]}
    data = b"x" * 16
    sparse = craft(folder / "sparse.cwm", {"blocks": {**blocks, "shape": [2, 1 << 29],
                   "data_offsets": [0, 1 << 30]}}, b"")  # fmt: skip
    with open(sparse, "r+b") as fh:  # 1 GiB declared, nothing allocated
        fh.truncate(sparse.stat().st_size + (1 << 30))
    return [
        ("length past the file", craft(folder / "a.cwm", {"blocks": blocks}, data, 1 << 20)),
        ("huge declared header", craft(folder / "b.cwm", {"blocks": blocks}, data, 1 << 62)),
        ("header length zero", craft(folder / "c.cwm", {"blocks": blocks}, data, 0)),
        (
            "offsets past the data",
            craft(folder / "d.cwm", {"blocks": {**blocks, "data_offsets": [0, 4096]}}, data),
        ),
        (
            "overlapping tensors",
            craft(
                folder / "e.cwm",
                {"blocks": blocks, "z": {**blocks, "shape": [8], "data_offsets": [8, 16]}},
                data,
            ),
        ),
        (
            "shape bigger than offsets",
            craft(folder / "f.cwm", {"blocks": {**blocks, "shape": [4, 8]}}, data),
        ),
        (
            "dtype not uint8",
            craft(folder / "g.cwm", {"blocks": {**blocks, "dtype": "F32", "shape": [2, 2]}}, data),
        ),
        ("1-D tensor", craft(folder / "h.cwm", {"blocks": {**blocks, "shape": [16]}}, data)),
        (
            "gap before the data",
            craft(folder / "i.cwm", {"blocks": {**blocks, "data_offsets": [8, 24]}}, b"x" * 24),
        ),
        ("negative shape", craft(folder / "j.cwm", {"blocks": {**blocks, "shape": [2, -8]}}, data)),
        ("block of 512 MiB", sparse),
        ("eight bytes", _write(folder / "k.cwm", b"\x05" + b"\x00" * 7)),
        ("empty", _write(folder / "l.cwm", b"")),
        ("not safetensors", _write(folder / "m.cwm", b"PK\x03\x04" + os.urandom(64))),
    ]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_crafted_safetensors_headers_are_refused(victim: tuple[WindowService, Path]) -> None:
    svc, export = victim
    folder = export.parent
    files = crafted_headers(folder)
    before, before_target = (
        tree(svc.records.store_dir),
        {p.name: p.stat().st_size for p in folder.iterdir()},
    )
    for label, path in files:
        message = refused(lambda p=path: svc.transfer.import_(str(p), name="evil"), "bad_import")
        assert message, label
    assert tree(svc.records.store_dir) == before
    assert {p.name: p.stat().st_size for p in folder.iterdir()} == before_target
    assert svc.records.catalog.window_names() == ["victim"]


def forged_manifests(svc: WindowService, export: Path) -> list[tuple[str, str, Path]]:
    """Valid safetensors whose manifest or data lies: (label, expected code, file)."""
    manifest, data = read_export_file(export)
    folder = export.parent
    attacker = block_hash_chain(VICTIM_TOKENS, BS, "attacker", "sha256")
    garbage = np.random.default_rng(9).integers(0, 256, data.shape, dtype=np.uint8)
    from cwm_connector.store.blob import digest

    cases: list[tuple[str, str, dict[str, Any], np.ndarray]] = [
        # The victim's hashes under the attacker's salt: would map them to the attacker's bytes.
        (
            "victim's hashes, attacker's salt",
            "bad_import",
            {**manifest, "salt": "attacker", "digests": [digest(r).hex() for r in garbage]},
            garbage,
        ),
        # The attacker's chain, pointing at the victim's blobs without holding their bytes.
        (
            "victim's digests, other bytes",
            "bad_import",
            {**manifest, "salt": "attacker", "block_hashes": [h.hex() for h in attacker]},
            garbage,
        ),
        ("one flipped byte", "bad_import", manifest, _flipped(data)),
        ("a block too few", "bad_import", manifest, data[:-1]),
        (
            "a hash too many",
            "bad_import",
            {**manifest, "block_hashes": [*manifest["block_hashes"], "00" * 32]},
            data,
        ),
        ("non-hex digest", "bad_import", {**manifest, "digests": ["zz"] * len(data)}, data),
        ("bool token", "bad_import", {**manifest, "token_ids": [True] * 10}, data),
        ("10M tokens", "bad_import", {**manifest, "token_ids": [1] * 10_000_000}, data),
        ("other format", "bad_import", {**manifest, "format": "cwm-window/99"}, data),
        (
            "fingerprint missing",
            "bad_import",
            {k: v for k, v in manifest.items() if k != "fingerprint"},
            data,
        ),
        (
            "another block size",
            "fingerprint_mismatch",
            {**manifest, "fingerprint": {**manifest["fingerprint"], "block_size": 64}},
            data,
        ),
        (
            "another dtype",
            "fingerprint_mismatch",
            {**manifest, "fingerprint": {**manifest["fingerprint"], "dtype": "float16"}},
            data,
        ),
        (
            "another model",
            "fingerprint_mismatch",
            {**manifest, "fingerprint": {**manifest["fingerprint"], "model": "other"}},
            data,
        ),
    ]
    return [
        (label, code, write_export(folder / f"forged-{i}.cwm", forged, rows))
        for i, (label, code, forged, rows) in enumerate(cases)
    ]


def _flipped(data: np.ndarray) -> np.ndarray:
    out = data.copy()
    out[1, 100] ^= 0x10
    return out


def test_forged_manifests_are_refused_and_nothing_leaks(
    victim: tuple[WindowService, Path],
) -> None:
    svc, export = victim
    cases = forged_manifests(svc, export)
    before = tree(svc.records.store_dir)
    victim_hashes = block_hash_chain(VICTIM_TOKENS, BS, "victim-salt", "sha256")
    victim_rows = svc.records.catalog.digests_for_engine(svc.records.engine_fp_id, victim_hashes)
    for label, code, path in cases:
        message = refused(lambda p=path: svc.transfer.import_(str(p), name="evil"), code)
        if label == "another block size":
            assert "block_size" in message
        if label == "another dtype":
            assert "dtype" in message
    assert tree(svc.records.store_dir) == before
    assert svc.records.catalog.window_names() == ["victim"]
    # The victim's hashes still name the victim's blobs, and no other salt names anything.
    assert (
        svc.records.catalog.digests_for_engine(svc.records.engine_fp_id, victim_hashes)
        == victim_rows
    )
    attacker = block_hash_chain(VICTIM_TOKENS, BS, "attacker", "sha256")
    assert svc.records.catalog.stored_hashes(svc.records.engine_fp_id, attacker) == set()
    assert svc.core.thaw("victim")["token_ids"] == VICTIM_TOKENS


def test_file_changed_between_verify_and_write_is_refused(
    victim: tuple[WindowService, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, export = victim
    fresh = make_service(svc.records.store_dir.parent / "fresh")
    before = tree(fresh.records.store_dir)
    reads: dict[int, int] = {}
    real_row = ExportFile.row

    def swapped(self: ExportFile, index: int) -> bytes:
        reads[index] = reads.get(index, 0) + 1
        data = real_row(self, index)
        # The second read of block 1 returns other bytes (as if the file was rewritten).
        return data[::-1] if index == 1 and reads[index] > 1 else data

    monkeypatch.setattr(ExportFile, "row", swapped)
    refused(lambda: fresh.transfer.import_(str(export), name="moved"), "bad_import")
    assert tree(fresh.records.store_dir) == before  # block 0's blob, written first, was removed


@pytest.mark.parametrize("where", ["relative", "store", "catalog", "directory", "nul"])
def test_export_to_hostile_paths(victim: tuple[WindowService, Path], where: str) -> None:
    svc, export = victim
    before = tree(svc.records.store_dir)
    target = {
        "relative": "victim.cwm",
        "store": str(svc.records.store_dir / "blobs" / "x.cwm"),
        "catalog": str(svc.records.store_dir / "catalog.sqlite"),
        "directory": str(export.parent),
        "nul": str(export.parent / "a\x00b"),
    }[where]
    code = "bad_request" if where in ("relative", "nul") else "bad_path"
    refused(lambda: svc.transfer.export("victim", target), code)
    assert tree(svc.records.store_dir) == before
    assert sorted(p.name for p in export.parent.iterdir()) == ["victim.cwm"]


def test_export_replaces_a_planted_link_without_following_it(
    victim: tuple[WindowService, Path], tmp_path: Path
) -> None:
    svc, export = victim
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    link = export.parent / "planted.cwm"
    link.symlink_to(precious)
    svc.transfer.export("victim", str(link))
    assert precious.read_text() == "keep me" and not link.is_symlink()
    assert sorted(p.name for p in export.parent.iterdir()) == ["planted.cwm", "victim.cwm"]


def race_freezes(services: list[WindowService], salts: list[list[str]]) -> dict[str, str]:
    """Every service freezes each of its salts under shared names at once; name -> salt."""
    jobs = [(svc, salt, name) for svc, own in zip(services, salts, strict=True)
            for salt in own for name in (f"dup-{i}" for i in range(4))]  # fmt: skip
    jobs += [(svc, own[0], f"own-{own[0]}") for svc, own in zip(services, salts, strict=True)]
    barrier = threading.Barrier(len(jobs))

    def one(job: tuple[WindowService, str, str]) -> tuple[str, str, str | None]:
        svc, salt, name = job
        barrier.wait()
        try:
            return name, salt, svc.core.freeze(salt, name)["salt"]
        except CwmError as exc:
            assert exc.code == "window_exists", exc.message
            return name, salt, None

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(one, jobs))
    winners: dict[str, str] = {}
    for name, salt, won in results:
        if won is not None:
            assert won == salt and name not in winners, (name, results)
            winners[name] = salt
    assert set(winners) == {name for name, _, _ in results}
    return winners


def check_own(svc: WindowService, winners: dict[str, str], tokens: dict[str, list[int]]) -> None:
    """Every window thaws with its own session's tokens, salt and hash chain."""
    assert sorted(w["name"] for w in svc.core.list()) == sorted(winners)
    for name, salt in winners.items():
        thawed = svc.core.thaw(name)
        assert thawed["salt"] == salt and thawed["token_ids"] == tokens[salt]
        _, blocks = svc.records.load(name)
        assert [h for h, _ in blocks] == block_hash_chain(tokens[salt], BS, salt, "sha256")


def sessions(prefix: str, num: int, offset: int) -> dict[str, list[int]]:
    return {f"{prefix}{i}": list(range(offset + i, offset + i + 2 * BS + 3)) for i in range(num)}


def test_two_services_race_on_one_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    a, b = make_service(store), make_service(store)
    tokens = {**sessions("a", 3, 100), **sessions("b", 3, 200)}
    for svc, prefix in ((a, "a"), (b, "b")):
        for salt in (s for s in tokens if s.startswith(prefix)):
            capture(svc, salt, tokens[salt], seed=sum(salt.encode()))
    winners = race_freezes([a, b], [["a0", "a1", "a2"], ["b0", "b1", "b2"]])
    check_own(a, winners, tokens)
    check_own(b, winners, tokens)


def test_two_services_race_on_one_redis(tmp_path: Path) -> None:
    from redis_servers import RedisServer, redis_available

    if not redis_available():
        pytest.skip("needs Debian's redis-server")
    from cwm_connector.stats import Stats
    from cwm_connector.store.memory import MemoryTier
    from cwm_connector.store.redis import RedisTier
    from cwm_connector.store.tiered import TieredStore
    from cwm_connector.windows.share import SharedWindows

    def chain(token_ids: list[int], salt: str) -> list[bytes]:
        return block_hash_chain(token_ids, BS, salt, "sha256")

    tokens = {**sessions("c", 2, 300), **sessions("d", 2, 400)}
    prefix = f"t{uuid.uuid4().hex[:8]}"
    with RedisServer() as redis:
        services = []
        for name in ("c", "d"):
            svc = make_service(tmp_path / name)
            tier = RedisTier(redis.url, prefix=prefix)
            svc.records.store = TieredStore(
                MemoryTier(1), svc.records.disk, tier, Stats(None), promote=False
            )
            svc.records.shared = SharedWindows(tier, svc.records.store, chain)
            for salt in (s for s in tokens if s.startswith(name)):
                capture(svc, salt, tokens[salt], seed=sum(salt.encode()))
            services.append(svc)
        winners = race_freezes(services, [["c0", "c1"], ["d0", "d1"]])
        for svc in services:  # each thaws the other's windows through Redis
            check_own(svc, winners, tokens)
