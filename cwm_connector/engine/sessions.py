"""The sessions table: for each salt, the tokens and block hashes of its latest finished request."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
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
    # A hybrid-allocator model: each KV-cache group's (first block, hashes); empty otherwise.
    group_runs: tuple[tuple[int, tuple[bytes, ...]], ...] = ()


def salt_digest(salt: str) -> str:
    """A short, non-reversible handle for a salt (salts are secrets: never list them)."""
    return xxhash.xxh3_64_hexdigest(salt.encode())


class SessionTable:
    """Written by the engine thread at request end, read by control-socket threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, SessionState] = {}

    def record(
        self,
        salt: str,
        token_ids: list[int],
        block_hashes: list[bytes],
        first_block: int = 0,
        group_runs: Sequence[tuple[int, Sequence[bytes]]] = (),
    ) -> None:
        """Remember a session's latest finished request."""
        runs = tuple((first, tuple(hashes)) for first, hashes in group_runs)
        state = SessionState(
            salt, tuple(token_ids), tuple(block_hashes), time.time(), first_block, runs
        )
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
