"""End to end: Redis keeps itself bounded (issue 15) with two real vLLM servers on one Redis.

With a short `redis_ttl_s`, a session's cache blocks expire in Redis while a
frozen window's blobs and block maps stay (no TTL); the window still thaws on a
second server whose own store is empty, and its reply equals the first
server's own prefix hit; deleting the window frees every key it alone pinned.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import redis
from e2e_tools import BLOCK, CONTINUATION, EXTERNAL_HITS, cwm, outputs, server
from redis_servers import RedisServer, redis_available

from cwm_connector.demo.tiny_model import make_prompt
from cwm_connector.store.redis import RedisTier

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not redis_available(), reason="needs Debian's redis-server (make setup)"),
]

TTL_S = 6.0  # long enough to freeze before the session's copies expire, short to wait out


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_cache_expires_windows_stay_and_delete_frees_them(tiny_model: Path, tmp_path: Path) -> None:
    store_a, store_b = tmp_path / "a", tmp_path / "b"
    sock_a, sock_b = store_a / "control.sock", store_b / "control.sock"
    with RedisServer() as rs:
        tier = RedisTier(rs.url)  # the servers' key prefix ("cwm"): usage() reads their keys
        a = server(tiny_model, store_a, tmp_path, "A", redis_url=rs.url, redis_ttl_s=TTL_S)
        b = server(tiny_model, store_b, tmp_path, "B", redis_url=rs.url, redis_ttl_s=TTL_S)
        try:
            a.start()
            b.start()
            a.complete(make_prompt(tiny_model, 1000, seed=41), salt="cache", max_tokens=4)
            a.complete(make_prompt(tiny_model, 2000, seed=42), salt="kept", max_tokens=8)
            wait_for(lambda: tier.usage()["cache_blobs"] >= 60, "write-behind copies to Redis")
            code, win = cwm(sock_a, "freeze", "kept", "w-kept")
            assert code == 0 and "redis" in win["tiers"], win
            manifest = msgpack.unpackb(tier.get_window("w-kept") or b"", raw=False)
            digests = {bytes(d) for _, d in manifest["blocks"]}
            client = redis.Redis.from_url(rs.url)
            assert all(client.pttl(tier.blob_key(d)) == -1 for d in digests)
            assert client.pttl(tier.window_key("w-kept")) == -1

            expired = lambda: tier.usage()["block_maps"] == win["blocks"]  # noqa: E731
            wait_for(lambda: tier.usage()["cache_blobs"] == 0 and expired(), "expiry", TTL_S + 30)
            usage = tier.usage()
            assert usage["pinned_blobs"] == len(digests) and usage["windows"] == 1
            assert usage["block_maps"] == win["blocks"] and usage["orphan_block_maps"] == 0

            code, on_a = cwm(sock_a, "thaw", "w-kept")
            assert code == 0, on_a
            token_ids = on_a["token_ids"]
            reference = a.complete(token_ids + CONTINUATION, salt="kept", max_tokens=8)
            hits = b.metric(EXTERNAL_HITS)
            code, thawed = cwm(sock_b, "thaw", "w-kept")  # B's store is empty: all from Redis
            assert code == 0 and thawed["staged_blocks"] == win["blocks"], thawed
            restored = b.complete(token_ids + CONTINUATION, salt="kept", max_tokens=8)
            assert b.metric(EXTERNAL_HITS) - hits == win["blocks"] * BLOCK
            assert outputs(restored) == outputs(reference)

            code, done = cwm(sock_b, "delete", "w-kept")  # from the other server
            assert code == 0, done
            # Released: deleted, or back as cache if B's own capture copied one again since.
            assert all(client.pttl(tier.blob_key(d)) != -1 for d in digests)
            usage = tier.usage()
            assert usage["pinned_blobs"] == 0 and usage["orphan_block_maps"] == 0
            assert usage["windows"] == 0 and tier.window_names() == []
            # nothing of either server is left once the cache expired
            wait_for(lambda: client.keys("cwm:*") == [], "cache expiry", TTL_S + 30)
            client.close()
        finally:
            a.stop()
            b.stop()
            tier.close()
