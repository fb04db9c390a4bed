"""Read-only MCP resources: JSON views through the same control ops as the tools."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from pydantic import BaseModel

from cwm_mcp.tools import WindowTools


def _json(value: Any) -> str:
    """Models, lists of models and plain values as indented JSON."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    return json.dumps(value, indent=2, default=str)


def add_resources(server: MCPServer, tools: WindowTools) -> None:
    """Register sessions://list, windows://list, stats://cache and health://status."""
    views: dict[str, tuple[str, str, Callable[[], Any]]] = {
        "sessions://list": (
            "sessions",
            "Live sessions (digest, tokens, last update, windows), newest first; no salts",
            tools.session_list,
        ),
        "windows://list": ("windows", "Every stored window, sorted by name", tools.window_list),
        "stats://cache": ("cache_stats", "Connector counters: hits, bytes", tools.cwm_stats),
        "health://status": (
            "health",
            "Health of the store, disk, Redis, control socket and vLLM",
            tools.cwm_health,
        ),
    }
    for uri, (name, description, view) in views.items():
        server.resource(uri, name=name, description=description, mime_type="application/json")(
            _reader(uri, view)
        )


def _reader(uri: str, view: Callable[[], Any]) -> Callable[[], str]:
    """A resource function: the view as JSON; a tool error becomes a ResourceError."""

    def read() -> str:
        try:
            return _json(view())
        except ToolError as exc:
            raise ResourceError(f"{uri}: {exc}") from exc

    read.__name__ = uri.replace("://", "_")
    return read
