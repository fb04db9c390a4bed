"""The window service behind the control socket: one object that holds the ops
objects and the table of op names it dispatches to (freeze, thaw, list, status,
clone, delete, export, import, stats, sessions, health, prometheus, auto-freeze).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cwm_connector.control.worker_channel import ThawStager
from cwm_connector.engine.sessions import SessionTable
from cwm_connector.errors import CwmError
from cwm_connector.store.budget import DiskBudget
from cwm_connector.store.tiered import TieredStore
from cwm_connector.windows.admin import AdminOps
from cwm_connector.windows.args import Progress, WindowError, no_progress
from cwm_connector.windows.core import CoreOps
from cwm_connector.windows.records import WindowRecords
from cwm_connector.windows.transfer import TransferOps

if TYPE_CHECKING:
    from cwm_connector.engine.auto_freeze import AutoFreezer
    from cwm_connector.windows.share import SharedWindows

PROGRESS_OPS = frozenset({"freeze", "export", "import"})
LATENCY_OPS = {"freeze": "freeze_seconds", "thaw": "thaw_seconds"}


class WindowService:
    """Composes the window ops (records, core, admin, transfer) and dispatches requests."""

    def __init__(
        self,
        *,
        store_dir: Path,
        engine_fp: dict[str, Any],
        engine_fp_id: str,
        block_size: int,
        hash_algo: str,
        sessions: SessionTable,
        detokenize: Callable[[list[int]], str],
        stats: Callable[[], dict[str, Any]],
        channels: ThawStager | None = None,
        store: TieredStore | None = None,
        shared: SharedWindows | None = None,
        auto: AutoFreezer | None = None,
        latency: Callable[[str, float], None] | None = None,
        failed_captures: Callable[[list[bytes]], int] | None = None,
        in_flight: Callable[[list[bytes]], int] | None = None,
        freeze_timeout_s: float = 60.0,
        group_engine_ids: list[str] | None = None,
        budget: DiskBudget | None = None,
    ):
        self.records = WindowRecords(
            store_dir=store_dir, engine_fp=engine_fp, engine_fp_id=engine_fp_id,
            block_size=block_size, hash_algo=hash_algo, sessions=sessions, store=store,
            shared=shared, group_engine_ids=group_engine_ids, budget=budget,
        )  # fmt: skip
        self.core = CoreOps(
            self.records, detokenize=detokenize, stats=stats, channels=channels,
            failed_captures=failed_captures, in_flight=in_flight,
            freeze_timeout_s=freeze_timeout_s,
        )  # fmt: skip
        self.admin = AdminOps(self.records, self.core, stats=stats, channels=channels, auto=auto)
        self.transfer = TransferOps(self.records)
        self._latency = latency
        core, admin, transfer = self.core, self.admin, self.transfer
        self.ops: dict[str, Callable[..., Any]] = {
            "ping": core.ping,
            "freeze": core.freeze,
            "thaw": core.thaw,
            "list": core.list,
            "status": core.status,
            "clone": core.clone,
            "delete": core.delete,
            "stats": core.stats,
            "export": transfer.export,
            "import": transfer.import_,
            "sessions": admin.sessions_list,
            "health": admin.health,
            "prometheus": admin.prometheus,
            "auto_freeze_config": admin.auto_freeze_config,
            "auto_freeze_check": admin.auto_freeze_check,
        }

    def handle(self, op: str, args: dict[str, Any], progress: Progress | None = None) -> Any:
        """Dispatch one control-socket request (freeze, export, import report progress)."""
        handler = self.ops.get(op)
        if handler is None:
            known = ", ".join(sorted(self.ops))
            raise CwmError(f"unknown op {op!r}; known: {known}", code="unknown_op")
        if any(key.startswith("_") for key in args):
            raise WindowError(f"bad arguments for {op}: names starting with '_' are reserved")
        if op in PROGRESS_OPS:
            args = {**args, "_progress": progress or no_progress}
        started = time.monotonic()
        try:
            result = handler(**args)
        except TypeError as exc:
            raise WindowError(f"bad arguments for {op}: {exc}") from exc
        if op in LATENCY_OPS and self._latency is not None:
            self._latency(LATENCY_OPS[op], time.monotonic() - started)
        return result
