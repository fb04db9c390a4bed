"""A control-socket client, shared by the `cwm` CLI and the MCP server."""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cwm_connector.control.protocol import PROTOCOL_VERSION, read_frame, write_frame
from cwm_connector.errors import CwmError

DEFAULT_TIMEOUT_S = 300.0  # a freeze waits for write-behind; bounded server-side too


class Unavailable(CwmError):
    """No cwm connector answers on the socket (vLLM not running, wrong path)."""

    code = "unavailable"
    retryable = True


def default_store_dir(env: dict[str, str] | None = None) -> Path:
    """$CWM_STORE_DIR, else ~/.cache/cwm (the connector's own default)."""
    env = dict(os.environ) if env is None else env
    return Path(os.path.expanduser(env.get("CWM_STORE_DIR") or "~/.cache/cwm"))


def default_socket_path(env: dict[str, str] | None = None) -> Path:
    """$CWM_CONTROL_SOCKET, else <$CWM_STORE_DIR or ~/.cache/cwm>/control.sock."""
    env = dict(os.environ) if env is None else env
    if env.get("CWM_CONTROL_SOCKET"):
        return Path(os.path.expanduser(env["CWM_CONTROL_SOCKET"]))
    return default_store_dir(env) / "control.sock"


class ControlClient:
    """Calls ops on a running connector; raises CwmError with the server's code."""

    def __init__(self, path: Path | str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.path = Path(path) if path else default_socket_path()
        self.timeout_s = timeout_s
        self._ids = itertools.count(1)

    def call(
        self, op: str, *, on_progress: Callable[[int, int], None] | None = None, **args: Any
    ) -> Any:
        """Send one request and return its result (progress frames go to on_progress)."""
        req_id = next(self._ids)
        request = {"v": PROTOCOL_VERSION, "id": req_id, "op": op, "args": args}
        if on_progress is not None:
            request["progress"] = True
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout_s)
                sock.connect(str(self.path))
                write_frame(sock, request)
                response = read_frame(sock)
                while "progress" in response and "ok" not in response:
                    progress = response["progress"]
                    if on_progress is not None and isinstance(progress, dict):
                        on_progress(int(progress.get("done", 0)), int(progress.get("total", 0)))
                    response = read_frame(sock)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise Unavailable(
                f"no cwm connector listens on {self.path}: is vLLM running with "
                "--kv-transfer-config CWMConnector and the same store_dir/control_socket?"
            ) from exc
        except CwmError:
            raise
        except OSError as exc:
            raise Unavailable(f"control socket {self.path}: {exc}") from exc
        if response.get("ok"):
            return response.get("result")
        error = response.get("error") or {}
        raise CwmError(
            str(error.get("message", "unknown error")),
            code=str(error.get("code", "internal")),
            retryable=bool(error.get("retryable", False)),
        )
