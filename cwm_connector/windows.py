"""Window operations (scheduler process, control-socket threads): freeze, thaw, list,
status, clone, delete, export, import, stats.

A window is a durable, named manifest of a session: its token ids, the ordered
block hashes of its full blocks, their blob digests, and the engine fingerprint.
Blobs are shared (content-addressed); a window pins the blobs it names.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from cwm_connector.catalog import Catalog, catalog_path
from cwm_connector.errors import BlobCorruptError, BlobMissingError, CwmError
from cwm_connector.fingerprint import canonical_json, differing_fields
from cwm_connector.hash_chain import block_hash_chain
from cwm_connector.sessions import SessionTable, salt_digest
from cwm_connector.stats import Stats
from cwm_connector.store import TieredStore
from cwm_connector.tier_disk import DiskTier
from cwm_connector.tier_memory import MemoryTier
from cwm_connector.window_admin import AdminOps
from cwm_connector.window_args import (
    Progress,
    WindowError,
    no_progress,
    tags_arg,
    text_arg,
    validate_name,
)
from cwm_connector.window_query import WindowQuery
from cwm_connector.window_transfer import TransferOps
from cwm_connector.worker_channel import ThawStager

if TYPE_CHECKING:
    from cwm_connector.auto_freeze import AutoFreezer
    from cwm_connector.window_share import SharedWindows

logger = logging.getLogger("vllm.cwm.windows")
FREEZE_POLL_S = 0.05


class WindowService(AdminOps, TransferOps):
    """Implements the window ops against the catalog, the disk tier and the sessions table."""

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
        freeze_timeout_s: float = 60.0,
    ):
        self.store_dir = store_dir
        self.disk = DiskTier(store_dir)
        # Verification and export read through the tiers (disk, then Redis); nothing is cached.
        self.store = store or TieredStore(
            MemoryTier(1), self.disk, None, Stats(None), promote=False
        )
        self.shared = shared
        self.engine_fp = engine_fp
        self.engine_fp_id = engine_fp_id
        self.block_size = block_size
        self.hash_algo = hash_algo
        self.sessions = sessions
        self._detokenize = detokenize
        self._stats = stats
        self.channels = channels
        self.auto = auto
        self._latency = latency
        self._failed_captures = failed_captures or (lambda hashes: 0)
        self.freeze_timeout_s = freeze_timeout_s
        self._local = threading.local()
        self._write_lock = threading.Lock()

    @property
    def catalog(self) -> Catalog:
        """This thread's catalog connection."""
        cat = getattr(self._local, "catalog", None)
        if cat is None:
            cat = self._local.catalog = Catalog(catalog_path(self.store_dir))
        return cat

    def handle(self, op: str, args: dict[str, Any], progress: Progress | None = None) -> Any:
        """Dispatch one control-socket request (freeze, export, import report progress)."""
        handler = OPS.get(op)
        if handler is None:
            raise CwmError(f"unknown op {op!r}; known: {', '.join(sorted(OPS))}", code="unknown_op")
        if any(key.startswith("_") for key in args):
            raise WindowError(f"bad arguments for {op}: names starting with '_' are reserved")
        if op in PROGRESS_OPS:
            args = {**args, "_progress": progress or no_progress}
        started = time.monotonic()
        try:
            result = handler(self, **args)
        except TypeError as exc:
            raise WindowError(f"bad arguments for {op}: {exc}") from exc
        if op in LATENCY_OPS and self._latency is not None:
            self._latency(LATENCY_OPS[op], time.monotonic() - started)
        return result

    # -- ops -----------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        from cwm_connector import __version__
        from cwm_connector.protocol import PROTOCOL_VERSION

        return {"version": __version__, "protocol": PROTOCOL_VERSION, "engine": self.engine_fp_id}

    def freeze(
        self,
        salt: str,
        name: str,
        overwrite: bool = False,
        description: str = "",
        tags: Sequence[str] | None = None,
        _progress: Progress = no_progress,
    ) -> dict[str, Any]:
        name = validate_name(name)
        session = self.sessions.get(text_arg(salt, "salt"))
        if session is None:
            raise WindowError(
                "no finished request with this salt since vLLM started: send the session's "
                "requests with cache_salt, then freeze",
                code="unknown_session",
            )
        if not overwrite and self.catalog.get_window(name) is not None:
            raise WindowError(f"window {name!r} exists (pass overwrite)", code="window_exists")
        hashes = list(session.block_hashes)
        found = self._wait_durable(hashes, _progress)
        blocks = [(h, found[h]) for h in hashes]
        row = self._row(name, session.salt, list(session.token_ids), None, description, tags)
        self._insert(row, blocks, replace=overwrite)
        return self._describe(name)

    def thaw(self, name: str, new_salt: str | None = None) -> dict[str, Any]:
        if new_salt is not None:  # thaw under another salt: a zero-copy clone first
            name = self._clone_for_salt(name, text_arg(new_salt, "new_salt"))
        row, blocks = self._load(name)
        self._check_fingerprint(name, row)
        stored = self.catalog.digests_for_engine(self.engine_fp_id, [h for h, _ in blocks])
        missing = [h for h, _ in blocks if h not in stored]
        if missing:
            raise WindowError(
                f"window {name!r}: {len(missing)} blocks are not in this store",
                code="window_damaged",
            )
        staged = self._prestage(name, [h for h, _ in blocks])
        if staged is None:  # no worker answers: at least verify every blob here
            bad = self._verify_blobs([d for _, d in blocks])
            staged_blocks = 0
        else:
            bad = [bytes.fromhex(d) for d in staged["failed"]]
            staged_blocks = int(staged["staged"])
        if bad:
            raise WindowError(
                f"window {name!r}: {len(bad)} of {len(blocks)} blobs are missing or corrupt "
                f"(first: {bad[0].hex()}); nothing was loaded",
                code="window_damaged",
            )
        token_ids = msgpack.unpackb(row["token_ids"])
        described = self._describe(name, resident=staged_blocks)
        return {
            **described,
            "staged_blocks": staged_blocks,
            "token_ids": token_ids,
            "text": self._detokenize(token_ids),
        }

    def _clone_for_salt(self, name: str, new_salt: str) -> str:
        """A clone of `name` under `new_salt` (made once, then reused): its name."""
        derived = validate_name(f"{name[:110]}.{salt_digest(new_salt)[:12]}")
        existing = self.catalog.get_window(derived)
        if existing is None or existing[0]["salt"] != new_salt:
            self.clone(name, derived, salt=new_salt)
        return derived

    def _prestage(self, name: str, hashes: list[bytes]) -> dict[str, Any] | None:
        """Have every worker read, verify and pin the window's blobs; None if none answers."""
        if self.channels is None or not hashes:
            return None
        try:
            return self.channels.prestage(hashes)
        except CwmError as exc:
            logger.warning("cwm: thaw of %r could not prestage on the workers: %s", name, exc)
            return None

    def list(self, **query: Any) -> list[dict[str, Any]]:
        selection = WindowQuery.parse(**query)
        in_redis = set() if self.shared is None else set(self.shared.names())
        described = [self._describe(name, in_redis=in_redis) for name in self._names(in_redis)]
        return selection.apply(described)

    def status(
        self,
        name: str | None = None,
        session: str | None = None,
        include_cache_stats: bool = False,
        include_lineage: bool = True,
    ) -> dict[str, Any]:
        if (name is None) == (session is None):
            raise WindowError("status takes exactly one of name or session")
        if session is not None:
            return self.session_status(text_arg(session, "session"))
        name = validate_name(name)  # never str() a hostile value into a valid name
        _, blocks = self._load(name)
        bad = self._verify_blobs([d for _, d in blocks])
        resident = None if self.channels is None else self.channels.resident([h for h, _ in blocks])
        out = {
            **self._describe(name, resident=resident or 0),
            "complete": not bad,
            "damaged_blobs": len(bad),
            "resident_blocks": resident,
        }
        if include_lineage:
            out["lineage"] = self.lineage(name)
        if include_cache_stats:
            out["cache_stats"] = self._stats()
        return out

    def lineage(self, name: str) -> dict[str, Any]:
        """parent, root and depth of a window (clones point at their source)."""
        chain = [name]
        parent = self.catalog.get_window(name)
        while parent is not None and parent[0]["parent"] and len(chain) < 1000:
            source = str(parent[0]["parent"])
            if source in chain:
                break  # a cycle cannot be made through the ops; never loop on a damaged one
            chain.append(source)
            parent = self.catalog.get_window(source)
        return {"parent": chain[1] if len(chain) > 1 else None, "root": chain[-1],
                "depth": len(chain) - 1}  # fmt: skip

    def clone(
        self,
        src: str,
        dst: str,
        salt: str | None = None,
        description: str | None = None,
        tags: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        row, blocks = self._load(src)
        dst = validate_name(dst)
        self._check_fingerprint(src, row)
        token_ids = msgpack.unpackb(row["token_ids"])
        new_salt = str(row["salt"]) if salt is None else text_arg(salt, "salt")
        block_rows: list[tuple[str, bytes, bytes]] = []
        if new_salt != row["salt"]:
            # Re-key the same blobs under the new salt's hash chain: no tensor copy.
            hashes = block_hash_chain(token_ids, self.block_size, new_salt, self.hash_algo)
            blocks = [(h, d) for h, (_, d) in zip(hashes, blocks, strict=False)]
            block_rows = [
                (fp, h, d)
                for fp in self.catalog.engine_fp_ids(self.engine_fp_id)
                for h, d in blocks
            ]
        new_row = self._row(
            dst,
            new_salt,
            token_ids,
            src,
            str(row.get("description", "")) if description is None else description,
            json.loads(str(row.get("tags") or "[]")) if tags is None else tags,
        )
        self._insert(new_row, blocks, block_rows=block_rows)
        return self._describe(dst)

    def delete(self, name: str) -> dict[str, Any]:
        validate_name(name)
        with self._write_lock:
            sizes_before = self.catalog.totals()["stored_bytes"]
            # A live session's latest blocks stay: its next freeze needs them, and capture
            # never writes a block again once the store held it (found by benchmarks/soak.py).
            live = [h for state in self.sessions.states() for h in state.block_hashes]
            keep = set(self.catalog.digests_for_engine(self.engine_fp_id, live).values())
            orphans = self.catalog.delete_window(name, keep=keep)
            in_redis = self.shared is not None and self.shared.remove(name)
            if orphans is None and not in_redis:
                raise WindowError(f"no window named {name!r}", code="window_not_found")
            orphans = orphans or []
            for dig in orphans:  # rows went first: a crash here leaves only orphan files
                self.disk.delete(dig)
            freed = sizes_before - self.catalog.totals()["stored_bytes"]
        return {"name": name, "deleted": True, "freed_blobs": len(orphans), "freed_bytes": freed}

    def stats(self) -> dict[str, Any]:
        return {
            **self._stats(),
            "store": {**self.catalog.totals(), "windows": len(self._names())},
            "sessions": len(self.sessions.summary()),
        }

    # -- helpers -------------------------------------------------------------
    def _row(
        self,
        name: str,
        salt: str,
        token_ids: list[int],
        parent: str | None,
        description: str = "",
        tags: Sequence[str] | None = None,
    ) -> dict[str, object]:
        return {
            "description": text_arg(description, "description", allow_empty=True),
            "tags": json.dumps(tags_arg(tags)),
            "name": name,
            "salt": salt,
            "engine_fp": self.engine_fp_id,
            "fingerprint": canonical_json(self.engine_fp),
            "token_ids": msgpack.packb(list(token_ids)),
            "num_tokens": len(token_ids),
            "created": time.time(),
            "parent": parent,
        }

    def _insert(
        self,
        row: dict[str, object],
        blocks: list[tuple[bytes, bytes]],
        *,
        replace: bool = False,
        block_rows: Sequence[tuple[str, bytes, bytes]] = (),
        blob_rows: Sequence[tuple[bytes, int, int, str]] = (),
    ) -> None:
        """Add a window: claim its name in Redis first (when shared), then the local catalog."""
        name = str(row["name"])
        if self.shared is not None:
            sizes = {d: (raw, stored, "") for d, (raw, stored) in self.catalog.blob_sizes(
                [d for _, d in blocks]).items()}  # fmt: skip
            sizes.update({d: (raw, stored, codec) for d, raw, stored, codec in blob_rows})
            fp_rows = {fp: list(blocks) for fp in self.catalog.engine_fp_ids(self.engine_fp_id)}
            if not self.shared.publish(row, blocks, sizes, fp_rows, replace):
                raise WindowError(f"window {name!r} exists (pass overwrite)", code="window_exists")
            replace = True  # the name is ours now; the local row is a mirror
        ok = self.catalog.insert_window(
            row, blocks, replace=replace, block_rows=block_rows, blob_rows=blob_rows
        )
        if not ok:
            raise WindowError(f"window {name!r} exists (pass overwrite)", code="window_exists")

    def _names(self, in_redis: set[str] | None = None) -> list[str]:
        names = set(self.catalog.window_names())
        if self.shared is not None:
            names |= set(self.shared.names()) if in_redis is None else in_redis
        return sorted(names)

    def _load(self, name: str) -> tuple[dict[str, object], list[tuple[bytes, bytes]]]:
        found = self.catalog.get_window(validate_name(name))
        if found is None and self.shared is not None:
            fetched = self.shared.fetch(name)
            if fetched is not None:  # mirror a window another server froze
                row, blocks, sizes = fetched
                fps = self.catalog.engine_fp_ids(self.engine_fp_id)
                self.catalog.insert_window(
                    row,
                    blocks,
                    replace=True,
                    block_rows=[(fp, h, d) for fp in fps for h, d in blocks],
                    blob_rows=[
                        (d, raw, stored, codec or "redis") for d, raw, stored, codec in sizes
                    ],
                )
                found = self.catalog.get_window(name)
        if found is None:
            raise WindowError(f"no window named {name!r}", code="window_not_found")
        return found

    def _describe(
        self, name: str, resident: int = 0, in_redis: set[str] | None = None
    ) -> dict[str, Any]:
        row, blocks = self._load(name)
        sizes = self.catalog.blob_sizes([d for _, d in blocks])
        tiers = ["memory"] if blocks and resident >= len(blocks) else []
        if all(self.disk.contains(d) for d in dict.fromkeys(d for _, d in blocks)):
            tiers.append("disk")
        if self.shared is not None:
            if in_redis is None:
                in_redis = set(self.shared.names())
            if name in in_redis:
                tiers.append("redis")
        return {
            "name": row["name"],
            "salt": row["salt"],
            "session": salt_digest(str(row["salt"])),
            "tokens": row["num_tokens"],
            "blocks": len(blocks),
            "bytes": sum(sizes.get(d, (0, 0))[0] for _, d in blocks),
            "stored_bytes": sum(sizes.get(d, (0, 0))[1] for _, d in set(blocks)),
            "created": row["created"],
            "parent": row["parent"],
            "fingerprint": str(row["engine_fp"])[:16],
            "model": str(json.loads(str(row["fingerprint"])).get("model", "")),
            "description": str(row.get("description") or ""),
            "tags": json.loads(str(row.get("tags") or "[]")),
            "tiers": tiers,
        }

    def _check_fingerprint(self, name: str, row: dict[str, object]) -> None:
        diff = differing_fields(json.loads(str(row["fingerprint"])), self.engine_fp)
        if diff:
            raise WindowError(
                f"window {name!r} was frozen under another engine; differing fields: "
                f"{', '.join(diff)}; nothing was loaded",
                code="fingerprint_mismatch",
            )

    def _wait_durable(self, hashes: list[bytes], progress: Progress) -> dict[bytes, bytes]:
        deadline = time.monotonic() + self.freeze_timeout_s
        while True:
            found = self.catalog.digests_for_engine(self.engine_fp_id, hashes)
            progress(len(found), len(set(hashes)))
            failed = self._failed_captures([h for h in hashes if h not in found])
            if failed:
                raise WindowError(
                    f"capture of {failed} of {len(hashes)} blocks failed (disk full, read-only "
                    "store or catalog unavailable: see the vLLM log); send the session's next "
                    "request once it is fixed, then freeze again",
                    code="capture_failed",
                    retryable=True,
                )
            if len(found) == len(set(hashes)):
                return found
            if time.monotonic() > deadline:
                raise WindowError(
                    f"{len(set(hashes)) - len(found)} of {len(hashes)} blocks are not durable "
                    f"after {self.freeze_timeout_s:.0f}s (capture failed or is still running)",
                    code="not_durable",
                    retryable=True,
                )
            time.sleep(FREEZE_POLL_S)

    def _verify_blobs(self, digests: list[bytes]) -> list[bytes]:
        sizes = self.catalog.blob_sizes(digests)
        bad = []
        for dig in dict.fromkeys(digests):
            raw_len = sizes.get(dig, (0, 0))[0]
            try:
                self.store.read_into(dig, [memoryview(bytearray(raw_len))])
            except (BlobCorruptError, BlobMissingError, CwmError):
                bad.append(dig)
        return bad


PROGRESS_OPS = frozenset({"freeze", "export", "import"})
OPS: dict[str, Callable[..., Any]] = {
    "ping": WindowService.ping,
    "freeze": WindowService.freeze,
    "thaw": WindowService.thaw,
    "list": WindowService.list,
    "status": WindowService.status,
    "clone": WindowService.clone,
    "delete": WindowService.delete,
    "export": WindowService.export,
    "import": WindowService.import_,
    "stats": WindowService.stats,
    "sessions": WindowService.sessions_list,
    "health": WindowService.health,
    "prometheus": WindowService.prometheus,
    "auto_freeze_config": WindowService.auto_freeze_config,
    "auto_freeze_check": WindowService.auto_freeze_check,
}
LATENCY_OPS = {"freeze": "freeze_seconds", "thaw": "thaw_seconds"}
