"""WAL checkpoints off the control ops' path: one thread per catalog that checkpoints it.

SQLite checkpoints a WAL-mode database inside whichever commit pushes the log past
1,000 pages: that commit copies the pages back and fsyncs the file. A control op
(delete, clone, freeze) that draws it takes 20-60 ms instead of under one
(benchmarks/bench_catalog.py: delete p99 35 ms with it, 9 ms without, issue 15).
The control ops' connections turn it off (`defer_checkpoints`) and a daemon thread
runs a PASSIVE checkpoint every CHECKPOINT_S instead, which waits for no reader or
writer. Capture connections keep SQLite's own. The thread ends with its owner.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import weakref
from pathlib import Path

logger = logging.getLogger("vllm.cwm.catalog")

CHECKPOINT_S = 0.5  # the WAL grows by at most this long's writes between checkpoints


def defer_checkpoints(conn: sqlite3.Connection) -> None:
    """This connection's commits never checkpoint (a Checkpointer does)."""
    conn.execute("PRAGMA wal_autocheckpoint=0")


class Checkpointer:
    """A daemon thread checkpointing one catalog while its owner lives."""

    def __init__(self, path: Path, owner: object):
        self.path = path
        self._owner = weakref.ref(owner)
        self._thread = threading.Thread(target=self._loop, name="cwm-wal", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while self._owner() is not None and self.path.exists():
                time.sleep(CHECKPOINT_S)
                try:
                    conn = conn or sqlite3.connect(str(self.path), timeout=0.1)
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:  # locked or gone now: the next round tries again
                    logger.debug("cwm: catalog checkpoint skipped: %s", exc)
        finally:
            if conn is not None:
                conn.close()
