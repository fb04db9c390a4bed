"""`cwm` with no connector: list/status/export read the store directly, in the online shape,
and say so; engine ops exit 3; `cwm store du|gc|verify` work on the store directory.

Online answers come from a real ControlServer serving the WindowService over the
same store (store_builder.py), so the comparison is with what the connector sends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp_fakes import REPO_ROOT
from redis_servers import RedisServer, free_port, redis_available
from store_builder import FILE_BYTES, PINNED_TOKENS, build_store, make_service, served

from cwm_connector import cli


def run_cli(
    capsys: pytest.CaptureFixture[str], *argv: str, as_json: bool = True
) -> tuple[int, Any, str]:
    """(exit code, stdout parsed as one JSON document or raw text, stderr)."""
    code = cli.main([*argv, *(["--json"] if as_json else [])])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if as_json else out), err


@pytest.mark.timeout(60)
def test_offline_reads_equal_online_answers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    svc, _, _ = build_store(store)
    queries = [["list"], ["list", "--tag", "x"], ["list", "--sort", "created", "--desc"],
               ["status", "w1"], ["status", "w2", "--no-lineage", "--cache-stats"]]  # fmt: skip
    online = {}
    with served(svc) as sock:
        for argv in queries:
            code, result, err = run_cli(capsys, *argv, "--socket", str(sock))
            assert (code, err) == (0, ""), result
            online[" ".join(argv)] = result
    missing = tmp_path / "none.sock"
    for argv in queries:
        code, result, err = run_cli(capsys, *argv, "--socket", str(missing), "--store-dir",
                                    str(store))  # fmt: skip
        assert code == 0, result
        assert err == f"cwm: no connector on {missing}; read the store at {store} directly\n"
        expected = online[" ".join(argv)]
        if argv[0] == "status" and "cache_stats" in expected:
            assert set(result.pop("cache_stats")) == set(expected.pop("cache_stats"))
        assert result == expected, argv
    assert [w["name"] for w in online["list"]] == ["w1", "w2"]
    assert online["status w1"]["resident_blocks"] is None  # what no worker knows: null


@pytest.mark.timeout(60)
def test_offline_export_is_importable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    build_store(store)
    target = tmp_path / "w1.cwm"
    where = ["--socket", str(tmp_path / "none.sock"), "--store-dir", str(store)]
    code, exported, err = run_cli(capsys, "export", "w1", str(target), *where)
    assert code == 0 and "read the store at" in err
    assert exported == {"name": "w1", "file": str(target), "bytes": target.stat().st_size}
    other = make_service(tmp_path / "other")
    imported = other.transfer.import_(str(target), name="copy")
    assert (imported["tokens"], imported["blocks"]) == (len(PINNED_TOKENS), 3)
    thawed = other.core.thaw("copy")
    assert thawed["token_ids"] == PINNED_TOKENS and thawed["salt"] == "s1"


@pytest.mark.timeout(60)
def test_engine_ops_exit_3_and_human_output_says_offline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    build_store(store)
    where = ["--socket", str(tmp_path / "none.sock"), "--store-dir", str(store)]
    for argv in (["freeze", "s1", "w3"], ["thaw", "w1"], ["delete", "w1"], ["stats"],
                 ["status", "--session", "s1"], ["clone", "w1", "w4"]):  # fmt: skip
        extra = where if argv[0] in ("status", "list", "export") else where[:2]
        code, result, _ = run_cli(capsys, *argv, *extra)
        assert code == 3 and result["error"]["code"] == "unavailable", argv
    code, text, err = run_cli(capsys, "list", *where, as_json=False)
    assert code == 0 and text.splitlines()[0].split()[:2] == ["NAME", "SESSION"]
    assert "w1" in text and "no connector on" in err
    code, text, err = run_cli(capsys, "status", "w1", *where, as_json=False)
    assert code == 0 and "blobs: complete" in text and "directly" in err
    code, result, _ = run_cli(capsys, "status", "nope", *where)
    assert code == 1 and result["error"]["code"] == "window_not_found"
    code, result, _ = run_cli(capsys, "list", *where[:2], "--store-dir", str(tmp_path / "no"))
    assert code == 3 and "no cwm store at" in result["error"]["message"]
    assert not (tmp_path / "no").exists()


@pytest.mark.timeout(60)
def test_store_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    svc, pinned, _ = build_store(store)
    at = ["--store-dir", str(store)]
    code, du, err = run_cli(capsys, "store", "du", *at, "--disk-bytes", "64MB",
                            "--disk-min-free", "0.25")  # fmt: skip
    assert (code, err) == (0, "") and du["store_dir"] == str(store) and du["redis"] is None
    assert du["disk"]["pinned_bytes"] == 3 * FILE_BYTES and du["disk"]["budget_bytes"] == 64 << 20
    assert du["disk"]["min_free_bytes"] == du["disk"]["fs_total_bytes"] // 4
    code, gc, _ = run_cli(capsys, "store", "gc", *at)
    assert code == 0 and gc["disk"]["orphan_blobs_removed"] == 0 and gc["disk"]["grace_s"] == 3600
    code, verified, _ = run_cli(capsys, "store", "verify", *at)
    assert code == 0 and verified["disk"]["damaged_blobs"] == 0 and "error" not in verified
    path = svc.records.disk.path_for(pinned[0])
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    code, verified, _ = run_cli(capsys, "store", "verify", *at)
    assert code == 1 and verified["disk"]["corrupt_blobs"] == 1
    assert verified["error"]["code"] == "store_damaged" and "w1, w2" in verified["error"]["message"]
    code, text, err = run_cli(capsys, "store", "du", *at, as_json=False)
    assert code == 0 and text.splitlines()[1].split() == ["DISK", "FILES", "BYTES"]
    assert "quarantined" in text and err == ""
    code, result, _ = run_cli(capsys, "store", "du", "--store-dir", str(tmp_path / "none"))
    assert code == 1 and result["error"]["code"] == "catalog_unavailable"
    code, result, _ = run_cli(capsys, "store", "du", *at, "--disk-bytes", "lots")
    assert code == 1 and result["error"]["code"] == "bad_config"


@pytest.mark.timeout(60)
def test_store_verify_json_is_one_document_in_a_subprocess(tmp_path: Path) -> None:
    store = tmp_path / "store"
    build_store(store)
    proc = subprocess.run(
        [sys.executable, "-m", "cwm_connector.cli", "store", "verify", "--json"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=False,
        env={**os.environ, "CWM_STORE_DIR": str(store)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["disk"]["checked_blobs"] == 5


@pytest.mark.timeout(60)
@pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")
def test_store_du_and_gc_cover_redis(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    build_store(store)
    at = ["--store-dir", str(store)]
    with RedisServer() as redis:
        code, du, _ = run_cli(capsys, "store", "du", *at, "--redis-url", redis.url)
        assert code == 0 and du["redis"]["windows"] == 0 and du["redis"]["pinned_blobs"] == 0
        assert {"cache_bytes", "block_maps", "orphan_block_maps"} <= set(du["redis"])
        code, gc, _ = run_cli(capsys, "store", "gc", *at, "--redis-url", redis.url)
        assert code == 0 and gc["redis"]["removed_block_maps"] == 0
    dead = f"redis://127.0.0.1:{free_port()}"
    code, du, _ = run_cli(capsys, "store", "du", *at, "--redis-url", dead)
    assert code == 1 and du["redis"]["error"]["code"] == du["error"]["code"]
    assert du["disk"]["pinned_blobs"] == 3  # the disk's numbers still come back
