"""The Redis tier: blobs, block maps and window manifests shared by many vLLM servers.

Key layout (`prefix` defaults to "cwm"):

    <prefix>:blob:<digest hex>         string: the exact bytes of a blob file (blob.py header
                                       + payload); readers verify it like a disk blob
    <prefix>:blk:<fp_id>:<hash hex>    string: the 16-byte blob digest of that block hash
    <prefix>:{windows}:m:<name>        string: a window's manifest (opaque msgpack bytes)
    <prefix>:{windows}:index           set: every window name

Blob and block keys carry no hash tag, so a cluster spreads them over every slot.
The window keys share the hash tag `{windows}`: a manifest and the index sit in one
slot, so one Lua script changes both atomically on Redis and Redis Cluster alike.

Errors. Redis down, slow, flapping or answering errors must never stall or crash
the engine. Reads (`get_*`, `has_blobs`, `window_names`) never raise: a failure is
a miss, counted in `errors`, logged once per outage. A connection-level failure
opens a circuit breaker: for `cooldown_s` every call returns at once without
touching the network; the next call after that tries again (redis-py reconnects
by itself). An error reply for one key (say WRONGTYPE) is a miss for that key
only and does not open the breaker. Writes raise `StoreError` (retryable) on any
failure and while the breaker is open; callers treat it as a future miss.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import AskError, ClusterError, ResponseError, TryAgainError
from redis.retry import Retry

from cwm_connector.errors import ConfigError, StoreError
from cwm_connector.stats import Stats

logger = logging.getLogger(__name__)

CHUNK_KEYS = 256  # commands per pipeline round trip: bounds one reply's size and latency
NUM_RETRIES = 0  # redis-py's own retries; the breaker retries later instead of stalling now
DATA_ERROR_LOG_INTERVAL_S = 60.0  # per-key error replies are logged at most this often
COUNTER_NAMES = (
    "hits",  # blobs found by get_blobs
    "misses",  # blobs asked for and not returned (absent or failed)
    "block_hits",
    "block_misses",
    "errors",  # failed calls and error replies
    "outages",  # times the breaker opened from a healthy state
    "skipped",  # calls answered by the open breaker without touching the network
    "bytes_read",  # blob bytes returned by get_blobs
    "bytes_written",  # blob bytes newly stored by put_blobs
    "blobs_written",  # blobs newly stored by put_blobs
)

# KEYS: manifest, index. ARGV: manifest, name, "1" to replace. Returns 1 if written.
PUT_WINDOW_LUA = """
if ARGV[3] ~= '1' and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return 1
"""
# KEYS: manifest, index. ARGV: name. Returns 1 if the manifest existed.
DELETE_WINDOW_LUA = """
local existed = redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return existed
"""

# error replies that say the cluster is moving or down: an outage, not bad data
CLUSTER_STATE_ERRORS = (ClusterError, AskError, TryAgainError)

Client = redis.Redis | RedisCluster
T = TypeVar("T")


class RedisTier:
    """Blobs, block maps and window manifests in Redis or a Redis Cluster."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "cwm",
        socket_timeout_s: float = 0.25,
        cooldown_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        scheme = urlsplit(url).scheme
        if scheme not in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
            raise ConfigError(
                f"redis_url: unsupported scheme {scheme!r} (redis:// or redis+cluster://)"
            )
        self.url = url
        self.is_cluster = scheme.endswith("+cluster")
        self.prefix = prefix
        self.socket_timeout_s = socket_timeout_s
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._where = urlsplit(url).netloc.rpartition("@")[2]  # never log a password
        self._stats = Stats(None)
        for name in COUNTER_NAMES:
            self._stats.add(name, 0)
        self._lock = threading.Lock()
        self._client: Client | None = None
        self._scripts: dict[str, Any] = {}
        self._open_until = 0.0  # the breaker is open while clock() < this
        self._in_outage = False
        self._stale_topology = False  # a cluster's slot table is re-read after an outage
        self._last_data_error_log = -DATA_ERROR_LOG_INTERVAL_S
        self._window_index = f"{prefix}:{{windows}}:index"

    # --- keys -----------------------------------------------------------------------------

    def blob_key(self, digest: bytes) -> str:
        """The key of a blob."""
        return f"{self.prefix}:blob:{digest.hex()}"

    def block_key(self, fp_id: str, block_hash: bytes) -> str:
        """The key of one block-map row."""
        return f"{self.prefix}:blk:{fp_id}:{block_hash.hex()}"

    def window_key(self, name: str) -> str:
        """The key of a window's manifest (same slot as the index)."""
        return f"{self.prefix}:{{windows}}:m:{name}"

    # --- blobs ----------------------------------------------------------------------------

    def get_blobs(self, digests: Sequence[bytes]) -> dict[bytes, bytes]:
        """The blobs found, by digest (absent or failed ones omitted); never raises."""
        replies = self._read("get_blobs", [("GET", self.blob_key(d)) for d in digests])
        found = {d: v for d, v in zip(digests, replies, strict=True) if isinstance(v, bytes)}
        self._stats.add("hits", len(found))
        self._stats.add("misses", len(set(digests)) - len(found))
        self._stats.add("bytes_read", sum(len(v) for v in found.values()))
        return found

    def has_blobs(self, digests: Sequence[bytes]) -> set[bytes]:
        """The digests whose blob Redis holds; never raises."""
        replies = self._read("has_blobs", [("EXISTS", self.blob_key(d)) for d in digests])
        return {d for d, v in zip(digests, replies, strict=True) if v == 1}

    def put_blobs(self, items: Sequence[tuple[bytes, bytes]]) -> int:
        """Store blobs (digest, blob file bytes) unless present; return how many were new."""
        commands = [("SET", self.blob_key(d), data, "NX") for d, data in items]
        replies = self._write("put_blobs", commands)
        new = [len(data) for (_d, data), ok in zip(items, replies, strict=True) if ok]
        self._stats.add("blobs_written", len(new))
        self._stats.add("bytes_written", sum(new))
        return len(new)

    def delete_blobs(self, digests: Sequence[bytes]) -> None:
        """Remove blobs if present."""
        self._write("delete_blobs", [("DEL", self.blob_key(d)) for d in digests])

    # --- block maps -----------------------------------------------------------------------

    def get_blocks(self, fp_id: str, hashes: Sequence[bytes]) -> dict[bytes, bytes]:
        """Block hash -> blob digest for the hashes mapped under this fingerprint id."""
        replies = self._read("get_blocks", [("GET", self.block_key(fp_id, h)) for h in hashes])
        found = {h: v for h, v in zip(hashes, replies, strict=True) if isinstance(v, bytes)}
        self._stats.add("block_hits", len(found))
        self._stats.add("block_misses", len(set(hashes)) - len(found))
        return found

    def put_blocks(self, fp_id: str, rows: Sequence[tuple[bytes, bytes]]) -> None:
        """Map block hashes to blob digests under this fingerprint id."""
        self._write("put_blocks", [("SET", self.block_key(fp_id, h), d) for h, d in rows])

    # --- windows --------------------------------------------------------------------------

    def put_window(self, name: str, manifest: bytes, replace: bool = False) -> bool:
        """Store a manifest and index its name; False if it exists and not replace (atomic)."""
        args = [manifest, name, "1" if replace else "0"]
        keys = [self.window_key(name), self._window_index]
        return self._guard("put_window", lambda c: self._scripts["put"](keys, args)) == 1

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

    def delete_window(self, name: str) -> bool:
        """Remove a manifest and its index entry (atomic); True if it existed."""
        keys = [self.window_key(name), self._window_index]
        return self._guard("delete_window", lambda c: self._scripts["del"](keys, [name])) == 1

    # --- health ---------------------------------------------------------------------------

    def available(self) -> bool:
        """False while the circuit breaker is open (within cooldown_s after a failure)."""
        return self._clock() >= self._open_until

    def counters(self) -> dict[str, int]:
        """hits, misses, block_hits, block_misses, errors, outages, skipped, bytes_*, ..."""
        return self._stats.snapshot()

    def close(self) -> None:
        """Close the connections (a later call connects again)."""
        with self._lock:
            client, self._client = self._client, None
            self._scripts = {}
        if client is not None:
            with contextlib.suppress(Exception):  # closing a broken connection must not raise
                client.close()

    # --- plumbing -------------------------------------------------------------------------

    def _connect(self) -> Client:
        """The client, made on first use: a cluster client contacts the cluster when made."""
        with self._lock:
            if self._client is None:
                names = ("socket_timeout", "socket_connect_timeout")
                timeouts = dict.fromkeys(names, self.socket_timeout_s)
                retry = Retry(NoBackoff(), NUM_RETRIES)
                if self.is_cluster:
                    url = self.url.replace("+cluster", "", 1)
                    self._client = RedisCluster(url=url, retry=retry, **timeouts)
                else:
                    self._client = redis.Redis.from_url(self.url, retry=retry, **timeouts)
                self._scripts = {
                    "put": self._client.register_script(PUT_WINDOW_LUA),
                    "del": self._client.register_script(DELETE_WINDOW_LUA),
                }
            return self._client

    def _read(self, what: str, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Run commands for a read; a failure gives None replies, never an exception."""
        try:
            replies = self._guard(what, lambda c: _pipeline(c, commands))
        except StoreError:
            return [None] * len(commands)
        return self._drop_errors(what, replies, read=True)

    def _write(self, what: str, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Run commands for a write; raise StoreError on any failure."""
        replies = self._guard(what, lambda c: _pipeline(c, commands))
        return self._drop_errors(what, replies, read=False)

    def _guard(self, what: str, call: Callable[[Client], T]) -> T:
        """Run one call through the breaker; StoreError on failure or while it is open."""
        if not self.available():
            self._stats.add("skipped")
            raise StoreError(f"Redis at {self._where} is unavailable (cooling down)")
        try:
            client = self._connect()
            if self._stale_topology and isinstance(client, RedisCluster):
                client.nodes_manager.initialize()  # nodes may have moved during the outage
            self._stale_topology = False
            result = call(client)
        except Exception as exc:  # redis-py raises RedisError, RedisClusterException, OSError
            if is_reply_error(exc):
                self._reply_errors(what, [exc])
            else:
                self._outage(what, exc)
            raise StoreError(f"Redis {what} failed: {type(exc).__name__}: {exc}") from exc
        self._recovered()
        return result

    def _drop_errors(self, what: str, replies: list[Any], read: bool) -> list[Any]:
        """Replace error replies (one key's WRONGTYPE, say) with None: misses, no breaker."""
        errors = [r for r in replies if isinstance(r, Exception)]
        if not errors:
            return replies
        self._reply_errors(what, errors)
        first = errors[0]
        if not read:
            raise StoreError(f"Redis {what} failed: {type(first).__name__}: {first}")
        return [None if isinstance(r, Exception) else r for r in replies]

    def _reply_errors(self, what: str, errors: Sequence[BaseException]) -> None:
        """Count error replies; log them at most every DATA_ERROR_LOG_INTERVAL_S."""
        self._stats.add("errors")
        now = self._clock()
        if now - self._last_data_error_log >= DATA_ERROR_LOG_INTERVAL_S:
            self._last_data_error_log = now
            logger.warning("Redis %s: %d error replies, e.g. %s", what, len(errors), errors[0])

    def _outage(self, what: str, exc: BaseException) -> None:
        """Count a failure and open the breaker; log only the first failure of an outage."""
        self._stats.add("errors")
        with self._lock:
            self._open_until = self._clock() + self.cooldown_s
            self._stale_topology = True
            first, self._in_outage = not self._in_outage, True
        if first:
            self._stats.add("outages")
            msg = "Redis at %s unavailable (%s: %r); reads are misses, retrying every %.1f s"
            logger.warning(msg, self._where, what, exc, self.cooldown_s)

    def _recovered(self) -> None:
        if not self._in_outage:  # the common case, without the lock
            return
        with self._lock:
            was, self._in_outage = self._in_outage, False
        if was:
            logger.warning("Redis at %s is reachable again", self._where)


def is_reply_error(exc: BaseException) -> bool:
    """An error reply about the data (WRONGTYPE, OOM, script error), not about reaching Redis."""
    return isinstance(exc, ResponseError) and not isinstance(exc, CLUSTER_STATE_ERRORS)


def _pipeline(client: Client, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Run single-key commands in non-transactional pipelines of at most CHUNK_KEYS.

    Error replies come back as ResponseError objects, one per failed key; a failure
    to reach Redis raises, so the caller sees an outage.
    """
    if isinstance(client, RedisCluster):
        replies = _cluster_pipeline(client, commands)
    else:
        replies = []
        for start in range(0, len(commands), CHUNK_KEYS):
            replies += _node_pipeline(client, commands[start : start + CHUNK_KEYS])
    for reply in replies:
        if isinstance(reply, Exception) and not is_reply_error(reply):
            raise reply
    return replies


def _cluster_pipeline(client: RedisCluster, commands: list[tuple[Any, ...]]) -> list[Any]:
    """One plain pipeline per node and chunk, grouped by the client's slot table.

    Not redis-py's ClusterPipeline: it re-sends each command that timed out one by
    one, so a stalled node would cost one socket timeout per key. A key whose slot
    moved (MOVED, ASK, TRYAGAIN) is sent again through the client, which follows
    the redirection and updates its slot table.
    """
    by_node: dict[str, tuple[Any, list[int]]] = {}
    for i, command in enumerate(commands):
        node = client.get_node_from_key(command[1])
        by_node.setdefault(node.name, (node, []))[1].append(i)
    replies: list[Any] = [None] * len(commands)
    for node, indexes in by_node.values():
        node_client = client.get_redis_connection(node)
        for start in range(0, len(indexes), CHUNK_KEYS):
            chunk = indexes[start : start + CHUNK_KEYS]
            node_replies = _node_pipeline(node_client, [commands[i] for i in chunk])
            for i, reply in zip(chunk, node_replies, strict=True):
                replies[i] = reply
    for i, reply in enumerate(replies):
        if isinstance(reply, AskError | TryAgainError):
            try:
                replies[i] = client.execute_command(*commands[i])
            except ResponseError as exc:
                replies[i] = exc
    return replies


def _node_pipeline(client: redis.Redis, commands: list[tuple[Any, ...]]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for command in commands:
        pipe.execute_command(*command)
    return pipe.execute(raise_on_error=False)
