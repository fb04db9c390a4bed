"""The bounded disk tier on real vLLM servers (issue 15): `disk_bytes` and `disk_min_free`.

Five times the budget in salted sessions goes through a server: the blob files never pass
the budget (plus one capture in flight), a window frozen early stays whole and thaws
losslessly after a restart while eviction runs beside it, the newest session still
restores, and once windows alone fill the budget a freeze fails with `store_full` and
leaves nothing behind. On a small real tmpfs, `disk_min_free` keeps the filesystem's free
share while captures go on.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from e2e_tools import BLOCK, EXTERNAL_HITS, cwm, metric_at_least, outputs, server
from fault_tools import tmpfs

from cwm_connector.demo.tiny_model import make_prompt
from cwm_connector.stats import read_stats
from cwm_connector.store.catalog import Catalog, catalog_path

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

BUDGET = 4 << 20
SESSION_TOKENS = 1000
SESSION_BLOCKS = SESSION_TOKENS // BLOCK  # full blocks captured per new session
NUM_SESSIONS = 20  # about 1 MB of blobs each: five times the budget
EVICTED = "cwm:evicted_blobs_total"
ERRORS = ("cwm:store_errors_total", "cwm:digest_errors_total", "cwm:load_errors_total")


def blob_bytes(store: Path) -> int:
    """Bytes of the blob files on disk (what the budget bounds)."""
    return sum(p.stat().st_size for p in (store / "blobs").rglob("*.blob"))


def cached(resp: dict[str, Any]) -> int:
    return int(resp["usage"]["prompt_tokens_details"]["cached_tokens"])


def settled(store: Path, blocks: int, timeout_s: float = 60.0) -> None:
    """Wait until the worker has captured (or refused for space) `blocks` blocks in all:
    captures run after the reply, so a sample taken at once would miss the newest."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = read_stats(store)
        done = stats.get("captured_blocks", 0) + stats.get("store_full_blocks", 0)
        if done >= blocks:
            return
        assert time.monotonic() < deadline, f"{done} of {blocks} blocks captured"
        time.sleep(0.05)


def capture_slack(store: Path) -> int:
    """One capture in flight: a whole session's blobs (the largest blob times its blocks)."""
    cat = Catalog(catalog_path(store))
    try:
        raw = cat.any_blob_raw_bytes()
    finally:
        cat.close()
    return (SESSION_TOKENS // BLOCK + 1) * (raw + 4096)


def test_disk_budget_evicts_cache_never_windows(tiny_model: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    sock = store / "control.sock"
    prompts = [make_prompt(tiny_model, SESSION_TOKENS, seed=300 + i) for i in range(NUM_SESSIONS)]
    early = make_prompt(tiny_model, SESSION_TOKENS, seed=299)
    srv = server(tiny_model, store, tmp_path, "A", disk_bytes=BUDGET).start()
    try:
        srv.complete(early, salt="early", max_tokens=2)
        settled(store, SESSION_BLOCKS)
        early_ref = srv.complete(early, salt="early")  # vLLM's own prefix-cache hit
        code, window = cwm(sock, "freeze", "early", "w-early")
        assert code == 0 and window["blocks"] == SESSION_TOKENS // BLOCK, window
        slack = capture_slack(store)
        sizes = []
        for i, prompt in enumerate(prompts):
            srv.complete(prompt, salt=f"s{i}", max_tokens=2)
            settled(store, (i + 2) * SESSION_BLOCKS)
            sizes.append(blob_bytes(store))
            assert sizes[-1] <= BUDGET + slack, sizes
        newest_ref = srv.complete(prompts[-1], salt=f"s{NUM_SESSIONS - 1}")
        metric_at_least(srv, EVICTED, 1)
        assert blob_bytes(store) <= BUDGET  # settled: within the budget itself
        assert sum(sizes) > 0 and max(sizes) > BUDGET // 2
    finally:
        srv.stop()
    cat = Catalog(catalog_path(store))
    assert cat.usage_drift() == {}  # the running totals equal a full recount
    assert cat.usage()["disk"] == blob_bytes(store)  # no orphan file, no dangling row
    cat.close()

    srv = server(tiny_model, store, tmp_path, "B", disk_bytes=BUDGET).start()
    try:
        newest = srv.complete(prompts[-1], salt=f"s{NUM_SESSIONS - 1}")
        assert srv.metric(EXTERNAL_HITS) > 0  # the newest session restored after the restart
        assert outputs(newest) == outputs(newest_ref)

        code, thawed = cwm(sock, "thaw", "w-early")
        assert code == 0 and thawed["blocks"] == SESSION_TOKENS // BLOCK, thawed
        # Eviction pressure beside the thawed window's next request: new sessions push
        # the store past its budget while the window's blocks are staged and loaded.
        pressure = threading.Thread(target=push, args=(srv, tiny_model, 40, 6), daemon=True)
        before = srv.metric(EVICTED)
        pressure.start()
        restored = srv.complete(early, salt="early")
        pressure.join(300)
        assert cached(restored) == (SESSION_TOKENS // BLOCK) * BLOCK
        assert outputs(restored) == outputs(early_ref)  # tokens and logprobs, exactly
        metric_at_least(srv, EVICTED, before + 1)
        assert blob_bytes(store) <= BUDGET + capture_slack(store)

        # Windows alone fill the budget: freezing fresh sessions ends with store_full.
        settled(store, 6 * SESSION_BLOCKS)  # the pressure's sessions, on this server
        stats = read_stats(store)
        done = stats.get("captured_blocks", 0) + stats.get("store_full_blocks", 0)
        codes = []
        for i in range(8):
            salt = f"full{i}"
            srv.complete(make_prompt(tiny_model, SESSION_TOKENS, seed=500 + i), salt=salt,
                         max_tokens=2)  # fmt: skip
            settled(store, done + (i + 1) * SESSION_BLOCKS)
            code, answer = cwm(sock, "freeze", salt, f"w-{salt}")
            codes.append(code)
            if code != 0:
                break
        assert code == 1 and answer["error"]["code"] == "store_full", answer
        assert "disk_bytes" in answer["error"]["message"]
        assert cwm(sock, "status", f"w-full{len(codes) - 1}")[0] == 1  # no window row
        cat = Catalog(catalog_path(store))
        assert cat.usage()["pinned"] <= BUDGET and cat.usage_drift() == {}
        cat.close()
        assert blob_bytes(store) <= BUDGET
        code, window = cwm(sock, "status", "w-early")
        assert code == 0 and window["complete"] is True, window
        for name in ERRORS:
            assert srv.metric(name) == 0, name
        # The disk tier against its budget, as gauges in vLLM's /metrics.
        assert metric_at_least(srv, "cwm:disk_limit_bytes", 1) == BUDGET
        assert 0 < srv.metric("cwm:disk_pinned_bytes") <= srv.metric("cwm:disk_used_bytes")
        assert srv.metric("cwm:disk_used_bytes") <= BUDGET
    finally:
        srv.stop()


def push(srv: Any, model: Path, seed: int, count: int) -> None:
    """Send `count` new salted sessions (eviction pressure)."""
    for i in range(count):
        prompt = make_prompt(model, SESSION_TOKENS, seed=seed + i)
        srv.complete(prompt, salt=f"p{seed + i}", max_tokens=2)


def test_disk_min_free_keeps_the_filesystem_free(tiny_model: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "store", "12m") as store:
        keep = 6 << 20  # half the filesystem stays free
        srv = server(tiny_model, store, tmp_path, "M", disk_min_free=0.5).start()
        try:
            low = []
            for i in range(10):  # about 10 MB of blobs through a 12 MB filesystem
                prompt = make_prompt(tiny_model, SESSION_TOKENS, seed=700 + i)
                srv.complete(prompt, salt=f"m{i}", max_tokens=2)
                settled(store, (i + 1) * SESSION_BLOCKS)
                st = os.statvfs(store)
                low.append(st.f_bavail * st.f_frsize)
            slack = capture_slack(store)
            assert min(low) >= keep - slack, low
            metric_at_least(srv, EVICTED, 1)
            metric_at_least(srv, "cwm:captured_blocks_total", 10 * (SESSION_TOKENS // BLOCK))
            assert srv.metric("cwm:store_errors_total") == 0  # never a failed write
            last = make_prompt(tiny_model, SESSION_TOKENS, seed=709)
            code, window = cwm(store / "control.sock", "freeze", "m9", "w-last")
            assert code == 0 and window["blocks"] == SESSION_TOKENS // BLOCK, window
            assert cached(srv.complete(last, salt="m9")) > 0
        finally:
            srv.stop()
