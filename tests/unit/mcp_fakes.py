"""In-test stand-ins for the MCP and CLI unit tests: the connector's op handler and vLLM.

FakeConnector serves the control ops over a real ControlServer (windows in a
dict, the same error codes); FakeVllm answers the four HTTP routes cwm uses.
They only drive the MCP and CLI layers; the connector's own ops are tested in
test_windows.py and end to end.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cwm_connector.errors import CwmError

SESSION_TOKENS = {"s1": [11, 12, 13, 14, 15], "s2": [21, 22]}
DIGESTS = {"s1": "a1a1a1a1a1a1a1a1", "s2": "b2b2b2b2b2b2b2b2"}
PROMETHEUS_TEXT = "# TYPE cwm_hits_total counter\ncwm_hits_total 3\n"
REPO_ROOT = Path(__file__).resolve().parents[2]


class FakeConnector:
    """Stands in for the connector's op handler: windows in a dict, the same error codes.

    Each op has exactly the control op's signature, so a wrong argument name fails the
    call. Filters, sorting and paging are the connector's (tested there), not applied here.
    """

    def __init__(self) -> None:
        self.windows: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.policy: dict[str, Any] = {
            "enabled": False,
            "threshold_fraction": 0.0,
            "threshold_tokens": 0,
            "cooldown_s": 300.0,
            "name_pattern": "auto-{salt}-{n}",
            "tags": ["auto"],
            "keep_last": 3,
        }
        self._lock = threading.Lock()

    def handle(self, op: str, args: dict[str, Any], progress: Any = None) -> Any:
        with self._lock:
            self.calls.append((op, dict(args)))
            return getattr(self, f"op_{op}")(**args)

    def _get(self, name: str) -> dict[str, Any]:
        if name not in self.windows:
            raise CwmError(f"no window named {name!r}", code="window_not_found")
        return self.windows[name]

    def _salt(self, salt_or_digest: str) -> str:
        for salt, digest in DIGESTS.items():
            if salt_or_digest in (salt, digest):
                return salt
        raise CwmError("no finished request with this salt", code="unknown_session")

    def _make(
        self,
        name: str,
        salt: str,
        parent: str | None,
        description: str = "",
        tags: Sequence[str] = (),
    ) -> dict[str, Any]:
        tokens = SESSION_TOKENS.get(salt, SESSION_TOKENS["s1"])
        window = {
            "name": name,
            "salt": salt,
            "session": DIGESTS.get(salt, "c3c3c3c3c3c3c3c3"),
            "tokens": len(tokens),
            "blocks": 1,
            "bytes": 4096,
            "stored_bytes": 1024,
            "created": 1_700_000_000.5,
            "parent": parent,
            "fingerprint": "0123456789abcdef",
            "tiers": ["disk"],
            "description": description,
            "tags": list(tags),
        }
        self.windows[name] = window
        return window

    def op_freeze(
        self,
        salt: str,
        name: str,
        overwrite: bool = False,
        description: str = "",
        tags: Sequence[str] = (),
    ) -> dict[str, Any]:
        salt = self._salt(salt)
        if name in self.windows and not overwrite:
            raise CwmError(f"window {name!r} exists (pass overwrite)", code="window_exists")
        return self._make(name, salt, None, description, tags)

    def op_thaw(self, name: str, new_salt: str | None = None) -> dict[str, Any]:
        window = self._get(name)
        if new_salt is not None:
            window = self._make(f"{name}.{new_salt}", new_salt, name)
        token_ids = SESSION_TOKENS.get(window["salt"], SESSION_TOKENS["s1"])
        text = " ".join(map(str, token_ids))
        return {**window, "token_ids": token_ids, "text": text, "staged_blocks": 1}

    def op_list(
        self,
        tags: Sequence[str] | None = None,
        model: str | None = None,
        session: str | None = None,
        search: str | None = None,
        sort_by: str = "name",
        sort_order: str = "asc",
        limit: int | None = None,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        return list(self.windows.values())

    def op_status(
        self,
        name: str | None = None,
        session: str | None = None,
        include_cache_stats: bool = False,
        include_lineage: bool = True,
    ) -> dict[str, Any]:
        if (name is None) == (session is None):
            raise CwmError("give exactly one of name or session", code="bad_request")
        if session is not None:
            salt = self._salt(session)
            names = [w["name"] for w in self.windows.values() if w["salt"] == salt]
            tokens = len(SESSION_TOKENS[salt])
            return {"session": DIGESTS[salt], "tokens": tokens, "updated": 1.7e9, "windows": names}
        window = self._get(name)
        out = {**window, "complete": True, "damaged_blobs": 0, "resident_blocks": 1}
        if include_lineage:
            root, depth = name, 0
            while self.windows[root]["parent"] is not None:
                root, depth = self.windows[root]["parent"], depth + 1
            out["lineage"] = {"parent": window["parent"], "root": root, "depth": depth}
        if include_cache_stats:
            out["cache_stats"] = self.op_stats()
        return out

    def op_clone(
        self,
        src: str,
        dst: str,
        salt: str | None = None,
        description: str = "",
        tags: Sequence[str] = (),
    ) -> dict[str, Any]:
        window = self._get(src)
        return self._make(dst, window["salt"] if salt is None else salt, src, description, tags)

    def op_delete(self, name: str) -> dict[str, Any]:
        self._get(name)
        del self.windows[name]
        return {"name": name, "deleted": True, "freed_blobs": 1, "freed_bytes": 1024}

    def op_export(self, name: str, file: str) -> dict[str, Any]:
        self._get(name)
        return {"name": name, "file": file, "bytes": 5000}

    def op_import(self, file: str, name: str | None = None) -> dict[str, Any]:
        if not file.startswith("/"):
            raise CwmError("file must be an absolute path", code="bad_request")
        return self._make(name or "imported", "s2", None)

    def op_sessions(self, limit: int = 100, reveal: bool = False) -> list[dict[str, Any]]:
        out = []
        for salt in list(SESSION_TOKENS)[:limit]:
            names = [w["name"] for w in self.windows.values() if w["salt"] == salt]
            row = {"session": DIGESTS[salt], "tokens": len(SESSION_TOKENS[salt])}
            row.update(updated=1.7e9, windows=names)
            out.append({**row, "salt": salt} if reveal else row)
        return out

    def op_stats(self) -> dict[str, Any]:
        return {"hits": 3, "store": {"windows": len(self.windows)}, "sessions": 2}

    def op_prometheus(self) -> dict[str, Any]:
        return {"text": PROMETHEUS_TEXT}

    def op_health(self) -> dict[str, Any]:
        return {
            "ok": True,
            "components": {
                "store": {"ok": True, "windows": len(self.windows)},
                "disk": {"ok": True, "free_bytes": 10**9, "writable": True},
                "redis": {"ok": True, "configured": False},
                "control_socket": {"ok": True},
            },
        }

    def op_auto_freeze_config(self, update: dict[str, Any] | None = None) -> dict[str, Any]:
        unknown = set(update or {}) - set(self.policy)
        if unknown:
            raise CwmError(f"auto_freeze: unknown keys {sorted(unknown)}", code="bad_config")
        self.policy.update(update or {})
        return dict(self.policy)

    def op_auto_freeze_check(
        self, session: str, tokens: int | None = None, trigger: bool = False
    ) -> dict[str, Any]:
        salt = self._salt(session)
        count = len(SESSION_TOKENS[salt]) if tokens is None else tokens
        threshold = self.policy["threshold_tokens"] or None
        would = bool(threshold) and count >= threshold
        reason = "triggered" if trigger else ("at threshold" if would else "below the threshold")
        window = None
        if trigger:
            window = self._make(f"auto-{DIGESTS[salt]}-1", salt, None, tags=["auto"])
        return {
            "session": DIGESTS[salt],
            "tokens": count,
            "threshold": threshold,
            "would_freeze": would,
            "reason": reason,
            "window": window,
        }


class FakeVllm:
    """A tiny stand-in for vLLM's OpenAI server: records every request, answers the four
    routes cwm uses (/health, /v1/models, /tokenize, /v1/completions)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.completion_status = 200
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def reply(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                fake.requests.append(("GET", self.path, None))
                if self.path == "/health":
                    self.reply(200, None)
                elif self.path == "/v1/models":
                    self.reply(200, {"object": "list", "data": [{"id": "tiny-llama"}]})
                else:
                    self.reply(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(("POST", self.path, body))
                if self.path == "/tokenize":
                    self.reply(200, {"tokens": [ord(c) for c in body["prompt"]], "count": 0})
                elif self.path == "/v1/completions" and fake.completion_status != 200:
                    error = {"message": "engine is sleeping", "code": fake.completion_status}
                    self.reply(fake.completion_status, {"error": error})
                elif self.path == "/v1/completions":
                    choice = {
                        "text": " next",
                        "token_ids": [7, 8],
                        "logprobs": {"token_logprobs": [-0.5, -0.25], "tokens": ["a", "b"]},
                        "finish_reason": "length",
                    }
                    usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": 2}
                    self.reply(200, {"id": "c1", "choices": [choice], "usage": usage})
                else:
                    self.reply(404, {"error": {"message": "not found"}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def posts(self, path: str) -> list[Any]:
        """Bodies of the POSTs to `path`, in order."""
        return [body for method, p, body in self.requests if method == "POST" and p == path]

    def __enter__(self) -> FakeVllm:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def closed_url() -> str:
    """A loopback URL nothing listens on (connection refused at once)."""
    return f"http://127.0.0.1:{free_port()}"
