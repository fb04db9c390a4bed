"""Real redis-server processes on 127.0.0.1 for tests: one server, or a 3-node cluster.

Plain helpers (not fixtures) so unit and end-to-end tests can share them. Every
process is started by pid and stopped by pid (SIGTERM, then SIGKILL); servers
keep no data on disk (`--save "" --appendonly no`) and live in a temp dir.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
CLUSTER_BUS_OFFSET = 10000  # Redis Cluster talks node to node on port + 10000


def redis_available() -> bool:
    """Whether redis-server and redis-cli are installed (Debian package `redis-server`)."""
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def free_port(cluster_bus: bool = False) -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now.

    With cluster_bus, port + 10000 (Redis Cluster's bus port) is free too, so the
    port is at most 55535.
    """
    if not cluster_bus:
        return _bind_probe(0)
    for _ in range(200):
        port = random.randint(20000, 55535)
        if _bind_probe(port) and _bind_probe(port + CLUSTER_BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _bind_probe(port: int) -> int:
    """Bind 127.0.0.1:port (0: any); the bound port, or 0 if it is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return 0
        return sock.getsockname()[1]


def _cli(port: int, *args: str, timeout: float = 2.0) -> str:
    """One redis-cli command against 127.0.0.1:port; its stdout ("" on failure)."""
    try:
        done = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return ""
    return done.stdout if done.returncode == 0 else ""


def _wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


class RedisServer:
    """One redis-server on 127.0.0.1; stop() and start() again keep the same port."""

    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = ()):
        self.port = port or free_port()
        self.extra_args = extra_args
        self._tmp = tempfile.TemporaryDirectory(prefix="cwm-redis-")
        self.dir = Path(self._tmp.name)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """`redis://127.0.0.1:<port>`."""
        return f"redis://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The pid of the running server, or None."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING."""
        if self._proc is not None:
            return self
        args = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port)]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.dir), *self.extra_args]
        log = open(self.dir / f"redis-{self.port}.log", "ab")  # noqa: SIM115 (held by Popen)
        try:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        try:
            _wait_for(self._ping, START_TIMEOUT_S, f"redis-server on port {self.port}")
        except BaseException:
            self.stop()
            raise
        return self

    def _ping(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"redis-server on port {self.port} exited: {self.log_tail()}")
        return _cli(self.port, "PING").strip() == "PONG"

    def log_tail(self, num_chars: int = 2000) -> str:
        """The end of the server's log, for error messages."""
        with contextlib.suppress(OSError):
            return (self.dir / f"redis-{self.port}.log").read_text(errors="replace")[-num_chars:]
        return ""

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open but nothing answers (a slow server)."""
        if self._proc is not None:
            os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        if self._proc is not None:
            os.kill(self._proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop the server by pid (SIGTERM, then SIGKILL) and wait for it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)  # a paused server cannot handle SIGTERM
            proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class RedisCluster:
    """Three cluster-enabled redis-servers on 127.0.0.1, joined, no replicas."""

    num_nodes = 3

    def __init__(self) -> None:
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        """`redis+cluster://127.0.0.1:<first node's port>`."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    @property
    def ports(self) -> list[int]:
        """The nodes' ports."""
        return [node.port for node in self.nodes]

    def start(self) -> RedisCluster:
        """Start the nodes, create the cluster, wait until every node says cluster_state:ok."""
        try:
            for _ in range(self.num_nodes):
                port = free_port(cluster_bus=True)
                conf = f"nodes-{port}.conf"
                extra = ("--cluster-enabled", "yes", "--cluster-config-file", conf)
                extra += ("--cluster-node-timeout", "2000")
                self.nodes.append(RedisServer(port, extra).start())
            addresses = [f"127.0.0.1:{port}" for port in self.ports]
            create = ["redis-cli", "--cluster", "create", *addresses]
            done = subprocess.run(
                [*create, "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT_S,
            )
            if done.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout}")
            _wait_for(self._is_ok, START_TIMEOUT_S, "cluster_state:ok on every node")
        except BaseException:
            self.stop()
            raise
        return self

    def _is_ok(self) -> bool:
        return all("cluster_state:ok" in _cli(p, "CLUSTER", "INFO") for p in self.ports)

    def dbsize(self) -> list[int]:
        """Keys held by each node, in node order."""
        return [int(_cli(p, "DBSIZE").strip() or -1) for p in self.ports]

    def stop(self) -> None:
        """Stop every node and remove their directories."""
        for node in self.nodes:
            node.close()
        self.nodes = []

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
