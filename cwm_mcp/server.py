"""The cwm MCP server: window tools for an agent, each one op on the connector's control socket.

`build_server()` returns the `MCPServer`; `main()` runs it over stdio (default) or
streamable HTTP. The server holds no state: every tool call is one request to
the connector inside vLLM, whose `CwmError` codes reach the model unchanged.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Sequence
from typing import Annotated, Any, TypeVar

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cwm_connector import __version__
from cwm_connector.client import ControlClient, default_socket_path
from cwm_connector.errors import CwmError

INSTRUCTIONS = """\
cwm keeps named, lossless KV-cache windows of vLLM sessions. A session is the run of
requests sent with the same `cache_salt`. Freeze a session into a window before a long
session ends or before a risky branch; later (even after vLLM restarts) thaw the window
and resend its `token_ids` (or `text`) with the same salt plus your continuation: the
prefix is then served from the cache instead of being recomputed. Clone a window to
branch it, export/import to move it between machines with the same model and engine.
Errors start with a stable code (e.g. `window_not_found`, `unavailable`)."""

T = TypeVar("T", bound=BaseModel)


class Window(BaseModel):
    """A named, durable snapshot of a session's KV cache."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(description="Window name")
    salt: str = Field(description="The cache_salt to send with requests that reuse this window")
    session: str = Field(description="A short non-secret handle of the salt")
    tokens: int = Field(description="Number of tokens in the window")
    blocks: int = Field(description="Number of full KV blocks stored")
    bytes: int = Field(description="Raw KV bytes of the window's blocks")
    stored_bytes: int = Field(description="Bytes on disk (after compression, blobs shared)")
    created: float = Field(description="Creation time, Unix seconds")
    parent: str | None = Field(description="Source window of a clone, else null")
    fingerprint: str = Field(description="Engine fingerprint id (model, dtype, layout)")
    tiers: list[str] = Field(description="Storage tiers holding the blocks")


class ThawedWindow(Window):
    """A window plus the tokens to resend (with the same salt) to hit its cached prefix."""

    token_ids: list[int] = Field(description="Prompt token ids to resend, then append new text")
    text: str = Field(description="The same tokens detokenized")
    staged_blocks: int = Field(
        default=0,
        description="Blocks already read, verified and held in vLLM's host memory: the next "
        "request with this salt loads them with a memory copy",
    )


class WindowStatus(Window):
    """A window plus the result of verifying every blob it names."""

    complete: bool = Field(description="True when every blob is present and passes its digest")
    damaged_blobs: int = Field(description="Blobs missing or failing their digest")
    resident_blocks: int | None = Field(
        default=None, description="Blocks held in host memory (null if the workers do not answer)"
    )


class DeleteResult(BaseModel):
    """What a delete removed."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(description="The deleted window")
    deleted: bool = Field(description="True when the window was removed")
    freed_blobs: int = Field(description="Blobs no other window used, now removed")
    freed_bytes: int = Field(description="Bytes freed on disk")


class ExportResult(BaseModel):
    """Where an export was written."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(description="The exported window")
    file: str = Field(description="Absolute path of the written file (on the vLLM host)")
    bytes: int = Field(description="Size of the file")


WindowName = Annotated[
    str,
    Field(
        description="Window name: 1-128 letters, digits, '.', '_' or '-', "
        "starting with a letter or digit"
    ),
]
Salt = Annotated[
    str,
    Field(description="The cache_salt the session's requests were sent with"),
]
ServerPath = Annotated[
    str,
    Field(description="Absolute path on the machine running vLLM (the server reads/writes it)"),
]


def tool_error(exc: CwmError) -> ToolError:
    """A ToolError whose text starts with the stable code, for the model to read."""
    hint = " (retryable: try again shortly)" if exc.retryable else ""
    return ToolError(f"{exc.code}: {exc.message}{hint}")


class WindowTools:
    """The tool bodies, kept apart from registration so they read as plain functions."""

    def __init__(self, client: ControlClient):
        self.client = client

    def call(self, op: str, **args: Any) -> Any:
        """One control-socket op; a CwmError becomes a ToolError."""
        try:
            return self.client.call(op, **args)
        except CwmError as exc:
            raise tool_error(exc) from exc

    def parse(self, model: type[T], op: str, value: Any) -> T:
        """Validate a connector result; a mismatch is reported, not crashed on."""
        try:
            return model.model_validate(value)
        except ValidationError as exc:
            raise ToolError(f"bad_response: {op} returned an unexpected result: {exc}") from exc

    def window_freeze(
        self,
        salt: Salt,
        name: WindowName,
        overwrite: Annotated[
            bool, Field(description="Replace an existing window of that name")
        ] = False,
    ) -> Window:
        """Freeze the session sent with `salt` into a durable window called `name`.

        Call it before ending a long session, before a risky branch, or whenever the
        context is worth keeping: the window survives vLLM restarts. The session's
        requests must have been sent with `cache_salt=salt` since vLLM started.
        Fails with `window_exists` unless `overwrite` is true. Resume it later with
        window_thaw.
        """
        return self.parse(
            Window, "freeze", self.call("freeze", salt=salt, name=name, overwrite=overwrite)
        )

    def window_thaw(self, name: WindowName) -> ThawedWindow:
        """Resume a frozen window: verify it and return the tokens to resend.

        Send a request with the returned `token_ids` (or `text`) as the prompt prefix,
        the window's `salt` as `cache_salt`, and your continuation appended: the
        prefix is then loaded from the cache instead of being recomputed. Fails with
        `fingerprint_mismatch` if vLLM now runs another model or layout.
        """
        return self.parse(ThawedWindow, "thaw", self.call("thaw", name=name))

    def window_list(self) -> list[Window]:
        """List every stored window (name, salt, size, creation time, parent)."""
        raw = self.call("list")
        if not isinstance(raw, list):
            raise ToolError(f"bad_response: list returned {type(raw).__name__}, not a list")
        return [self.parse(Window, "list", item) for item in raw]

    def window_status(self, name: WindowName) -> WindowStatus:
        """Check that a window is intact (every blob present and verified) without loading it."""
        return self.parse(WindowStatus, "status", self.call("status", name=name))

    def window_clone(
        self,
        src: Annotated[str, Field(description="The window to copy")],
        dst: WindowName,
        salt: Annotated[
            str | None,
            Field(description="A new cache_salt for the copy; default: keep the source's salt"),
        ] = None,
    ) -> Window:
        """Branch a window: `dst` shares the blobs of `src` (no tensor copy).

        Give a new `salt` to explore a branch in a separate session while keeping
        the original intact; thaw `dst` and send with the new salt.
        """
        return self.parse(Window, "clone", self.call("clone", src=src, dst=dst, salt=salt))

    def window_delete(self, name: WindowName) -> DeleteResult:
        """Delete a window; blobs no other window uses are removed from disk. Cannot be undone."""
        return self.parse(DeleteResult, "delete", self.call("delete", name=name))

    def window_export(self, name: WindowName, file: ServerPath) -> ExportResult:
        """Write a window to a single file (safetensors) to back it up or move it elsewhere."""
        return self.parse(ExportResult, "export", self.call("export", name=name, file=file))

    def window_import(
        self,
        file: ServerPath,
        name: Annotated[
            str | None, Field(description="Name for the imported window; default: its own")
        ] = None,
    ) -> Window:
        """Import a window file written by window_export (same model and engine layout only)."""
        return self.parse(Window, "import", self.call("import", file=file, name=name))

    def cwm_stats(self) -> dict[str, Any]:
        """Connector counters: cache hits and misses, bytes moved, store size, live sessions."""
        raw = self.call("stats")
        if not isinstance(raw, dict):
            raise ToolError(f"bad_response: stats returned {type(raw).__name__}, not an object")
        return raw


READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)
VERIFIES = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)
WRITES = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)
OVERWRITES = ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False)
DESTRUCTIVE = ToolAnnotations(
    read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=False
)

# Tool name -> annotations; the order is the order tools are listed in.
TOOLS: dict[str, ToolAnnotations] = {
    "window_freeze": OVERWRITES,  # overwrite=True replaces a window
    "window_thaw": VERIFIES,  # reads and verifies blobs; changes nothing today
    "window_list": READ_ONLY,
    "window_status": READ_ONLY,
    "window_clone": WRITES,
    "window_delete": DESTRUCTIVE,
    "window_export": OVERWRITES,  # replaces the target file
    "window_import": WRITES,
    "cwm_stats": READ_ONLY,
}


def build_server(client: ControlClient | None = None) -> MCPServer:
    """The "cwm" MCP server with the nine window tools bound to `client`."""
    tools = WindowTools(client if client is not None else ControlClient())
    server = MCPServer("cwm", instructions=INSTRUCTIONS, version=__version__, log_level="WARNING")
    for name, hints in TOOLS.items():
        fn = getattr(tools, name)
        server.add_tool(
            fn,
            name=name,
            description=inspect.cleandoc(fn.__doc__ or ""),  # the SDK sends __doc__ verbatim
            annotations=hints,
            structured_output=True,  # window_list's array arrives as {"result": [...]}
        )
    return server


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
        "--http", type=int, metavar="PORT", help="serve streamable HTTP on PORT instead of stdio"
    )
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default: loopback)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the MCP server until its transport closes."""
    args = parse_args(argv)
    socket_path = args.socket or default_socket_path()
    server = build_server(ControlClient(socket_path))
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
