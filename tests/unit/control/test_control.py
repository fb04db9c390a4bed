"""The control socket against hostile and broken clients (real Unix sockets)."""

from __future__ import annotations

import socket
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from cwm_connector.control.client import ControlClient, Unavailable
from cwm_connector.control.protocol import MAX_FRAME_BYTES, read_frame
from cwm_connector.control.server import ControlServer
from cwm_connector.errors import ConfigError, CwmError

pytestmark = pytest.mark.timeout(60)


def handler(op: str, args: dict[str, Any], progress: Callable[[int, int], None]) -> Any:
    if op == "echo":
        return args
    if op == "count":
        for done in range(1, args["total"] + 1):
            progress(done, args["total"])
            time.sleep(0.15)  # beyond the server's progress throttle
        return {"counted": args["total"]}
    raise CwmError(f"unknown op {op!r}", code="unknown_op")


@pytest.fixture
def server() -> Iterator[ControlServer]:
    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    srv = ControlServer(folder / "control.sock", handler, client_timeout_s=1.0)
    srv.start()
    yield srv
    srv.stop()


def raw(server: ControlServer) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(server.path))
    return sock


def frame(message: Any) -> bytes:
    payload = msgpack.packb(message)
    return struct.pack(">I", len(payload)) + payload


def still_serves(server: ControlServer) -> bool:
    return ControlClient(server.path, timeout_s=5).call("echo", x=1) == {"x": 1}


def test_socket_is_private(server: ControlServer) -> None:
    assert stat.S_IMODE(server.path.stat().st_mode) == 0o600


def test_round_trip_and_structured_errors(server: ControlServer) -> None:
    client = ControlClient(server.path)
    assert client.call("echo", a=[1, 2], b="x") == {"a": [1, 2], "b": "x"}
    with pytest.raises(CwmError) as err:
        client.call("nope")
    assert err.value.code == "unknown_op" and not err.value.retryable


def test_progress_frames_only_when_asked(server: ControlServer) -> None:
    seen: list[tuple[int, int]] = []
    result = ControlClient(server.path).call(
        "count", on_progress=lambda d, t: seen.append((d, t)), total=3
    )
    assert result == {"counted": 3}
    assert seen == [(1, 3), (2, 3), (3, 3)]
    with raw(server) as sock:  # no "progress" flag: the first frame is the response
        sock.sendall(frame({"v": 1, "id": 5, "op": "count", "args": {"total": 2}}))
        assert read_frame(sock) == {"v": 1, "id": 5, "ok": True, "result": {"counted": 2}}


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ({"v": 99, "id": 1, "op": "echo", "args": {}}, "bad_version"),
        ({"v": 1, "id": "one", "op": "echo"}, "bad_request"),
        ({"v": 1, "id": 1, "op": 7}, "bad_request"),
        ({"v": 1, "id": 1, "op": "echo", "args": [1, 2]}, "bad_request"),
        ([1, 2, 3], "bad_request"),
    ],
)
def test_malformed_requests_get_structured_errors(
    server: ControlServer, message: Any, code: str
) -> None:
    with raw(server) as sock:
        sock.sendall(frame(message))
        reply = read_frame(sock)
    assert reply["ok"] is False and reply["error"]["code"] == code
    assert still_serves(server)


def test_garbage_and_oversize_frames(server: ControlServer) -> None:
    with raw(server) as sock:
        payload = b"\xc1\xff garbage"
        sock.sendall(struct.pack(">I", len(payload)) + payload)
        assert read_frame(sock)["error"]["code"] == "bad_request"
    with raw(server) as sock:
        sock.sendall(struct.pack(">I", MAX_FRAME_BYTES + 1))
        assert read_frame(sock)["error"]["code"] == "frame_too_large"
        assert sock.recv(1) == b""  # dropped: the stream cannot be resynchronised
    assert still_serves(server)


def test_truncated_and_hanging_clients_are_dropped(server: ControlServer) -> None:
    truncated = raw(server)
    truncated.sendall(struct.pack(">I", 100) + b"abc")
    truncated.close()
    hanging = raw(server)  # connects, sends nothing, never reads
    assert still_serves(server)
    assert hanging.recv(1) == b""  # the server timed it out (client_timeout_s)
    hanging.close()


def test_many_clients_at_once(server: ControlServer) -> None:
    results: list[str] = []

    def one(i: int) -> None:
        try:
            ok = ControlClient(server.path, timeout_s=20).call("echo", i=i) == {"i": i}
            results.append("ok" if ok else "wrong")
        except CwmError as exc:  # over max_clients: a structured, retryable refusal
            results.append(exc.code if exc.retryable else "error")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 100
    assert set(results) <= {"ok", "busy"} and results.count("ok") >= 64


def test_live_socket_refused_stale_replaced(server: ControlServer) -> None:
    with pytest.raises(ConfigError):
        ControlServer(server.path, handler).start()
    server.stop()
    server.path.touch()  # a leftover file, nobody listening
    again = ControlServer(server.path, handler)
    again.start()
    try:
        assert still_serves(again)
    finally:
        again.stop()


def test_no_server_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(Unavailable) as err:
        ControlClient(tmp_path / "none.sock").call("echo")
    assert err.value.retryable
