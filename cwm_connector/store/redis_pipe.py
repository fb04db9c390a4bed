"""Pipelined batches of single-slot commands against Redis or Redis Cluster, in parallel.

A batch is split per node (a cluster's slot table) and into chunks; every chunk
is one non-transactional pipeline (one round trip), and the chunks run on a
small pool of threads, each on its own pooled connection: a restore's 32 MB
of blobs arrive over several sockets at once, and no key costs a round trip
of its own. Error replies come back as exception objects in their slot of the
reply list; a failure to reach a node raises.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import redis
from redis.cluster import RedisCluster
from redis.exceptions import AskError, ClusterError, ResponseError, TryAgainError

Client = redis.Redis | RedisCluster
Command = tuple[Any, ...]
T = TypeVar("T")
Value = bytes | memoryview  # a blob as redis-py (bytes) or redis_bulk (a view) read it

CHUNK_KEYS = 256  # commands per pipeline round trip: bounds one reply's size and latency
NUM_CONNECTIONS = 4  # pipelines in flight at once (threads, each with its own connection)
# error replies that say the cluster is moving or down: an outage, not bad data
CLUSTER_STATE_ERRORS = (ClusterError, AskError, TryAgainError)


def is_reply_error(exc: BaseException) -> bool:
    """An error reply about the data (WRONGTYPE, OOM, script error), not about reaching Redis."""
    return isinstance(exc, ResponseError) and not isinstance(exc, CLUSTER_STATE_ERRORS)


def routing_key(command: Command) -> Any:
    """The key that picks a command's node: an EVAL's first key, else the first argument."""
    return command[3] if command[0] == "EVAL" else command[1]


class Pipes:
    """Runs batches of commands: per node, in chunks, several chunks at once."""

    def __init__(self, num_connections: int = NUM_CONNECTIONS):
        self._num_connections = num_connections
        self._pool = ThreadPoolExecutor(num_connections, thread_name_prefix="cwm-redis-io")

    def split(
        self, client: Client, commands: Sequence[Command], chunk: int = CHUNK_KEYS
    ) -> list[tuple[redis.Redis, list[int]]]:
        """The batch as jobs: (one node's connection, at most `chunk` command indexes)."""
        if not isinstance(client, RedisCluster):
            every = list(range(len(commands)))
            return [(client, every[s : s + chunk]) for s in range(0, len(every), chunk)]
        by_node: dict[str, tuple[Any, list[int]]] = {}
        for i, command in enumerate(commands):
            node = client.get_node_from_key(routing_key(command))
            by_node.setdefault(node.name, (node, []))[1].append(i)
        jobs = []
        for node, indexes in by_node.values():
            conn = client.get_redis_connection(node)
            jobs += [(conn, indexes[s : s + chunk]) for s in range(0, len(indexes), chunk)]
        return jobs

    def run(
        self,
        client: Client,
        commands: Sequence[Command],
        chunk: int = CHUNK_KEYS,
        parallel: bool = True,
    ) -> list[Any]:
        """Replies in command order; raises when a node cannot be reached.

        `parallel=False` runs the jobs one after another on this thread (a caller that
        is itself one of the pool's threads must not wait on the pool).
        """
        if not commands:
            return []
        jobs = self.split(client, commands, chunk)
        replies: list[Any] = [None] * len(commands)

        def one(job: tuple[redis.Redis, list[int]]) -> None:
            conn, indexes = job
            for i, reply in zip(indexes, _node_pipeline(conn, [commands[i] for i in indexes]),
                                strict=True):  # fmt: skip
                replies[i] = reply

        if len(jobs) == 1 or not parallel:  # the common small batch: no thread hop
            for job in jobs:
                one(job)
        else:
            for future in [self._pool.submit(one, job) for job in jobs]:
                future.result()  # re-raises a node's connection error
        if isinstance(client, RedisCluster):
            _follow_redirects(client, commands, replies)
        for reply in replies:
            if isinstance(reply, Exception) and not is_reply_error(reply):
                raise reply
        return replies

    def start_threads(self) -> None:
        """Start every pool thread now (an executor starts them on demand)."""
        barrier = threading.Barrier(self._num_connections + 1)
        for _ in range(self._num_connections):
            self._pool.submit(barrier.wait, 1.0)
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(1.0)  # busy threads: they exist already

    def submit(self, call: Callable[[], T]) -> Future[T]:
        """Run a call on the pool (it must not wait on the pool itself)."""
        return self._pool.submit(call)

    def close(self) -> None:
        """Stop the threads (pending batches finish)."""
        self._pool.shutdown(wait=False)


def _follow_redirects(
    client: RedisCluster, commands: Sequence[Command], replies: list[Any]
) -> None:
    """Send a command whose slot moved (ASK, TRYAGAIN) again through the client.

    Not redis-py's ClusterPipeline: it re-sends each command that timed out one by
    one, so a stalled node would cost one socket timeout per key.
    """
    for i, reply in enumerate(replies):
        if isinstance(reply, AskError | TryAgainError):
            try:
                replies[i] = client.execute_command(*commands[i])
            except ResponseError as exc:
                replies[i] = exc


def _node_pipeline(client: redis.Redis, commands: list[Command]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for command in commands:
        pipe.execute_command(*command)
    return pipe.execute(raise_on_error=False)


class Pending:
    """Blobs of a batch still arriving by chunks: `get(key)` waits only for its own chunk."""

    def __init__(self) -> None:
        self._futures: dict[bytes, Future[dict[bytes, Value]]] = {}

    def add(self, keys: Sequence[bytes], future: Future[dict[bytes, Value]]) -> None:
        """These keys are answered by this chunk's future (a dict of those found)."""
        for key in keys:
            self._futures[key] = future

    def __contains__(self, key: object) -> bool:
        return key in self._futures

    def get(self, key: bytes, default: Value | None = None) -> Value | None:
        """The value, once its chunk arrived; `default` if absent or failed."""
        future = self._futures.get(key)
        return default if future is None else future.result().get(key, default)

    def all(self) -> dict[bytes, Value]:
        """Every value found (waits for every chunk)."""
        out: dict[bytes, Value] = {}
        for future in {id(f): f for f in self._futures.values()}.values():
            out.update(future.result())
        return out


def done(value: T) -> Future[T]:
    """A future that holds `value` already."""
    future: Future[T] = Future()
    future.set_result(value)
    return future
