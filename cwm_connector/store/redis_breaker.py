"""The Redis tier's circuit breaker: failures become fast misses, logged once per outage.

A connection-level failure opens the breaker: for `cooldown_s` every call is
refused at once, off the network; the next call after that tries again. An
error reply about one key (WRONGTYPE, OOM, a script error) is counted and
logged at most every DATA_ERROR_LOG_INTERVAL_S, and opens nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from cwm_connector.errors import StoreError
from cwm_connector.stats import Stats

DATA_ERROR_LOG_INTERVAL_S = 60.0  # per-key error replies are logged at most this often


class Breaker:
    """Open for cooldown_s after a failure to reach Redis; counts into the tier's stats."""

    def __init__(
        self,
        where: str,
        cooldown_s: float,
        stats: Stats,
        clock: Callable[[], float],
        log: logging.Logger,
    ):
        self.where = where  # host:port, never a password
        self.cooldown_s = cooldown_s
        self.stale_topology = False  # a cluster's slot table is re-read after an outage
        self._stats = stats
        self._clock = clock
        self._log = log
        self._lock = threading.Lock()
        self._open_until = 0.0  # open while clock() < this
        self._in_outage = False
        self._last_data_error_log = -DATA_ERROR_LOG_INTERVAL_S

    def available(self) -> bool:
        """False while open (within cooldown_s after a failure)."""
        return self._clock() >= self._open_until

    def check(self) -> None:
        """Raise StoreError (counted as skipped) while open."""
        if not self.available():
            self._stats.add("skipped")
            raise StoreError(f"Redis at {self.where} is unavailable (cooling down)")

    def outage(self, what: str, exc: BaseException) -> None:
        """Count a failure and open; log only the first failure of an outage."""
        self._stats.add("errors")
        with self._lock:
            self._open_until = self._clock() + self.cooldown_s
            self.stale_topology = True
            first, self._in_outage = not self._in_outage, True
        if first:
            self._stats.add("outages")
            msg = "Redis at %s unavailable (%s: %r); reads are misses, retrying every %.1f s"
            self._log.warning(msg, self.where, what, exc, self.cooldown_s)

    def recovered(self) -> None:
        """A call went through: log the end of an outage once."""
        if not self._in_outage:  # the common case, without the lock
            return
        with self._lock:
            was, self._in_outage = self._in_outage, False
        if was:
            self._log.warning("Redis at %s is reachable again", self.where)

    def reply_errors(self, what: str, errors: Sequence[BaseException]) -> None:
        """Count error replies; log them at most every DATA_ERROR_LOG_INTERVAL_S."""
        self._stats.add("errors")
        now = self._clock()
        if now - self._last_data_error_log >= DATA_ERROR_LOG_INTERVAL_S:
            self._last_data_error_log = now
            self._log.warning("Redis %s: %d error replies, e.g. %s", what, len(errors), errors[0])

    def drop_errors(self, what: str, replies: list[Any], read: bool) -> list[Any]:
        """Error replies become None for a read (misses); a write raises StoreError."""
        errors = [r for r in replies if isinstance(r, Exception)]
        if not errors:
            return replies
        self.reply_errors(what, errors)
        first = errors[0]
        if not read:
            raise StoreError(f"Redis {what} failed: {type(first).__name__}: {first}")
        return [None if isinstance(r, Exception) else r for r in replies]
