"""The cwm MCP server: window tools for an agent, each one op on the connector's control socket.

`build_server()` returns the `MCPServer`; `main()` runs it over stdio (default) or
streamable HTTP. The server holds no state: every tool call is one request to
the connector inside vLLM, whose `CwmError` codes reach the model unchanged.
Tool bodies live in `cwm_mcp.tools`, result models in `cwm_mcp.models`, resources
in `cwm_mcp.resources`, and the vLLM HTTP calls (warm, continue, health) in
`cwm_mcp.vllm_api`.

When no connector answers, the read-only window tools (window_list, window_status)
answer from the store directory itself (`--store-dir`; windows/offline.py), in the
same shape, and log that they did; every other tool keeps the `unavailable` error.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations

from cwm_connector import __version__
from cwm_connector.control.client import ControlClient, default_socket_path, default_store_dir
from cwm_connector.windows.offline import StoreFallbackClient
from cwm_mcp.resources import add_resources
from cwm_mcp.tools import WindowTools
from cwm_mcp.vllm_api import VllmApi, default_vllm_url

INSTRUCTIONS = """\
cwm keeps named, lossless KV-cache windows of vLLM sessions. A session is the run of
requests sent with the same `cache_salt` (session_list shows them). Freeze a session into
a window before a long session ends or before a risky branch; later (even after vLLM
restarts) thaw the window and resend its `token_ids` (or `text`) with the same salt plus
your continuation: the prefix is then served from the cache instead of being recomputed.
window_thaw can also send the continuation itself and return vLLM's reply. Clone a window
to branch it, export/import to move it between machines with the same model and engine.
Errors start with a stable code (e.g. `window_not_found`, `unavailable`)."""

READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)
WRITES = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)
SETS = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)
OVERWRITES = ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False)
DESTRUCTIVE = ToolAnnotations(
    read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=False
)

# Tool name -> annotations; the order is the order tools are listed in.
TOOLS: dict[str, ToolAnnotations] = {
    "window_freeze": OVERWRITES,  # overwrite=True replaces a window
    "window_thaw": WRITES,  # stages blobs; new_salt adds a clone; continuation generates
    "window_list": READ_ONLY,
    "window_status": READ_ONLY,
    "window_clone": WRITES,
    "window_delete": DESTRUCTIVE,
    "window_export": OVERWRITES,  # replaces the target file
    "window_import": WRITES,
    "session_list": READ_ONLY,
    "cwm_stats": READ_ONLY,
    "get_metrics_data": READ_ONLY,
    "cwm_health": READ_ONLY,
    "auto_freeze_config": SETS,  # with no arguments it only reads
    "auto_freeze_check": WRITES,  # trigger=True freezes
}


logger = logging.getLogger("cwm_mcp")


def build_server(
    client: ControlClient | None = None,
    vllm: VllmApi | None = None,
    store_dir: Path | None = None,
) -> MCPServer:
    """The "cwm" MCP server: its tools and resources bound to `client` and `vllm`.

    With `store_dir`, read-only tools answer from that store when no connector does.
    """
    control: ControlClient | StoreFallbackClient = client or ControlClient()
    if store_dir is not None:
        control = StoreFallbackClient(control, store_dir, on_offline=_say_offline)
    tools = WindowTools(control, vllm if vllm is not None else VllmApi())
    server = MCPServer("cwm", instructions=INSTRUCTIONS, version=__version__, log_level="WARNING")
    for name, hints in TOOLS.items():
        fn = getattr(tools, name)
        server.add_tool(
            fn,
            name=name,
            description=inspect.cleandoc(fn.__doc__ or ""),  # the SDK sends __doc__ verbatim
            annotations=hints,
            structured_output=True,  # list results arrive as {"result": [...]}
        )
    add_resources(server, tools)
    return server


def _say_offline(message: str) -> None:
    logger.warning("cwm mcp: %s", message)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options of `cwm mcp` / `python -m cwm_mcp`."""
    parser = argparse.ArgumentParser(
        prog="cwm mcp", description="Serve cwm's window tools over MCP (stdio by default)."
    )
    parser.add_argument(
        "--socket",
        default=None,
        help=f"connector control socket (default: {default_socket_path()})",
    )
    parser.add_argument(
        "--vllm-url",
        default=None,
        help=f"vLLM's OpenAI server, for warm/continuation/health (default: {default_vllm_url()})",
    )
    parser.add_argument(
        "--http", type=int, metavar="PORT", help="serve streamable HTTP on PORT instead of stdio"
    )
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default: loopback)")
    parser.add_argument(
        "--store-dir",
        type=Path,
        default=None,
        help="store read-only tools read when no connector answers "
        "(default: $CWM_STORE_DIR or ~/.cache/cwm)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the MCP server until its transport closes."""
    args = parse_args(argv)
    socket_path = args.socket or default_socket_path()
    store_dir = args.store_dir or default_store_dir()
    server = build_server(ControlClient(socket_path), VllmApi(args.vllm_url), store_dir)
    if args.http is None:
        server.run("stdio")
        return 0
    # stdout stays free for tools that wrap us; the address goes to stderr.
    print(
        f"cwm MCP server: http://{args.host}:{args.http}/mcp (control socket {socket_path})",
        file=sys.stderr,
        flush=True,
    )
    server.run("streamable-http", host=args.host, port=args.http)
    return 0
