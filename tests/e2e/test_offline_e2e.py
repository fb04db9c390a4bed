"""End to end: with vLLM stopped, `cwm list/status/export` read the store directly (same
windows, same JSON keys as online) and `cwm store du/gc/verify` work; freeze exits 3.

One server start: a salted request, `cwm freeze` and the online answers (and `store du`
and `verify` while it serves), then the same commands with the server gone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from e2e_tools import BLOCK, cwm, server

from cwm_connector.demo.tiny_model import make_prompt
from cwm_connector.windows.export_file import open_export

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def cwm_at(store: Path, *args: str) -> tuple[int, Any, str]:
    """`cwm ARGS --store-dir STORE --json` (socket: the store's default): code, JSON, stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "cwm_connector.cli", *args, "--store-dir", str(store), "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def test_offline_reads_and_upkeep_with_vllm_stopped(tiny_model: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    sock = store / "control.sock"
    srv = server(tiny_model, store, tmp_path, "A").start()
    try:
        srv.complete(make_prompt(tiny_model, 500, seed=11), salt="s1", max_tokens=4)
        code, win = cwm(sock, "freeze", "s1", "w1")
        assert code == 0 and win["blocks"] == (win["tokens"] - 1) // BLOCK, win
        _, online_list = cwm(sock, "list")
        _, online_status = cwm(sock, "status", "w1")
        code, live_du, _ = cwm_at(store, "store", "du")  # safe while serving: reads only
        assert code == 0 and live_du["disk"]["pinned_blobs"] == win["blocks"]
        code, live_verify, _ = cwm_at(store, "store", "verify")
        assert code == 0 and live_verify["disk"]["damaged_blobs"] == 0
    finally:
        srv.stop()

    offline_note = f"cwm: no connector on {sock}; read the store at {store} directly"
    code, listed, err = cwm_at(store, "list", "--socket", str(sock))
    assert code == 0 and listed == online_list and offline_note in err
    code, status, err = cwm_at(store, "status", "w1", "--socket", str(sock))
    assert code == 0 and set(status) == set(online_status) and offline_note in err
    same = ("name", "salt", "tokens", "blocks", "bytes", "stored_bytes", "created", "lineage")
    assert {k: status[k] for k in same} == {k: online_status[k] for k in same}
    assert status["complete"] is True and status["resident_blocks"] is None
    target = tmp_path / "w1.cwm"
    code, exported, _ = cwm_at(store, "export", "w1", str(target), "--socket", str(sock))
    assert code == 0 and exported["file"] == str(target)
    with open_export(target) as export:  # the import reader's own checks
        assert export.num_blocks == win["blocks"] and export.manifest["name"] == "w1"
        manifest = export.manifest
        assert manifest["block_size"] == BLOCK and len(manifest["token_ids"]) == win["tokens"]
    code, du, _ = cwm_at(store, "store", "du")
    assert code == 0 and du["disk"]["pinned_blobs"] == win["blocks"]
    assert du["disk"]["orphan_blobs"] == 0 and du["disk"]["missing_blobs"] == 0
    code, gc, _ = cwm_at(store, "store", "gc")
    assert code == 0 and gc["disk"]["orphan_blobs_removed"] == 0
    code, verified, _ = cwm_at(store, "store", "verify")
    assert code == 0 and verified["disk"]["damaged_blobs"] == 0
    on_disk = du["disk"]["pinned_blobs"] + du["disk"]["cache_blobs"]
    assert verified["disk"]["checked_blobs"] == on_disk
    code, err_doc = cwm(sock, "freeze", "s1", "w2")
    assert code == 3 and err_doc["error"]["code"] == "unavailable"
