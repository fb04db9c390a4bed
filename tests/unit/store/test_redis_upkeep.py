"""Redis upkeep against real redis-server processes: pins, TTLs, delete, usage/gc, two servers.

The same suite runs on one server and on a 3-node Redis Cluster. A "server" here
is what one vLLM server holds: its own disk tier, a RedisTier and SharedWindows.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import redis
from redis.cluster import RedisCluster as ClusterClient
from redis_servers import RedisServer, free_port, redis_available

from cwm_connector.errors import CwmError, StoreError
from cwm_connector.stats import Stats
from cwm_connector.store import blob
from cwm_connector.store.disk import DiskTier
from cwm_connector.store.memory import MemoryTier
from cwm_connector.store.redis import RedisTier
from cwm_connector.store.tiered import TieredStore
from cwm_connector.windows.share import SharedWindows

pytestmark = [
    pytest.mark.skipif(not redis_available(), reason="needs redis-server and redis-cli"),
    pytest.mark.timeout(120),
]

FP = "fp-rank0"
Blocks = list[tuple[bytes, bytes]]


def chain(token_ids: list[int], salt: str) -> list[bytes]:
    """A stand-in for vLLM's hash chain: one 32-byte hash per token here."""
    return [blob.digest(f"{salt}/{i}/{t}".encode()) * 2 for i, t in enumerate(token_ids)]


class Server:
    """One vLLM server's view: its own disk, a RedisTier and SharedWindows on a shared Redis."""

    def __init__(self, url: str, prefix: str, root: Path, ttl_s: float = 600.0):
        self.redis = RedisTier(url, prefix=prefix, ttl_s=ttl_s)
        self.disk = DiskTier(root)
        self.store = TieredStore(MemoryTier(1), self.disk, self.redis, Stats(None), promote=False)
        self.shared = SharedWindows(self.redis, self.store, chain)

    def capture(self, raws: list[bytes]) -> list[bytes]:
        """Write raw blocks to this server's disk; their digests."""
        digests = [blob.digest(r) for r in raws]
        for dig, raw in zip(digests, raws, strict=True):
            self.disk.put(dig, [raw])
        return digests

    def freeze(self, name: str, salt: str, digests: list[bytes], replace: bool = False) -> bool:
        """Publish a window of these blobs under this salt's chain (freeze, clone, import)."""
        tokens = list(range(len(digests)))
        blocks = list(zip(chain(tokens, salt), digests, strict=True))
        row = {"name": name, "salt": salt, "token_ids": msgpack.packb(tokens)}
        sizes = {d: (1, 1, "none") for d in digests}
        return self.shared.publish(row, blocks, sizes, {FP: blocks}, replace)

    def close(self) -> None:
        self.store.close()
        self.redis.close()


def new_prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def raw_client(url: str) -> redis.Redis | ClusterClient:
    if url.startswith("redis+cluster://"):
        return ClusterClient.from_url(url.replace("+cluster", "", 1))
    return redis.Redis.from_url(url)


def all_keys(url: str, prefix: str) -> list[bytes]:
    """Every key of this prefix on every node."""
    client = raw_client(url)
    try:
        if isinstance(client, ClusterClient):
            return list(client.scan_iter(match=f"{prefix}:*", target_nodes=ClusterClient.PRIMARIES))
        return list(client.scan_iter(match=f"{prefix}:*"))
    finally:
        client.close()


def pttl(url: str, key: str) -> int:
    client = raw_client(url)
    try:
        return int(client.pttl(key))
    finally:
        client.close()


def raws(n: int, size: int = 256) -> list[bytes]:
    return [os.urandom(size) for _ in range(n)]


@pytest.fixture
def servers(url: str, tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    prefix = new_prefix()
    a, b = Server(url, prefix, tmp_path / "a"), Server(url, prefix, tmp_path / "b")
    yield a, b
    a.close()
    b.close()


def assert_consistent(server: Server, url: str, cache_maps: int = 0) -> None:
    """Pins equal the windows naming each key; pinned keys have no TTL; no orphan block map."""
    tier = server.redis
    want_blobs: Counter[bytes] = Counter()
    want_maps: Counter[tuple[bytes, bytes]] = Counter()
    for name in tier.window_names():
        manifest = msgpack.unpackb(tier.get_window(name) or b"", raw=False)
        blocks = [(bytes(h), bytes(d)) for h, d in manifest["blocks"]]
        want_blobs.update(set(d for _, d in blocks))
        want_maps.update(set(blocks))
    client = raw_client(url)
    try:
        for dig, count in want_blobs.items():
            key = tier.blob_key(dig)
            assert int(client.get(f"{key}:pins") or 0) == count, dig.hex()
            assert client.exists(key) and client.pttl(key) == -1
        for (h, d), count in want_maps.items():
            key = tier.block_key(FP, h)
            assert int(client.hget(f"{key}:pins", d) or 0) == count
            assert client.get(key) is not None and client.pttl(key) == -1
    finally:
        client.close()
    usage = tier.usage()
    assert usage["orphan_block_maps"] == 0
    assert usage["pinned_blobs"] == len(want_blobs)
    assert usage["block_maps"] == len(want_maps) + cache_maps
    assert usage["windows"] == len(tier.window_names())


# --- delete releases what no other window pins ------------------------------------------


def test_delete_frees_unpinned_blobs_and_block_maps(
    servers: tuple[Server, Server], url: str
) -> None:
    a, _ = servers
    prefix = a.redis.prefix
    cache = a.capture(raws(2))  # a live session's blocks: write-behind cache, not a window's
    a.store.upload(FP, list(zip(chain([0, 1], "live"), cache, strict=True)))
    before = set(all_keys(url, prefix))
    assert len(before) == 4  # 2 blobs, 2 block maps
    digests = a.capture(raws(5))
    assert a.freeze("w", "s1", digests)
    during = set(all_keys(url, prefix))
    # 5 blobs + 5 pin counters + 5 maps + 5 map pins + manifest + index
    assert len(during - before) == 22, sorted(during - before)
    assert all(pttl(url, a.redis.blob_key(d)) == -1 for d in digests)
    assert pttl(url, a.redis.window_key("w")) == -1
    assert a.shared.remove("w") and not a.shared.remove("w")
    assert set(all_keys(url, prefix)) == before  # only the session's cache is left
    assert a.redis.counters()["blobs_freed"] == 5 and a.redis.counters()["block_maps_freed"] == 5


def test_shared_blob_stays_until_both_windows_are_deleted(
    servers: tuple[Server, Server], url: str
) -> None:
    a, b = servers
    digests = a.capture(raws(4))
    assert a.freeze("first", "s1", digests)
    assert b.freeze("branch", "s2", digests[:3])  # a clone under a new salt, from server B
    assert b.freeze("same-salt", "s1", digests[:2])  # shares block maps too
    assert_consistent(a, url)
    assert b.shared.remove("first")
    assert_consistent(b, url)
    assert set(a.redis.has_blobs(digests)) == set(digests[:3])  # the 4th was pinned by first only
    assert a.redis.get_blocks(FP, chain([0, 1, 2, 3], "s1")) == dict(
        zip(chain([0, 1], "s1"), digests[:2], strict=True)
    )
    assert a.shared.remove("branch") and a.shared.remove("same-salt")
    assert all_keys(url, a.redis.prefix) == []


def test_failed_claim_and_overwrite_release_their_pins(
    servers: tuple[Server, Server], url: str
) -> None:
    a, b = servers
    old, new = a.capture(raws(3)), a.capture(raws(2))
    assert a.freeze("w", "s1", old)
    assert not b.freeze("w", "s9", old)  # taken: B's pins are released again
    assert_consistent(a, url)
    assert a.freeze("w", "s1", new, replace=True)  # the old window's blobs go
    assert_consistent(a, url)
    assert a.redis.has_blobs(old + new) == set(new)
    with pytest.raises(CwmError):  # a blob on no disk and not in Redis: nothing stays pinned
        b.freeze("x", "s3", [blob.digest(b"nowhere")])
    assert_consistent(a, url)


# --- TTLs ----------------------------------------------------------------------------------


def test_cache_expires_and_windows_do_not(url: str, tmp_path: Path) -> None:
    server = Server(url, new_prefix(), tmp_path, ttl_s=3.0)
    try:
        cache, pinned = server.capture(raws(3)), server.capture(raws(3))
        server.store.upload(FP, list(zip(chain([0, 1, 2], "live"), cache, strict=True)))
        assert server.freeze("w", "s1", pinned)
        tier = server.redis
        assert 0 < pttl(url, tier.blob_key(cache[0])) <= 3000
        assert 0 < pttl(url, tier.block_key(FP, chain([0], "live")[0])) <= 3000
        assert pttl(url, tier.blob_key(pinned[0])) == -1
        assert pttl(url, tier.window_key("w")) == -1
        time.sleep(3.2)
        assert tier.get_blobs(cache) == {} and tier.get_blocks(FP, chain([0, 1, 2], "live")) == {}
        assert set(tier.get_blobs(pinned)) == set(pinned)
        assert server.shared.fetch("w") is not None
        assert tier.usage()["cache_blobs"] == 0 and tier.usage()["pinned_blobs"] == 3
    finally:
        server.close()


def test_reads_and_writes_restart_the_ttl(url: str, tmp_path: Path) -> None:
    server = Server(url, new_prefix(), tmp_path, ttl_s=3.0)
    try:
        digests = server.capture(raws(2))
        hashes = chain([0, 1], "live")
        server.store.upload(FP, list(zip(hashes, digests, strict=True)))
        tier = server.redis
        for _ in range(3):  # 4.5 s in all: alive only because each read restarted the TTL
            time.sleep(1.5)
            assert tier.get_blocks(FP, hashes[:1]) == {hashes[0]: digests[0]}
            assert set(tier.get_blobs(digests[:1])) == {digests[0]}
            assert tier.has_blobs(digests[1:]) == {digests[1]}  # upload's existence check
            assert pttl(url, tier.blob_key(digests[0])) > 2000
        assert tier.get_blocks(FP, hashes[1:]) == {}  # never read: expired
        time.sleep(2.0)  # down to at most 1 s left
        server.store.upload(FP, list(zip(hashes, digests, strict=True)))  # a write restarts it
        assert pttl(url, tier.blob_key(digests[0])) > 2000
        assert pttl(url, tier.block_key(FP, hashes[1])) > 2000  # re-mapped as cache
    finally:
        server.close()


def test_evicted_blobs_are_misses_and_volatile_lru_spares_windows(tmp_path: Path) -> None:
    extra = ("--maxmemory", "6mb", "--maxmemory-policy", "volatile-lru")
    with RedisServer(extra_args=extra) as small:
        server = Server(small.url, new_prefix(), tmp_path)
        try:
            pinned = server.capture(raws(8, 64 << 10))  # 512 KB pinned by a window
            assert server.freeze("w", "s1", pinned)
            cache = server.capture(raws(160, 64 << 10))  # 10 MB of cache: more than fits
            for start in range(0, len(cache), 16):
                rows = list(
                    zip(chain(list(range(16)), f"c{start}"), cache[start : start + 16], strict=True)
                )
                server.store.upload(FP, rows)
            got = server.redis.get_blobs(cache + pinned)
            assert set(pinned) <= set(got) and len(got) < len(cache)  # Redis evicted cache
            assert server.redis.counters()["errors"] == 0 and server.redis.available()
            client = redis.Redis.from_url(small.url)
            client.delete(server.redis.blob_key(pinned[0]))  # evicted under another policy
            client.close()
            assert pinned[0] not in server.redis.get_blobs(pinned)
            assert server.redis.counters()["errors"] == 0
        finally:
            server.close()


# --- usage and gc --------------------------------------------------------------------------


def test_usage_and_gc_numbers(servers: tuple[Server, Server], url: str) -> None:
    a, _ = servers
    tier = a.redis
    pinned = a.capture([os.urandom(300), os.urandom(300)])
    assert a.freeze("w", "s1", pinned)
    cache = a.capture([os.urandom(500)])
    a.store.upload(FP, [(chain([0], "live")[0], cache[0])])
    sizes = {d: len(a.disk.path_for(d).read_bytes()) for d in pinned + cache}
    client = raw_client(url)
    try:  # what older versions or crashes leave behind
        client.set(tier.block_key(FP, b"o" * 32), blob.digest(b"gone"), px=60_000)  # orphan map
        client.set(tier.blob_key(blob.digest(b"x")), b"x" * 10)  # unpinned, no TTL
        client.set(f"{tier.prefix}:blob:{blob.digest(b'old').hex()}", b"y" * 7)  # first layout
        client.set(f"{tier.prefix}:blk:{FP}:{(b'h' * 32).hex()}", pinned[0])  # first layout
    finally:
        client.close()
    usage = tier.usage()
    assert usage == {
        "windows": 1,
        "pinned_blobs": 2,
        "pinned_bytes": sizes[pinned[0]] + sizes[pinned[1]],
        "cache_blobs": 3,
        "cache_bytes": sizes[cache[0]] + 10 + 7,
        "block_maps": 5,
        "orphan_block_maps": 1,
    }
    assert tier.gc() == {"removed_block_maps": 2, "removed_blobs": 1, "ttl_set": 1, "persisted": 0}
    assert 0 < pttl(url, tier.blob_key(blob.digest(b"x"))) <= 600_000
    after = tier.usage()
    assert after["orphan_block_maps"] == 0 and after["block_maps"] == 3
    assert after["cache_blobs"] == 2 and after["pinned_blobs"] == 2
    assert tier.gc() == dict.fromkeys(("removed_block_maps", "removed_blobs", "ttl_set",
                                       "persisted"), 0)  # fmt: skip
    assert_consistent(a, url, cache_maps=1)


def test_usage_and_gc_raise_a_retryable_store_error_when_redis_is_down() -> None:
    tier = RedisTier(f"redis://127.0.0.1:{free_port()}")
    for call in (tier.usage, tier.gc):
        with pytest.raises(StoreError) as info:
            call()
        assert info.value.retryable
    tier.close()


# --- two servers, any order of ops -----------------------------------------------------------


def test_two_servers_leave_no_orphans(servers: tuple[Server, Server], url: str) -> None:
    """Random freeze/clone/import/overwrite/delete sequences from two servers, then racing."""
    a, b = servers
    rng = random.Random(15)
    pool = a.capture(raws(12))
    names: list[str] = []
    for step in range(40):
        server = a if rng.random() < 0.5 else b
        op = rng.choice(["freeze", "clone", "import", "overwrite", "delete", "delete"])
        if op == "delete" and names:
            assert server.shared.remove(names.pop(rng.randrange(len(names))))
        elif op in ("clone", "import", "overwrite") and names:
            src = rng.choice(names)
            manifest = msgpack.unpackb(server.redis.get_window(src) or b"", raw=False)
            digests = [bytes(d) for _, d in manifest["blocks"]]
            if op == "overwrite":  # from A, whose disk holds the pool
                assert a.freeze(src, f"o{step}", rng.sample(pool, 3), replace=True)
            else:  # clone: a new salt; import: the same salt under a new name
                salt = f"c{step}" if op == "clone" else str(manifest["row"]["salt"])
                assert server.freeze(f"{op}{step}", salt, digests)
                names.append(f"{op}{step}")
        else:
            k = rng.randint(1, 6)
            assert a.freeze(f"w{step}", f"s{step}", rng.sample(pool, k))
            names.append(f"w{step}")
        assert_consistent(a, url)
    errors: list[BaseException] = []

    def churn(server: Server, base: str) -> None:  # clones and deletes racing the other server
        try:
            for i in range(15):
                packed = server.redis.get_window(rng.choice(names))
                if packed is not None:  # else deleted by the other thread meanwhile
                    blocks = msgpack.unpackb(packed, raw=False)["blocks"]
                    server.freeze(f"{base}{i}", f"{base}{i}", [bytes(d) for _, d in blocks])
                if i % 2:
                    server.shared.remove(f"{base}{i}")
                server.shared.remove(rng.choice(names))
        except CwmError as exc:  # B lacks a blob whose last window A deleted meanwhile: fine
            if exc.code != "blob_missing":
                errors.append(exc)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(s, n)) for s, n in ((a, "ra"), (b, "rb"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert_consistent(a, url)
    for name in a.redis.window_names():
        assert b.shared.remove(name)
    assert all_keys(url, a.redis.prefix) == []  # nothing pinned, nothing left
