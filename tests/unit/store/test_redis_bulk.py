"""redis_bulk: blob values read off the socket, against a real redis-server and scripted peers."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid

import pytest
import redis
from redis._parsers.base import BaseParser
from redis.exceptions import ResponseError
from redis_servers import RedisServer, redis_available
from test_redis import Clock

from cwm_connector.store import blob, redis_bulk
from cwm_connector.store.redis import RedisTier

pytestmark = [
    pytest.mark.skipif(not redis_available(), reason="needs redis-server (Debian redis-server)"),
    pytest.mark.timeout(60),
]

COOLDOWN_S = 2.0


def test_values_equal_get_and_ttl_restarts(single: RedisServer) -> None:
    client = redis.Redis.from_url(single.url)
    tag = uuid.uuid4().hex[:8]
    sizes = [0, 1, 39, 65_534, 65_536, 262_184, 3_000_001]  # around the scratch size, and big
    keys = [f"{tag}:k{i}" for i in range(len(sizes))]
    values = [os.urandom(n) for n in sizes]
    for key, value in zip(keys, values, strict=True):
        client.set(key, value, px=5_000)
    client.set(f"{tag}:forever", b"x")
    got = redis_bulk.get_values(client, [*keys, f"{tag}:absent", f"{tag}:forever"], 60_000, 2.0)
    assert got is not None
    assert [bytes(v) for v in got[: len(keys)]] == [client.get(k) for k in keys] == values
    assert got[len(keys)] is None  # a missing key is a miss
    assert bytes(got[-1]) == b"x"
    assert 55_000 < client.pttl(keys[0]) <= 60_000  # PEXPIRE ... XX ran in the same pipeline
    assert client.pttl(f"{tag}:forever") == -1  # XX: a key without TTL keeps none
    big = got[sizes.index(3_000_001)]
    assert isinstance(big, memoryview) and big.obj is not None and len(big.obj) == 3_000_003
    # the pooled connection is clean afterwards: redis-py and the reader both use it again
    assert client.ping() and client.get(keys[1]) == values[1]
    again = redis_bulk.get_values(client, keys[:2], 60_000, 2.0)
    assert again is not None and [bytes(v) for v in again] == values[:2]


def test_a_non_string_key_is_an_error_for_that_key_only(single: RedisServer) -> None:
    client = redis.Redis.from_url(single.url)
    tag = uuid.uuid4().hex[:8]
    client.rpush(f"{tag}:list", b"a")
    client.set(f"{tag}:ok", b"fine")
    got = redis_bulk.get_values(client, [f"{tag}:list", f"{tag}:ok"], 60_000, 2.0)
    assert got is not None
    assert isinstance(got[0], ResponseError) and "WRONGTYPE" in str(got[0])
    assert bytes(got[1]) == b"fine"


def test_tier_reads_blobs_through_the_reader(single: RedisServer) -> None:
    tier = RedisTier(single.url, prefix=f"t{uuid.uuid4().hex[:8]}")
    raws = [os.urandom(n) for n in (300, 262_144, 70_000)]
    items = [(blob.digest(r), blob.encode(r)) for r in raws]
    tier.put_blobs(items)
    wrong = blob.digest(b"a list, not a blob")
    redis.Redis.from_url(single.url).rpush(tier.blob_key(wrong), b"x")
    got = tier.get_blobs([d for d, _ in items] + [wrong])
    assert set(got) == {d for d, _ in items}  # the list is a miss, the rest arrive
    assert all(isinstance(v, memoryview) for v in got.values())  # redis-py gives bytes
    assert {d: bytes(v) for d, v in got.items()} == dict(items)
    counters = tier.counters()
    assert counters["errors"] == 1 and counters["outages"] == 0 and tier.available()
    tier.close()


def _stream(sock: socket.socket, data: bytes, piece: int, close: bool) -> None:
    """Write data in small pieces with pauses, so the reader sees many partial recvs."""
    for i, start in enumerate(range(0, len(data), piece)):
        sock.sendall(data[start : start + piece])
        if i % 50 == 0:
            time.sleep(0.002)
    if close:
        sock.close()


def test_a_huge_value_split_across_recv_calls() -> None:
    value = os.urandom(1_000_003)
    data = b"".join([
        b"$%d\r\n" % len(value), value, b"\r\n", b":1\r\n",
        b"$-1\r\n", b":0\r\n",
        b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n", b":0\r\n",
        b"$5\r\nhello\r\n", b":1\r\n",
    ])  # fmt: skip
    reader, writer = socket.socketpair()
    with reader, writer:
        thread = threading.Thread(target=_stream, args=(writer, data, 997, False))
        thread.start()
        replies = redis_bulk._read_replies(reader, BaseParser.parse_error, 8, 2.0)
        thread.join()
    assert bytes(replies[0]) == value and replies[1] == 1
    assert replies[2] is None and replies[3] == 0
    assert isinstance(replies[4], ResponseError) and replies[5] == 0
    assert bytes(replies[6]) == b"hello" and replies[7] == 1
    assert reader.gettimeout() is None  # socketpair default: restored as it was


@pytest.mark.parametrize("cut", [3, 40_000, 200_000])  # in a header, in scratch, in its own buffer
def test_a_connection_closed_mid_reply_raises(cut: int) -> None:
    data = b"$262184\r\n" + os.urandom(262_184) + b"\r\n:1\r\n"
    reader, writer = socket.socketpair()
    with reader:
        thread = threading.Thread(target=_stream, args=(writer, data[:cut], 4096, True))
        thread.start()
        with pytest.raises(redis.ConnectionError):
            redis_bulk._read_replies(reader, BaseParser.parse_error, 2, 2.0)
        thread.join()


class FakeRedis:
    """A peer that answers redis-py's handshake, then cuts each GET reply short (or not)."""

    def __init__(self, value: bytes):
        self.value = value
        self.cut = True  # close the connection mid-value
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while (command := _parse_command(buf)) is None:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                args, buf = command
                if args[0].upper() == b"GET":
                    reply = b"$%d\r\n%s\r\n" % (len(self.value), self.value)
                    if self.cut:
                        conn.sendall(reply[: len(reply) // 2])
                        return
                    conn.sendall(reply)
                elif args[0].upper() == b"PEXPIRE":
                    conn.sendall(b":1\r\n")
                else:  # HELLO, CLIENT SETINFO, ...: fine
                    conn.sendall(b"+OK\r\n")

    def close(self) -> None:
        self.sock.close()


def _parse_command(buf: bytes) -> tuple[list[bytes], bytes] | None:
    """One RESP array of bulk strings from the front of buf, and the rest; None if partial."""
    end = buf.find(b"\r\n")
    if end < 0:
        return None
    count, pos, args = int(buf[1:end]), end + 2, []
    for _ in range(count):
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None
        size = int(buf[pos + 1 : end])
        if len(buf) < end + 2 + size + 2:
            return None
        args.append(buf[end + 2 : end + 2 + size])
        pos = end + 2 + size + 2
    return args, buf[pos:]


def test_a_reply_cut_short_is_a_miss_and_opens_the_breaker() -> None:
    raw = os.urandom(262_144)
    digest = blob.digest(raw)
    fake = FakeRedis(blob.encode(raw))
    clock = Clock()
    tier = RedisTier(fake.url, socket_timeout_s=1.0, cooldown_s=COOLDOWN_S, clock=clock)
    try:
        assert tier.get_blobs([digest]) == {}  # a miss, not an error
        counters = tier.counters()
        assert counters["outages"] == 1 and counters["errors"] == 1 and not tier.available()
        assert tier.get_blobs([digest]) == {}  # the open breaker answers off the network
        assert tier.counters()["skipped"] == 1
        fake.cut = False
        clock.now += COOLDOWN_S
        got = tier.get_blobs([digest])  # redis-py reconnected the dropped connection
        assert {d: bytes(v) for d, v in got.items()} == {digest: blob.encode(raw)}
        assert tier.available() and tier.counters()["outages"] == 1
    finally:
        tier.close()
        fake.close()


def test_a_stalled_server_is_a_miss_within_the_socket_timeout() -> None:
    raw = os.urandom(262_144)
    with RedisServer() as server:
        clock = Clock()
        tier = RedisTier(server.url, socket_timeout_s=0.25, cooldown_s=COOLDOWN_S, clock=clock)
        tier.put_blobs([(blob.digest(raw), blob.encode(raw))])
        server.pause()
        try:
            started = time.perf_counter()
            assert tier.get_blobs([blob.digest(raw)]) == {}
            assert time.perf_counter() - started < 2.0  # SO_RCVTIMEO kept the socket timeout
            assert tier.counters()["outages"] == 1 and not tier.available()
        finally:
            server.resume()
        clock.now += COOLDOWN_S
        got = tier.get_blobs([blob.digest(raw)])
        assert bytes(got[blob.digest(raw)]) == blob.encode(raw)
        tier.close()
