"""The MCP server as a subprocess: real MCP clients over stdio and streamable HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.types import CallToolResult
from mcp_fakes import DIGESTS, REPO_ROOT, SESSION_TOKENS, FakeConnector, FakeVllm, free_port
from test_mcp_server import (
    CALL_TIMEOUT_S,
    TOOL_NAMES,
    WINDOW_FIELDS,
    error_text,
    run_async,
    structured,
)

# -- stdio: `python -m cwm_mcp` as a subprocess ---------------------------------------


@pytest.mark.timeout(120)
def test_stdio_subprocess(
    connector: tuple[Path, FakeConnector], vllm: FakeVllm, tmp_path: Path
) -> None:
    path, fake = connector
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "cwm_mcp", "--socket", str(path), "--vllm-url", vllm.url],
        cwd=REPO_ROOT,
    )
    errlog_path = tmp_path / "stderr.log"

    async def body() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with errlog_path.open("w") as errlog:
            transport = stdio_client(params, errlog=errlog)
            async with Client(transport, read_timeout_seconds=CALL_TIMEOUT_S) as client:
                out["tools"] = {tool.name for tool in (await client.list_tools()).tools}
                out["freeze"] = await client.call_tool(
                    "window_freeze", {"salt": "s1", "name": "w1", "tags": ["t"]}
                )
                out["list"] = await client.call_tool("window_list", {"tags": ["t"]})
                out["thaw"] = await client.call_tool(
                    "window_thaw", {"name": "w1", "continuation": [9]}
                )
                out["missing"] = await client.call_tool("window_status", {"name": "nope"})
                out["health"] = await client.call_tool("cwm_health", {"component": "vllm"})
                sessions = await client.read_resource("sessions://list")
                out["sessions"] = json.loads(sessions.contents[0].text)
        return out

    try:
        out = run_async(body, timeout_s=90)
    except BaseException:
        print(errlog_path.read_text(errors="replace"))
        raise
    assert out["tools"] == TOOL_NAMES
    frozen = structured(out["freeze"])
    assert set(frozen) >= WINDOW_FIELDS
    assert (frozen["name"], frozen["salt"], frozen["tokens"], frozen["tags"]) == (
        "w1", "s1", 5, ["t"]
    )  # fmt: skip
    listed = structured(out["list"])["result"]
    assert [w["name"] for w in listed] == ["w1"] and listed[0]["tiers"] == ["disk"]
    thawed = structured(out["thaw"])
    assert thawed["token_ids"] == SESSION_TOKENS["s1"]
    assert thawed["text"] == "11 12 13 14 15" and thawed["salt"] == "s1"
    assert thawed["reply"]["token_ids"] == [7, 8]
    assert vllm.posts("/v1/completions")[0]["prompt"] == [*SESSION_TOKENS["s1"], 9]
    assert "window_not_found: no window named 'nope'" in error_text(out["missing"])
    assert structured(out["health"])["components"]["vllm"]["url"] == vllm.url
    assert [s["session"] for s in out["sessions"]] == [DIGESTS["s1"], DIGESTS["s2"]]
    assert ("freeze", {"salt": "s1", "name": "w1", "overwrite": False, "description": "",
                       "tags": ["t"]}) in fake.calls  # fmt: skip


# -- streamable HTTP: `python -m cwm_mcp --http PORT` as a subprocess -----------------


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Block until something accepts on 127.0.0.1:port; fail if the process dies first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"MCP server exited early with {proc.returncode}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"MCP server did not listen on port {port} within {timeout_s}s")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server by its pid, SIGKILL it if it does not exit in time."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.mark.timeout(120)
def test_streamable_http_subprocess(connector: tuple[Path, FakeConnector], tmp_path: Path) -> None:
    path, fake = connector
    fake.op_freeze("s2", "w2")
    port = free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cwm_mcp", "--socket", str(path), "--http", str(port)],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, proc, timeout_s=30)

        async def body() -> CallToolResult:
            url = f"http://127.0.0.1:{port}/mcp"
            async with Client(url, read_timeout_seconds=CALL_TIMEOUT_S) as client:
                return await client.call_tool("window_list", {})

        result = run_async(body, timeout_s=60)
    except BaseException:
        stop_process(proc)
        print(log_path.read_text(errors="replace"))
        raise
    stop_process(proc)
    listed = structured(result)["result"]
    assert [(w["name"], w["salt"], w["tokens"]) for w in listed] == [("w2", "s2", 2)]
    assert [op for op, _ in fake.calls] == ["list"]
    assert proc.returncode is not None
    assert f"http://127.0.0.1:{port}/mcp" in log_path.read_text(errors="replace")
