"""The MCP layer: a real in-memory MCP client against `cwm_mcp`, which talks to a real
ControlServer on a temp socket served by mcp_fakes.FakeConnector (every tool and
resource, annotations, error mapping). Subprocess transports: test_mcp_transports.py.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import MCPError
from mcp.client import Client
from mcp.types import CallToolResult
from mcp_fakes import (
    DIGESTS,
    PROMETHEUS_TEXT,
    SESSION_TOKENS,
    FakeConnector,
    FakeVllm,
    closed_url,
)

from cwm_connector.control.client import ControlClient
from cwm_mcp.server import build_server
from cwm_mcp.vllm_api import VllmApi

TOOL_NAMES = {
    "window_freeze",
    "window_thaw",
    "window_list",
    "window_status",
    "window_clone",
    "window_delete",
    "window_export",
    "window_import",
    "session_list",
    "cwm_stats",
    "get_metrics_data",
    "cwm_health",
    "auto_freeze_config",
    "auto_freeze_check",
}
READ_ONLY_TOOLS = {"window_list", "window_status", "session_list", "cwm_stats"} | {
    "get_metrics_data",
    "cwm_health",
}
RESOURCES = {"sessions://list", "windows://list", "stats://cache", "health://status"}
WINDOW_FIELDS = {
    "name",
    "salt",
    "session",
    "tokens",
    "blocks",
    "bytes",
    "stored_bytes",
    "created",
    "parent",
    "fingerprint",
    "tiers",
    "description",
    "tags",
}
CALL_TIMEOUT_S = 30.0


def structured(result: CallToolResult) -> dict[str, Any]:
    """The structured content of a successful call (fails the test on an error result)."""
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


def error_text(result: CallToolResult) -> str:
    """The text of an error result (fails the test on success)."""
    assert result.is_error, result
    return " ".join(getattr(block, "text", "") for block in result.content)


def run_async(fn: Any, *args: Any, timeout_s: float = 60.0) -> Any:
    """Run an async test body with a hard bound on its duration."""

    async def bounded() -> Any:
        with anyio.fail_after(timeout_s):
            return await fn(*args)

    return anyio.run(bounded)


# -- in-memory: every tool, annotations, error mapping ------------------------------


def make_server(path: Path, vllm_url: str) -> Any:
    """The MCP server bound to the fake connector's socket and a vLLM URL."""
    return build_server(ControlClient(path, timeout_s=CALL_TIMEOUT_S), VllmApi(vllm_url))


def in_memory(path: Path, vllm_url: str, body: Any) -> Any:
    """Run `body(client)` against an in-memory MCP client of the server."""

    async def wrapped() -> Any:
        async with Client(make_server(path, vllm_url), read_timeout_seconds=CALL_TIMEOUT_S) as c:
            return await body(c)

    return run_async(wrapped)


@pytest.mark.timeout(60)
def test_tool_listing_schemas_and_annotations(connector: tuple[Path, FakeConnector]) -> None:
    path, _ = connector

    async def body(client: Client) -> dict[str, Any]:
        return {tool.name: tool for tool in (await client.list_tools()).tools}

    tools = in_memory(path, closed_url(), body)
    assert set(tools) == TOOL_NAMES
    for name, tool in tools.items():
        assert tool.annotations is not None and tool.output_schema, name
        assert (tool.annotations.read_only_hint is True) == (name in READ_ONLY_TOOLS), name
        assert tool.description and "\n    " not in tool.description, name
        for arg, schema in tool.input_schema.get("properties", {}).items():
            assert schema.get("description"), f"{name}.{arg} has no description"
    assert tools["window_delete"].annotations.destructive_hint is True
    assert "cache_salt" in tools["window_freeze"].input_schema["properties"]["salt"]["description"]
    assert "window_thaw" in (tools["window_freeze"].description or "")
    assert "token_ids" in (tools["window_thaw"].description or "")
    args = {name: list(tool.input_schema.get("properties", {})) for name, tool in tools.items()}
    assert args["window_freeze"] == ["salt", "name", "overwrite", "description", "tags"]
    assert args["window_thaw"] == ["name", "new_salt", "warm", "continuation", "max_tokens"]
    assert args["window_list"] == [
        "tags", "model", "session_id", "search", "sort_by", "sort_order", "limit", "offset"
    ]  # fmt: skip
    assert args["window_status"] == ["name", "session_id", "include_cache_stats", "include_lineage"]
    assert args["window_clone"] == ["src", "dst", "salt", "description", "tags"]
    assert args["session_list"] == ["limit", "reveal_salts"]
    assert args["cwm_health"] == ["component"]
    assert args["get_metrics_data"] == ["format"]
    assert args["auto_freeze_check"] == ["session_id", "token_count", "trigger"]
    assert set(args["auto_freeze_config"]) == set(FakeConnector().policy)


@pytest.mark.timeout(60)
def test_window_tools_forward_exact_args(connector: tuple[Path, FakeConnector]) -> None:
    path, fake = connector

    async def body(client: Client) -> dict[str, Any]:
        out: dict[str, Any] = {}

        async def call(key: str, tool: str, args: dict[str, Any]) -> None:
            out[key] = await client.call_tool(tool, args)

        await call("freeze", "window_freeze", {"salt": "s1", "name": "a"})
        await call("freeze_labelled", "window_freeze", {
            "salt": DIGESTS["s2"], "name": "b", "overwrite": True,
            "description": "the plan", "tags": ["x", "y"],
        })  # fmt: skip
        await call("clone", "window_clone", {"src": "a", "dst": "c", "salt": "s2"})
        await call("clone_labelled", "window_clone", {
            "src": "c", "dst": "d", "description": "branch", "tags": ["x"],
        })  # fmt: skip
        await call("list", "window_list", {})
        await call("list_filtered", "window_list", {
            "tags": ["x"], "model": "tiny", "session_id": DIGESTS["s2"], "search": "plan",
            "sort_by": "tokens", "sort_order": "desc", "limit": 5, "offset": 2,
        })  # fmt: skip
        await call("bad_sort", "window_list", {"sort_by": "size"})
        await call("bad_limit", "window_list", {"limit": -1})
        await call("export", "window_export", {"name": "a", "file": "/tmp/a.cwm"})
        await call("import", "window_import", {"file": "/tmp/a.cwm"})
        await call("delete", "window_delete", {"name": "d"})
        await call("stats", "cwm_stats", {})
        await call("exists", "window_freeze", {"salt": "s1", "name": "a"})
        await call("unknown", "window_freeze", {"salt": "zz", "name": "z"})
        await call("missing", "window_delete", {"name": "nope"})
        return out

    calls_before = len(fake.calls)
    out = in_memory(path, closed_url(), body)
    frozen = structured(out["freeze"])
    assert set(frozen) >= WINDOW_FIELDS and frozen["tokens"] == 5
    assert (frozen["description"], frozen["tags"]) == ("", [])
    labelled = structured(out["freeze_labelled"])
    assert (labelled["salt"], labelled["description"], labelled["tags"]) == (
        "s2", "the plan", ["x", "y"]
    )  # fmt: skip
    clone = structured(out["clone"])
    assert (clone["name"], clone["parent"], clone["salt"]) == ("c", "a", "s2")
    assert structured(out["clone_labelled"])["tags"] == ["x"]
    listed = structured(out["list"])["result"]
    assert [w["name"] for w in listed] == ["a", "b", "c", "d"]
    assert all(set(w) >= WINDOW_FIELDS for w in listed)
    assert len(structured(out["list_filtered"])["result"]) == 4  # the fake does not filter
    assert "sort_by" in error_text(out["bad_sort"])
    assert "limit" in error_text(out["bad_limit"])
    assert structured(out["export"]) == {"name": "a", "file": "/tmp/a.cwm", "bytes": 5000}
    assert structured(out["import"])["name"] == "imported"
    deleted = structured(out["delete"])
    assert deleted == {"name": "d", "deleted": True, "freed_blobs": 1, "freed_bytes": 1024}
    stats = structured(out["stats"])
    assert stats["hits"] == 3 and stats["store"] == {"windows": 4}
    assert "window_exists: window 'a' exists" in error_text(out["exists"])
    assert "unknown_session:" in error_text(out["unknown"])
    assert "window_not_found: no window named 'nope'" in error_text(out["missing"])
    # Arguments arrive under the op's own names, defaults included; invalid ones never leave.
    list_defaults = {
        "tags": None, "model": None, "session": None, "search": None,
        "sort_by": "name", "sort_order": "asc", "limit": None, "offset": 0,
    }  # fmt: skip
    assert fake.calls[calls_before:] == [
        ("freeze", {"salt": "s1", "name": "a", "overwrite": False, "description": "",
                    "tags": []}),
        ("freeze", {"salt": DIGESTS["s2"], "name": "b", "overwrite": True,
                    "description": "the plan", "tags": ["x", "y"]}),
        ("clone", {"src": "a", "dst": "c", "salt": "s2", "description": "", "tags": []}),
        ("clone", {"src": "c", "dst": "d", "salt": None, "description": "branch",
                   "tags": ["x"]}),
        ("list", list_defaults),
        ("list", {"tags": ["x"], "model": "tiny", "session": DIGESTS["s2"], "search": "plan",
                  "sort_by": "tokens", "sort_order": "desc", "limit": 5, "offset": 2}),
        ("export", {"name": "a", "file": "/tmp/a.cwm"}),
        ("import", {"file": "/tmp/a.cwm", "name": None}),
        ("delete", {"name": "d"}),
        ("stats", {}),
        ("freeze", {"salt": "s1", "name": "a", "overwrite": False, "description": "",
                    "tags": []}),
        ("freeze", {"salt": "zz", "name": "z", "overwrite": False, "description": "",
                    "tags": []}),
        ("delete", {"name": "nope"}),
    ]  # fmt: skip


@pytest.mark.timeout(60)
def test_window_status_of_a_window_or_a_session(connector: tuple[Path, FakeConnector]) -> None:
    path, fake = connector
    fake.op_freeze("s1", "a")
    fake.op_clone("a", "b")
    fake.calls.clear()

    async def body(client: Client) -> dict[str, Any]:
        return {
            "window": await client.call_tool("window_status", {"name": "b"}),
            "full": await client.call_tool(
                "window_status",
                {"name": "a", "include_cache_stats": True, "include_lineage": False},
            ),
            "session": await client.call_tool("window_status", {"session_id": DIGESTS["s1"]}),
            "both": await client.call_tool("window_status", {"name": "a", "session_id": "s1"}),
            "neither": await client.call_tool("window_status", {}),
            "missing": await client.call_tool("window_status", {"name": "nope"}),
        }

    out = in_memory(path, closed_url(), body)
    window = structured(out["window"])
    assert window["kind"] == "window" and set(window) >= WINDOW_FIELDS
    assert (window["name"], window["complete"], window["damaged_blobs"]) == ("b", True, 0)
    assert window["resident_blocks"] == 1
    assert window["lineage"] == {"parent": "a", "root": "a", "depth": 1}
    assert window["cache_stats"] is None
    full = structured(out["full"])
    assert full["lineage"] is None and full["cache_stats"]["hits"] == 3
    session = structured(out["session"])
    assert session["kind"] == "session" and session["session"] == DIGESTS["s1"]
    assert (session["tokens"], session["windows"], session["updated"]) == (5, ["a", "b"], 1.7e9)
    assert session["name"] is None
    for key in ("both", "neither"):
        assert "bad_request: give exactly one of name or session_id" in error_text(out[key])
    assert "window_not_found" in error_text(out["missing"])
    assert fake.calls == [
        ("status", {"name": "b", "session": None, "include_cache_stats": False,
                    "include_lineage": True}),
        ("status", {"name": "a", "session": None, "include_cache_stats": True,
                    "include_lineage": False}),
        ("status", {"name": None, "session": DIGESTS["s1"], "include_cache_stats": False,
                    "include_lineage": True}),
        ("status", {"name": "nope", "session": None, "include_cache_stats": False,
                    "include_lineage": True}),
    ]  # fmt: skip


@pytest.mark.timeout(60)
def test_sessions_metrics_and_auto_freeze(connector: tuple[Path, FakeConnector]) -> None:
    path, fake = connector
    fake.op_freeze("s2", "w")
    fake.calls.clear()

    async def body(client: Client) -> dict[str, Any]:
        out: dict[str, Any] = {}
        out["sessions"] = await client.call_tool("session_list", {})
        out["revealed"] = await client.call_tool("session_list", {"limit": 1, "reveal_salts": True})
        out["json"] = await client.call_tool("get_metrics_data", {})
        out["prom"] = await client.call_tool("get_metrics_data", {"format": "prometheus"})
        out["bad_format"] = await client.call_tool("get_metrics_data", {"format": "xml"})
        out["policy"] = await client.call_tool("auto_freeze_config", {})
        out["updated"] = await client.call_tool(
            "auto_freeze_config",
            {"enabled": True, "threshold_tokens": 4, "cooldown_s": 10, "tags": ["auto", "x"]},
        )
        out["bad_fraction"] = await client.call_tool(
            "auto_freeze_config", {"threshold_fraction": 2}
        )
        out["check"] = await client.call_tool("auto_freeze_check", {"session_id": "s1"})
        out["check_small"] = await client.call_tool(
            "auto_freeze_check", {"session_id": DIGESTS["s1"], "token_count": 2}
        )
        out["trigger"] = await client.call_tool(
            "auto_freeze_check", {"session_id": "s2", "trigger": True}
        )
        out["unknown"] = await client.call_tool("auto_freeze_check", {"session_id": "zz"})
        return out

    out = in_memory(path, closed_url(), body)
    sessions = structured(out["sessions"])["result"]
    assert [(s["session"], s["tokens"], s["windows"]) for s in sessions] == [
        (DIGESTS["s1"], 5, []), (DIGESTS["s2"], 2, ["w"])
    ]  # fmt: skip
    assert all("salt" not in s for s in sessions)
    assert structured(out["revealed"])["result"][0]["salt"] == "s1"
    metrics = structured(out["json"])
    assert metrics["format"] == "json" and metrics["metrics"]["hits"] == 3
    assert metrics["text"] is None
    prom = structured(out["prom"])
    assert prom == {"format": "prometheus", "metrics": None, "text": PROMETHEUS_TEXT}
    assert "format" in error_text(out["bad_format"])
    assert structured(out["policy"]) == {**FakeConnector().policy}
    updated = structured(out["updated"])
    assert (updated["enabled"], updated["threshold_tokens"], updated["cooldown_s"]) == (
        True, 4, 10.0
    )  # fmt: skip
    assert updated["tags"] == ["auto", "x"]
    assert "threshold_fraction" in error_text(out["bad_fraction"])
    check = structured(out["check"])
    assert check == {
        "session": DIGESTS["s1"], "tokens": 5, "threshold": 4, "would_freeze": True,
        "reason": "at threshold", "window": None,
    }  # fmt: skip
    assert structured(out["check_small"])["would_freeze"] is False
    triggered = structured(out["trigger"])
    assert triggered["reason"] == "triggered" and triggered["window"]["tags"] == ["auto"]
    assert triggered["window"]["name"] == f"auto-{DIGESTS['s2']}-1"
    assert "unknown_session:" in error_text(out["unknown"])
    assert fake.calls == [
        ("sessions", {"limit": 100, "reveal": False}),
        ("sessions", {"limit": 1, "reveal": True}),
        ("stats", {}),
        ("prometheus", {}),
        ("auto_freeze_config", {"update": None}),
        ("auto_freeze_config", {"update": {"enabled": True, "threshold_tokens": 4,
                                           "cooldown_s": 10.0, "tags": ["auto", "x"]}}),
        ("auto_freeze_check", {"session": "s1", "tokens": None, "trigger": False}),
        ("auto_freeze_check", {"session": DIGESTS["s1"], "tokens": 2, "trigger": False}),
        ("auto_freeze_check", {"session": "s2", "tokens": None, "trigger": True}),
        ("auto_freeze_check", {"session": "zz", "tokens": None, "trigger": False}),
    ]  # fmt: skip


@pytest.mark.timeout(60)
def test_health_adds_vllm_and_never_fails(
    connector: tuple[Path, FakeConnector], vllm: FakeVllm
) -> None:
    path, fake = connector
    down = closed_url()

    async def body(client: Client) -> dict[str, Any]:
        return {
            "all": await client.call_tool("cwm_health", {}),
            "disk": await client.call_tool("cwm_health", {"component": "disk"}),
            "bogus": await client.call_tool("cwm_health", {"component": "gpu"}),
        }

    out = in_memory(path, vllm.url, body)
    health = structured(out["all"])
    assert health["ok"] is True
    assert set(health["components"]) == {"store", "disk", "redis", "control_socket", "vllm"}
    assert health["components"]["vllm"]["ok"] is True
    assert health["components"]["vllm"]["url"] == vllm.url
    assert health["components"]["redis"] == {"ok": True, "configured": False}
    disk = structured(out["disk"])
    assert disk == {"ok": True, "components": {"disk": {"ok": True, "free_bytes": 10**9,
                                                       "writable": True}}}  # fmt: skip
    assert "bad_request: unknown component 'gpu'" in error_text(out["bogus"])
    assert ("GET", "/health", None) in vllm.requests
    assert fake.calls == [("health", {})] * 3

    async def vllm_down(client: Client) -> CallToolResult:
        return await client.call_tool("cwm_health", {})

    health = structured(in_memory(path, down, vllm_down))
    assert health["ok"] is False and health["components"]["store"]["ok"] is True
    assert health["components"]["vllm"]["ok"] is False and health["components"]["vllm"]["error"]

    no_socket = path.parent / "none.sock"
    health = structured(in_memory(no_socket, vllm.url, vllm_down))
    assert health["ok"] is False
    assert set(health["components"]) == {"control_socket", "vllm"}
    control = health["components"]["control_socket"]
    assert control["ok"] is False and control["error"]["code"] == "unavailable"
    assert health["components"]["vllm"]["ok"] is True


@pytest.mark.timeout(60)
def test_thaw_warm_and_continuation_through_vllm(
    connector: tuple[Path, FakeConnector], vllm: FakeVllm
) -> None:
    path, fake = connector
    fake.op_freeze("s1", "a")
    fake.calls.clear()

    async def body(client: Client) -> dict[str, Any]:
        out: dict[str, Any] = {}
        out["plain"] = await client.call_tool("window_thaw", {"name": "a"})
        out["warm"] = await client.call_tool("window_thaw", {"name": "a", "warm": True})
        out["text"] = await client.call_tool(
            "window_thaw", {"name": "a", "continuation": "Hi", "max_tokens": 2}
        )
        out["ids"] = await client.call_tool(
            "window_thaw",
            {"name": "a", "new_salt": "s9", "warm": True, "continuation": [5, 6]},
        )
        out["bad_max"] = await client.call_tool("window_thaw", {"name": "a", "max_tokens": 0})
        out["missing"] = await client.call_tool("window_thaw", {"name": "nope", "warm": True})
        return out

    out = in_memory(path, vllm.url, body)
    ids = SESSION_TOKENS["s1"]
    plain = structured(out["plain"])
    assert (plain["token_ids"], plain["text"], plain["staged_blocks"]) == (ids, "11 12 13 14 15", 1)
    assert (plain["warmed"], plain["reply"]) == (False, None)
    warm = structured(out["warm"])
    assert (warm["warmed"], warm["reply"]) == (True, None)
    text = structured(out["text"])
    assert text["warmed"] is False
    assert text["reply"] == {
        "text": " next", "token_ids": [7, 8], "logprobs": [-0.5, -0.25],
        "finish_reason": "length", "usage": {"prompt_tokens": 7, "completion_tokens": 2},
    }  # fmt: skip
    branched = structured(out["ids"])
    assert (branched["name"], branched["salt"], branched["parent"]) == ("a.s9", "s9", "a")
    assert branched["warmed"] is True and branched["reply"]["text"] == " next"
    assert "max_tokens" in error_text(out["bad_max"])
    assert "window_not_found" in error_text(out["missing"])
    assert fake.calls == [
        ("thaw", {"name": "a", "new_salt": None}),
        ("thaw", {"name": "a", "new_salt": None}),
        ("thaw", {"name": "a", "new_salt": None}),
        ("thaw", {"name": "a", "new_salt": "s9"}),
        ("thaw", {"name": "nope", "new_salt": None}),
    ]
    # Exactly what reached vLLM: the warm prompt alone, then prefix + continuation ids.
    assert vllm.posts("/tokenize") == [
        {"model": "tiny-llama", "prompt": "Hi", "add_special_tokens": False}
    ]
    continued = {"max_tokens": 2, "temperature": 0.0, "logprobs": 1, "return_token_ids": True}
    assert vllm.posts("/v1/completions") == [
        {"model": "tiny-llama", "prompt": ids, "max_tokens": 1, "cache_salt": "s1"},
        {"model": "tiny-llama", "prompt": [*ids, ord("H"), ord("i")], "cache_salt": "s1",
         **continued},
        {"model": "tiny-llama", "prompt": ids, "max_tokens": 1, "cache_salt": "s9"},
        {"model": "tiny-llama", "prompt": [*ids, 5, 6], "cache_salt": "s9",
         **continued, "max_tokens": 64},
    ]  # fmt: skip
    models = [r for r in vllm.requests if r[:2] == ("GET", "/v1/models")]
    assert len(models) == 3  # once per thaw that talks to vLLM


@pytest.mark.timeout(60)
def test_thaw_vllm_errors_are_tool_errors(
    connector: tuple[Path, FakeConnector], vllm: FakeVllm
) -> None:
    path, fake = connector
    fake.op_freeze("s1", "a")
    vllm.completion_status = 503

    async def body(client: Client) -> str:
        return error_text(await client.call_tool("window_thaw", {"name": "a", "warm": True}))

    text = in_memory(path, vllm.url, body)
    assert "vllm_unavailable: window 'a' is thawed (salt 's1') but POST " in text
    assert "HTTP 503: engine is sleeping" in text and "retryable" in text
    text = in_memory(path, closed_url(), body)
    assert "vllm_unavailable: window 'a' is thawed" in text and "/v1/models" in text


@pytest.mark.timeout(60)
def test_resources_are_json_views(connector: tuple[Path, FakeConnector], vllm: FakeVllm) -> None:
    path, fake = connector
    fake.op_freeze("s1", "a", tags=["x"])
    fake.calls.clear()

    async def body(client: Client) -> dict[str, Any]:
        listed = (await client.list_resources()).resources
        out: dict[str, Any] = {"listed": {str(r.uri): r for r in listed}}
        for uri in sorted(RESOURCES):
            contents = (await client.read_resource(uri)).contents
            assert len(contents) == 1 and contents[0].mime_type == "application/json"
            out[uri] = json.loads(contents[0].text)
        return out

    out = in_memory(path, vllm.url, body)
    assert set(out["listed"]) == RESOURCES
    assert all(r.description for r in out["listed"].values())
    assert [(w["name"], w["tags"]) for w in out["windows://list"]] == [("a", ["x"])]
    assert [s["session"] for s in out["sessions://list"]] == [DIGESTS["s1"], DIGESTS["s2"]]
    assert all("salt" not in s for s in out["sessions://list"])
    assert out["stats://cache"] == {"hits": 3, "store": {"windows": 1}, "sessions": 2}
    assert out["health://status"]["ok"] is True
    assert out["health://status"]["components"]["vllm"]["ok"] is True
    assert sorted(op for op, _ in fake.calls) == ["health", "list", "sessions", "stats"]
    assert ("sessions", {"limit": 100, "reveal": False}) in fake.calls


@pytest.mark.timeout(60)
def test_resource_errors_name_the_code() -> None:
    missing = Path(tempfile.mkdtemp(prefix="cwm-mcp-", dir="/tmp"))

    async def body(client: Client) -> str:
        with pytest.raises(MCPError) as caught:
            await client.read_resource("windows://list")
        return str(caught.value)

    try:
        text = in_memory(missing / "none.sock", closed_url(), body)
    finally:
        shutil.rmtree(missing, ignore_errors=True)
    assert "windows://list: unavailable: no cwm connector listens on" in text


@pytest.mark.timeout(60)
def test_no_connector_is_a_retryable_tool_error() -> None:
    missing = Path(tempfile.mkdtemp(prefix="cwm-mcp-", dir="/tmp"))
    server = build_server(ControlClient(missing / "none.sock", timeout_s=5))

    async def body() -> str:
        async with Client(server, read_timeout_seconds=CALL_TIMEOUT_S) as client:
            return error_text(await client.call_tool("window_list", {}))

    try:
        text = run_async(body)
    finally:
        shutil.rmtree(missing, ignore_errors=True)
    assert "unavailable: no cwm connector listens on" in text
    assert "retryable" in text
