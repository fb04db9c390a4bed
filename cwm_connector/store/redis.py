"""The Redis tier: blobs, block maps and window manifests shared by many vLLM servers.

Key layout (`prefix` defaults to "cwm"; Redis >= 7.0):

    <prefix>:blob:{<digest hex>}             string: the exact bytes of a blob file (blob.py
                                             header + payload); readers verify it like a disk blob
    <prefix>:blob:{<digest hex>}:pins        integer: how many windows pin that blob
    <prefix>:blk:<fp_id>:{<hash hex>}        string: the 16-byte blob digest of that block hash
    <prefix>:blk:<fp_id>:{<hash hex>}:pins   hash: digest -> how many windows pin the map there
    <prefix>:{windows}:m:<name>              string: a window's manifest (opaque msgpack bytes)
    <prefix>:{windows}:index                 set: every window name

Lifetime. A blob or block map that no window pins is cache: it carries a TTL of
`ttl_s`, restarted whenever it is written or read (`PEXPIRE ... XX` in the same
pipeline as the read: no extra round trip, and a key without TTL keeps none).
Pinning a key (a window that names it) removes its TTL; releasing the last pin
deletes it. Manifests never expire. Every change of a key together with its pin
counter is one Lua script (`redis_lua.py`) over two keys of one hash tag, so it
is atomic on Redis and on Redis Cluster alike: blob keys are tagged by their
digest, block maps by their hash (a cluster spreads both over every slot), the
window keys share `{windows}`. Under `maxmemory`, `volatile-lru` (or any
`volatile-*` policy) evicts only cache; a blob evicted anyway is a miss.

Pins are counts, not sets, so ten thousand clones of one window cost a few
bytes per blob. The window ops (`windows/share.py`) pin before they claim a
name and release only what a claim or delete handed back (the scripts return
the replaced or removed manifest to exactly one caller), so a count is never
too low; a crash between the two steps leaves it one too high (that blob never
expires). Keys of the first layout (`<prefix>:blob:<hex>`, `<prefix>:blk:<fp>:
<hex>`, no hash tag) are never read; `gc` removes them.

Errors. Redis down, slow, flapping or answering errors must never stall or crash
the engine. Reads (`get_*`, `has_blobs`, `window_names`) never raise: a failure is
a miss, counted in `errors`, logged once per outage. A connection-level failure
opens a circuit breaker (`redis_breaker.py`): for `cooldown_s` every call returns
at once without touching the network; the next call after that tries again
(redis-py reconnects by itself). An error reply for one key (say WRONGTYPE) is a
miss for that key only and does not open the breaker. Writes, pins, `usage` and
`gc` raise `StoreError` (retryable) on any failure and while the breaker is open;
callers treat it as a future miss.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from cwm_connector.errors import ConfigError, StoreError
from cwm_connector.stats import Stats
from cwm_connector.store import redis_bulk as bulk
from cwm_connector.store import redis_lua as lua
from cwm_connector.store import redis_upkeep
from cwm_connector.store.redis_breaker import Breaker
from cwm_connector.store.redis_pipe import (
    CHUNK_KEYS,
    NUM_CONNECTIONS,
    Client,
    Command,
    Pending,
    Pipes,
    Value,
    done,
    is_reply_error,
)

__all__ = ["CHUNK_KEYS", "RedisTier", "is_reply_error"]

logger = logging.getLogger(__name__)

BLOB_CHUNK_KEYS = 8  # blobs per pipeline (2 MB of 256 KB blocks): chunks run in parallel
READ_SIZE = 4 << 20  # bytes per recv: fewer GIL hand-offs per blob (the engine holds the GIL)
NUM_RETRIES = 0  # redis-py's own retries; the breaker retries later instead of stalling now
DEFAULT_TTL_S = 604_800.0  # a week, as CwmConfig.redis_ttl_s
COUNTER_NAMES = (
    "hits",  # blobs found by get_blobs
    "misses",  # blobs asked for and not returned (absent, evicted, expired or failed)
    "block_hits",
    "block_misses",
    "errors",  # failed calls and error replies
    "outages",  # times the breaker opened from a healthy state
    "skipped",  # calls answered by the open breaker without touching the network
    "bytes_read",  # blob bytes returned by get_blobs
    "bytes_written",  # blob bytes newly stored by put_blobs
    "blobs_written",  # blobs newly stored by put_blobs
    "blobs_freed",  # blobs deleted when their last pin went
    "block_maps_freed",  # block maps deleted when their last pin went
)

T = TypeVar("T")
Rows = Sequence[tuple[bytes, bytes]]


class RedisTier:
    """Blobs, block maps and window manifests in Redis or a Redis Cluster."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "cwm",
        ttl_s: float = DEFAULT_TTL_S,
        socket_timeout_s: float = 0.25,
        cooldown_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        scheme = urlsplit(url).scheme
        if scheme not in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
            raise ConfigError(
                f"redis_url: unsupported scheme {scheme!r} (redis:// or redis+cluster://)"
            )
        if ttl_s <= 0:
            raise ConfigError("redis_ttl_s must be positive")
        self.url = url
        self.is_cluster = scheme.endswith("+cluster")
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.socket_timeout_s = socket_timeout_s
        self.cooldown_s = cooldown_s
        self._where = urlsplit(url).netloc.rpartition("@")[2]  # never log a password
        self._stats = Stats(None)
        for name in COUNTER_NAMES:
            self._stats.add(name, 0)
        self._lock = threading.Lock()
        self._client: Client | None = None
        self._pipes = Pipes()
        self._breaker = Breaker(self._where, cooldown_s, self._stats, clock, logger)
        self._window_index = f"{prefix}:{{windows}}:index"

    @property
    def ttl_ms(self) -> int:
        """The cache TTL in milliseconds (at least 1)."""
        return max(1, int(self.ttl_s * 1000))

    # --- keys -----------------------------------------------------------------------------

    def blob_key(self, digest: bytes) -> str:
        """The key of a blob (its digest is its hash tag)."""
        return f"{self.prefix}:blob:{{{digest.hex()}}}"

    def block_key(self, fp_id: str, block_hash: bytes) -> str:
        """The key of one block-map row (its block hash is its hash tag)."""
        return f"{self.prefix}:blk:{fp_id}:{{{block_hash.hex()}}}"

    def window_key(self, name: str) -> str:
        """The key of a window's manifest (same slot as the index)."""
        return f"{self.prefix}:{{windows}}:m:{name}"

    # --- blobs ----------------------------------------------------------------------------

    def get_blobs(self, digests: Sequence[bytes]) -> dict[bytes, Value]:
        """The blobs found, by digest (absent or failed ones omitted); never raises."""
        return self.prefetch_blobs(digests).all()

    def prefetch_blobs(self, digests: Sequence[bytes]) -> Pending:
        """Start reading blobs in chunks over parallel pipelines; never raises.

        `get(digest)` on the answer waits only for that digest's chunk, so a caller
        verifies the first blobs while the rest are on the wire. Cache blobs found get
        their TTL back.
        """
        digests = list(dict.fromkeys(digests))
        pending = Pending()
        commands = self._refreshed("GET", map(self.blob_key, digests))
        chunk = 2 * BLOB_CHUNK_KEYS  # even: a GET and its PEXPIRE stay in one job
        try:  # no network on Redis; a cluster client reads the slot table when first made
            self._breaker.check()
            jobs = self._pipes.split(self._connect(), commands, chunk)
        except StoreError:
            pending.add(digests, done({}))
            return pending
        except Exception as exc:  # as in _guard: redis-py raises RedisError, OSError, ...
            self._breaker.outage("get_blobs", exc)
            pending.add(digests, done({}))
            return pending
        for node, indexes in jobs:
            keys = [digests[i // 2] for i in indexes if i % 2 == 0]
            job = functools.partial(self._read_blobs, node, keys, [commands[i] for i in indexes])
            pending.add(keys, done(job()) if len(jobs) == 1 else self._pipes.submit(job))
        return pending

    def _read_blobs(
        self, node: redis.Redis, digests: list[bytes], commands: list[Command]
    ) -> dict[bytes, Value]:
        """One chunk of prefetch_blobs (GET, PEXPIRE pairs), run on one node's connection.

        Read by `redis_bulk` (values straight into buffers of their own); a chunk it
        declines goes through redis-py.
        """
        keys = [c[1] for c in commands[::2]]
        args = (keys, self.ttl_ms, self.socket_timeout_s)
        try:
            values = self._guard("get_blobs", lambda _c: bulk.get_values(node, *args))
        except StoreError:
            values = [None] * len(keys)
        if values is None:
            values = self._read("get_blobs", commands, len(commands), parallel=False)[::2]
        else:
            values = self._breaker.drop_errors("get_blobs", values, read=True)
        found = {
            d: v for d, v in zip(digests, values, strict=True) if isinstance(v, bytes | memoryview)
        }
        self._stats.add("hits", len(found))
        self._stats.add("misses", len(digests) - len(found))
        self._stats.add("bytes_read", sum(len(v) for v in found.values()))
        return found

    def has_blobs(self, digests: Sequence[bytes]) -> set[bytes]:
        """The digests whose blob Redis holds (cache ones get their TTL back); never raises."""
        replies = self._read("has_blobs", self._refreshed("EXISTS", map(self.blob_key, digests)))
        return {d for d, v in zip(digests, replies[::2], strict=True) if v == 1}

    def put_blobs(self, items: Sequence[tuple[bytes, bytes]]) -> int:
        """Store blobs (digest, blob file bytes) unless present; return how many were new.

        A new blob is cache (with TTL) unless a window pins it already; a present one
        keeps its bytes and its TTL restarts.
        """
        ttl = self.ttl_ms
        commands = [self._script(lua.PUT_BLOB, self.blob_key(d), data, ttl) for d, data in items]
        replies = self._write("put_blobs", commands, 2 * BLOB_CHUNK_KEYS)
        new = [len(data) for (_d, data), ok in zip(items, replies, strict=True) if ok == 1]
        self._stats.add("blobs_written", len(new))
        self._stats.add("bytes_written", sum(new))
        return len(new)

    def delete_blobs(self, digests: Sequence[bytes]) -> None:
        """Remove blobs and their pin counts if present."""
        keys = [self.blob_key(d) for d in digests]
        self._write("delete_blobs", [("DEL", k) for k in keys] + [("DEL", _pins(k)) for k in keys])

    # --- block maps -----------------------------------------------------------------------

    def get_blocks(self, fp_id: str, hashes: Sequence[bytes]) -> dict[bytes, bytes]:
        """Block hash -> blob digest for the hashes mapped under this fingerprint id."""
        keys = [self.block_key(fp_id, h) for h in hashes]
        replies = self._read("get_blocks", self._refreshed("GET", keys))
        found = {h: v for h, v in zip(hashes, replies[::2], strict=True) if isinstance(v, bytes)}
        self._stats.add("block_hits", len(found))
        self._stats.add("block_misses", len(set(hashes)) - len(found))
        return found

    def put_blocks(self, fp_id: str, rows: Rows) -> None:
        """Map block hashes to blob digests under this fingerprint id (cache, with TTL).

        A map some window pins is left as it is.
        """
        ttl = self.ttl_ms
        self._write("put_blocks", [
            self._script(lua.PUT_BLOCK, self.block_key(fp_id, h), d, ttl) for h, d in rows
        ])  # fmt: skip

    # --- pins (one window's hold on its blobs and block maps) -------------------------------

    def pin_blobs(self, digests: Sequence[bytes]) -> set[bytes]:
        """Add one pin to each blob (no TTL from now on); the digests whose blob is absent."""
        digests = list(dict.fromkeys(digests))
        commands = [self._script(lua.PIN_BLOB, self.blob_key(d)) for d in digests]
        replies = self._write("pin_blobs", commands)
        return {d for d, present in zip(digests, replies, strict=True) if present != 1}

    def unpin_blobs(self, digests: Sequence[bytes]) -> int:
        """Remove one pin from each blob; delete those left unpinned; return how many."""
        commands = [self._script(lua.UNPIN_BLOB, self.blob_key(d)) for d in dict.fromkeys(digests)]
        freed = sum(1 for r in self._write("unpin_blobs", commands) if r == 1)
        self._stats.add("blobs_freed", freed)
        return freed

    def pin_blocks(self, maps: Mapping[str, Rows]) -> None:
        """Pin each fingerprint's (hash, digest) rows: the maps name these digests, no TTL."""
        self._write("pin_blocks", self._block_scripts(lua.PIN_BLOCK, maps))

    def unpin_blocks(self, maps: Mapping[str, Rows]) -> int:
        """Remove one pin from each row; delete the maps left unpinned; return how many."""
        replies = self._write("unpin_blocks", self._block_scripts(lua.UNPIN_BLOCK, maps))
        freed = sum(1 for r in replies if r == 1)
        self._stats.add("block_maps_freed", freed)
        return freed

    def _block_scripts(self, script: str, maps: Mapping[str, Rows]) -> list[Command]:
        return [
            self._script(script, self.block_key(fp_id, h), d)
            for fp_id, rows in maps.items()
            for h, d in dict.fromkeys(rows)
        ]

    # --- windows --------------------------------------------------------------------------

    def claim_window(
        self, name: str, manifest: bytes, replace: bool = False
    ) -> tuple[bool, bytes | None]:
        """Store a manifest and index its name (atomic): (claimed, the manifest it replaced)."""
        keys = [self.window_key(name), self._window_index]
        command = ("EVAL", lua.CLAIM_WINDOW, 2, *keys, manifest, name, "1" if replace else "0")
        reply = self._guard("put_window", lambda c: c.execute_command(*command))
        if isinstance(reply, bytes):
            return True, reply
        return reply == 1, None

    def put_window(self, name: str, manifest: bytes, replace: bool = False) -> bool:
        """Store a manifest and index its name; False if it exists and not replace (atomic)."""
        return self.claim_window(name, manifest, replace)[0]

    def get_window(self, name: str) -> bytes | None:
        """A window's manifest, or None (absent or Redis failing)."""
        replies = self._read("get_window", [("GET", self.window_key(name))])
        return replies[0] if replies and isinstance(replies[0], bytes) else None

    def window_names(self) -> list[str]:
        """Every indexed window name, sorted (empty when Redis fails)."""
        replies = self._read("window_names", [("SMEMBERS", self._window_index)])
        if not replies or not isinstance(replies[0], set | list):
            return []
        return sorted(n.decode() for n in replies[0])

    def pop_window(self, name: str) -> bytes | None:
        """Remove a manifest and its index entry (atomic); the manifest, or None if absent."""
        keys = [self.window_key(name), self._window_index]
        command = ("EVAL", lua.POP_WINDOW, 2, *keys, name)
        reply = self._guard("delete_window", lambda c: c.execute_command(*command))
        return reply if isinstance(reply, bytes) else None

    def delete_window(self, name: str) -> bool:
        """Remove a manifest and its index entry (atomic); True if it existed."""
        return self.pop_window(name) is not None

    # --- upkeep (`cwm store du|gc`) -------------------------------------------------------

    def usage(self) -> dict[str, int]:
        """windows, pinned_blobs/bytes, cache_blobs/bytes, block_maps, orphan_block_maps.

        One SCAN over the tier's keys in bounded batches; raises StoreError when Redis fails.
        """
        return self._guard("usage", lambda c: redis_upkeep.usage(self, c))

    def gc(self) -> dict[str, int]:
        """Remove orphan block maps and first-layout keys; give unpinned keys without TTL one.

        Returns removed_block_maps, removed_blobs, ttl_set, persisted; raises StoreError
        when Redis fails.
        """
        return self._guard("gc", lambda c: redis_upkeep.gc(self, c))

    def run(self, client: Client, commands: Sequence[Command]) -> list[Any]:
        """A batch on a connected client (upkeep scans), error replies left in place."""
        return self._pipes.run(client, commands)

    @staticmethod
    def _script(script: str, key: str, *args: Any) -> Command:
        """An EVAL of a script over one key and its pins key (one slot)."""
        return ("EVAL", script, 2, key, _pins(key), *args)

    def _refreshed(self, command: str, keys: Any) -> list[Command]:
        """`command key` for each key, each followed by a TTL restart if it has one."""
        ttl = self.ttl_ms
        return [c for k in keys for c in ((command, k), ("PEXPIRE", k, ttl, "XX"))]

    def warm(self, connections: int = NUM_CONNECTIONS) -> bool:
        """Open `connections` connections to each node and start the pipeline threads now,
        so the first restore pays no connects. False if Redis cannot be reached: nothing
        raised and nothing counted (the first real call finds out, through the breaker)."""
        if not self.available():
            return False
        try:
            client = self._connect()
            nodes = (
                [client.get_redis_connection(n) for n in client.get_primaries()]
                if isinstance(client, RedisCluster)
                else [client]
            )
            for node in nodes:
                pool, opened = node.connection_pool, []
                try:
                    for _ in range(connections):
                        opened.append(pool.get_connection())
                finally:  # back to the pool, connected, even when a later one failed
                    for conn in opened:
                        pool.release(conn)
        except Exception:  # redis-py raises RedisError, RedisClusterException, OSError
            return False
        self._pipes.start_threads()
        return True

    # --- health ---------------------------------------------------------------------------

    def available(self) -> bool:
        """False while the circuit breaker is open (within cooldown_s after a failure)."""
        return self._breaker.available()

    def counters(self) -> dict[str, int]:
        """hits, misses, block_hits, block_misses, errors, outages, skipped, bytes_*, ..."""
        return self._stats.snapshot()

    def close(self) -> None:
        """Close the connections (a later call connects again)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # closing a broken connection must not raise
                client.close()

    # --- plumbing -------------------------------------------------------------------------

    def _connect(self) -> Client:
        """The client, made on first use: a cluster client contacts the cluster when made."""
        with self._lock:
            if self._client is None:
                names = ("socket_timeout", "socket_connect_timeout")
                timeouts: dict[str, Any] = dict.fromkeys(names, self.socket_timeout_s)
                timeouts["socket_read_size"] = READ_SIZE
                retry = Retry(NoBackoff(), NUM_RETRIES)
                if self.is_cluster:
                    url = self.url.replace("+cluster", "", 1)
                    self._client = RedisCluster(url=url, retry=retry, **timeouts)
                else:
                    self._client = redis.Redis.from_url(self.url, retry=retry, **timeouts)
            return self._client

    def _read(
        self, what: str, commands: list[Command], chunk: int = CHUNK_KEYS, parallel: bool = True
    ) -> list[Any]:
        """Run commands for a read; a failure gives None replies, never an exception."""
        try:
            replies = self._guard(what, lambda c: self._pipes.run(c, commands, chunk, parallel))
        except StoreError:
            return [None] * len(commands)
        return self._breaker.drop_errors(what, replies, read=True)

    def _write(self, what: str, commands: list[Command], chunk: int = CHUNK_KEYS) -> list[Any]:
        """Run commands for a write; raise StoreError on any failure."""
        replies = self._guard(what, lambda c: self._pipes.run(c, commands, chunk))
        return self._breaker.drop_errors(what, replies, read=False)

    def _guard(self, what: str, call: Callable[[Client], T]) -> T:
        """Run one call through the breaker; StoreError on failure or while it is open."""
        self._breaker.check()
        try:
            client = self._connect()
            if self._breaker.stale_topology and isinstance(client, RedisCluster):
                client.nodes_manager.initialize()  # nodes may have moved during the outage
            self._breaker.stale_topology = False
            result = call(client)
        except Exception as exc:  # redis-py raises RedisError, RedisClusterException, OSError
            if is_reply_error(exc):
                self._breaker.reply_errors(what, [exc])
            else:
                self._breaker.outage(what, exc)
            raise StoreError(f"Redis {what} failed: {type(exc).__name__}: {exc}") from exc
        self._breaker.recovered()
        return result


def _pins(key: str) -> str:
    """The pin counter of a blob or block-map key (same hash tag, so same slot)."""
    return f"{key}:pins"
