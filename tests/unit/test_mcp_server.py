"""The MCP layer end to end: real MCP clients (in-memory, stdio, streamable HTTP) against
`cwm_mcp`, which talks to a real ControlServer on a temp socket.

The socket's handler is a small in-test stand-in for the connector (windows in a
dict); it only drives the MCP layer. The connector's own ops are tested in
test_windows.py and end to end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.types import CallToolResult

from cwm_connector.client import ControlClient
from cwm_connector.control import ControlServer
from cwm_connector.errors import CwmError
from cwm_mcp.server import build_server

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOL_NAMES = {
    "window_freeze",
    "window_thaw",
    "window_list",
    "window_status",
    "window_clone",
    "window_delete",
    "window_export",
    "window_import",
    "cwm_stats",
}
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
}
SESSION_TOKENS = {"s1": [11, 12, 13, 14, 15], "s2": [21, 22]}
CALL_TIMEOUT_S = 30.0


class FakeConnector:
    """Stands in for the connector's op handler: windows in a dict, the same error codes."""

    def __init__(self) -> None:
        self.windows: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def handle(self, op: str, args: dict[str, Any], progress: Any = None) -> Any:
        with self._lock:
            self.calls.append((op, dict(args)))
            return getattr(self, f"op_{op}")(**args)

    def _get(self, name: str) -> dict[str, Any]:
        if name not in self.windows:
            raise CwmError(f"no window named {name!r}", code="window_not_found")
        return self.windows[name]

    def _make(self, name: str, salt: str, parent: str | None) -> dict[str, Any]:
        tokens = SESSION_TOKENS[salt] if salt in SESSION_TOKENS else SESSION_TOKENS["s1"]
        window = {
            "name": name,
            "salt": salt,
            "session": f"digest-{salt}",
            "tokens": len(tokens),
            "blocks": 1,
            "bytes": 4096,
            "stored_bytes": 1024,
            "created": 1_700_000_000.5,
            "parent": parent,
            "fingerprint": "0123456789abcdef",
            "tiers": ["disk"],
        }
        self.windows[name] = window
        return window

    def op_freeze(self, salt: str, name: str, overwrite: bool = False) -> dict[str, Any]:
        if salt not in SESSION_TOKENS:
            raise CwmError("no finished request with this salt", code="unknown_session")
        if name in self.windows and not overwrite:
            raise CwmError(f"window {name!r} exists (pass overwrite)", code="window_exists")
        return self._make(name, salt, None)

    def op_thaw(self, name: str) -> dict[str, Any]:
        window = self._get(name)
        token_ids = SESSION_TOKENS[window["salt"]]
        return {**window, "token_ids": token_ids, "text": " ".join(map(str, token_ids))}

    def op_list(self) -> list[dict[str, Any]]:
        return list(self.windows.values())

    def op_status(self, name: str) -> dict[str, Any]:
        return {**self._get(name), "complete": True, "damaged_blobs": 0}

    def op_clone(self, src: str, dst: str, salt: str | None = None) -> dict[str, Any]:
        window = self._get(src)
        return self._make(dst, window["salt"] if salt is None else salt, src)

    def op_delete(self, name: str) -> dict[str, Any]:
        self._get(name)
        del self.windows[name]
        return {"name": name, "deleted": True, "freed_blobs": 1, "freed_bytes": 1024}

    def op_export(self, name: str, file: str) -> dict[str, Any]:
        self._get(name)
        return {"name": name, "file": file, "bytes": 5000}

    def op_import(self, file: str, name: str | None = None) -> dict[str, Any]:
        if not file.startswith("/"):
            raise CwmError("file must be an absolute path", code="bad_request")
        return self._make(name or "imported", "s2", None)

    def op_stats(self) -> dict[str, Any]:
        return {"hits": 3, "store": {"windows": len(self.windows)}, "sessions": 2}


@pytest.fixture
def connector() -> Iterator[tuple[Path, FakeConnector]]:
    """A live ControlServer on a short /tmp socket path, served by a FakeConnector."""
    tmp = Path(tempfile.mkdtemp(prefix="cwm-mcp-", dir="/tmp"))
    path = tmp / "c.sock"
    fake = FakeConnector()
    server = ControlServer(path, fake.handle)
    server.start()
    try:
        yield path, fake
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


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


@pytest.mark.timeout(60)
def test_in_memory_tools_cover_every_op(connector: tuple[Path, FakeConnector]) -> None:
    path, fake = connector
    server = build_server(ControlClient(path, timeout_s=CALL_TIMEOUT_S))

    async def body() -> None:
        async with Client(server, read_timeout_seconds=CALL_TIMEOUT_S) as client:
            tools = {tool.name: tool for tool in (await client.list_tools()).tools}
            assert set(tools) == TOOL_NAMES
            for name in ("window_list", "window_status", "cwm_stats"):
                assert tools[name].annotations is not None
                assert tools[name].annotations.read_only_hint is True, name
            for name in TOOL_NAMES - {"window_list", "window_status", "cwm_stats"}:
                assert tools[name].annotations.read_only_hint is not True, name
            assert tools["window_delete"].annotations.destructive_hint is True
            assert all(tool.output_schema for tool in tools.values())
            salt_schema = tools["window_freeze"].input_schema["properties"]["salt"]
            assert "cache_salt" in salt_schema["description"]
            freeze_doc = tools["window_freeze"].description or ""
            assert "window_thaw" in freeze_doc and "\n    " not in freeze_doc
            assert "token_ids" in (tools["window_thaw"].description or "")

            args = {"salt": "s1", "name": "a"}
            frozen = structured(await client.call_tool("window_freeze", args))
            assert set(frozen) >= WINDOW_FIELDS and frozen["tokens"] == 5
            clone = structured(
                await client.call_tool("window_clone", {"src": "a", "dst": "b", "salt": "s2"})
            )
            assert (clone["name"], clone["parent"], clone["salt"]) == ("b", "a", "s2")
            status = structured(await client.call_tool("window_status", {"name": "b"}))
            assert (status["complete"], status["damaged_blobs"]) == (True, 0)
            exported = structured(
                await client.call_tool("window_export", {"name": "a", "file": "/tmp/a.cwm"})
            )
            assert exported == {"name": "a", "file": "/tmp/a.cwm", "bytes": 5000}
            imported = structured(await client.call_tool("window_import", {"file": "/tmp/a.cwm"}))
            assert imported["name"] == "imported"
            deleted = structured(await client.call_tool("window_delete", {"name": "b"}))
            assert deleted == {"name": "b", "deleted": True, "freed_blobs": 1, "freed_bytes": 1024}
            stats = structured(await client.call_tool("cwm_stats", {}))
            assert stats["store"] == {"windows": 2} and stats["hits"] == 3

            again = await client.call_tool("window_freeze", args)
            assert "window_exists: window 'a' exists" in error_text(again)
            unknown = await client.call_tool("window_freeze", {"salt": "zz", "name": "c"})
            assert "unknown_session:" in error_text(unknown)

    run_async(body)
    # The tools forward their arguments under the op's own names, defaults included.
    assert fake.calls[:4] == [
        ("freeze", {"salt": "s1", "name": "a", "overwrite": False}),
        ("clone", {"src": "a", "dst": "b", "salt": "s2"}),
        ("status", {"name": "b"}),
        ("export", {"name": "a", "file": "/tmp/a.cwm"}),
    ]
    assert ("import", {"file": "/tmp/a.cwm", "name": None}) in fake.calls
    assert set(fake.windows) == {"a", "imported"}


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


# -- stdio: `python -m cwm_mcp` as a subprocess ---------------------------------------


@pytest.mark.timeout(120)
def test_stdio_subprocess(connector: tuple[Path, FakeConnector], tmp_path: Path) -> None:
    path, fake = connector
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "cwm_mcp", "--socket", str(path)], cwd=REPO_ROOT
    )
    errlog_path = tmp_path / "stderr.log"

    async def body() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with errlog_path.open("w") as errlog:
            transport = stdio_client(params, errlog=errlog)
            async with Client(transport, read_timeout_seconds=CALL_TIMEOUT_S) as client:
                out["tools"] = {tool.name for tool in (await client.list_tools()).tools}
                out["freeze"] = await client.call_tool(
                    "window_freeze", {"salt": "s1", "name": "w1"}
                )
                out["list"] = await client.call_tool("window_list", {})
                out["thaw"] = await client.call_tool("window_thaw", {"name": "w1"})
                out["missing"] = await client.call_tool("window_status", {"name": "nope"})
        return out

    try:
        out = run_async(body, timeout_s=90)
    except BaseException:
        print(errlog_path.read_text(errors="replace"))
        raise
    assert out["tools"] == TOOL_NAMES
    frozen = structured(out["freeze"])
    assert set(frozen) >= WINDOW_FIELDS
    assert (frozen["name"], frozen["salt"], frozen["tokens"]) == ("w1", "s1", 5)
    listed = structured(out["list"])["result"]
    assert [w["name"] for w in listed] == ["w1"] and listed[0]["tiers"] == ["disk"]
    thawed = structured(out["thaw"])
    assert thawed["token_ids"] == SESSION_TOKENS["s1"]
    assert thawed["text"] == "11 12 13 14 15" and thawed["salt"] == "s1"
    assert "window_not_found: no window named 'nope'" in error_text(out["missing"])
    assert ("freeze", {"salt": "s1", "name": "w1", "overwrite": False}) in fake.calls


# -- streamable HTTP: `python -m cwm_mcp --http PORT` as a subprocess -----------------


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    assert ("list", {}) in fake.calls
    assert proc.returncode is not None
    assert f"http://127.0.0.1:{port}/mcp" in log_path.read_text(errors="replace")
