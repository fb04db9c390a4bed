"""The control-socket wire format: length-prefixed msgpack frames.

Each frame is a 4-byte big-endian payload length, then a msgpack map.
Request:  {"v": 1, "id": int, "op": str, "args": {...}, "progress": bool (optional)}
Response: {"v": 1, "id": int, "ok": true, "result": ...}
       or {"v": 1, "id": int, "ok": false, "error": {"code", "message", "retryable"}}
A request with "progress": true may get progress frames before its response:
          {"v": 1, "id": int, "progress": {"done": int, "total": int}}
A frame longer than MAX_FRAME_BYTES is refused before it is read. No pickle.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack

from cwm_connector.errors import CwmError

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 16 * 1024 * 1024
LENGTH = struct.Struct(">I")


class ProtocolError(CwmError):
    """A frame that is not a valid cwm request or response."""

    code = "bad_request"


class FrameTooLarge(ProtocolError):
    """A frame's declared length exceeds MAX_FRAME_BYTES."""

    code = "frame_too_large"


class ConnectionClosed(CwmError):
    """The peer closed the connection (possibly mid-frame)."""

    code = "connection_closed"
    retryable = True


def pack(message: dict[str, Any]) -> bytes:
    """One frame: length prefix + msgpack payload."""
    payload = msgpack.packb(message, use_bin_type=True)
    if len(payload) > MAX_FRAME_BYTES:
        raise FrameTooLarge(f"frame of {len(payload)} bytes exceeds {MAX_FRAME_BYTES}")
    return LENGTH.pack(len(payload)) + payload


def unpack(payload: bytes) -> dict[str, Any]:
    """Decode a frame payload into a map, or raise ProtocolError."""
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"frame is not valid msgpack: {exc}") from exc
    if not isinstance(message, dict):
        raise ProtocolError("frame is not a msgpack map")
    return message


def recv_exact(sock: socket.socket, num: int) -> bytes:
    """Read exactly num bytes or raise ConnectionClosed."""
    chunks = bytearray()
    while len(chunks) < num:
        chunk = sock.recv(min(num - len(chunks), 1 << 20))
        if not chunk:
            raise ConnectionClosed("connection closed mid-frame" if chunks else "connection closed")
        chunks += chunk
    return bytes(chunks)


def read_frame(sock: socket.socket, max_bytes: int = MAX_FRAME_BYTES) -> dict[str, Any]:
    """Read one frame from a socket."""
    (length,) = LENGTH.unpack(recv_exact(sock, LENGTH.size))
    if length > max_bytes:
        raise FrameTooLarge(f"frame of {length} bytes exceeds {max_bytes}")
    return unpack(recv_exact(sock, length))


def write_frame(sock: socket.socket, message: dict[str, Any]) -> None:
    """Send one frame."""
    sock.sendall(pack(message))


def parse_request(message: dict[str, Any]) -> tuple[int, str, dict[str, Any]]:
    """Validate a request map; return (id, op, args)."""
    req_id = message.get("id")
    if not isinstance(req_id, int) or isinstance(req_id, bool):
        raise ProtocolError("request id must be an integer")
    version = message.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version!r} not supported (server speaks {PROTOCOL_VERSION})",
            code="bad_version",
        )
    op = message.get("op")
    if not isinstance(op, str) or not op:
        raise ProtocolError("op must be a non-empty string")
    args = message.get("args", {})
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise ProtocolError("args must be a map with string keys")
    return req_id, op, args


def ok_response(req_id: int, result: Any) -> dict[str, Any]:
    """A success response."""
    return {"v": PROTOCOL_VERSION, "id": req_id, "ok": True, "result": result}


def progress_frame(req_id: int, done: int, total: int) -> dict[str, Any]:
    """A progress notice for a long op (freeze, export, import)."""
    return {"v": PROTOCOL_VERSION, "id": req_id, "progress": {"done": done, "total": total}}


def error_response(req_id: int | None, error: CwmError) -> dict[str, Any]:
    """An error response carrying {code, message, retryable}."""
    return {"v": PROTOCOL_VERSION, "id": req_id, "ok": False, "error": error.to_dict()}
