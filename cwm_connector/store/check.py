"""The start-up check of a store: catalog rows whose blob file is missing or broken go.

At start, rank 0 looks at catalogued blob files (exists, header, length) on a
background thread. A crash or a hand on the disk may have left a row naming a
blob that is not there (or not whole); its rows are dropped (those tokens will be
recomputed, the next capture of the content heals it) and a corrupt file is
quarantined, so nothing is counted as stored that is not there.

The work per start is bounded, so a store of a million blobs costs the same to
start as a small one (issue 15; serving never waits for it, it runs beside):

- every blob written since the previous start's check (rowid past `check_mark`),
  at most CHECK_NEW of them: what a crash could have left half-done (SQLite gives
  a new row the largest rowid + 1; one written after the largest row was deleted
  may reuse a checked rowid and waits for the slice);
- then CHECK_SLICE of the older ones, from where the previous start stopped
  (`check_cursor`), wrapping: every blob is looked at within
  ceil(blobs / CHECK_SLICE) starts;
- in batches of CHECK_BATCH, each followed by a pause as long as the batch took,
  so it takes at most about half of one core from the engine's lookups.

A blob read that fails at serve time is a miss and is quarantined then anyway;
this check only makes the catalog true sooner.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from cwm_connector.errors import CwmError
from cwm_connector.stats import Stats
from cwm_connector.store.catalog import Catalog
from cwm_connector.store.disk import DiskTier

logger = logging.getLogger("vllm.cwm.worker")

RECHECK_S = 0.5  # a bad-looking blob is looked at again after this (it may be being replaced)
CHECK_NEW = 100_000  # blobs written since the last check, looked at per start
CHECK_SLICE = 100_000  # older blobs looked at per start (a rotating slice)
CHECK_BATCH = 100  # rows per catalog read (about a millisecond); a pause as long follows
MARK_KEY, CURSOR_KEY = "check_mark", "check_cursor"


@dataclass(slots=True)
class CheckLimits:
    """How much one start looks at (tests and benchmarks shrink or grow it)."""

    new: int = CHECK_NEW
    slice: int = CHECK_SLICE
    batch: int = CHECK_BATCH
    pause: bool = True  # pause after each batch as long as it took


def check_store(
    catalog_path: Path,
    disk: DiskTier,
    stats: Stats,
    skip_absent: bool,
    limits: CheckLimits | None = None,
) -> int:
    """Drop the rows of missing or broken blob files; return how many blobs were dropped.

    skip_absent: a blob not on this disk may live in Redis (a shared store): leave it.
    """
    catalog = Catalog(catalog_path)
    if not catalog.writable:
        catalog.close()
        return 0
    scan = _Scan(catalog, disk, skip_absent, limits or CheckLimits())
    try:
        scan.run()
        bad = scan.bad
        if bad:  # look again: a file being replaced right now is not damage
            time.sleep(RECHECK_S)
            bad = [(dig, p) for dig, _ in bad if (p := disk.check(dig)) is not None]
        for dig, problem in bad:
            block = catalog.block_of(dig)
            catalog.forget_blob(dig)
            if problem == "corrupt":
                disk.quarantine(dig)
            stats.add("missing_blobs" if problem == "missing" else "digest_errors")
            logger.error(
                "cwm: start-up check: blob %s of block %s is %s; its catalog rows are "
                "dropped (those tokens will be recomputed)",
                dig.hex(), block.hex()[:16] if block else "-", problem,
            )  # fmt: skip
        scan.save()
    except (CwmError, OSError, sqlite3.Error) as exc:
        logger.error("cwm: start-up check of the store stopped: %s", exc)
        bad = []
    finally:
        catalog.close()
    logger.info("cwm: start-up check: %d blobs, %d dropped", scan.checked, len(bad))
    return len(bad)


class _Scan:
    """One start's walk: the new blobs, then a slice of the older ones."""

    def __init__(self, catalog: Catalog, disk: DiskTier, skip_absent: bool, limits: CheckLimits):
        self.catalog, self.disk, self.skip_absent, self.limits = catalog, disk, skip_absent, limits
        self.mark = int(catalog.meta(MARK_KEY) or 0)
        self.cursor = int(catalog.meta(CURSOR_KEY) or 0)
        self.checked = 0
        self.bad: list[tuple[bytes, str]] = []

    def run(self) -> None:
        # The newest rows went since: rowids past the largest now are the new ones.
        self.mark = min(self.mark, self.catalog.max_blob_rowid())
        top = self.mark  # older blobs: rowid <= top; new ones: past it
        _, last_new = self._walk(self.mark, None, self.limits.new)
        cursor = self.cursor if self.cursor < top else 0
        seen, last = self._walk(cursor, top, self.limits.slice)
        if seen < self.limits.slice and cursor > 0:  # reached the new blobs: wrap around
            _, wrapped = self._walk(0, cursor, self.limits.slice - seen)
            last = wrapped if wrapped is not None else last
        self.cursor = last or 0
        self.mark = last_new if last_new is not None else self.mark

    def save(self) -> None:
        self.catalog.meta(MARK_KEY, str(self.mark))
        self.catalog.meta(CURSOR_KEY, str(self.cursor))

    def _walk(self, after: int, upto: int | None, budget: int) -> tuple[int, int | None]:
        """Check up to `budget` rows with after < rowid (<= upto): (rows seen, last rowid)."""
        last: int | None = None
        seen = 0
        while seen < budget:
            started = time.monotonic()
            rows = self.catalog.blob_rows_from(after, min(self.limits.batch, budget - seen))
            rows = [r for r in rows if upto is None or r[0] <= upto]
            if not rows:
                break
            for rowid, dig, codec in rows:
                self._check(dig, codec)
                last = after = rowid
            seen += len(rows)
            if self.limits.pause:  # leave the engine at least half a core
                time.sleep(time.monotonic() - started)
        return seen, last

    def _check(self, dig: bytes, codec: str) -> None:
        if codec == "redis" or (self.skip_absent and not self.disk.contains(dig)):
            return  # Redis holds it, not this disk
        self.checked += 1
        problem = self.disk.check(dig)
        if problem is not None:
            self.bad.append((dig, problem))
