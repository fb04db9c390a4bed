"""The control socket server: a Unix socket (mode 0600) served by its own threads.

One accept thread, one short-lived thread per client (bounded). A slow,
hanging or hostile client only ever costs its own thread: reads time out,
oversize frames are refused before they are read, garbage gets a structured
error. The engine loop never touches the socket.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cwm_connector.control.protocol import (
    ConnectionClosed,
    FrameTooLarge,
    ProtocolError,
    error_response,
    ok_response,
    parse_request,
    progress_frame,
    read_frame,
    write_frame,
)
from cwm_connector.errors import ConfigError, CwmError

logger = logging.getLogger("vllm.cwm.control")

Progress = Callable[[int, int], None]
Handler = Callable[[str, dict[str, Any], Progress], Any]
MAX_CLIENTS = 64
CLIENT_TIMEOUT_S = 30.0
PROGRESS_INTERVAL_S = 0.1  # at most ten progress frames a second per request


class UnknownOp(CwmError):
    """The op is not one the server knows."""

    code = "unknown_op"


class ControlServer:
    """Serves `handler(op, args)` over length-prefixed msgpack frames."""

    def __init__(
        self,
        path: Path,
        handler: Handler,
        *,
        max_clients: int = MAX_CLIENTS,
        client_timeout_s: float = CLIENT_TIMEOUT_S,
    ):
        self.path = path
        self._handler = handler
        self._slots = threading.BoundedSemaphore(max_clients)
        self._client_timeout_s = client_timeout_s
        self._sock: socket.socket | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        """Bind (replacing a stale socket file, refusing a live one) and serve."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _clear_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket file is created 0600
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        sock.listen(128)
        self._sock = sock
        threading.Thread(target=self._accept_loop, name="cwm-control", daemon=True).start()

    def stop(self) -> None:
        """Stop accepting and remove the socket file."""
        self._stopping.set()
        if self._sock is not None:
            self._sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                _send_quietly(
                    conn,
                    error_response(None, CwmError("too many clients", code="busy", retryable=True)),
                )
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(self._client_timeout_s)
        try:
            while not self._stopping.is_set():
                try:
                    message = read_frame(conn)
                except FrameTooLarge as exc:
                    _send_quietly(conn, error_response(None, exc))
                    return  # the stream cannot be resynchronised
                except ProtocolError as exc:
                    _send_quietly(conn, error_response(None, exc))
                    continue
                req_id = message.get("id") if isinstance(message.get("id"), int) else None
                try:
                    req_id, op, args = parse_request(message)
                    progress = _progress_sender(conn, req_id, message.get("progress") is True)
                    result = self._handler(op, args, progress)
                    response = ok_response(req_id, result)
                except CwmError as exc:
                    response = error_response(req_id, exc)
                except Exception as exc:  # a bug in an op must not kill the server
                    logger.exception("cwm: control op failed")
                    response = error_response(req_id, CwmError(f"internal error: {exc}"))
                write_frame(conn, response)
        except (ConnectionClosed, TimeoutError, OSError):
            pass
        finally:
            conn.close()
            self._slots.release()


def _progress_sender(conn: socket.socket, req_id: int, wanted: bool) -> Progress:
    """A throttled progress callback; a client that stops reading only loses progress."""
    last = [0.0, wanted]

    def send(done: int, total: int) -> None:
        now = time.monotonic()
        if not last[1] or (done < total and now - last[0] < PROGRESS_INTERVAL_S):
            return
        last[0] = now
        try:
            write_frame(conn, progress_frame(req_id, done, total))
        except OSError:
            last[1] = False

    return send


def _send_quietly(conn: socket.socket, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        write_frame(conn, message)


def _clear_stale_socket(path: Path) -> None:
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)  # nobody listens: a leftover of a dead server
        return
    finally:
        probe.close()
    raise ConfigError(f"control socket {path} is in use by a running cwm; set control_socket")
