"""End to end through the real MCP client: thaw-and-continue, warm, and the whole tool surface.

`window_thaw` with a `continuation` returns vLLM's reply in one call, equal to
the reply vLLM gave while it still held the prefix, and the restored prefix is
counted as an external hit. With `warm`, the user's next request is a local
prefix-cache hit, not an external one. Every other tool and the four resources
answer on a real server.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_tools import BLOCK, CONTINUATION, EXTERNAL_HITS, mcp_call, mcp_session, server

from cwm_connector.demo.tiny_model import make_prompt
from cwm_connector.engine.sessions import salt_digest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_thaw_continue_warm_and_every_tool(tiny_model: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    sock = store / "control.sock"
    srv = server(tiny_model, store, tmp_path, "A").start()
    try:
        srv.complete(make_prompt(tiny_model, 3000, seed=51), salt="s1", max_tokens=8)
        freeze = {"salt": "s1", "name": "w1", "description": "mcp e2e", "tags": ["e2e"]}
        frozen, thawed = mcp_session(
            sock, [("window_freeze", freeze), ("window_thaw", {"name": "w1"})], srv.url
        )
        assert frozen["tags"] == ["e2e"] and frozen["description"] == "mcp e2e"
        token_ids = thawed["token_ids"]
        reference = srv.complete(token_ids + CONTINUATION, salt="s1", max_tokens=8)
    finally:
        srv.stop()

    srv = server(tiny_model, store, tmp_path, "B").start()
    try:
        continued = mcp_call(
            sock, "window_thaw", {"name": "w1", "continuation": CONTINUATION, "max_tokens": 8},
            srv.url,
        )  # fmt: skip
        assert continued["reply"]["text"] == reference["choices"][0]["text"]
        assert srv.metric(EXTERNAL_HITS) == frozen["blocks"] * BLOCK

        before = srv.metric(EXTERNAL_HITS)
        warmed = mcp_call(sock, "window_thaw", {"name": "w1", "new_salt": "s-warm", "warm": True},
                          srv.url)  # fmt: skip
        assert warmed["salt"] == "s-warm"
        assert srv.metric(EXTERNAL_HITS) - before == frozen["blocks"] * BLOCK  # the warm-up
        user = srv.complete(token_ids + CONTINUATION, salt="s-warm", max_tokens=8)
        assert srv.metric(EXTERNAL_HITS) - before == frozen["blocks"] * BLOCK  # no new external
        assert user["usage"]["prompt_tokens_details"]["cached_tokens"] == frozen["blocks"] * BLOCK
        assert user["choices"][0]["text"] == reference["choices"][0]["text"]

        srv.complete(token_ids, salt="s1", max_tokens=1)  # a live session for session tools
        results = mcp_session(
            sock,
            [
                ("window_list", {"tags": ["e2e"]}),
                ("window_status", {"name": "w1", "include_cache_stats": True}),
                ("window_status", {"session_id": "s1"}),
                ("window_clone", {"src": "w1", "dst": "w1-copy", "tags": ["copy"]}),
                ("window_export", {"name": "w1", "file": str(tmp_path / "w1.cwm")}),
                ("window_import", {"file": str(tmp_path / "w1.cwm"), "name": "w1-imported"}),
                ("window_delete", {"name": "w1-imported"}),
                ("session_list", {}),
                ("cwm_stats", {}),
                ("get_metrics_data", {"format": "prometheus"}),
                ("cwm_health", {}),
                ("auto_freeze_config", {"threshold_tokens": 100000}),
                ("auto_freeze_check", {"session_id": "s1"}),
                ("resource", {"uri": "windows://list"}),
                ("resource", {"uri": "sessions://list"}),
                ("resource", {"uri": "stats://cache"}),
                ("resource", {"uri": "health://status"}),
            ],
            srv.url,
        )
        listed, status, by_session, clone, export, imported, deleted = results[:7]
        sessions, stats, metrics, health, policy, check = results[7:13]
        res_windows, res_sessions, res_stats, res_health = results[13:]
        # the warm thaw's branch under the new salt inherited w1's tags
        assert [w["name"] for w in listed["result"]] == ["w1", warmed["name"]]
        assert status["complete"] is True and status["lineage"]["depth"] == 0
        assert "scheduler" in status["cache_stats"]
        assert "w1" in by_session["windows"] and by_session["session"] == salt_digest("s1")
        assert clone["parent"] == "w1" and clone["tags"] == ["copy"]
        assert export["bytes"] > 0 and imported["blocks"] == frozen["blocks"]
        assert deleted["deleted"] is True
        digests = {s["session"] for s in sessions["result"]}
        assert salt_digest("s1") in digests and all("salt" not in s for s in sessions["result"])
        assert stats["worker"]["loaded_blocks"] >= frozen["blocks"]
        assert "cwm:loaded_blocks_total" in metrics["text"]
        assert health["ok"] is True and health["components"]["vllm"]["ok"] is True
        assert policy["threshold_tokens"] == 100000 and policy["enabled"] is True
        assert check["would_freeze"] is False and check["threshold"] == 100000
        assert {"w1", "w1-copy"} <= {w["name"] for w in res_windows}
        assert salt_digest("s1") in {s["session"] for s in res_sessions}
        assert "scheduler" in res_stats and res_health["ok"] is True
    finally:
        srv.stop()
