"""End to end: freeze a session with the `cwm` CLI, restart vLLM, thaw, continue.

The continuation is shorter than the tail of the window's last block, so the
restored request and the reference (vLLM still holding the prefix) load the same
blocks and compute the same tokens: their outputs must be identical.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from e2e_tools import (
    BLOCK,
    CONTINUATION,
    EXTERNAL_HITS,
    blob_files,
    cwm,
    mcp_call,
    outputs,
    server,
)

from cwm_connector.control.protocol import read_frame
from cwm_connector.demo.tiny_model import make_prompt
from cwm_connector.stats import read_stats
from cwm_connector.store import blob
from cwm_connector.store.disk import DiskTier

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def zstd_round_trips(store: Path) -> int:
    """Re-encode every real captured KV blob with zstd and check the decode is bit-exact."""
    disk = DiskTier(store)
    count = 0
    for path in (store / "blobs").rglob("*.blob"):
        header = blob.parse_header(path.read_bytes()[: blob.HEADER_SIZE])
        raw = bytearray(header.raw_len)
        disk.read_into(header.digest, [memoryview(raw)])
        encoded = blob.encode(raw, "zstd")
        decoded = blob.decode_payload(blob.parse_header(encoded), encoded[blob.HEADER_SIZE :])
        assert bytes(decoded) == bytes(raw) and len(encoded) < len(raw)
        count += 1
    return count


def test_freeze_restart_thaw_clone_export_import(tiny_model: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    sock = store / "control.sock"
    prompt = make_prompt(tiny_model, 3000, seed=3)

    srv = server(tiny_model, store, tmp_path, "A").start()
    try:
        code, err = cwm(sock, "freeze", "s1", "w1")
        assert code == 1 and err["error"]["code"] == "unknown_session"
        srv.complete(prompt, salt="s1", max_tokens=8)
        code, win = cwm(sock, "freeze", "s1", "w1")
        assert code == 0, win
        assert win["tokens"] == 3001 + 8 and win["blocks"] == (3001 + 8 - 1) // BLOCK
        code, err = cwm(sock, "freeze", "s1", "w1")
        assert code == 1 and err["error"]["code"] == "window_exists"
        code, err = cwm(sock, "thaw", "../../etc/passwd")
        assert code == 1 and err["error"]["code"] == "bad_name"
        code, thawed = cwm(sock, "thaw", "w1")
        assert code == 0
        token_ids = thawed["token_ids"]
        by_mcp = mcp_call(sock, "window_freeze", {"salt": "s1", "name": "w-mcp"})
        assert (by_mcp["tokens"], by_mcp["blocks"]) == (win["tokens"], win["blocks"])
        # The reference: vLLM still holds the prefix in its own cache.
        reference = srv.complete(token_ids + CONTINUATION, salt="s1", max_tokens=8)
        assert reference["usage"]["prompt_tokens_details"]["cached_tokens"] == win["blocks"] * BLOCK
    finally:
        srv.stop()

    srv = server(tiny_model, store, tmp_path, "B").start()
    try:
        code, listed = cwm(sock, "list")
        assert code == 0 and [w["name"] for w in listed] == ["w-mcp", "w1"]
        thawed = mcp_call(sock, "window_thaw", {"name": "w1"})
        assert thawed["token_ids"] == token_ids and thawed["text"]
        # Thaw staged every block in the worker's host memory ahead of the request.
        assert thawed["staged_blocks"] == win["blocks"] and "memory" in thawed["tiers"]
        # Hostile control-socket clients cost vLLM nothing.
        hanging = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        hanging.connect(str(sock))  # connects and never sends
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as garbage:
            garbage.connect(str(sock))
            garbage.sendall(b"\xff\xff\xff\xff" + b"junk")  # declares a 4 GiB frame
            assert read_frame(garbage)["error"]["code"] == "frame_too_large"
        restored = srv.complete(thawed["token_ids"] + CONTINUATION, salt="s1", max_tokens=8)
        assert srv.metric(EXTERNAL_HITS) == win["blocks"] * BLOCK
        assert outputs(restored) == outputs(reference)
        # ... and the request loaded the thaw's staged blocks: no staging, no disk read.
        assert read_stats(store)["loaded_prestaged_blocks"] == win["blocks"]
        hanging.close()

        before = blob_files(store)
        code, clone = cwm(sock, "clone", "w1", "w2", "--salt", "s2")
        assert code == 0 and clone["salt"] == "s2" and clone["blocks"] == win["blocks"]
        assert blob_files(store) == before  # no tensor was copied
        other = srv.complete(token_ids + CONTINUATION, salt="s2", max_tokens=8)
        assert srv.metric(EXTERNAL_HITS) == 2 * win["blocks"] * BLOCK
        assert outputs(other) == outputs(reference)

        export = tmp_path / "w1.cwm"
        code, result = cwm(sock, "export", "w1", str(export))
        assert code == 0 and export.stat().st_size == result["bytes"]
        code, status = cwm(sock, "status", "w1")
        assert code == 0 and status["complete"] is True
        assert zstd_round_trips(store) == blob_files(store) > 0
    finally:
        srv.stop()

    fresh = tmp_path / "fresh-store"
    srv = server(tiny_model, fresh, tmp_path, "C").start()
    try:
        code, imported = cwm(fresh / "control.sock", "import", str(export), "--name", "moved")
        assert code == 0 and imported["blocks"] == win["blocks"]
        code, thawed = cwm(fresh / "control.sock", "thaw", "moved")
        assert code == 0 and thawed["token_ids"] == token_ids
        moved = srv.complete(token_ids + CONTINUATION, salt="s1", max_tokens=8)
        assert srv.metric(EXTERNAL_HITS) == win["blocks"] * BLOCK
        assert outputs(moved) == outputs(reference)
        before = blob_files(fresh)
        code, deleted = cwm(fresh / "control.sock", "delete", "moved")
        # Session s1 still holds these blocks (its latest request): they stay for its next
        # freeze. Once the session moved on, deleting a window frees them.
        assert code == 0 and deleted["freed_blobs"] == 0 and blob_files(fresh) == before
        srv.complete("a new topic", salt="s1", max_tokens=2)  # no full block: nothing live
        time.sleep(1.0)
        code, _ = cwm(fresh / "control.sock", "import", str(export), "--name", "moved")
        assert code == 0
        code, deleted = cwm(fresh / "control.sock", "delete", "moved")
        assert code == 0 and deleted["freed_blobs"] == win["blocks"]
        assert blob_files(fresh) == before - win["blocks"]
    finally:
        srv.stop()


def test_freeze_after_eviction_and_thaw_on_the_same_server(
    tiny_model: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    sock = store / "control.sock"
    srv = server(tiny_model, store, tmp_path, "E")
    srv.max_model_len = 4096
    srv.extra_args = ["--num-gpu-blocks-override", "160"]  # room for about one session
    srv.start()
    try:
        first = srv.complete(make_prompt(tiny_model, 3000, seed=11), salt="s1", max_tokens=4)
        for seed in (12, 13):  # other sessions push s1's blocks out of the paged cache
            srv.complete(make_prompt(tiny_model, 3000, seed=seed), salt=f"x{seed}", max_tokens=4)
        code, win = cwm(sock, "freeze", "s1", "evicted")
        assert code == 0, win
        assert win["blocks"] == (first["usage"]["total_tokens"] - 1) // BLOCK
        code, status = cwm(sock, "status", "evicted")
        assert code == 0 and status["complete"] is True and status["resident_blocks"] == 0
        code, thawed = cwm(sock, "thaw", "evicted")
        assert code == 0 and thawed["staged_blocks"] == win["blocks"]
        code, status = cwm(sock, "status", "evicted")
        assert status["resident_blocks"] == win["blocks"] and status["tiers"] == ["memory", "disk"]
        again = srv.complete(thawed["token_ids"], salt="s1", max_tokens=4)
        # The local cache lost the session: the hit comes from the window.
        assert srv.metric(EXTERNAL_HITS) == (len(thawed["token_ids"]) - 1) // BLOCK * BLOCK
        assert (
            again["usage"]["prompt_tokens_details"]["cached_tokens"]
            >= win["blocks"] * BLOCK - BLOCK
        )
    finally:
        srv.stop()
