"""Blob values read straight off the socket, each large one into a buffer of its own.

redis-py parses replies in Python, in reads of at most `socket_read_size`, and each
read with a socket timeout is a poll and a recv: two GIL hand-offs, and each wait
for the GIL back from vLLM's busy worker thread lasts up to the interpreter's 5 ms
switch interval. Here one pipeline of `GET key`, `PEXPIRE key ttl XX` pairs goes out
through a pooled redis-py connection and the replies are read by hand, on the socket
made blocking (SO_RCVTIMEO keeps the socket timeout): header lines through a 64 KB
scratch buffer, each value with `recv_into` straight into a buffer of its exact
size, with no intermediate bytes objects and no joins.

Only what this needs is parsed: bulk strings, nulls, integers and error replies.
redis-py keeps everything else: connecting, AUTH, the pool, cluster routing; and a
batch this reader declines (TLS or other connection kinds, a cluster redirect) is
read through redis-py instead. A socket error or a malformed reply raises (the
connection is dropped, the caller's breaker counts an outage), as redis-py would.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from typing import Any

import redis
from redis.connection import Connection
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    ResponseError,
    TryAgainError,
)

SCRATCH_BYTES = 64 << 10  # header lines and whatever value bytes arrive with them
MAX_LINE = 1 << 10  # a reply line longer than this is not a reply this reader expects
REDIRECTS = (MovedError, AskError, TryAgainError, ClusterDownError)

Reply = memoryview | int | None | ResponseError


class ProtocolError(redis.ConnectionError):
    """The stream is not the RESP this reader expects (the connection is dropped)."""


class _Reader:
    """RESP replies from one socket, parsed in place; values are views into its buffers.

    Each recv_into asks for all the room left, so a thread that waited for the GIL takes
    everything that arrived meanwhile in one call. A value that does not fit gets a new
    buffer of exactly its size (plus CRLF), which then holds nothing else; bytes are never
    moved within a buffer (values handed out are views into it).
    """

    def __init__(self, sock: socket.socket, parse_error: Any):
        self.sock = sock
        self.parse_error = parse_error
        self.view = memoryview(bytearray(SCRATCH_BYTES))
        self.start = 0
        self.end = 0

    def _recv(self, need: int) -> None:
        """Receive more; first move the unread bytes to a new buffer with room for `need`."""
        if len(self.view) - self.start < need:
            size = self.end - self.start
            fresh = memoryview(bytearray(max(need, SCRATCH_BYTES)))
            fresh[:size] = self.view[self.start : self.end]
            self.view, self.start, self.end = fresh, 0, size
        self.end += _received(self.sock.recv_into(self.view[self.end :]))

    def line(self) -> bytes:
        """The next line, without its CRLF."""
        while True:
            i = self.view.obj.find(b"\r\n", self.start, self.end)  # type: ignore[union-attr]
            if i >= 0:
                out = bytes(self.view[self.start : i])
                self.start = i + 2
                return out
            if self.end - self.start > MAX_LINE:
                raise ProtocolError("reply line too long")
            self._recv(MAX_LINE + 2)

    def bulk(self, size: int) -> memoryview:
        """The next `size` bytes and their CRLF, as a view."""
        if len(self.view) - self.start >= size + 2:  # fits the current buffer
            while self.end - self.start < size + 2:
                self._recv(size + 2)
            value, crlf = self.view[self.start : self.start + size + 2], self.start + size + 2
            self.start = crlf
        else:
            value = self._own(size + 2)
        if value[size:] != b"\r\n":
            raise ProtocolError("bulk string longer than its header")
        return value[:size]

    def _own(self, total: int) -> memoryview:
        """The next `total` bytes in a buffer of their own.

        One recvmsg_into per call scatters into the rest of that buffer and a fresh
        scratch buffer, so the next reply's header (and its value's first bytes) come
        with this value's last bytes: about one GIL hand-off per value.
        """
        own = memoryview(bytearray(total))
        have = self.end - self.start
        own[:have] = self.view[self.start : self.end]
        spare = memoryview(bytearray(SCRATCH_BYTES))
        extra = 0
        while have < total:
            n = _received(self.sock.recvmsg_into([own[have:], spare])[0])
            extra = max(0, n - (total - have))
            have = min(total, have + n)
        self.view, self.start, self.end = spare, 0, extra
        return own

    def reply(self) -> Reply:
        """One reply: a bulk string (a view), an integer, None, or an error object."""
        line = self.line()
        kind, rest = line[:1], line[1:]
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self.bulk(size)
        if kind == b":":
            return int(rest)
        if kind == b"_":  # RESP3 null
            return None
        if kind == b"-":
            return self.parse_error(rest.decode(errors="replace"))
        raise ProtocolError(f"unexpected reply type {kind!r}")


def get_values(
    client: redis.Redis,
    keys: Sequence[str],
    ttl_ms: int,
    timeout_s: float | None,
) -> list[memoryview | ResponseError | None] | None:
    """Each key's value (an error reply for that key, or None if absent), TTL restarted.

    A value larger than SCRATCH_BYTES is a view into a buffer of its own (2 bytes more);
    smaller ones are views into a buffer shared with other replies of this call.

    None when this reader declines the batch (TLS or other connection kinds, a
    cluster redirect): the caller reads it through redis-py. Raises what redis-py
    raises when Redis cannot be reached or the connection breaks.
    """
    pool = client.connection_pool
    conn = pool.get_connection()
    clean = False
    try:
        # redis-py internals, read defensively: a redis-py without them declines here,
        # before anything is sent, and every batch takes redis-py's own path.
        sock = getattr(conn, "_sock", None)
        parse_error = getattr(getattr(conn, "_parser", None), "parse_error", None)
        if (
            type(conn) is not Connection
            or not isinstance(sock, socket.socket)
            or not callable(parse_error)
        ):
            clean = True
            return None
        commands = [c for k in keys for c in (("GET", k), ("PEXPIRE", k, ttl_ms, "XX"))]
        conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        replies = _read_replies(sock, parse_error, len(commands), timeout_s)
        clean = True
    finally:
        if not clean:
            conn.disconnect()  # the stream is somewhere mid-reply: never reuse it
        pool.release(conn)
    if any(isinstance(r, REDIRECTS) for r in replies):
        return None  # the slot moved: redis-py's path follows redirects
    return [r if isinstance(r, memoryview | ResponseError) else None for r in replies[::2]]


def _read_replies(
    sock: socket.socket, parse_error: Any, count: int, timeout_s: float | None
) -> list[Reply]:
    """`count` replies, read with the socket blocking and a kernel receive timeout.

    A blocking recv is one system call (one GIL hand-off); with a Python-level timeout
    each recv is a poll and a recv, two. SO_RCVTIMEO keeps redis-py's socket_timeout
    meanwhile (a stalled server raises, as before).
    """
    before = sock.gettimeout()
    sock.settimeout(None)
    seconds = 0.0 if timeout_s is None else timeout_s
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
    try:
        reader = _Reader(sock, parse_error)
        replies = [reader.reply() for _ in range(count)]
        if reader.start != reader.end:
            raise ProtocolError("bytes after the last reply")
        return replies
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(0.0))
        sock.settimeout(before)


def _received(n: int) -> int:
    """A recv's byte count; 0 means Redis closed the connection."""
    if n == 0:
        raise redis.ConnectionError("Redis closed the connection mid-reply")
    return n


def _timeval(seconds: float) -> bytes:
    """A struct timeval for SO_RCVTIMEO (0 = no timeout)."""
    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1e6))
