"""Pipelined batches of single-slot commands against Redis or Redis Cluster, in parallel.

A batch is split per node (a cluster's slot table) and into chunks; every chunk
is one non-transactional pipeline (one round trip), and the chunks run on a
small pool of threads, each on its own pooled connection: a restore's 32 MB
of blobs arrive over several sockets at once, and no key costs a round trip
of its own. Error replies come back as exception objects in their slot of the
reply list; a failure to reach a node raises.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.exceptions import AskError, ClusterError, ResponseError, TryAgainError

Client = redis.Redis | RedisCluster
Command = tuple[Any, ...]

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
        self._pool = ThreadPoolExecutor(num_connections, thread_name_prefix="cwm-redis-io")

    def run(self, client: Client, commands: Sequence[Command], chunk: int = CHUNK_KEYS) -> list[Any]:
        """Replies in command order; raises when a node cannot be reached."""
        if not commands:
            return []
        jobs: list[tuple[redis.Redis, list[int]]] = []
        if isinstance(client, RedisCluster):
            by_node: dict[str, tuple[Any, list[int]]] = {}
            for i, command in enumerate(commands):
                node = client.get_node_from_key(routing_key(command))
                by_node.setdefault(node.name, (node, []))[1].append(i)
            for node, indexes in by_node.values():
                conn = client.get_redis_connection(node)
                jobs += [(conn, indexes[s : s + chunk]) for s in range(0, len(indexes), chunk)]
        else:
            every = list(range(len(commands)))
            jobs = [(client, every[s : s + chunk]) for s in range(0, len(every), chunk)]
        replies: list[Any] = [None] * len(commands)

        def one(job: tuple[redis.Redis, list[int]]) -> None:
            conn, indexes = job
            for i, reply in zip(indexes, _node_pipeline(conn, [commands[i] for i in indexes]),
                                strict=True):  # fmt: skip
                replies[i] = reply

        if len(jobs) == 1:  # the common small batch: no thread hop
            one(jobs[0])
        else:
            for future in [self._pool.submit(one, job) for job in jobs]:
                future.result()  # re-raises a node's connection error
        if isinstance(client, RedisCluster):
            _follow_redirects(client, commands, replies)
        for reply in replies:
            if isinstance(reply, Exception) and not is_reply_error(reply):
                raise reply
        return replies

    def close(self) -> None:
        """Stop the threads (pending batches finish)."""
        self._pool.shutdown(wait=False)


def _follow_redirects(client: RedisCluster, commands: Sequence[Command], replies: list[Any]) -> None:
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
