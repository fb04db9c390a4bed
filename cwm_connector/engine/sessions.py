"""The sessions table: for each salt, the tokens and block hashes of its latest finished request."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import xxhash


@dataclass(frozen=True, slots=True)
class SessionState:
    """A session's latest state: prompt + generated tokens, and its full blocks' hashes."""

    salt: str
    token_ids: tuple[int, ...]
    block_hashes: tuple[bytes, ...]
    updated: float
    first_block: int = 0  # position of block_hashes[0] (> 0 when a sliding window let go)


def salt_digest(salt: str) -> str:
    """A short, non-reversible handle for a salt (salts are secrets: never list them)."""
    return xxhash.xxh3_64_hexdigest(salt.encode())


class SessionTable:
    """Written by the engine thread at request end, read by control-socket threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, SessionState] = {}

    def record(
        self, salt: str, token_ids: list[int], block_hashes: list[bytes], first_block: int = 0
    ) -> None:
        """Remember a session's latest finished request."""
        state = SessionState(salt, tuple(token_ids), tuple(block_hashes), time.time(), first_block)
        with self._lock:
            self._sessions[salt] = state

    def get(self, salt: str) -> SessionState | None:
        """The session of a salt (or of a salt digest), if seen."""
        with self._lock:
            found = self._sessions.get(salt)
            if found is None:
                found = next((s for k, s in self._sessions.items() if salt_digest(k) == salt), None)
            return found

    def states(self) -> list[SessionState]:
        """Every session's latest state, most recent first."""
        with self._lock:
            return sorted(self._sessions.values(), key=lambda s: -s.updated)

    def summary(self) -> list[dict[str, Any]]:
        """Sessions by digest (no salts), most recent first."""
        with self._lock:
            states = sorted(self._sessions.values(), key=lambda s: -s.updated)
        return [
            {"session": salt_digest(s.salt), "tokens": len(s.token_ids), "updated": s.updated}
            for s in states
        ]
