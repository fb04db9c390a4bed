"""The control ops around windows: sessions, health, metrics text, the auto-freeze policy.

Holds the window records and the core ops (auto-freeze freezes, lists and
deletes through them); each op is small and answers plain JSON-able values.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from cwm_connector.control.worker_channel import ThawStager
from cwm_connector.engine.auto_freeze import AUTO_TAG, AutoFreezer, surplus_windows
from cwm_connector.engine.prom import prometheus_text
from cwm_connector.engine.sessions import salt_digest
from cwm_connector.errors import CwmError
from cwm_connector.windows.core import CoreOps
from cwm_connector.windows.records import WindowRecords

MIN_FREE_BYTES = 1 << 30  # below this the disk tier reports itself unhealthy


class AdminOps:
    """sessions, health, prometheus, auto_freeze_config, auto_freeze_check, auto_freeze."""

    def __init__(
        self,
        rec: WindowRecords,
        core: CoreOps,
        *,
        stats: Callable[[], dict[str, Any]],
        channels: ThawStager | None = None,
        auto: AutoFreezer | None = None,
    ):
        self.rec = rec
        self.core = core
        self.channels = channels
        self.auto = auto
        self._stats = stats

    # -- sessions --------------------------------------------------------------
    def sessions_list(self, limit: int = 100, reveal: bool = False) -> list[dict[str, Any]]:
        """Sessions seen since vLLM started, newest first; salts only when `reveal`."""
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= 10_000:
            raise CwmError("limit must be an integer in [0, 10000]", code="bad_request")
        by_session: dict[str, list[str]] = {}
        for window in self.core.list():
            by_session.setdefault(window["session"], []).append(window["name"])
        out = []
        for state in self.rec.sessions.states()[:limit]:
            entry = self.core.session_entry(state, by_session)
            if reveal is True:
                entry["salt"] = state.salt
            out.append(entry)
        return out

    # -- health ----------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """Whether each part works: catalog, disk (writable, free space), Redis, workers."""
        components = {
            "control_socket": {"ok": True},
            "catalog": self._check(lambda: {"windows": self.rec.catalog.count_windows()}),
            "disk": self._check(self._disk_health),
            "redis": self._redis_health(),
            "workers": self._workers_health(),
        }
        return {"ok": all(c["ok"] for c in components.values()), "components": components}

    @staticmethod
    def _check(probe: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        try:
            return {"ok": True, **probe()}
        except Exception as exc:  # a health probe reports, never raises
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    def _disk_health(self) -> dict[str, Any]:
        with tempfile.NamedTemporaryFile(dir=self.rec.store_dir / "tmp", suffix=".health") as fh:
            fh.write(b"ok")
            fh.flush()
            os.fsync(fh.fileno())
        free = shutil.disk_usage(self.rec.store_dir).free
        if free < MIN_FREE_BYTES:
            raise CwmError(f"only {free} bytes free under {self.rec.store_dir}")
        return {"writable": True, "free_bytes": free, "path": str(self.rec.store_dir)}

    def _redis_health(self) -> dict[str, Any]:
        if self.rec.shared is None:
            return {"ok": True, "configured": False}
        redis = self.rec.shared.redis
        started = time.monotonic()
        names = redis.window_names()  # a read: never raises, opens the breaker on failure
        ok = redis.available()
        return {"ok": ok, "configured": True, "url": redis.url, "windows": len(names),
                "latency_ms": round((time.monotonic() - started) * 1e3, 2)}  # fmt: skip

    def _workers_health(self) -> dict[str, Any]:
        if self.channels is None:
            return {"ok": True, "configured": False}
        answered = self.channels.resident([]) is not None
        return {"ok": answered, "answering": answered}

    # -- metrics ---------------------------------------------------------------
    def prometheus(self) -> dict[str, str]:
        """cwm's counters in the Prometheus text format."""
        stats = self._stats()
        totals = {**stats.get("worker", {}), **stats.get("scheduler", {})}
        return {"text": prometheus_text(totals)}

    # -- auto-freeze -------------------------------------------------------------
    def _auto(self) -> AutoFreezer:
        if self.auto is None:
            raise CwmError("auto-freeze is not available on this server", code="unavailable")
        return self.auto

    def auto_freeze_config(self, update: dict[str, Any] | None = None) -> dict[str, Any]:
        """The auto-freeze policy; `update` changes some of its fields at run time."""
        auto = self._auto()
        if update is not None:
            if not isinstance(update, dict):
                raise CwmError("update must be a map of policy fields", code="bad_request")
            try:
                auto.set_policy(update)
            except CwmError as exc:
                raise CwmError(exc.message, code="bad_request") from exc
        return auto.policy.to_dict()

    def auto_freeze_check(
        self, session: str, tokens: int | None = None, trigger: bool = False
    ) -> dict[str, Any]:
        """Would this session freeze now? With trigger, freeze it now whatever the policy."""
        auto = self._auto()
        state = self.rec.sessions.get(session) if isinstance(session, str) else None
        if state is None:
            raise CwmError("no finished request of this session since vLLM started",
                           code="unknown_session")  # fmt: skip
        count = len(state.token_ids) if tokens is None else int(tokens)
        decision = auto.check(state.salt, count)
        window = None
        reason = decision.reason
        if trigger:
            window = self.auto_freeze(state.salt, count)
            reason = "triggered"
        return {"session": salt_digest(state.salt), "tokens": count,
                "threshold": decision.threshold, "would_freeze": decision.would_freeze,
                "reason": reason, "window": window}  # fmt: skip

    def auto_freeze(self, salt: str, tokens: int, name: str | None = None) -> dict[str, Any]:
        """Freeze a session under the policy's name and tags; keep the newest keep_last."""
        auto = self._auto()
        name = name or auto.claim(salt)
        tags = sorted({AUTO_TAG, *auto.policy.tags})
        try:
            window = self.core.freeze(salt, name, tags=tags,
                                 description=f"auto-freeze at {tokens} tokens")  # fmt: skip
        except CwmError:
            auto.release(salt)
            raise
        for old in surplus_windows(
            self.core.list(session=salt_digest(salt)), auto.policy.keep_last
        ):
            self.core.delete(old)
        return window
