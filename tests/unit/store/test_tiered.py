"""Blob format, disk tier and catalog: round trips, corruption, atomicity."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from cwm_connector.config import CwmConfig
from cwm_connector.errors import BlobCorruptError, BlobMissingError, ConfigError
from cwm_connector.store import blob
from cwm_connector.store.catalog import Catalog
from cwm_connector.store.disk import DiskTier


def payloads() -> list[bytes]:
    rng = np.random.default_rng(0)
    bf16_like = (rng.standard_normal(4096).astype(np.float32).view(np.uint32) >> 16).astype(
        np.uint16
    )
    nan_inf = np.array([0x7FC0, 0x7F80, 0xFF80, 0x0000, 0x8000] * 100, dtype=np.uint16)
    return [
        bf16_like.tobytes(),
        bytes(8192),
        rng.integers(0, 256, 8191, dtype=np.uint8).tobytes(),  # odd length
        nan_inf.tobytes(),
    ]


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_disk_round_trip_is_bit_exact(tmp_path: Path, codec: str) -> None:
    disk = DiskTier(tmp_path)
    for raw in payloads():
        dig = blob.digest(raw)
        disk.put(dig, [raw], codec)
        out = bytearray(len(raw))
        disk.read_into(dig, [memoryview(out)])
        assert bytes(out) == raw


def test_zstd_plane_split_shrinks_bf16(tmp_path: Path) -> None:
    raw = payloads()[0]
    disk = DiskTier(tmp_path)
    stored = disk.put(blob.digest(raw), [raw], "zstd")
    assert stored < len(raw)


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_flipped_byte_is_refused(tmp_path: Path, codec: str) -> None:
    disk = DiskTier(tmp_path)
    raw = payloads()[0]
    dig = blob.digest(raw)
    disk.put(dig, [raw], codec)
    path = disk.path_for(dig)
    data = bytearray(path.read_bytes())
    data[blob.HEADER_SIZE + 100] ^= 0x01  # same length, one bit
    path.write_bytes(bytes(data))
    with pytest.raises(BlobCorruptError):
        disk.read_into(dig, [memoryview(bytearray(len(raw)))])


def test_truncated_and_missing_blobs(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path)
    raw = payloads()[1]
    dig = blob.digest(raw)
    disk.put(dig, [raw])
    path = disk.path_for(dig)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BlobCorruptError):
        disk.read_into(dig, [memoryview(bytearray(len(raw)))])
    path.unlink()
    with pytest.raises(BlobMissingError):
        disk.read_into(dig, [memoryview(bytearray(len(raw)))])


def test_header_is_the_documented_layout(tmp_path: Path) -> None:
    raw = b"\x01\x02" * 64
    data = blob.encode(raw, "none")
    magic, version, codec, _, raw_len, payload_len, dig = struct.unpack_from("<4sBBHQQ16s", data)
    assert (magic, version, codec, raw_len, payload_len) == (b"CWMB", 1, 0, 128, 128)
    assert dig == blob.digest(raw)
    assert len(data) == 40 + 128


def test_orphan_tmp_files_of_dead_processes_are_removed(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path)
    dead = disk.tmp_dir / "999999999-abc.tmp"
    mine = disk.tmp_dir / f"{os.getpid()}-abc.tmp"
    dead.write_bytes(b"x")
    mine.write_bytes(b"x")
    assert disk.clean_orphan_tmp() == 1
    assert not dead.exists() and mine.exists()


def test_catalog_scopes_blocks_by_fingerprint(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.sqlite")
    cat.register_fingerprint("fpA", "engine1", "{}")
    cat.register_fingerprint("fpB", "engine2", "{}")
    cat.add_blocks("fpA", [(b"h1", b"d1"), (b"h2", b"d2")], [(b"d1", 10, 10, "none")])
    assert cat.stored_hashes("engine1", [b"h1", b"h2", b"h3"]) == {b"h1", b"h2"}
    assert cat.stored_hashes("engine2", [b"h1", b"h2"]) == set()
    assert cat.digests_for("fpA", [b"h2"]) == {b"h2": b"d2"}
    assert cat.digests_for("fpB", [b"h2"]) == {}
    assert cat.forget_blob(b"d1") == 1
    assert cat.stored_hashes("engine1", [b"h1", b"h2"]) == {b"h2"}
    # A second connection (another process/thread) sees the same rows.
    other = Catalog(tmp_path / "catalog.sqlite")
    assert other.stored_hashes("engine1", [b"h2"]) == {b"h2"}


def test_catalog_handles_more_hashes_than_sql_variables(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite")
    cat.register_fingerprint("fp", "e", "{}")
    many = [i.to_bytes(4, "big") for i in range(1500)]
    cat.add_blocks("fp", [(h, b"d") for h in many], [])
    assert len(cat.stored_hashes("e", many)) == 1500


def test_config_precedence_and_validation() -> None:
    env = {"CWM_STORE_DIR": "/from/env", "CWM_CAPTURE": "all", "CWM_MEMORY_BYTES": "1024"}
    cfg = CwmConfig.resolve({"store_dir": "/from/config"}, env)
    assert cfg.store_dir == "/from/config"
    assert cfg.capture == "all"
    assert cfg.memory_bytes == 1024
    assert cfg.control_socket_path == Path("/from/config/control.sock")
    with pytest.raises(ConfigError):
        CwmConfig.resolve({"capture": "sometimes"}, {})
    with pytest.raises(ConfigError):
        CwmConfig.resolve({"memory_bytes": "lots"}, {})


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_segmented_write_and_read_equal_the_joined_blob(tmp_path: Path, codec: str) -> None:
    raw = payloads()[0]
    parts = [raw[:1000], raw[1000:5000], raw[5000:]]
    disk = DiskTier(tmp_path)
    dig = blob.digest_segments(parts)
    assert dig == blob.digest(raw)
    disk.put(dig, parts, codec)
    assert disk.path_for(dig).read_bytes() == blob.encode(raw, codec)
    outs = [bytearray(len(p)) for p in parts]
    disk.read_into(dig, [memoryview(o) for o in outs])
    assert b"".join(outs) == raw


def _adversarial() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    specials = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-40, -1e38], dtype=np.float32)
    return {
        "random": rng.integers(0, 256, 65536, dtype=np.uint8).tobytes(),
        "zeros": bytes(65536),
        "ones": b"\xff" * 65536,
        "nan_inf_f32": rng.choice(specials, 16384).astype(np.float32).tobytes(),
        "nan_inf_f16": rng.choice(specials, 32768).astype(np.float16).tobytes(),
        "odd_length": rng.integers(0, 256, 4097, dtype=np.uint8).tobytes(),
        "one_byte": b"\x01",
    }


@pytest.mark.parametrize("kind", sorted(_adversarial()))
def test_zstd_round_trip_is_bit_exact_on_adversarial_data(tmp_path: Path, kind: str) -> None:
    raw = _adversarial()[kind]
    encoded = blob.encode(raw, "zstd")
    header = blob.parse_header(encoded)
    assert header.codec == "zstd" and header.raw_len == len(raw)
    assert bytes(blob.decode_payload(header, encoded[blob.HEADER_SIZE :])) == raw
    out = bytearray(len(raw))
    blob.unpack_into(encoded, blob.digest(raw), [memoryview(out)])  # the Redis read path
    assert bytes(out) == raw


def test_stats_file_holds_the_last_snapshot_under_concurrent_flushes(tmp_path: Path) -> None:
    import json
    import threading

    from cwm_connector.stats import Stats

    stats = Stats(tmp_path / "stats.json")

    def work(i: int) -> None:
        for _ in range(300):
            stats.add(f"thread{i}")
            stats.flush(force=True)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats.flush(force=True)
    assert json.loads((tmp_path / "stats.json").read_text()) == stats.snapshot()
    assert stats.snapshot() == {f"thread{i}": 300 for i in range(4)}
