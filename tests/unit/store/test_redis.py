"""The Redis tier against a real redis-server and a real 3-node Redis Cluster on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from redis.cluster import RedisCluster as ClusterClient
from redis_servers import RedisCluster, RedisServer, free_port, redis_available

from cwm_connector.errors import ConfigError, StoreError
from cwm_connector.stats import Stats
from cwm_connector.store import blob
from cwm_connector.store.catalog import Catalog
from cwm_connector.store.disk import DiskTier
from cwm_connector.store.memory import MemoryTier
from cwm_connector.store.redis import CHUNK_KEYS, RedisTier
from cwm_connector.store.tiered import TieredStore

pytestmark = [
    pytest.mark.skipif(
        not redis_available(),
        reason="needs redis-server and redis-cli (Debian package redis-server; CI installs it)",
    ),
    pytest.mark.timeout(60),
]

T = TypeVar("T")
SOCKET_TIMEOUT_S = 0.25
COOLDOWN_S = 2.0


class Clock:
    """A clock the test moves by hand, so cooldowns pass without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def tier(url: str) -> Iterator[RedisTier]:
    tier = RedisTier(url, prefix=f"t{uuid.uuid4().hex[:8]}")  # each test its own keys
    yield tier
    tier.close()


def make_blobs(n: int, size: int = 300) -> list[tuple[bytes, bytes]]:
    """(digest, blob file bytes) of random raw blocks (never zeros)."""
    items = []
    for _ in range(n):
        raw = os.urandom(size)
        items.append((blob.digest(raw), blob.encode(raw)))
    return items


def raw_client(url: str) -> redis.Redis | ClusterClient:
    """A plain client, to plant keys the tier would never write."""
    if url.startswith("redis+cluster://"):
        return ClusterClient.from_url(url.replace("+cluster", "", 1))
    return redis.Redis.from_url(url)


def timed(call: Callable[..., T], *args: Any) -> tuple[T, float]:
    """The call's result and how long it took (seconds)."""
    start = time.perf_counter()
    result = call(*args)
    return result, time.perf_counter() - start


# --- the same suite on one server and on a cluster ------------------------------------------


def test_blob_round_trip_and_nx(tier: RedisTier) -> None:
    items = make_blobs(20)
    digests = [d for d, _ in items]
    absent = [blob.digest(os.urandom(32)) for _ in range(3)]
    assert tier.put_blobs(items[:12]) == 12
    assert tier.put_blobs(items) == 8  # the first 12 are there already (SET NX)
    forged = [(digests[0], blob.encode(os.urandom(300)))]
    assert tier.put_blobs(forged) == 0  # NX keeps the first bytes of a digest
    got = tier.get_blobs(digests + absent)
    assert set(got) == set(digests)
    for digest, data in items:
        assert got[digest] == data
        header = blob.parse_header(got[digest])
        raw = blob.decode_payload(header, got[digest][blob.HEADER_SIZE :])
        assert header.digest == digest == blob.digest(raw)
    assert tier.has_blobs(digests[:5] + absent) == set(digests[:5])
    tier.delete_blobs(digests[:5])
    assert set(tier.get_blobs(digests)) == set(digests[5:])
    assert tier.has_blobs(digests[:5]) == set()
    counters = tier.counters()
    assert counters["blobs_written"] == 20 and counters["errors"] == 0
    assert counters["bytes_written"] == sum(len(d) for _, d in items)
    assert counters["hits"] == 20 + 15 and counters["misses"] == 3 + 5


def test_large_batches_are_chunked(tier: RedisTier) -> None:
    items = make_blobs(2 * CHUNK_KEYS + 17, size=64)
    assert tier.put_blobs(items) == len(items)
    got = tier.get_blobs([d for d, _ in items])
    assert got == dict(items)


def test_block_map_is_per_fingerprint(tier: RedisTier) -> None:
    rows = [(os.urandom(32), blob.digest(os.urandom(64))) for _ in range(10)]
    tier.put_blocks("fp-a", rows)
    hashes = [h for h, _ in rows]
    assert tier.get_blocks("fp-a", [*hashes, os.urandom(32)]) == dict(rows)
    assert tier.get_blocks("fp-b", hashes) == {}
    assert tier.counters()["block_hits"] == 10 and tier.counters()["block_misses"] == 11


def test_windows_put_get_list_delete(tier: RedisTier) -> None:
    first, second = os.urandom(200), os.urandom(200)
    assert tier.window_names() == []
    assert tier.put_window("w-b", first)
    assert tier.put_window("w-a", os.urandom(50))
    assert tier.window_names() == ["w-a", "w-b"]
    assert not tier.put_window("w-b", second)  # exists, not replace: the old manifest stays
    assert tier.get_window("w-b") == first
    assert tier.put_window("w-b", second, replace=True)
    assert tier.get_window("w-b") == second
    assert tier.delete_window("w-b") and not tier.delete_window("w-b")
    assert tier.get_window("w-b") is None
    assert tier.window_names() == ["w-a"]


def test_concurrent_put_window_has_one_winner(tier: RedisTier) -> None:
    manifests = [os.urandom(100) for _ in range(8)]
    results: list[bool | None] = [None] * 8
    barrier = threading.Barrier(8)

    def put(i: int) -> None:
        barrier.wait()
        results[i] = tier.put_window("race", manifests[i])

    threads = [threading.Thread(target=put, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 1 and results.count(False) == 7
    assert tier.get_window("race") == manifests[results.index(True)]
    assert tier.window_names() == ["race"]


def test_error_replies_mid_pipeline_are_misses(tier: RedisTier, url: str) -> None:
    items = make_blobs(3)
    digests = [d for d, _ in items]
    assert tier.put_blobs(items) == 3
    tier.put_window("w", b"manifest")
    client = raw_client(url)
    try:  # plant keys of the wrong type: GET / SMEMBERS answer WRONGTYPE for them
        client.delete(tier.blob_key(digests[1]))
        client.rpush(tier.blob_key(digests[1]), b"x")
        client.delete(tier.window_key("w"))
        client.sadd(tier.window_key("w"), b"x")
        client.delete(f"{tier.prefix}:{{windows}}:index")
        client.set(f"{tier.prefix}:{{windows}}:index", b"x")
    finally:
        client.close()
    got = tier.get_blobs(digests)
    assert set(got) == {digests[0], digests[2]}  # only the bad key is a miss
    assert tier.get_window("w") is None
    assert tier.window_names() == []
    assert tier.counters()["errors"] == 3
    assert tier.available()  # the server answered: no breaker for one bad key
    assert set(tier.get_blobs(digests)) == {digests[0], digests[2]}
    with pytest.raises(StoreError):  # a write that gets an error reply raises: SREM on a string
        tier.delete_window("w")
    assert tier.available() and tier.counters()["errors"] == 5


def test_cluster_spreads_blobs_and_keeps_windows_in_one_slot(cluster: RedisCluster) -> None:
    tier = RedisTier(cluster.url, prefix=f"t{uuid.uuid4().hex[:8]}")
    try:
        assert tier.is_cluster
        items = make_blobs(60, size=32)
        assert tier.put_blobs(items) == 60
        tier.put_window("w", b"m")
        per_node = []
        for port in cluster.ports:
            node = redis.Redis(host="127.0.0.1", port=port)
            try:
                per_node.append(sum(1 for _ in node.scan_iter(match=f"{tier.prefix}:blob:*")))
                slot_manifest = node.cluster("KEYSLOT", tier.window_key("w"))
                slot_index = node.cluster("KEYSLOT", f"{tier.prefix}:{{windows}}:index")
                slots = {node.cluster("KEYSLOT", tier.blob_key(d)) for d, _ in items}
            finally:
                node.close()
        assert sum(per_node) == 60 and all(n > 0 for n in per_node), per_node
        assert slot_manifest == slot_index
        assert len(slots) > 1
    finally:
        tier.close()


# --- faults: down, slow, back again ---------------------------------------------------------

READS = ("get_blobs", "has_blobs", "get_blocks", "get_window", "window_names")


def call_reads(tier: RedisTier, digests: list[bytes]) -> list[tuple[object, float]]:
    """Each read method once: (result, seconds)."""
    return [
        timed(tier.get_blobs, digests),
        timed(tier.has_blobs, digests),
        timed(tier.get_blocks, "fp", digests),
        timed(tier.get_window, "w"),
        timed(tier.window_names),
    ]


def assert_writes_raise(tier: RedisTier, items: list[tuple[bytes, bytes]]) -> None:
    writes = [
        lambda: tier.put_blobs(items),
        lambda: tier.delete_blobs([d for d, _ in items]),
        lambda: tier.put_blocks("fp", items),
        lambda: tier.put_window("w2", b"m"),
        lambda: tier.delete_window("w"),
    ]
    for write in writes:
        with pytest.raises(StoreError) as info:
            write()
        assert info.value.retryable and info.value.code == "store_error"


def assert_works(tier: RedisTier) -> None:
    """Writes and reads go through (a fresh server: its data is gone)."""
    items = make_blobs(4)
    assert tier.put_blobs(items) == 4
    assert tier.get_blobs([d for d, _ in items]) == dict(items)
    assert tier.put_window("w", b"again", replace=True)
    assert tier.window_names() == ["w"]


@pytest.mark.parametrize("fault", ["stopped", "paused"])
def test_outage_is_a_fast_miss_and_recovers(fault: str, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    with RedisServer() as server:
        tier = RedisTier(
            server.url, socket_timeout_s=SOCKET_TIMEOUT_S, cooldown_s=COOLDOWN_S, clock=clock
        )
        items = make_blobs(5)
        digests = [d for d, _ in items]
        assert tier.put_blobs(items) == 5 and tier.put_window("w", b"m")
        caplog.set_level(logging.WARNING, logger="cwm_connector.store.redis")
        server.stop() if fault == "stopped" else server.pause()

        result, seconds = timed(tier.get_blobs, digests)  # the call that finds the outage
        assert result == {} and seconds < 0.5, seconds
        if fault == "paused":
            assert seconds >= SOCKET_TIMEOUT_S * 0.8  # it did wait for the read timeout
        assert not tier.available() and tier.counters()["errors"] == 1
        for _ in range(3):  # breaker open: every call answers at once, off the network
            for (result, seconds), name in zip(call_reads(tier, digests), READS, strict=True):
                assert not result and seconds < 0.005, (name, seconds)
            assert_writes_raise(tier, items)
        assert tier.counters()["errors"] == 1 and tier.counters()["skipped"] == 30

        for _ in range(3):  # still down after each cooldown: one probe, a miss, no new log line
            clock.now += COOLDOWN_S + 0.1
            for (result, seconds), name in zip(call_reads(tier, digests), READS, strict=True):
                assert not result and seconds < 0.5, (name, seconds)
        assert tier.counters()["errors"] == 4 and tier.counters()["outages"] == 1
        assert len([r for r in caplog.records if "unavailable" in r.message]) == 1

        server.start() if fault == "stopped" else server.resume()
        assert not tier.available()
        assert tier.get_blobs(digests) == {}  # restarted, but the breaker is still open
        clock.now += COOLDOWN_S + 0.1
        if fault == "paused":  # the same server resumed: its data is still there
            assert tier.get_blobs(digests) == dict(items)
            tier.delete_blobs(digests)
        assert_works(tier)  # the same RedisTier object, reconnected by redis-py
        assert tier.available() and tier.counters()["outages"] == 1
        assert any("reachable again" in r.message for r in caplog.records)
        tier.close()


def test_down_at_start_is_unavailable_until_it_comes_up() -> None:
    clock = Clock()
    port = free_port()
    tier = RedisTier(f"redis://127.0.0.1:{port}", cooldown_s=COOLDOWN_S, clock=clock)
    assert tier.available() and not tier.is_cluster  # nothing tried yet
    assert tier.get_blobs([b"d" * 16]) == {} and not tier.available()
    with pytest.raises(StoreError):
        tier.put_blobs(make_blobs(1))
    with RedisServer(port):
        clock.now += COOLDOWN_S + 0.1
        assert_works(tier)
    tier.close()


def test_bad_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        RedisTier("http://127.0.0.1:6379")


def test_cluster_down_at_start_never_raises_from_init_or_reads() -> None:
    tier = RedisTier(f"redis+cluster://127.0.0.1:{free_port()}", cooldown_s=COOLDOWN_S)
    assert tier.is_cluster
    result, seconds = timed(tier.get_blobs, [b"d" * 16])
    assert result == {} and seconds < 0.5 and not tier.available()
    assert tier.window_names() == [] and tier.get_window("w") is None
    with pytest.raises(StoreError):
        tier.put_window("w", b"m")
    tier.close()


def test_cluster_node_paused_is_a_miss_and_recovers(cluster: RedisCluster) -> None:
    clock = Clock()
    tier = RedisTier(
        cluster.url,
        prefix=f"t{uuid.uuid4().hex[:8]}",
        socket_timeout_s=SOCKET_TIMEOUT_S,
        cooldown_s=COOLDOWN_S,
        clock=clock,
    )
    items = make_blobs(30, size=32)  # 30 random digests: every node holds some
    digests = [d for d, _ in items]
    assert tier.put_blobs(items) == 30
    node = cluster.nodes[1]
    node.pause()  # shorter than --cluster-node-timeout: the cluster itself stays ok
    try:
        result, seconds = timed(tier.get_blobs, digests)
        # each node's chunk is read on its own connection: the paused node's blobs are misses
        assert 0 < len(result) < len(digests) and seconds < 0.5, seconds
        assert all(result[d] == data for d, data in items if d in result)
        assert not tier.available()
        with pytest.raises(StoreError):
            tier.put_blobs(make_blobs(1))
        assert timed(tier.has_blobs, digests)[1] < 0.005
    finally:
        node.resume()
    clock.now += COOLDOWN_S + 0.1
    assert tier.get_blobs(digests) == dict(items)
    assert tier.available()
    tier.close()


def _clients(port: int) -> int:
    with redis.Redis(port=port) as probe:
        return int(probe.info("clients")["connected_clients"]) - 1  # not the probe itself


@pytest.mark.parametrize("kind", ["single", "cluster"])
def test_warm_opens_the_restore_connections_ahead(
    request: pytest.FixtureRequest, kind: str
) -> None:
    """A restore after warm() opens no connection of its own (the first restore paid ~15 ms)."""
    server = request.getfixturevalue(kind)
    ports = server.ports if kind == "cluster" else [server.port]
    prefix = f"t{uuid.uuid4().hex[:8]}"
    writer, tier = RedisTier(server.url, prefix=prefix), RedisTier(server.url, prefix=prefix)
    items = make_blobs(40, size=64)
    try:
        writer.put_blobs(items)
        before = [_clients(p) for p in ports]
        assert tier.warm()
        warmed = [_clients(p) - b for p, b in zip(ports, before, strict=True)]
        assert min(warmed) >= 4  # each node: one connection per pipeline thread
        assert tier.get_blobs([d for d, _ in items]) == dict(items)  # 5 chunks on 4 threads
        assert [_clients(p) - b for p, b in zip(ports, before, strict=True)] == warmed
    finally:
        writer.close()
        tier.close()


def test_warm_with_redis_down_returns_false_and_counts_nothing() -> None:
    tier = RedisTier(f"redis://127.0.0.1:{free_port()}", socket_timeout_s=SOCKET_TIMEOUT_S)
    assert tier.warm() is False
    assert tier.counters()["outages"] == 0 and tier.available()  # the breaker saw nothing


@pytest.mark.parametrize("known_part", [0, 4, 10])
def test_digests_for_asks_redis_only_for_what_the_lookup_did_not_name(
    tier: RedisTier, tmp_path: Path, known_part: int
) -> None:
    rows = [(os.urandom(32), blob.digest(os.urandom(64))) for _ in range(10)]
    tier.put_blocks("fp", rows)
    store = TieredStore(MemoryTier(1), DiskTier(tmp_path / "blobs"), tier, Stats(None))
    catalog = Catalog(tmp_path / "catalog.db")
    try:
        known = dict(rows[:known_part])
        found = store.digests_for(catalog, "fp", [h for h, _ in rows], known)
        assert found == dict(rows)
        counters = tier.counters()
        assert counters["block_hits"] + counters["block_misses"] == 10 - known_part
    finally:
        catalog.close()
        store.close()
