"""End to end against real vLLM servers: capture, restart, lossless restore, misses.

One session is captured on server A; every later test starts its own server on
a copy of that store (a restart), so each scenario sees the same state.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from cwm_connector.control.client import ControlClient
from cwm_connector.demo.tiny_model import TinyModelSpec, build_tiny_model, make_prompt
from cwm_connector.demo.vllm_process import VllmServer, kv_transfer_config
from cwm_connector.errors import CwmError
from cwm_connector.stats import read_stats

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

BLOCK = 32
PROMPT_TOKENS = 3000  # > one 2,048-token prefill chunk on the CPU
EXTERNAL_HITS = "vllm:external_prefix_cache_hits_total"


@dataclass
class Captured:
    model: Path
    store: Path
    prompt: str
    reference: dict[str, Any]  # vLLM's own prefix-cache hit on server A
    cold: dict[str, Any]
    block_digests: list[bytes]  # blob digest of each captured block, in order


def worker_stats(store: Path) -> dict[str, int]:
    return read_stats(store)


def wait_for(pred, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.2)


def server(model: Path, store: Path, logs: Path, name: str, **extra: Any) -> VllmServer:
    connector = kv_transfer_config(
        {"store_dir": str(store), "verify_restore": True},
        module_path=extra.pop("module_path", False),
    )
    return VllmServer(str(model), logs / f"{name}.log", connector=connector, **extra)


def logprobs(resp: dict[str, Any]) -> tuple[list[str], list[float], list[Any]]:
    lp = resp["choices"][0]["logprobs"]
    return lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]


def cached(resp: dict[str, Any]) -> int:
    return resp["usage"]["prompt_tokens_details"]["cached_tokens"]


def full_blocks(resp: dict[str, Any]) -> int:
    return (resp["usage"]["prompt_tokens"] - 1) // BLOCK


@pytest.fixture(scope="module")
def captured(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Captured:
    root = tmp_path_factory.mktemp("restore")
    model = root / "model"
    shutil.copytree(tiny_model, model)  # this module rebuilds it in place later
    store = root / "store"
    prompt = make_prompt(model, PROMPT_TOKENS)
    srv = server(model, store, root, "A").start()
    try:
        cold = srv.complete(prompt, salt="session-1")
        reference = srv.complete(prompt, salt="session-1")
        assert cached(reference) == full_blocks(reference) * BLOCK
        assert srv.metric(EXTERNAL_HITS) == 0
        # Prompt + generated tokens: every block with KV for all its tokens.
        num_blocks = (cold["usage"]["total_tokens"] - 1) // BLOCK
        wait_for(lambda: worker_stats(store).get("captured_blocks", 0) >= num_blocks)
        ControlClient(store / "control.sock").call("freeze", salt="session-1", name="win")
    finally:
        srv.stop()
    with sqlite3.connect(store / "catalog.sqlite") as db:
        digests = [row[0] for row in db.execute("SELECT digest FROM blocks ORDER BY rowid")]
    assert len(digests) == num_blocks
    return Captured(model, store, prompt, reference, cold, digests)


def copy_store(cap: Captured, dest: Path) -> Path:
    shutil.copytree(cap.store, dest, ignore=shutil.ignore_patterns("*.sock"))
    shutil.rmtree(dest / "stats", ignore_errors=True)
    return dest


@pytest.mark.parametrize("layerwise", ["off", "on"])
def test_restore_after_restart_is_lossless(
    captured: Captured, tmp_path: Path, layerwise: str
) -> None:
    store = copy_store(captured, tmp_path / "store")
    env = {"VLLM_SERVER_DEV_MODE": "1", "CWM_LAYERWISE_LOAD": layerwise}
    srv = server(captured.model, store, tmp_path, "B", env=env).start()
    try:
        restored = srv.complete(captured.prompt, salt="session-1")
        expected = full_blocks(restored) * BLOCK
        assert expected == (PROMPT_TOKENS // BLOCK) * BLOCK
        # Every full block came from cwm (external), none from a local cache.
        assert srv.metric(EXTERNAL_HITS) == expected
        assert cached(restored) == expected
        # Same tokens and logprobs as vLLM's own prefix-cache hit, exactly.
        assert logprobs(restored) == logprobs(captured.reference)
        stats = worker_stats(store)
        assert stats["loaded_blocks"] == expected // BLOCK
        # The paged blocks after the scatter hash to the captured digests.
        assert stats["restore_verified_blocks"] == expected // BLOCK
        assert stats.get("restore_mismatch_blocks", 0) == 0
        # Layer by layer: vLLM's attention asked for each layer of the model (2 here).
        assert stats.get("layer_load_waits", 0) == (2 if layerwise == "on" else 0)

        # Another salt, same prompt: no hit at all.
        other = srv.complete(captured.prompt, salt="session-2")
        assert cached(other) == 0
        assert srv.metric(EXTERNAL_HITS) == expected

        # A longer prompt with the same salt and prefix reuses every stored full block.
        requests.post(srv.url + "/reset_prefix_cache", timeout=30).raise_for_status()
        longer = captured.prompt + " " + make_prompt(captured.model, 700, seed=7)
        resp = srv.complete(longer, salt="session-1")
        assert resp["usage"]["prompt_tokens"] > PROMPT_TOKENS + 600
        assert srv.metric(EXTERNAL_HITS) == 2 * expected
        assert cached(resp) == expected
    finally:
        srv.stop()


def test_module_path_config_and_corrupt_blob_is_recomputed(
    captured: Captured, tmp_path: Path
) -> None:
    store = copy_store(captured, tmp_path / "store")
    bad_index = 40
    bad_blob = next(store.glob(f"blobs/*/*/{captured.block_digests[bad_index].hex()}.blob"))
    data = bytearray(bad_blob.read_bytes())
    data[len(data) // 2] ^= 0x10  # same length, one flipped bit
    bad_blob.write_bytes(bytes(data))
    srv = server(captured.model, store, tmp_path, "C", module_path=True).start()
    try:
        resp = srv.complete(captured.prompt, salt="session-1")
        # Only the blocks before the corrupt one are loaded; the rest is recomputed.
        assert srv.metric(EXTERNAL_HITS) == bad_index * BLOCK
        assert cached(resp) == bad_index * BLOCK
        tokens, lps, _ = logprobs(resp)
        ref_tokens, ref_lps, _ = logprobs(captured.reference)
        assert tokens == ref_tokens
        assert lps == pytest.approx(ref_lps, abs=0.05)
        stats = worker_stats(store)
        assert stats["digest_errors"] == 1
        assert stats.get("load_errors", 0) == 0  # refused before any promise
        assert not bad_blob.exists()
        assert (store / "quarantine" / bad_blob.name).exists()
        log = (tmp_path / "C.log").read_text()
        assert "failed verification" in log and captured.block_digests[bad_index].hex() in log
    finally:
        srv.stop()


def test_changed_weights_under_same_path_get_no_hit(captured: Captured, tmp_path: Path) -> None:
    # Runs last in this module: it rebuilds the module's model in place.
    store = copy_store(captured, tmp_path / "store")
    build_tiny_model(captured.model, TinyModelSpec(seed=1))
    srv = server(captured.model, store, tmp_path, "D").start()
    try:
        with pytest.raises(CwmError) as err:
            ControlClient(store / "control.sock").call("thaw", name="win")
        assert err.value.code == "fingerprint_mismatch" and "weights" in err.value.message
        resp = srv.complete(captured.prompt, salt="session-1")
        assert srv.metric(EXTERNAL_HITS) == 0
        assert cached(resp) == 0
        assert worker_stats(store).get("loaded_blocks", 0) == 0
    finally:
        srv.stop()
