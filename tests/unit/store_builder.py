"""A real store built through the catalog and window code, no vLLM (upkeep and offline tests).

`build_store` leaves two windows (w1 and its clone w2, pinning the same 3 blobs) and
2 cache blobs (a captured session never frozen), each blob 4,096 random bytes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cwm_connector.control.server import ControlServer
from cwm_connector.engine.fingerprint import fingerprint_id
from cwm_connector.engine.hash_chain import block_hash_chain
from cwm_connector.engine.sessions import SessionTable
from cwm_connector.store.blob import HEADER_SIZE, digest
from cwm_connector.store.catalog import Catalog
from cwm_connector.windows.service import WindowService

BS = 32
RAW_BYTES = 4096
FILE_BYTES = HEADER_SIZE + RAW_BYTES  # one uncompressed blob file
ENGINE = {"model": "tiny", "dtype": "bfloat16", "block_size": BS, "hash_algo": "sha256"}
PINNED_TOKENS = list(range(100))  # 3 full blocks
CACHE_TOKENS = list(range(1000, 1070))  # 2 full blocks


def make_service(store: Path) -> WindowService:
    """The window service the connector would run over `store` (no workers, no Redis)."""
    engine_id = fingerprint_id(ENGINE)
    cat = Catalog(store / "catalog.sqlite")
    cat.register_fingerprint("fp-" + engine_id, engine_id, "{}")
    cat.close()
    return WindowService(
        store_dir=store,
        engine_fp=ENGINE,
        engine_fp_id=engine_id,
        block_size=BS,
        hash_algo="sha256",
        sessions=SessionTable(),
        detokenize=lambda ids: " ".join(map(str, ids)),
        stats=lambda: {"scheduler": {}, "worker": {}},
        freeze_timeout_s=1.0,
    )


def capture(svc: WindowService, salt: str, token_ids: list[int], seed: int) -> list[bytes]:
    """What the worker does at request end: blob files, then block rows; the session entry."""
    hashes = block_hash_chain(token_ids, BS, salt, "sha256")
    rng = np.random.default_rng(seed)
    fp = svc.records.catalog.engine_fp_ids(svc.records.engine_fp_id)[0]
    rows, blobs = [], []
    for h in hashes:
        raw = rng.integers(0, 256, RAW_BYTES, dtype=np.uint8).tobytes()
        dig = digest(raw)
        stored = svc.records.disk.put(dig, [raw])
        rows.append((h, dig))
        blobs.append((dig, len(raw), stored, "none"))
    svc.records.catalog.add_blocks(fp, rows, blobs)
    svc.records.sessions.record(salt, token_ids, hashes)
    return [d for _, d in rows]


def build_store(store: Path) -> tuple[WindowService, list[bytes], list[bytes]]:
    """The service, the 3 pinned digests and the 2 cache digests."""
    svc = make_service(store)
    pinned = capture(svc, "s1", PINNED_TOKENS, seed=1)
    svc.core.freeze("s1", "w1", tags=["x"], description="first")
    svc.core.clone("w1", "w2", salt="s9")
    cache = capture(svc, "s2", CACHE_TOKENS, seed=2)
    return svc, pinned, cache


def orphan_file(svc: WindowService, seed: int, age_s: float = 0.0) -> bytes:
    """A blob file with no catalog row (a crash between file and row), `age_s` old."""
    raw = np.random.default_rng(seed).integers(0, 256, RAW_BYTES, dtype=np.uint8).tobytes()
    dig = digest(raw)
    svc.records.disk.put(dig, [raw])
    if age_s:
        when = os.stat(svc.records.disk.path_for(dig)).st_mtime - age_s
        os.utime(svc.records.disk.path_for(dig), (when, when))
    return dig


@contextmanager
def served(svc: WindowService) -> Iterator[Path]:
    """A real ControlServer answering with `svc` on a short /tmp socket path."""
    tmp = Path(tempfile.mkdtemp(prefix="cwm-off-", dir="/tmp"))
    path = tmp / "c.sock"
    server = ControlServer(path, svc.handle)
    server.start()
    try:
        yield path
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
