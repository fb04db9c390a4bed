"""Window reads with no engine: list, status and export straight from a store directory.

With vLLM down the control socket does not answer, yet the windows are on disk.
`OfflineWindows` builds the ops objects the connector serves (`WindowRecords`,
`CoreOps`, `TransferOps`) over the store directory with no engine, workers or
sessions, so its answers have the online shape and follow every change made
there; what only the engine knows is null or empty, as online when no worker
answers (`resident_blocks`). These ops only read the store (SQLite WAL lets them
read beside a live server); export writes its file outside the store.

`StoreFallbackClient` is the control client the CLI and the MCP server use: when
no connector answers, a read-only op is answered here and the caller is told
(`on_offline`); every other op keeps the `unavailable` error.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cwm_connector.control.client import ControlClient, Unavailable
from cwm_connector.store.catalog_db import CatalogUnavailable, catalog_path
from cwm_connector.windows.args import Progress, no_progress

if TYPE_CHECKING:
    from cwm_connector.windows.core import CoreOps
    from cwm_connector.windows.records import WindowRecords

OFFLINE_OPS = frozenset({"list", "status", "export"})  # reads that need no engine


class OfflineWindows:
    """list, status and export over a store directory, with no engine running."""

    def __init__(self, store_dir: Path):
        self.store_dir = Path(store_dir).expanduser()

    @property
    def exists(self) -> bool:
        """Whether the directory holds a cwm store (its catalog)."""
        return catalog_path(self.store_dir).is_file()

    def call(self, op: str, _progress: Progress = no_progress, **args: Any) -> Any:
        """Run one read-only op; any other op is `unavailable` (it needs the engine)."""
        if op == "list":
            return self.list(**args)
        if op == "status":
            return self.status(**args)
        if op == "export":
            return self.export(**args, _progress=_progress)
        raise Unavailable(f"{op} needs the running engine (no connector answers)")

    def list(self, **query: Any) -> list[dict[str, Any]]:
        with self._core() as core:
            return core.list(**query)

    def status(
        self,
        name: str | None = None,
        session: str | None = None,
        include_cache_stats: bool = False,
        include_lineage: bool = True,
    ) -> dict[str, Any]:
        if session is not None and name is None:
            raise Unavailable("sessions live in the running engine: status --session needs it")
        with self._core() as core:
            return core.status(name, session, include_cache_stats, include_lineage)

    def export(self, name: str, file: str, _progress: Progress = no_progress) -> dict[str, Any]:
        with self._records() as rec:
            row, _ = rec.load(name)  # checks the name; window_not_found when absent
            fingerprint = json.loads(str(row["fingerprint"]))
        # The manifest's block size and hash algorithm are the window's own engine's.
        from cwm_connector.windows.transfer import TransferOps

        with self._records(fingerprint) as rec:
            return TransferOps(rec).export(name, file, _progress)

    def _stats(self) -> dict[str, Any]:
        """The counters the connector's roles last wrote (no scheduler runs)."""
        from cwm_connector.stats import read_stats

        return {"scheduler": {}, "worker": read_stats(self.store_dir)}

    @contextlib.contextmanager
    def _core(self) -> Iterator[CoreOps]:
        from cwm_connector.windows.core import CoreOps

        with self._records() as rec:
            yield CoreOps(rec, detokenize=lambda ids: "", stats=self._stats)

    @contextlib.contextmanager
    def _records(self, engine_fp: dict[str, Any] | None = None) -> Iterator[WindowRecords]:
        """Window records of the store, bound to a window's engine (or to none)."""
        # Imported here: the CLI loads this module on every run and needs these only offline.
        from cwm_connector.engine.fingerprint import fingerprint_id
        from cwm_connector.engine.sessions import SessionTable
        from cwm_connector.windows.records import WindowRecords

        fp = engine_fp or {}
        rec = WindowRecords(
            store_dir=self.store_dir,
            engine_fp=fp,
            engine_fp_id=fingerprint_id(fp) if fp else "",
            block_size=int(fp.get("block_size") or 0),
            hash_algo=str(fp.get("hash_algo") or ""),
            sessions=SessionTable(),
        )
        try:
            if not rec.catalog.ok:
                raise CatalogUnavailable(rec.catalog.error or "the catalog cannot be opened")
            yield rec
        finally:
            rec.catalog.close()


class StoreFallbackClient:
    """A control client that answers read-only ops from the store when no connector does."""

    def __init__(
        self,
        client: ControlClient,
        store_dir: Path,
        on_offline: Callable[[str], None] | None = None,
    ):
        self.client = client
        self.store_dir = Path(store_dir).expanduser()
        self.on_offline = on_offline or (lambda message: None)

    @property
    def path(self) -> Path:
        """The control socket tried first."""
        return self.client.path

    def call(
        self, op: str, *, on_progress: Callable[[int, int], None] | None = None, **args: Any
    ) -> Any:
        """The connector's answer; for a read-only op with no connector, the store's."""
        try:
            return self.client.call(op, on_progress=on_progress, **args)
        except Unavailable as exc:
            if op not in OFFLINE_OPS:
                raise
            offline = OfflineWindows(self.store_dir)
            if not offline.exists:
                raise Unavailable(
                    f"{exc.message}; no cwm store at {self.store_dir} to read instead "
                    "(--store-dir, $CWM_STORE_DIR)"
                ) from exc
            self.on_offline(
                f"no connector on {self.client.path}; read the store at {self.store_dir} directly"
            )
            return offline.call(op, _progress=on_progress or no_progress, **args)
