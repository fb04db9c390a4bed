"""End to end: two vLLM servers share windows through Redis (one server, or a 3-node cluster).

A session frozen on server A is thawed on server B, whose own disk store stays
empty: B's reply must equal A's own prefix-cache hit token for token and
logprob for logprob, and the hit must be counted on B. With Redis stopped
while both serve, requests still succeed and the errors are counted; once
Redis is back, freeze and restore through it resume without a restart.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from e2e_tools import BLOCK, CONTINUATION, EXTERNAL_HITS, blob_files, cwm, outputs, server
from redis_servers import RedisCluster, RedisServer, redis_available

from cwm_connector.demo.tiny_model import make_prompt
from cwm_connector.demo.vllm_process import VllmServer
from cwm_connector.stats import read_stats

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not redis_available(), reason="needs Debian's redis-server (make setup)"),
]

COOLDOWN_S = 2.5  # the Redis tier's circuit breaker (2 s) plus a margin


@contextmanager
def two_servers(model: Path, tmp_path: Path, redis_url: str) -> Iterator[tuple[VllmServer, ...]]:
    """Servers A and B, each on its own store, both on one Redis; stopped at the end."""
    a = server(model, tmp_path / "a", tmp_path, "A", redis_url=redis_url)
    b = server(model, tmp_path / "b", tmp_path, "B", redis_url=redis_url)
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        a.stop()
        b.stop()


def freeze_on_a_thaw_on_b(
    model: Path, a: VllmServer, b: VllmServer, sock_a: Path, sock_b: Path, salt: str, seed: int
) -> dict[str, Any]:
    """Converse on A, freeze there, thaw on B and continue; check B equals A's prefix hit."""
    a.complete(make_prompt(model, 3000, seed=seed), salt=salt, max_tokens=8)
    code, win = cwm(sock_a, "freeze", salt, f"w-{salt}")
    assert code == 0, win
    assert "redis" in win["tiers"]
    code, on_a = cwm(sock_a, "thaw", f"w-{salt}")
    assert code == 0, on_a
    token_ids = on_a["token_ids"]
    reference = a.complete(token_ids + CONTINUATION, salt=salt, max_tokens=8)  # A's prefix hit

    hits_before = b.metric(EXTERNAL_HITS)
    code, listed = cwm(sock_b, "list")
    assert code == 0 and f"w-{salt}" in [w["name"] for w in listed]
    code, thawed = cwm(sock_b, "thaw", f"w-{salt}")
    assert code == 0, thawed
    assert thawed["token_ids"] == token_ids and thawed["staged_blocks"] == win["blocks"]
    restored = b.complete(token_ids + CONTINUATION, salt=salt, max_tokens=8)
    assert b.metric(EXTERNAL_HITS) - hits_before == win["blocks"] * BLOCK
    assert outputs(restored) == outputs(reference)
    return win


@pytest.mark.parametrize("topology", ["single", "cluster"])
def test_window_frozen_on_one_server_thaws_on_another(
    tiny_model: Path, tmp_path: Path, topology: str
) -> None:
    redis = RedisServer() if topology == "single" else RedisCluster()
    store_a, store_b = tmp_path / "a", tmp_path / "b"
    with redis, two_servers(tiny_model, tmp_path, redis.url) as (a, b):
        win = freeze_on_a_thaw_on_b(
            tiny_model, a, b, store_a / "control.sock", store_b / "control.sock", "s1", 21
        )
        assert blob_files(store_b) == 0  # B never had the blobs on its own disk
        assert read_stats(store_b)["redis_hit_blocks"] == win["blocks"]
        if topology == "cluster":
            assert sum(1 for n in redis.dbsize() if n > 0) > 1  # keys spread over nodes


def test_redis_outage_costs_misses_and_recovers_without_restart(
    tiny_model: Path, tmp_path: Path
) -> None:
    store_a, store_b = tmp_path / "a", tmp_path / "b"
    sock_a, sock_b = store_a / "control.sock", store_b / "control.sock"
    with RedisServer() as redis, two_servers(tiny_model, tmp_path, redis.url) as (a, b):
        redis.stop()
        prompt = make_prompt(tiny_model, 3000, seed=31)
        down_a = a.complete(prompt, salt="s2", max_tokens=8)  # served; capture stays local
        down_b = b.complete(prompt, salt="s2", max_tokens=8)  # served; recomputed
        assert outputs(down_a)[0] == outputs(down_b)[0]
        code, err = cwm(sock_a, "freeze", "s2", "w-down")
        assert code == 1 and err["error"]["retryable"] is True
        code, err = cwm(sock_b, "thaw", "w-down")
        assert code == 1
        deadline = time.monotonic() + 30
        while read_stats(store_a).get("redis_copy_errors", 0) == 0:
            assert time.monotonic() < deadline, read_stats(store_a)
            time.sleep(0.2)
        stats_a = read_stats(store_a)  # the write-behind copy failed, and Redis's reads
        assert stats_a["redis_copy_dropped_blocks"] >= 1 and stats_a["redis_errors"] >= 1

        redis.start()  # same port, empty: nothing of the outage reached it
        time.sleep(COOLDOWN_S)
        freeze_on_a_thaw_on_b(tiny_model, a, b, sock_a, sock_b, "s3", 32)
