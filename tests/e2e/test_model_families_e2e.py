"""Model families end to end (issue 13): a model whose layers all use sliding-window
attention, on a real vLLM server with the connector, across a restart.

vLLM hands a block that left the window as its null block (id 0). cwm must never
capture it, store it under a real hash or write it back: a window holds only the
run of real blocks before its boundary, and a hit needs only the window's blocks.
"""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from e2e_tools import BLOCK, EXTERNAL_HITS, outputs, server

from cwm_connector.control.client import ControlClient
from cwm_connector.demo.tiny_model import TinyModelSpec, build_tiny_model
from cwm_connector.engine.hash_chain import block_hash_chain
from cwm_connector.engine.kv_groups import blocks_for_window
from cwm_connector.stats import read_stats

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

WINDOW = 64
SESSION_TOKENS = 1000
BRANCH_AT = 600
SALT = "sliding-session"


def token_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(300, 3000) for _ in range(n)]


def cached(resp: dict[str, Any]) -> int:
    return resp["usage"]["prompt_tokens_details"]["cached_tokens"]


def wait_for(pred: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def test_all_sliding_window_model_restores_losslessly_and_never_the_null_block(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    root = tmp_path_factory.mktemp("sliding")
    spec = TinyModelSpec(layer_types=("sliding_attention",) * 2, sliding_window=WINDOW)
    model = build_tiny_model(root / "model", spec)
    store = root / "store"
    session = token_ids(SESSION_TOKENS, seed=1)
    next_turn = session + token_ids(100, seed=2)
    branch = session[:BRANCH_AT] + token_ids(200, seed=3)

    a = server(model, store, root, "A").start()
    try:
        a.complete(session, salt=SALT)
        chain = block_hash_chain(session, BLOCK, SALT, "sha256")
        boundary = SESSION_TOKENS // BLOCK  # blocks fully inside the session prompt
        window_blocks = blocks_for_window(WINDOW, BLOCK)
        wanted = set(chain[boundary - window_blocks : boundary])
        wait_for(lambda: wanted <= stored_hashes(store))
        window = ControlClient(store / "control.sock").call("freeze", salt=SALT, name="sw")
        reference = a.complete(next_turn, salt=SALT)  # vLLM's own prefix hit
        assert cached(reference) >= 30 * BLOCK
        branch_before = a.complete(branch, salt=SALT)
        branch_cold = a.complete(branch, salt="never-seen")  # same tokens, no hit at all
        assert cached(branch_cold) == 0
        stats = ControlClient(store / "control.sock").call("stats")
    finally:
        a.stop()

    # The session's blocks that left the window were handed as the null block: none of
    # them is in the catalog, under any table.
    assert stats["scheduler"]["null_blocks_skipped"] >= boundary - window_blocks - 2
    left_window = set(chain[: boundary - window_blocks - 1])
    assert not left_window & stored_hashes(store)
    with sqlite3.connect(store / "catalog.sqlite") as db:
        (first_block,) = db.execute("SELECT first_block FROM windows WHERE name='sw'").fetchone()
        in_window = [bytes(r[0]) for r in db.execute(
            "SELECT block_hash FROM window_blocks WHERE name='sw' ORDER BY idx")]  # fmt: skip
    assert not left_window & set(in_window)
    assert in_window == chain[first_block : first_block + len(in_window)]
    assert first_block + len(in_window) >= boundary - 1 and len(in_window) >= window_blocks
    assert window["blocks"] == len(in_window)

    b = server(model, store, root, "B").start()
    try:
        thawed = ControlClient(store / "control.sock").call("thaw", name="sw")
        assert thawed["token_ids"][:SESSION_TOKENS] == session
        restored = b.complete(next_turn, salt=SALT)
        hits = b.metric(EXTERNAL_HITS)
        assert hits >= 30 * BLOCK and cached(restored) == hits
        assert outputs(restored) == outputs(reference)  # tokens and logprobs, exactly
        worker = read_stats(store)
        assert worker["restore_verified_blocks"] == worker["loaded_blocks"] >= window_blocks
        assert worker.get("restore_mismatch_blocks", 0) == 0
        # A branch from the middle: its window's blocks were never stored, so it is a
        # correct recompute (before the restart vLLM's own cache still held them).
        branch_after = b.complete(branch, salt=SALT)
        assert b.metric(EXTERNAL_HITS) == hits
        assert outputs(branch_after)[0] == outputs(branch_before)[0] == outputs(branch_cold)[0]
    finally:
        b.stop()


def stored_hashes(store: Path) -> set[bytes]:
    """Every block hash the catalog holds (any fingerprint)."""
    path = store / "catalog.sqlite"
    if not path.exists():
        return set()
    with sqlite3.connect(path) as db:
        return {bytes(r[0]) for r in db.execute("SELECT block_hash FROM blocks")}
