"""The bodies of cwm's MCP tools: each is one control-socket op (plus vLLM calls for thaw/health).

Docstrings are the tool descriptions the agent reads; `Field(description=...)` is the
text of each argument. A connector `CwmError` becomes a `ToolError` whose text
starts with its stable code.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, Field, ValidationError

from cwm_connector.control.client import ControlClient
from cwm_connector.errors import CwmError
from cwm_connector.windows.offline import StoreFallbackClient
from cwm_mcp.health import health_report
from cwm_mcp.models import (
    AutoFreezeCheck,
    AutoFreezePolicy,
    DeleteResult,
    ExportResult,
    Health,
    Metrics,
    SessionInfo,
    Status,
    ThawedWindow,
    Window,
    WindowStatus,
)
from cwm_mcp.vllm_api import VllmApi, resume

T = TypeVar("T", bound=BaseModel)

WindowName = Annotated[
    str,
    Field(
        description="Window name: 1-128 letters, digits, '.', '_' or '-', "
        "starting with a letter or digit"
    ),
]
Salt = Annotated[
    str,
    Field(
        description="The cache_salt the session's requests were sent with, or the session's "
        "16-hex digest as listed by session_list"
    ),
]
ServerPath = Annotated[
    str,
    Field(description="Absolute path on the machine running vLLM (the server reads/writes it)"),
]
Description = Annotated[str, Field(description="Free text to remember what the window holds")]
Tags = Annotated[list[str] | None, Field(description="Labels, e.g. ['project-x', 'draft']")]
OptionalName = Annotated[str | None, Field(description="A window name (or give session_id)")]
SessionId = Annotated[str | None, Field(description="A session: its cache_salt or 16-hex digest")]


def tool_error(exc: CwmError) -> ToolError:
    """A ToolError whose text starts with the stable code, for the model to read."""
    hint = " (retryable: try again shortly)" if exc.retryable else ""
    return ToolError(f"{exc.code}: {exc.message}{hint}")


class WindowTools:
    """The tool bodies, kept apart from registration so they read as plain functions."""

    def __init__(self, client: ControlClient | StoreFallbackClient, vllm: VllmApi):
        self.client = client
        self.vllm = vllm

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

    def parse_list(self, model: type[T], op: str, value: Any) -> list[T]:
        """Validate a connector result that must be an array."""
        if not isinstance(value, list):
            raise ToolError(f"bad_response: {op} returned {type(value).__name__}, not a list")
        return [self.parse(model, op, item) for item in value]

    def parse_dict(self, op: str, value: Any) -> dict[str, Any]:
        """A connector result that must be an object."""
        if not isinstance(value, dict):
            raise ToolError(f"bad_response: {op} returned {type(value).__name__}, not an object")
        return value

    # -- windows -----------------------------------------------------------------------

    def window_freeze(
        self,
        salt: Salt,
        name: WindowName,
        overwrite: Annotated[
            bool, Field(description="Replace an existing window of that name")
        ] = False,
        description: Description = "",
        tags: Tags = None,
    ) -> Window:
        """Freeze the session sent with `salt` into a durable window called `name`.

        Call it before ending a long session, before a risky branch, or whenever the
        context is worth keeping: the window survives vLLM restarts. The session's
        requests must have been sent with `cache_salt=salt` since vLLM started
        (session_list shows them). Fails with `window_exists` unless `overwrite` is
        true. Resume it later with window_thaw.
        """
        result = self.call(
            "freeze",
            salt=salt,
            name=name,
            overwrite=overwrite,
            description=description,
            tags=list(tags or []),
        )
        return self.parse(Window, "freeze", result)

    def window_thaw(
        self,
        name: WindowName,
        new_salt: Annotated[
            str | None,
            Field(description="Continue under this new cache_salt (a zero-copy branch)"),
        ] = None,
        warm: Annotated[
            bool, Field(description="Also send the prefix to vLLM now so it sits in its cache")
        ] = False,
        continuation: Annotated[
            str | list[int] | None,
            Field(description="Text (or token ids) to append; vLLM's greedy reply is returned"),
        ] = None,
        max_tokens: Annotated[
            int, Field(ge=1, description="Tokens to generate for the continuation")
        ] = 64,
    ) -> ThawedWindow:
        """Resume a frozen window: verify it, stage its KV blocks and return the tokens to resend.

        Send a request with the returned `token_ids` (or `text`) as the prompt prefix,
        the returned `salt` as `cache_salt`, and your continuation appended: the
        prefix is then loaded from the cache instead of being recomputed. Or give
        `continuation` here and get vLLM's greedy `reply` directly. `new_salt`
        branches the window first (the original stays untouched). Fails with
        `fingerprint_mismatch` if vLLM now runs another model or layout, and with
        `vllm_unavailable` when warm/continuation cannot reach vLLM (the thaw itself
        succeeded then).
        """
        thawed = self.parse(ThawedWindow, "thaw", self.call("thaw", name=name, new_salt=new_salt))
        try:
            extra = resume(
                self.vllm,
                thawed.model_dump(),
                warm=warm,
                continuation=continuation,
                max_tokens=max_tokens,
            )
        except CwmError as exc:
            message = f"window {thawed.name!r} is thawed (salt {thawed.salt!r}) but {exc.message}"
            raise tool_error(CwmError(message, code=exc.code, retryable=exc.retryable)) from exc
        return self.parse(ThawedWindow, "thaw", {**thawed.model_dump(), **extra})

    def window_list(
        self,
        tags: Annotated[
            list[str] | None, Field(description="Only windows carrying every one of these tags")
        ] = None,
        model: Annotated[str | None, Field(description="Only windows of this model")] = None,
        session_id: Annotated[
            str | None, Field(description="Only windows of this session (salt or digest)")
        ] = None,
        search: Annotated[
            str | None, Field(description="Substring of the name or description")
        ] = None,
        sort_by: Annotated[
            Literal["name", "created", "tokens", "bytes"], Field(description="Sort key")
        ] = "name",
        sort_order: Annotated[Literal["asc", "desc"], Field(description="Sort order")] = "asc",
        limit: Annotated[
            int | None, Field(ge=0, description="At most this many windows (default: all)")
        ] = None,
        offset: Annotated[int, Field(ge=0, description="Skip this many first")] = 0,
    ) -> list[Window]:
        """List stored windows (name, salt, size, creation time, parent, description, tags).

        Filters combine (all must match); use limit/offset to page through many windows.
        """
        result = self.call(
            "list",
            tags=tags,
            model=model,
            session=session_id,
            search=search,
            sort_by=sort_by,
            sort_order=sort_order,
            limit=limit,
            offset=offset,
        )
        return self.parse_list(Window, "list", result)

    def window_status(
        self,
        name: OptionalName = None,
        session_id: SessionId = None,
        include_cache_stats: Annotated[
            bool, Field(description="Add the connector's counters")
        ] = False,
        include_lineage: Annotated[
            bool, Field(description="Add the clone ancestry {parent, root, depth}")
        ] = True,
    ) -> Status:
        """Check a window (every blob present and verified, without loading it) or a session.

        Give exactly one of `name` (kind=window: complete, damaged_blobs,
        resident_blocks, lineage) or `session_id` (kind=session: tokens, last update,
        its windows).
        """
        if (name is None) == (session_id is None):
            raise ToolError("bad_request: give exactly one of name or session_id")
        result = self.call(
            "status",
            name=name,
            session=session_id,
            include_cache_stats=include_cache_stats,
            include_lineage=include_lineage,
        )
        if name is not None:
            window = self.parse(WindowStatus, "status", result)
            return Status(kind="window", **window.model_dump())
        session = self.parse(SessionInfo, "status", result)
        return Status(kind="session", **session.model_dump(exclude={"salt"}))

    def window_clone(
        self,
        src: Annotated[str, Field(description="The window to copy")],
        dst: WindowName,
        salt: Annotated[
            str | None,
            Field(description="A new cache_salt for the copy; default: keep the source's salt"),
        ] = None,
        description: Description = "",
        tags: Tags = None,
    ) -> Window:
        """Branch a window: `dst` shares the blobs of `src` (no tensor copy).

        Give a new `salt` to explore a branch in a separate session while keeping
        the original intact; thaw `dst` and send with the new salt.
        """
        result = self.call(
            "clone", src=src, dst=dst, salt=salt, description=description, tags=list(tags or [])
        )
        return self.parse(Window, "clone", result)

    def window_delete(self, name: WindowName) -> DeleteResult:
        """Delete a window; blobs no other window uses are removed (freed_bytes). Irreversible."""
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

    # -- sessions, health, metrics -----------------------------------------------------

    def session_list(
        self,
        limit: Annotated[int, Field(ge=1, description="At most this many, newest first")] = 100,
        reveal_salts: Annotated[
            bool, Field(description="Include each session's cache_salt (a secret of its user)")
        ] = False,
    ) -> list[SessionInfo]:
        """List live sessions (salted request streams vLLM finished since it started).

        Each has a 16-hex `session` digest that window_freeze accepts as its salt,
        its token count, last update and the windows frozen from it.
        """
        result = self.call("sessions", limit=limit, reveal=reveal_salts)
        return self.parse_list(SessionInfo, "sessions", result)

    def cwm_stats(self) -> dict[str, Any]:
        """Connector counters: cache hits and misses, bytes moved, store size, live sessions."""
        return self.parse_dict("stats", self.call("stats"))

    def get_metrics_data(
        self,
        format: Annotated[
            Literal["json", "prometheus"],
            Field(description="json: the counters; prometheus: exposition text to scrape"),
        ] = "json",
    ) -> Metrics:
        """cwm's counters as JSON or in the Prometheus text format."""
        if format == "json":
            return Metrics(format="json", metrics=self.parse_dict("stats", self.call("stats")))
        text = self.parse_dict("prometheus", self.call("prometheus")).get("text")
        if not isinstance(text, str):
            raise ToolError("bad_response: prometheus returned no text")
        return Metrics(format="prometheus", text=text)

    def cwm_health(
        self,
        component: Annotated[
            str | None,
            Field(description="store, disk, redis, control_socket or vllm; default: all"),
        ] = None,
    ) -> Health:
        """Health of cwm's store, disk, Redis, control socket and of the vLLM server.

        Never fails for an unhealthy part: `ok` is false and the component says why.
        """
        try:
            report = health_report(self.client.call, self.vllm, component)
        except CwmError as exc:
            raise tool_error(exc) from exc
        return self.parse(Health, "health", report)

    # -- auto-freeze -------------------------------------------------------------------

    def auto_freeze_config(
        self,
        enabled: Annotated[bool | None, Field(description="Turn auto-freeze on or off")] = None,
        threshold_tokens: Annotated[
            int | None, Field(ge=0, description="Freeze a session at this many tokens; 0: unused")
        ] = None,
        threshold_fraction: Annotated[
            float | None,
            Field(ge=0, le=1, description="...or at this fraction of max_model_len; 0: unused"),
        ] = None,
        cooldown_s: Annotated[
            float | None, Field(ge=0, description="Seconds between freezes of one session")
        ] = None,
        keep_last: Annotated[
            int | None, Field(ge=0, description="Automatic windows kept per session; 0: all")
        ] = None,
        name_pattern: Annotated[
            str | None, Field(description="Window name with {salt} (digest), {n} or {time}")
        ] = None,
        tags: Annotated[list[str] | None, Field(description="Tags of automatic windows")] = None,
    ) -> AutoFreezePolicy:
        """Show the auto-freeze policy, or change it at run time (give only what changes).

        With a policy on, the connector freezes a session by itself once it reaches
        the threshold (the lower of the two given), at most once per cooldown, and
        keeps the newest `keep_last` automatic windows of each session.
        """
        changes = {
            key: value
            for key, value in (
                ("enabled", enabled),
                ("threshold_tokens", threshold_tokens),
                ("threshold_fraction", threshold_fraction),
                ("cooldown_s", cooldown_s),
                ("keep_last", keep_last),
                ("name_pattern", name_pattern),
                ("tags", tags),
            )
            if value is not None
        }
        result = self.call("auto_freeze_config", update=changes or None)
        return self.parse(AutoFreezePolicy, "auto_freeze_config", result)

    def auto_freeze_check(
        self,
        session_id: Annotated[str, Field(description="The session: its cache_salt or digest")],
        token_count: Annotated[
            int | None, Field(ge=0, description="Check at this size; default: its current size")
        ] = None,
        trigger: Annotated[
            bool, Field(description="Freeze it now, whatever the policy says")
        ] = False,
    ) -> AutoFreezeCheck:
        """Would the auto-freeze policy freeze this session now? With trigger, freeze it now."""
        result = self.call(
            "auto_freeze_check", session=session_id, tokens=token_count, trigger=trigger
        )
        return self.parse(AutoFreezeCheck, "auto_freeze_check", result)
