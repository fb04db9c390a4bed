"""The start-up check of a store: catalog rows whose blob file is missing or broken go.

At start, rank 0 looks at every catalogued blob file once (exists, header,
length) on a background thread. A crash or a hand on the disk may have left a
row naming a blob that is not there (or not whole); its rows are dropped (those
tokens will be recomputed, the next capture of the content heals it) and a
corrupt file is quarantined, so nothing is counted as stored that is not there.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from cwm_connector.errors import CwmError
from cwm_connector.stats import Stats
from cwm_connector.store.catalog import Catalog
from cwm_connector.store.disk import DiskTier

logger = logging.getLogger("vllm.cwm.worker")

RECHECK_S = 0.5  # a bad-looking blob is looked at again after this (it may be being replaced)


def check_store(catalog_path: Path, disk: DiskTier, stats: Stats, skip_absent: bool) -> int:
    """Drop the rows of missing or broken blob files; return how many blobs were dropped.

    skip_absent: a blob not on this disk may live in Redis (a shared store): leave it.
    """
    catalog = Catalog(catalog_path)
    if not catalog.writable:
        catalog.close()
        return 0
    checked = 0
    bad: list[tuple[bytes, str]] = []
    try:
        for rows in catalog.blob_rows():
            for dig, codec in rows:
                if codec == "redis" or (skip_absent and not disk.contains(dig)):
                    continue  # Redis holds it, not this disk
                checked += 1
                problem = disk.check(dig)
                if problem is not None:
                    bad.append((dig, problem))
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
    except (CwmError, OSError) as exc:
        logger.error("cwm: start-up check of the store stopped: %s", exc)
    finally:
        catalog.close()
    logger.info("cwm: start-up check: %d blobs, %d dropped", checked, len(bad))
    return len(bad)
