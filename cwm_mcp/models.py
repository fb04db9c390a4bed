"""The typed results of cwm's MCP tools (pydantic models become the tools' output schemas).

Every model allows extra fields: a newer connector may add some, and the agent
should see them rather than lose them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
)


class Open(BaseModel):
    """Base of every result: unknown fields pass through."""

    model_config = ConfigDict(extra="allow")


class Window(Open):
    """A named, durable snapshot of a session's KV cache."""

    name: str = Field(description="Window name")
    salt: str = Field(description="The cache_salt to send with requests that reuse this window")
    session: str = Field(description="A short non-secret handle of the salt (16 hex digits)")
    tokens: int = Field(description="Number of tokens in the window")
    blocks: int = Field(description="Number of full KV blocks stored")
    bytes: int = Field(description="Raw KV bytes of the window's blocks")
    stored_bytes: int = Field(description="Bytes on disk (after compression, blobs shared)")
    created: float = Field(description="Creation time, Unix seconds")
    parent: str | None = Field(description="Source window of a clone, else null")
    fingerprint: str = Field(description="Engine fingerprint id (model, dtype, layout)")
    tiers: list[str] = Field(description="Storage tiers holding the blocks")
    description: str = Field(default="", description="Free text given at freeze or clone")
    tags: list[str] = Field(default_factory=list, description="Labels given at freeze or clone")


class Reply(Open):
    """vLLM's greedy completion of the thawed prefix plus the continuation."""

    text: str = Field(description="The generated text")
    token_ids: list[int] | None = Field(
        default=None, description="The generated token ids (null if vLLM did not return them)"
    )
    logprobs: list[float | None] | None = Field(
        default=None, description="Log-probability of each generated token"
    )
    finish_reason: str | None = Field(default=None, description="Why generation stopped")
    usage: dict[str, Any] | None = Field(
        default=None, description="vLLM's token usage (prompt_tokens, completion_tokens, ...)"
    )


class ThawedWindow(Window):
    """A window plus the tokens to resend (with the same salt) to hit its cached prefix."""

    token_ids: list[int] = Field(description="Prompt token ids to resend, then append new text")
    text: str = Field(description="The same tokens detokenized")
    staged_blocks: int = Field(
        default=0,
        description="Blocks already read, verified and held in vLLM's host memory: the next "
        "request with this salt loads them with a memory copy",
    )
    warmed: bool = Field(
        default=False, description="True when the prefix was sent to vLLM (warm=true)"
    )
    reply: Reply | None = Field(
        default=None, description="vLLM's reply to token_ids + continuation, when one was given"
    )


class Lineage(Open):
    """Where a window comes from."""

    parent: str | None = Field(description="The window it was cloned from, else null")
    root: str = Field(description="The first ancestor (itself when not a clone)")
    depth: int = Field(description="Number of clone steps from the root")


class WindowStatus(Window):
    """A window plus the result of verifying every blob it names."""

    complete: bool = Field(description="True when every blob is present and passes its digest")
    damaged_blobs: int = Field(description="Blobs missing or failing their digest")
    resident_blocks: int | None = Field(
        default=None, description="Blocks held in host memory (null if the workers do not answer)"
    )
    lineage: Lineage | None = Field(default=None, description="Clone ancestry, when asked")
    cache_stats: dict[str, Any] | None = Field(
        default=None, description="Connector counters, when asked"
    )


class SessionInfo(Open):
    """A live session (the requests sent with one cache_salt) as the connector last saw it."""

    session: str = Field(
        description="The salt's digest (16 hex digits); window_freeze accepts it as salt"
    )
    tokens: int = Field(description="Tokens of the session's latest finished request")
    updated: float = Field(description="When that request finished, Unix seconds")
    windows: list[str] = Field(description="Windows frozen from this session")
    salt: str | None = Field(default=None, description="The salt itself (only with reveal_salts)")

    @model_serializer(mode="wrap")
    def _hide_absent_salt(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leave `salt` out unless it was revealed (a null would read as 'no salt')."""
        data = handler(self)
        if data.get("salt") is None:
            data.pop("salt", None)
        return data


class Status(Open):
    """window_status's answer: a window's check (kind=window) or a session's (kind=session)."""

    kind: Literal["window", "session"] = Field(description="Which of the two was asked for")
    session: str = Field(description="The session digest")
    tokens: int = Field(description="Tokens of the window, or of the session's latest request")
    name: str | None = Field(default=None, description="Window name (kind=window)")
    salt: str | None = Field(default=None, description="The window's cache_salt (kind=window)")
    complete: bool | None = Field(default=None, description="All blobs verify (kind=window)")
    damaged_blobs: int | None = Field(default=None, description="Bad blobs (kind=window)")
    resident_blocks: int | None = Field(default=None, description="Blocks in host memory")
    lineage: Lineage | None = Field(default=None, description="Clone ancestry (kind=window)")
    cache_stats: dict[str, Any] | None = Field(default=None, description="Connector counters")
    updated: float | None = Field(default=None, description="Last request (kind=session)")
    windows: list[str] | None = Field(
        default=None, description="Windows of the session (kind=session)"
    )


class DeleteResult(Open):
    """What a delete removed."""

    name: str = Field(description="The deleted window")
    deleted: bool = Field(description="True when the window was removed")
    freed_blobs: int = Field(description="Blobs no other window used, now removed")
    freed_bytes: int = Field(description="Bytes freed on disk")


class ExportResult(Open):
    """Where an export was written."""

    name: str = Field(description="The exported window")
    file: str = Field(description="Absolute path of the written file (on the vLLM host)")
    bytes: int = Field(description="Size of the file")


class ComponentHealth(Open):
    """One component's health; other fields say why."""

    ok: bool = Field(description="True when the component works")


class Health(Open):
    """Health of cwm's parts and of the vLLM server the sidecar talks to."""

    ok: bool = Field(description="True when every reported component is ok")
    components: dict[str, ComponentHealth] = Field(
        description="store, disk, redis, control_socket, vllm (or the one asked for)"
    )


class Metrics(Open):
    """Connector counters as JSON, or as Prometheus exposition text."""

    format: Literal["json", "prometheus"] = Field(description="The format asked for")
    metrics: dict[str, Any] | None = Field(default=None, description="The counters (json)")
    text: str | None = Field(default=None, description="Exposition text (prometheus)")


class AutoFreezePolicy(Open):
    """When the connector freezes a growing session by itself."""

    enabled: bool = Field(description="Auto-freeze on or off")
    threshold_fraction: float = Field(description="Fraction of max_model_len; 0: unused")
    threshold_tokens: int = Field(description="Absolute token count; 0: unused")
    cooldown_s: float = Field(description="Seconds before the same session freezes again")
    name_pattern: str = Field(description="Window name; {salt} (its digest), {n}, {time}")
    tags: list[str] = Field(description="Tags of automatic windows")
    keep_last: int = Field(description="Automatic windows kept per session; 0: all")


class AutoFreezeCheck(Open):
    """Whether a session would be auto-frozen now, and the window if it was."""

    session: str = Field(description="The session digest")
    tokens: int | None = Field(description="Token count the check used")
    threshold: int | None = Field(description="Token threshold (null when auto-freeze is off)")
    would_freeze: bool = Field(description="True when the policy says freeze now")
    reason: str = Field(description="Why (or 'triggered')")
    window: Window | None = Field(default=None, description="The window frozen by this call")
