"""Helpers shared by the end-to-end tests: the `cwm` CLI as a subprocess, reply outputs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cwm_connector.demo.vllm_process import VllmServer, kv_transfer_config

BLOCK = 32
EXTERNAL_HITS = "vllm:external_prefix_cache_hits_total"
CONTINUATION = list(range(100, 120))  # 20 token ids: stays inside the window's last block


def cwm(socket: Path, *args: str) -> tuple[int, Any]:
    """Run `cwm ARGS --socket S --json`; its exit code and JSON document."""
    proc = subprocess.run(
        [sys.executable, "-m", "cwm_connector.cli", *args, "--socket", str(socket), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, json.loads(proc.stdout)


def server(model: Path, store: Path, logs: Path, name: str, **extra: Any) -> VllmServer:
    """A vLLM server with the connector on `store` (restores verified), not started."""
    config = kv_transfer_config({"store_dir": str(store), "verify_restore": True, **extra})
    return VllmServer(str(model), logs / f"{name}.log", connector=config)


def outputs(resp: dict[str, Any]) -> tuple[list[str], list[float], list[Any]]:
    """Tokens, logprobs and top logprobs of a completion."""
    lp = resp["choices"][0]["logprobs"]
    return lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]


def blob_files(store: Path) -> int:
    """Blob files in a store's disk tier."""
    return len(list((store / "blobs").rglob("*.blob")))


def metric_at_least(srv: VllmServer, name: str, value: float, timeout_s: float = 30.0) -> float:
    """Wait until a /metrics counter reaches value. Connector stats reach vLLM only with engine
    steps, so an idle server is nudged with an unsalted 1-token request each second."""
    deadline = time.monotonic() + timeout_s
    while (got := srv.metric(name)) < value:
        assert time.monotonic() < deadline, f"{name} = {got}, expected >= {value}"
        srv.complete("nudge", None, max_tokens=1)
        time.sleep(1.0)
    return got


Call = tuple[str, dict[str, Any]]  # (tool name, arguments), or ("resource", {"uri": ...})


def mcp_session(socket: Path, calls: list[Call], vllm_url: str | None = None) -> list[Any]:
    """Run tool calls and resource reads through the real MCP client, over stdio to `cwm mcp`.

    Each tool result must succeed and be structured; resources come back as parsed JSON.
    """
    import anyio
    from mcp.client import Client
    from mcp.client.stdio import StdioServerParameters, stdio_client

    args = ["-m", "cwm_connector.cli", "mcp", "--socket", str(socket)]
    if vllm_url:
        args += ["--vllm-url", vllm_url]
    params = StdioServerParameters(
        command=sys.executable, args=args, cwd=str(Path(__file__).resolve().parents[1])
    )

    async def body() -> list[Any]:
        results: list[Any] = []
        with anyio.fail_after(300):
            async with Client(stdio_client(params), read_timeout_seconds=200) as client:
                for tool, arguments in calls:
                    if tool == "resource":
                        contents = (await client.read_resource(arguments["uri"])).contents
                        results.append(json.loads(contents[0].text))
                        continue
                    result = await client.call_tool(tool, arguments)
                    assert not result.is_error, (tool, result.content)
                    assert result.structured_content is not None, tool
                    results.append(result.structured_content)
        return results

    return anyio.run(body)


def mcp_call(socket: Path, tool: str, args: dict[str, Any], vllm_url: str | None = None) -> Any:
    """One tool call through the real MCP client."""
    return mcp_session(socket, [(tool, args)], vllm_url)[0]
