"""The MCP server with no connector: read-only window tools answer from the store directory
(same structured results as through a live connector), engine tools say `unavailable`.

A real in-memory MCP client; the online side is a real ControlServer serving the
WindowService over the same store (store_builder.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.client import Client
from mcp_fakes import closed_url
from store_builder import build_store, served

from cwm_connector.control.client import ControlClient
from cwm_mcp.server import build_server
from cwm_mcp.vllm_api import VllmApi

READS: list[tuple[str, dict[str, Any]]] = [
    ("window_list", {}),
    ("window_list", {"tags": ["x"], "sort_by": "tokens", "sort_order": "desc"}),
    ("window_status", {"name": "w1"}),
    ("window_status", {"name": "w2", "include_lineage": False}),
]
ENGINE_TOOLS: list[tuple[str, dict[str, Any]]] = [
    ("window_freeze", {"salt": "s1", "name": "w3"}),
    ("window_thaw", {"name": "w1"}),
    ("window_delete", {"name": "w1"}),
    ("window_clone", {"src": "w1", "dst": "w4"}),
    ("session_list", {}),
    ("window_status", {"session_id": "s1"}),
]


def session(server: Any, calls: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """Each call's (is_error, structured content or error text)."""

    async def body() -> list[Any]:
        out = []
        with anyio.fail_after(60):
            async with Client(server, read_timeout_seconds=30) as client:
                for tool, args in calls:
                    result = await client.call_tool(tool, args)
                    text = result.content[0].text if result.content else ""
                    out.append((result.is_error, result.structured_content, text))
                contents = (await client.read_resource("windows://list")).contents
                out.append(contents[0].text)
        return out

    return anyio.run(body)


@pytest.mark.timeout(90)
def test_read_tools_answer_from_the_store_and_engine_tools_are_unavailable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = tmp_path / "store"
    svc, _, _ = build_store(store)
    with served(svc) as sock:
        online = session(build_server(ControlClient(sock), VllmApi(closed_url()), store), READS)
    missing = ControlClient(tmp_path / "none.sock", timeout_s=5)
    server = build_server(missing, VllmApi(closed_url()), store)
    offline = session(server, READS + ENGINE_TOOLS)
    for (tool, _), (is_error, content, _), (_, expected, _) in zip(
        READS, offline[: len(READS)], online[: len(READS)], strict=True
    ):
        assert not is_error and content == expected, tool
    assert [w["name"] for w in online[0][1]["result"]] == ["w1", "w2"]
    assert online[2][1]["kind"] == "window" and online[2][1]["resident_blocks"] is None
    engine_results = offline[len(READS) : -1]
    for (tool, _), (is_error, _, text) in zip(ENGINE_TOOLS, engine_results, strict=True):
        assert is_error and ": unavailable: " in text, (tool, text)
    assert offline[-1] == online[-1]  # the windows://list resource
    assert f"read the store at {store} directly" in caplog.text
