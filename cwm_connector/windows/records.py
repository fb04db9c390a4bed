"""Window rows: reading, writing and describing them (shared by every ops object).

A window is a durable, named manifest of a session: its token ids, the ordered
block hashes of its full blocks, their blob digests, and the engine fingerprint.
Blobs are shared (content-addressed); a window pins the blobs it names. Rows go
to the local catalog and, when Redis sharing is on, are claimed there first.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from cwm_connector.engine.fingerprint import canonical_json, differing_fields
from cwm_connector.engine.sessions import SessionTable
from cwm_connector.errors import BlobCorruptError, BlobMissingError, CwmError
from cwm_connector.stats import Stats
from cwm_connector.store.budget import DiskBudget, blob_space
from cwm_connector.store.catalog import Catalog, catalog_path
from cwm_connector.store.catalog_db import GROUP_STRIDE
from cwm_connector.store.disk import DiskTier
from cwm_connector.store.memory import MemoryTier
from cwm_connector.store.tiered import TieredStore
from cwm_connector.store.wal_checkpoint import Checkpointer
from cwm_connector.windows.args import WindowError, tags_arg, text_arg, validate_name

if TYPE_CHECKING:
    from cwm_connector.windows.share import SharedWindows

logger = logging.getLogger("vllm.cwm.windows")


class WindowRecords:
    """The store, the catalog (one connection per thread) and the engine a window must match."""

    def __init__(
        self,
        *,
        store_dir: Path,
        engine_fp: dict[str, Any],
        engine_fp_id: str,
        block_size: int,
        hash_algo: str,
        sessions: SessionTable,
        store: TieredStore | None = None,
        shared: SharedWindows | None = None,
        group_engine_ids: list[str] | None = None,
        budget: DiskBudget | None = None,
    ):
        self.store_dir = store_dir
        self.budget = budget  # the disk tier's limits (None: unchecked, as offline)
        self.disk = DiskTier(store_dir)
        # Verification and export read through the tiers (disk, then Redis); nothing is cached.
        self.store = store or TieredStore(
            MemoryTier(1), self.disk, None, Stats(None), promote=False
        )
        self.shared = shared
        self.engine_fp = engine_fp
        self.engine_fp_id = engine_fp_id
        # Each KV-cache group's catalog engine id (one group: the engine's own id).
        self.group_engine_ids = group_engine_ids or [engine_fp_id]
        self.block_size = block_size
        self.hash_algo = hash_algo
        self.sessions = sessions
        self.write_lock = threading.Lock()
        self._checkpointer: Checkpointer | None = None
        self._checkpointer_lock = threading.Lock()  # not write_lock: delete holds that
        self._local = threading.local()

    @property
    def catalog(self) -> Catalog:
        """This thread's catalog connection."""
        cat = getattr(self._local, "catalog", None)
        if cat is None:
            cat = self._local.catalog = Catalog(catalog_path(self.store_dir))
            if cat.writable:  # an op's commit never pays for a checkpoint: a thread does
                cat.defer_checkpoints()
                with self._checkpointer_lock:
                    self._checkpointer = self._checkpointer or Checkpointer(cat.path, self)
        return cat

    def row(
        self,
        name: str,
        salt: str,
        token_ids: list[int],
        parent: str | None,
        description: str = "",
        tags: Sequence[str] | None = None,
        first_block: int = 0,
        num_groups: int = 1,
    ) -> dict[str, object]:
        """A window row; `first_block` is the position of its first block in the chain."""
        return {
            "first_block": int(first_block),
            "num_groups": int(num_groups),
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

    def insert(
        self,
        row: dict[str, object],
        blocks: list[tuple[bytes, bytes]],
        *,
        replace: bool = False,
        block_rows: Sequence[tuple[str, bytes, bytes]] = (),
        blob_rows: Sequence[tuple[bytes, int, int, str]] = (),
        indices: Sequence[int] | None = None,
    ) -> None:
        """Add a window: claim its name in Redis first (when shared), then the local catalog.

        A hybrid model's window stays local (Redis sharing of several groups: README).
        """
        name = str(row["name"])
        if self.shared is not None:
            sizes = {d: (raw, stored, "") for d, (raw, stored) in self.catalog.blob_sizes(
                [d for _, d in blocks]).items()}  # fmt: skip
            sizes.update({d: (raw, stored, codec) for d, raw, stored, codec in blob_rows})
            fp_rows = self._fp_rows(blocks, indices)
            if not self.shared.publish(row, blocks, sizes, fp_rows, replace, indices):
                raise WindowError(f"window {name!r} exists (pass overwrite)", code="window_exists")
            replace = True  # the name is ours now; the local row is a mirror
        ok = self.catalog.insert_window(
            row, blocks, replace=replace, block_rows=block_rows, blob_rows=blob_rows,
            indices=indices,
        )  # fmt: skip
        if not ok:
            raise WindowError(f"window {name!r} exists (pass overwrite)", code="window_exists")

    def shared_names(self) -> set[str]:
        """Redis's window names (none without Redis), each one the local catalog lacks
        mirrored into it first, so that SQL pages over the catalog list every window."""
        if self.shared is None:
            return set()
        names = self.shared.names()
        for name in sorted(set(names) - self.catalog.known_windows(names)):
            try:
                self.load(name)
            except CwmError as exc:  # one bad manifest must not hide every other window
                logger.warning("cwm: window %r in redis is not listed: %s", name, exc)
        return set(names)

    def load(self, name: str) -> tuple[dict[str, object], list[tuple[bytes, bytes]]]:
        found = self.catalog.get_window(validate_name(name))
        if found is None and self.shared is not None:
            fetched = self.shared.fetch(name)
            if fetched is not None:  # mirror a window another server froze
                row, blocks, sizes, indices = fetched
                fp_rows = self._fp_rows(blocks, indices)
                self.catalog.insert_window(
                    row,
                    blocks,
                    replace=True,
                    block_rows=[(fp, h, d) for fp, rows in fp_rows.items() for h, d in rows],
                    # 'redis': a Redis-only mirror (a row this disk already has is kept)
                    blob_rows=[(d, raw, stored, "redis") for d, raw, stored, _ in sizes],
                    indices=indices,
                )
                found = self.catalog.get_window(name)
        if found is None:
            raise WindowError(f"no window named {name!r}", code="window_not_found")
        return found

    def describe(
        self, name: str, resident: int = 0, in_redis: set[str] | None = None
    ) -> dict[str, Any]:
        """A window as list/status/clone/freeze print it (mirrored from Redis if need be)."""
        found = self.catalog.window_summary(validate_name(name))
        if found is None:
            self.load(name)  # a window another server froze, or window_not_found
            found = self.catalog.window_summary(name)
        if found is None:
            raise WindowError(f"no window named {name!r}", code="window_not_found")
        if self.shared is not None and in_redis is None:
            in_redis = {name} if self.shared.redis.get_window(name) is not None else set()
        return self.describe_row(found, resident, in_redis or set())

    @staticmethod
    def describe_row(
        row: dict[str, object], resident: int = 0, in_redis: set[str] | frozenset[str] = frozenset()
    ) -> dict[str, Any]:
        """A window from its catalog summary (catalog_windows.LISTED), without its blocks.

        tiers: 'memory' when every block is resident on the workers; 'disk' when every
        blob it names has a row stored on this disk (a codec other than 'redis', which
        marks a Redis-only mirror; kept per window as off_disk); 'redis' when Redis lists it.
        """
        num_blocks = int(row["num_blocks"])  # type: ignore[call-overload]
        tiers = ["memory"] if num_blocks and resident >= num_blocks else []
        if not row["off_disk"]:
            tiers.append("disk")
        if row["name"] in in_redis:
            tiers.append("redis")
        return {
            "name": row["name"],
            "salt": row["salt"],
            "session": row["session"],
            "tokens": row["num_tokens"],
            "blocks": num_blocks,
            "bytes": row["num_bytes"],
            "stored_bytes": row["stored_bytes"],
            "created": row["created"],
            "parent": row["parent"],
            "fingerprint": str(row["engine_fp"])[:16],
            "model": row["model"],
            "description": str(row.get("description") or ""),
            "tags": json.loads(str(row.get("tags") or "[]")),
            "tiers": tiers,
        }

    def check_fingerprint(self, name: str, row: dict[str, object]) -> None:
        diff = differing_fields(json.loads(str(row["fingerprint"])), self.engine_fp)
        if diff:
            raise WindowError(
                f"window {name!r} was frozen under another engine; differing fields: "
                f"{', '.join(diff)}; nothing was loaded",
                code="fingerprint_mismatch",
            )

    def verify_blobs(self, digests: list[bytes]) -> list[bytes]:
        sizes = self.catalog.blob_sizes(digests)
        bad = []
        for dig in dict.fromkeys(digests):
            raw_len = sizes.get(dig, (0, 0))[0]
            try:
                self.store.read_into(dig, [memoryview(bytearray(raw_len))])
            except (BlobCorruptError, BlobMissingError, CwmError):
                bad.append(dig)
        return bad

    def _fp_rows(
        self, blocks: list[tuple[bytes, bytes]], indices: Sequence[int] | None
    ) -> dict[str, list[tuple[bytes, bytes]]]:
        """Each registered fingerprint's (hash, digest) rows: a block goes to its group's."""
        groups = [0] * len(blocks) if indices is None else [i // GROUP_STRIDE for i in indices]
        out: dict[str, list[tuple[bytes, bytes]]] = {}
        for group, engine_id in enumerate(self.group_engine_ids):
            rows = [b for g, b in zip(groups, blocks, strict=True) if g == group]
            for fp in self.catalog.engine_fp_ids(engine_id):
                out[fp] = rows
        return out

    @property
    def is_hybrid(self) -> bool:
        """The engine has several KV-cache groups (its windows hold each group's blocks)."""
        return len(self.group_engine_ids) > 1

    def positions(self, name: str, row: dict[str, object], count: int) -> list[tuple[int, int]]:
        """(group, block position) of each of a window's `count` blocks, in order."""
        if int(row.get("num_groups") or 1) <= 1:
            first = int(row.get("first_block") or 0)
            return [(0, first + i) for i in range(count)]
        return [divmod(idx, GROUP_STRIDE) for idx in self.catalog.window_block_indices(name)]


def group_index(group: int, position: int) -> int:
    """A hybrid window's window_blocks index of one block."""
    return group * GROUP_STRIDE + position


def make_room(rec: WindowRecords, incoming: int, what: str, keep: set[bytes]) -> None:
    """Evict cache blobs (never `keep`) so `incoming` more bytes fit; StoreFullError when
    windows alone leave no room (nothing was written)."""
    if rec.budget is None:
        return
    fits, room = rec.budget.make_room(rec.catalog, incoming, keep)
    if not fits:
        raise rec.budget.full_error(room, what)


def check_capture_room(rec: WindowRecords, num_blocks: int, what: str) -> None:
    """StoreFullError when windows alone leave no room for `num_blocks` more blocks (their
    capture is refused, or was: see CwmWorker._store_new)."""
    if rec.budget is None or not num_blocks:
        return
    raw = rec.catalog.any_blob_raw_bytes()
    room = rec.budget.room(rec.catalog, num_blocks * blob_space(raw))
    if raw and not room.fits:
        raise rec.budget.full_error(room, what)
