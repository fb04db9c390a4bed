"""The core window ops: freeze, thaw, list, status (by name or session), clone, delete, stats.

Each op reads and writes rows through `WindowRecords`; thaw stages blocks on the
workers through the worker channel (`ThawStager`) when one is connected.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from cwm_connector.control.protocol import PROTOCOL_VERSION
from cwm_connector.control.worker_channel import ThawStager
from cwm_connector.engine.hash_chain import block_hash_chain
from cwm_connector.engine.sessions import SessionState, salt_digest
from cwm_connector.errors import CwmError
from cwm_connector.version import __version__
from cwm_connector.windows.args import Progress, WindowError, no_progress, text_arg, validate_name
from cwm_connector.windows.query import WindowQuery
from cwm_connector.windows.records import WindowRecords, check_capture_room, group_index

logger = logging.getLogger("vllm.cwm.windows")
FREEZE_POLL_S = 0.05


class CoreOps:
    """freeze, thaw, list, status, lineage, clone, delete, stats, ping."""

    def __init__(
        self,
        rec: WindowRecords,
        *,
        detokenize: Callable[[list[int]], str],
        stats: Callable[[], dict[str, Any]],
        channels: ThawStager | None = None,
        failed_captures: Callable[[list[bytes]], int] | None = None,
        in_flight: Callable[[list[bytes]], int] | None = None,
        freeze_timeout_s: float = 60.0,
    ):
        self.rec = rec
        self.channels = channels
        self._detokenize = detokenize
        self._stats = stats
        self._failed_captures = failed_captures or (lambda hashes: 0)
        # None: no scheduler answers (tests, offline); a block is then waited for
        self._in_flight = in_flight
        self.freeze_timeout_s = freeze_timeout_s

    def ping(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "engine": self.rec.engine_fp_id,
        }

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
        session = self.rec.sessions.get(text_arg(salt, "salt"))
        if session is None:
            raise WindowError(
                "no finished request with this salt since vLLM started: send the session's "
                "requests with cache_salt, then freeze",
                code="unknown_session",
            )
        if not overwrite and self.rec.catalog.window_summary(name) is not None:
            raise WindowError(f"window {name!r} exists (pass overwrite)", code="window_exists")
        runs = session.group_runs or ((session.first_block, session.block_hashes),)
        if len(runs) != len(self.rec.group_engine_ids):
            raise WindowError("the session was captured by another engine", code="unknown_session")
        blocks: list[tuple[bytes, bytes]] = []
        indices: list[int] = []
        for group, (first, hashes) in enumerate(runs):
            engine_id = self.rec.group_engine_ids[group]
            found = self._wait_durable(list(hashes), _progress, engine_id, group == 0)
            blocks += [(h, found[h]) for h in hashes]
            indices += [group_index(group, first + i) for i in range(len(hashes))]
        row = self.rec.row(name, session.salt, list(session.token_ids), None, description, tags,
                           first_block=runs[0][0], num_groups=len(runs))  # fmt: skip
        hybrid = len(runs) > 1
        self.rec.insert(row, blocks, replace=overwrite, indices=indices if hybrid else None)
        return self.rec.describe(name)

    def thaw(self, name: str, new_salt: str | None = None) -> dict[str, Any]:
        if new_salt is not None:  # thaw under another salt: a zero-copy clone first
            name = self._clone_for_salt(name, text_arg(new_salt, "new_salt"))
        row, blocks = self.rec.load(name)
        self.rec.check_fingerprint(name, row)
        missing = self._missing_blocks(name, row, blocks)
        if missing:
            raise WindowError(
                f"window {name!r}: {len(missing)} blocks are not in this store",
                code="window_damaged",
            )
        # A window that starts past block 0 (a sliding window) is found by the request's own
        # lookup instead: a prestaged job is matched at block 0 only.
        first = int(row.get("first_block") or 0)
        prestage = not first and int(row.get("num_groups") or 1) == 1
        staged = self._prestage(name, [h for h, _ in blocks]) if prestage else None
        if staged is None:  # no worker answers: at least verify every blob here
            bad = self.rec.verify_blobs([d for _, d in blocks])
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
        described = self.rec.describe(name, resident=staged_blocks)
        return {
            **described,
            "staged_blocks": staged_blocks,
            "token_ids": token_ids,
            "text": self._detokenize(token_ids),
        }

    def _clone_for_salt(self, name: str, new_salt: str) -> str:
        """A clone of `name` under `new_salt` (made once, then reused): its name."""
        derived = validate_name(f"{name[:110]}.{salt_digest(new_salt)[:12]}")
        existing = self.rec.catalog.window_summary(derived)
        if existing is None or existing["salt"] != new_salt:
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
        in_redis = self.rec.shared_names()  # Redis-only windows are mirrored first
        rows = self.rec.catalog.list_windows(selection.page_spec())  # one page, in SQL
        return [self.rec.describe_row(row, in_redis=in_redis) for row in rows]

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
        _, blocks = self.rec.load(name)
        bad = self.rec.verify_blobs([d for _, d in blocks])
        resident = None if self.channels is None else self.channels.resident([h for h, _ in blocks])
        out = {
            **self.rec.describe(name, resident=resident or 0),
            "complete": not bad,
            "damaged_blobs": len(bad),
            "resident_blocks": resident,
        }
        if include_lineage:
            out["lineage"] = self.lineage(name)
        if include_cache_stats:
            out["cache_stats"] = self._stats()
        return out

    def session_status(self, session: str) -> dict[str, Any]:
        """A live session (by salt or digest): its latest token count and its windows."""
        state = self.rec.sessions.get(session)
        if state is None:
            raise CwmError("no finished request of this session since vLLM started",
                           code="unknown_session")  # fmt: skip
        windows = [w["name"] for w in self.list(session=salt_digest(state.salt))]
        return self.session_entry(state, {salt_digest(state.salt): windows})

    @staticmethod
    def session_entry(state: SessionState, windows: dict[str, list[str]]) -> dict[str, Any]:
        key = salt_digest(state.salt)
        return {"session": key, "tokens": len(state.token_ids), "updated": state.updated,
                "windows": windows.get(key, [])}  # fmt: skip

    def lineage(self, name: str) -> dict[str, Any]:
        """parent, root and depth of a window (clones point at their source)."""
        chain = [name]
        parent = self.rec.catalog.window_summary(name)
        while parent is not None and parent["parent"] and len(chain) < 1000:
            source = str(parent["parent"])
            if source in chain:
                break  # a cycle cannot be made through the ops; never loop on a damaged one
            chain.append(source)
            parent = self.rec.catalog.window_summary(source)
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
        row, blocks = self.rec.load(src)
        dst = validate_name(dst)
        self.rec.check_fingerprint(src, row)
        token_ids = msgpack.unpackb(row["token_ids"])
        new_salt = str(row["salt"]) if salt is None else text_arg(salt, "salt")
        block_rows: list[tuple[str, bytes, bytes]] = []
        positions = self.rec.positions(src, row, len(blocks))
        if new_salt != row["salt"]:
            # Re-key the same blobs under the new salt's hash chain: no tensor copy.
            chain = block_hash_chain(token_ids, self.rec.block_size, new_salt, self.rec.hash_algo)
            blocks = [(chain[pos], d) for (_, pos), (_, d) in zip(positions, blocks, strict=True)]
            fps = [self.rec.catalog.engine_fp_ids(e) for e in self.rec.group_engine_ids]
            block_rows = [
                (fp, h, d)
                for (group, _), (h, d) in zip(positions, blocks, strict=True)
                for fp in fps[group]
            ]
        new_row = self.rec.row(
            dst,
            new_salt,
            token_ids,
            src,
            str(row.get("description", "")) if description is None else description,
            json.loads(str(row.get("tags") or "[]")) if tags is None else tags,
            first_block=int(row.get("first_block") or 0),
            num_groups=int(row.get("num_groups") or 1),
        )
        hybrid = int(row.get("num_groups") or 1) > 1
        indices = [group_index(g, pos) for g, pos in positions] if hybrid else None
        self.rec.insert(new_row, blocks, block_rows=block_rows, indices=indices)
        return self.rec.describe(dst)

    def delete(self, name: str) -> dict[str, Any]:
        validate_name(name)
        with self.rec.write_lock:
            # A live session's latest blocks stay: its next freeze needs them, and capture
            # never writes a block again once the store held it (found by benchmarks/soak.py).
            # Only the blobs this window alone pinned are looked up (by their block rows).
            live = {h for state in self.rec.sessions.states() for h in state.block_hashes}
            keep = self.rec.catalog.live_keeper(self.rec.engine_fp_id, live)
            removed = self.rec.catalog.remove_window(name, keep)
            in_redis = self.rec.shared is not None and self.rec.shared.remove(name)
            if removed is None and not in_redis:
                raise WindowError(f"no window named {name!r}", code="window_not_found")
            orphans, freed = removed or ([], 0)  # freed: the stored bytes of the rows dropped
            for dig in orphans:  # rows went first: a crash here leaves only orphan files
                self.rec.disk.delete(dig)
        return {"name": name, "deleted": True, "freed_blobs": len(orphans), "freed_bytes": freed}

    def stats(self) -> dict[str, Any]:
        return {
            **self._stats(),
            "store": {**self.rec.catalog.totals(), "windows": self._count_windows()},
            "sessions": len(self.rec.sessions.summary()),
        }

    def _count_windows(self) -> int:
        """Windows in the catalog (COUNT(*)), Redis-only ones mirrored into it first."""
        self.rec.shared_names()
        return self.rec.catalog.count_windows()

    def _missing_blocks(
        self, name: str, row: dict[str, object], blocks: list[tuple[bytes, bytes]]
    ) -> list[bytes]:
        """The window's block hashes its group's engine does not hold."""
        positions = self.rec.positions(name, row, len(blocks))
        missing = []
        for group, engine_id in enumerate(self.rec.group_engine_ids):
            hashes = [h for (g, _), (h, _) in zip(positions, blocks, strict=True) if g == group]
            stored = self.rec.catalog.digests_for_engine(engine_id, hashes)
            missing += [h for h in hashes if h not in stored]
        return missing

    def _check_not_lost(self, wanted: list[bytes], total: int) -> None:
        """Missing blocks no capture will bring (evicted from the store since they were
        captured, or dropped as damaged): not_durable at once, not after the timeout."""
        assert self._in_flight is not None
        if self._in_flight(wanted):
            return
        found = self.rec.catalog.digests_for_engine(self.rec.group_engine_ids[0], wanted)
        lost = len(set(wanted) - set(found))  # a capture may have landed since the lookup
        if lost:
            raise WindowError(
                f"{lost} of {total} blocks of this session are no longer in the store (evicted "
                "as least recently used under disk_bytes/disk_min_free, or dropped as damaged) "
                "and no capture of them is running; send the session's next request (it "
                "captures them again), then freeze",
                code="not_durable",
                retryable=True,
            )

    def _wait_durable(
        self, hashes: list[bytes], progress: Progress, engine_id: str, fail_fast: bool = True
    ) -> dict[bytes, bytes]:
        deadline = time.monotonic() + self.freeze_timeout_s
        while True:
            found = self.rec.catalog.digests_for_engine(engine_id, hashes)
            progress(len(found), len(set(hashes)))
            # The scheduler tracks the failed captures of the first group.
            wanted = [h for h in hashes if h not in found]
            # Blocks still to capture that windows leave no room for: store_full at once (the
            # capture's own failure reaches the scheduler only with the next engine step).
            check_capture_room(self.rec, len(set(wanted)), "freezing this session")
            failed = self._failed_captures(wanted) if fail_fast else 0
            if fail_fast and not failed and wanted and self._in_flight is not None:
                self._check_not_lost(wanted, len(hashes))
            if failed:
                raise WindowError(
                    f"capture of {failed} of {len(hashes)} blocks failed (disk full, read-only "
                    "store, catalog unavailable, or windows filled disk_bytes then: see the vLLM "
                    "log); send the session's next request once it is fixed, then freeze again",
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
