"""End to end: auto-freeze inside the connector, cwm's counters in vLLM's /metrics.

A salted conversation grows past the policy's threshold on a real vLLM server;
a window appears by itself, complete and durable. The cooldown holds, keep-last
holds once the policy is changed at run time, cwm's counters move in /metrics,
and the automatic window thaws losslessly after a restart.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from e2e_tools import (
    BLOCK,
    CONTINUATION,
    EXTERNAL_HITS,
    cwm,
    metric_at_least,
    outputs,
    server,
)

from cwm_connector.demo.tiny_model import make_prompt

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

POLICY = {"threshold_tokens": 2000, "cooldown_s": 3600, "keep_last": 1}


def auto_windows(sock: Path) -> list[dict[str, Any]]:
    code, listed = cwm(sock, "list", "--tag", "auto", "--sort", "created")
    assert code == 0, listed
    return listed


def wait_for_windows(sock: Path, count: int, timeout_s: float = 90.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while len(found := auto_windows(sock)) < count:
        assert time.monotonic() < deadline, f"{len(found)} automatic windows, wanted {count}"
        time.sleep(0.5)
    return found


def test_auto_freeze_cooldown_keep_last_metrics_and_lossless_thaw(
    tiny_model: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    sock = store / "control.sock"
    srv = server(tiny_model, store, tmp_path, "A", auto_freeze=POLICY).start()
    try:
        srv.complete(make_prompt(tiny_model, 1000, seed=41), salt="s1", max_tokens=4)
        time.sleep(2.0)
        assert auto_windows(sock) == []  # below the threshold: nothing frozen
        long_prompt = make_prompt(tiny_model, 3000, seed=42)
        first = srv.complete(long_prompt, salt="s1", max_tokens=4)
        (window,) = wait_for_windows(sock, 1)
        assert window["tokens"] == first["usage"]["total_tokens"]
        assert window["blocks"] == (window["tokens"] - 1) // BLOCK and "auto" in window["tags"]
        code, status = cwm(sock, "status", window["name"])
        assert code == 0 and status["complete"] is True  # every blob durable and verified
        assert metric_at_least(srv, "cwm:auto_freezes_total", 1) == 1
        metric_at_least(srv, "cwm:captured_blocks_total", window["blocks"])

        srv.complete(long_prompt, salt="s1", max_tokens=8)  # crosses again, in cooldown
        time.sleep(3.0)
        assert [w["name"] for w in auto_windows(sock)] == [window["name"]]

        code, policy = cwm(sock, "auto-freeze", "--cooldown", "0")
        assert code == 0 and policy["cooldown_s"] == 0 and policy["keep_last"] == 1
        again = srv.complete(long_prompt, salt="s1", max_tokens=12)
        deadline = time.monotonic() + 90
        while (found := auto_windows(sock)) == [window] or not found:
            assert time.monotonic() < deadline, found
            time.sleep(0.5)
        (newest,) = found  # keep_last 1: the older automatic window was deleted
        assert newest["name"] != window["name"]
        assert newest["tokens"] == again["usage"]["total_tokens"]

        code, thawed = cwm(sock, "thaw", newest["name"])
        assert code == 0
        token_ids = thawed["token_ids"]
        reference = srv.complete(token_ids + CONTINUATION, salt="s1", max_tokens=8)
        metric_at_least(srv, "cwm:thaw_seconds_count", 1)
    finally:
        srv.stop()

    srv = server(tiny_model, store, tmp_path, "B").start()
    try:
        code, thawed = cwm(sock, "thaw", newest["name"])
        assert code == 0 and thawed["staged_blocks"] == newest["blocks"]
        restored = srv.complete(token_ids + CONTINUATION, salt="s1", max_tokens=8)
        assert srv.metric(EXTERNAL_HITS) == newest["blocks"] * BLOCK
        assert outputs(restored) == outputs(reference)
        metric_at_least(srv, "cwm:loaded_blocks_total", newest["blocks"])
        assert metric_at_least(srv, "cwm:prestaged_hit_blocks_total", 1) == newest["blocks"]
    finally:
        srv.stop()
