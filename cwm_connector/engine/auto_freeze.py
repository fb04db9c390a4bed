"""The auto-freeze policy: when a salted session grows past a threshold, freeze it by itself.

Pure planning (no I/O): the connector asks `check` at each finished salted
request and runs the freeze in the background when it says so. A session
freezes again only after `cooldown_s`; the connector keeps the newest
`keep_last` automatic windows of each session and deletes older ones.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from cwm_connector.engine.sessions import salt_digest
from cwm_connector.errors import ConfigError

AUTO_TAG = "auto"
NAME_FIELDS = ("{salt}", "{time}", "{n}")


@dataclass(frozen=True, slots=True)
class AutoFreezePolicy:
    """Settings of `auto_freeze` (extra-config key, or `cwm auto-freeze` at run time)."""

    enabled: bool = False
    threshold_fraction: float = 0.0  # of max_model_len; 0: not used
    threshold_tokens: int = 0  # absolute; 0: not used
    cooldown_s: float = 300.0
    # {salt} is the salt's digest (never the salt); {time} keeps names unique across restarts
    name_pattern: str = "auto-{salt}-{time}-{n}"
    tags: tuple[str, ...] = (AUTO_TAG,)
    keep_last: int = 3  # automatic windows kept per session; 0: keep all

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold_fraction <= 1.0:
            raise ConfigError("auto_freeze.threshold_fraction must be within [0, 1]")
        if self.threshold_tokens < 0 or self.keep_last < 0 or self.cooldown_s < 0:
            raise ConfigError("auto_freeze: threshold_tokens, keep_last, cooldown_s must be >= 0")
        if "{n}" not in self.name_pattern and "{time}" not in self.name_pattern:
            raise ConfigError("auto_freeze.name_pattern needs {n} or {time} to stay unique")
        if self.enabled and not (self.threshold_fraction or self.threshold_tokens):
            raise ConfigError("auto_freeze is enabled but has no threshold")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> AutoFreezePolicy:
        """A policy from config values; unknown keys are an error."""
        return cls().updated(values or {})

    def updated(self, changes: Mapping[str, Any]) -> AutoFreezePolicy:
        """A copy with some fields changed (validated)."""
        known = set(asdict(self))
        unknown = set(changes) - known
        if unknown:
            raise ConfigError(f"auto_freeze: unknown keys {sorted(unknown)}; known {sorted(known)}")
        typed: dict[str, Any] = {}
        try:
            for key, value in changes.items():
                kind = type(getattr(self, key))
                if kind is tuple:
                    value = tuple(str(t) for t in ([value] if isinstance(value, str) else value))
                elif kind is bool and not isinstance(value, bool):
                    value = str(value).lower() in ("1", "true", "yes", "on")
                else:
                    value = kind(value)
                typed[key] = value
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"auto_freeze: bad value: {exc}") from exc
        policy = replace(self, **typed)
        if "enabled" not in changes and (policy.threshold_tokens or policy.threshold_fraction):
            policy = replace(policy, enabled=True)  # setting a threshold turns it on
        return policy

    def threshold(self, max_model_len: int) -> int | None:
        """Tokens at which a session freezes (the lower of the two), or None when off."""
        limits = []
        if self.threshold_tokens:
            limits.append(self.threshold_tokens)
        if self.threshold_fraction:
            limits.append(max(1, int(self.threshold_fraction * max_model_len)))
        return min(limits) if self.enabled and limits else None

    def to_dict(self) -> dict[str, Any]:
        """The policy as plain JSON-able values."""
        out = asdict(self)
        out["tags"] = list(self.tags)
        return out


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether a session should freeze now, and why."""

    would_freeze: bool
    reason: str
    threshold: int | None


@dataclass(slots=True)
class _SessionMark:
    last_freeze: float = 0.0
    count: int = 0


@dataclass
class AutoFreezer:
    """Applies a policy to sessions; thread-safe (engine thread and control threads)."""

    policy: AutoFreezePolicy
    max_model_len: int
    clock: Callable[[], float] = time.time
    _marks: dict[str, _SessionMark] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, salt: str, tokens: int) -> Decision:
        """Should this session (at `tokens` tokens) be frozen now?"""
        threshold = self.policy.threshold(self.max_model_len)
        if threshold is None:
            return Decision(False, "auto-freeze is disabled", None)
        if tokens < threshold:
            return Decision(False, f"{tokens} tokens is below the threshold", threshold)
        with self._lock:
            mark = self._marks.get(salt)
            if mark is not None and self.clock() - mark.last_freeze < self.policy.cooldown_s:
                return Decision(False, "in cooldown after the last auto-freeze", threshold)
        return Decision(True, f"{tokens} tokens reached the threshold {threshold}", threshold)

    def claim(self, salt: str) -> str:
        """Start a freeze of this session: mark the cooldown, return the window's name."""
        now = self.clock()
        with self._lock:
            mark = self._marks.setdefault(salt, _SessionMark())
            mark.last_freeze = now
            mark.count += 1
            number = mark.count
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
        name = self.policy.name_pattern.replace("{salt}", salt_digest(salt))
        return name.replace("{time}", stamp).replace("{n}", str(number))

    def release(self, salt: str) -> None:
        """A claimed freeze failed: let the next request try again (no cooldown)."""
        with self._lock:
            mark = self._marks.get(salt)
            if mark is not None:
                mark.last_freeze = 0.0

    def set_policy(self, changes: Mapping[str, Any]) -> AutoFreezePolicy:
        """Change the policy at run time; returns the new one."""
        self.policy = self.policy.updated(changes)
        return self.policy


def surplus_windows(windows: list[dict[str, Any]], keep_last: int) -> list[str]:
    """Names of a session's automatic windows beyond the newest keep_last (oldest first)."""
    if keep_last <= 0:
        return []
    auto = sorted(
        (w for w in windows if AUTO_TAG in (w.get("tags") or [])), key=lambda w: w["created"]
    )
    return [w["name"] for w in auto[: max(0, len(auto) - keep_last)]]
