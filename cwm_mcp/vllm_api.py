"""The few vLLM OpenAI-server calls cwm makes after a thaw: warm the cache, continue a session.

Shared by the MCP sidecar and the `cwm` CLI. Every call has a bounded timeout;
any failure (refused, timed out, an HTTP error, a reply that is not JSON) is a
`VllmUnavailable` CwmError whose message says which call failed and why.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import requests

from cwm_connector.errors import CwmError

DEFAULT_VLLM_URL = "http://127.0.0.1:8000"
HEALTH_TIMEOUT_S = 2.0  # /health answers at once on a live server
META_TIMEOUT_S = 10.0  # /v1/models, /tokenize
COMPLETION_TIMEOUT_S = 300.0  # a cold prefill of a long prompt on a CPU takes minutes


class VllmUnavailable(CwmError):
    """vLLM's HTTP server did not answer, or answered with an error."""

    code = "vllm_unavailable"
    retryable = True


def default_vllm_url(env: Mapping[str, str] | None = None) -> str:
    """$CWM_VLLM_URL, else http://127.0.0.1:8000."""
    env = os.environ if env is None else env
    return env.get("CWM_VLLM_URL") or DEFAULT_VLLM_URL


class VllmApi:
    """A small client of one vLLM OpenAI-compatible server."""

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        completion_timeout_s: float = COMPLETION_TIMEOUT_S,
    ):
        self.url = (url or default_vllm_url()).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("CWM_VLLM_API_KEY")
        self.completion_timeout_s = completion_timeout_s

    def _request(
        self, method: str, path: str, timeout_s: float, body: dict[str, Any] | None = None
    ) -> Any:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        where = f"{method} {self.url}{path}"
        try:
            response = requests.request(
                method, self.url + path, json=body, headers=headers, timeout=timeout_s
            )
        except requests.RequestException as exc:
            raise VllmUnavailable(f"{where}: {exc}") from exc
        if response.status_code >= 400:
            raise VllmUnavailable(
                f"{where}: HTTP {response.status_code}: {_error_message(response)}",
                retryable=response.status_code >= 500,
            )
        try:
            return response.json() if response.content else None
        except ValueError as exc:
            raise VllmUnavailable(f"{where}: the reply is not JSON") from exc

    def health(self) -> dict[str, Any]:
        """GET /health: {ok, url, status_code, latency_ms} or {ok: false, url, error}; no raise."""
        started = time.monotonic()
        try:
            response = requests.get(self.url + "/health", timeout=HEALTH_TIMEOUT_S)
        except requests.RequestException as exc:
            return {"ok": False, "url": self.url, "error": str(exc)}
        return {
            "ok": response.status_code == 200,
            "url": self.url,
            "status_code": response.status_code,
            "latency_ms": round((time.monotonic() - started) * 1000, 1),
        }

    def served_model(self) -> str:
        """The first model id of GET /v1/models (the name requests must use)."""
        listing = self._request("GET", "/v1/models", META_TIMEOUT_S)
        try:
            return str(listing["data"][0]["id"])
        except (KeyError, IndexError, TypeError) as exc:
            raise VllmUnavailable(f"GET {self.url}/v1/models: no served model listed") from exc

    def tokenize(self, model: str, text: str) -> list[int]:
        """POST /tokenize without special tokens (the text continues a prompt)."""
        body = {"model": model, "prompt": text, "add_special_tokens": False}
        reply = self._request("POST", "/tokenize", META_TIMEOUT_S, body)
        tokens = reply.get("tokens") if isinstance(reply, dict) else None
        if not isinstance(tokens, list):
            raise VllmUnavailable(f"POST {self.url}/tokenize: no 'tokens' in the reply")
        return [int(t) for t in tokens]

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/completions; returns the decoded reply."""
        reply = self._request("POST", "/v1/completions", self.completion_timeout_s, body)
        if not isinstance(reply, dict) or not reply.get("choices"):
            raise VllmUnavailable(f"POST {self.url}/v1/completions: no choices in the reply")
        return reply


def resume(
    api: VllmApi,
    thawed: Mapping[str, Any],
    *,
    warm: bool = False,
    continuation: str | Sequence[int] | None = None,
    max_tokens: int = 64,
) -> dict[str, Any]:
    """After a thaw: optionally warm vLLM's cache and continue the session.

    Returns {"warmed": bool, "reply": {text, token_ids, logprobs, finish_reason, usage} or None}.
    The warm request is the window's tokens alone with max_tokens 1; the continuation
    request is the window's tokens + the continuation's (text is tokenized by vLLM),
    greedy, under the window's salt, so the prefix is served from the cache.
    """
    out: dict[str, Any] = {"warmed": False, "reply": None}
    if not warm and continuation is None:
        return out
    model = api.served_model()
    prompt = [int(t) for t in thawed["token_ids"]]
    salt = thawed["salt"]
    if warm:
        api.complete({"model": model, "prompt": prompt, "max_tokens": 1, "cache_salt": salt})
        out["warmed"] = True
    if continuation is not None:
        if isinstance(continuation, str):
            extra = api.tokenize(model, continuation)
        else:
            extra = [int(t) for t in continuation]
        body = {
            "model": model,
            "prompt": prompt + extra,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "logprobs": 1,
            "cache_salt": salt,
            "return_token_ids": True,
        }
        out["reply"] = reply_of(api.complete(body))
    return out


def reply_of(completion: Mapping[str, Any]) -> dict[str, Any]:
    """The first choice of a completion as {text, token_ids, logprobs, finish_reason, usage}."""
    choice = completion["choices"][0]
    logprobs = choice.get("logprobs") or {}
    return {
        "text": choice.get("text", ""),
        "token_ids": choice.get("token_ids"),
        "logprobs": logprobs.get("token_logprobs"),
        "finish_reason": choice.get("finish_reason"),
        "usage": completion.get("usage"),
    }


def _error_message(response: requests.Response) -> str:
    """vLLM's error text ({"error": {"message"}} or {"message"}), else the body's start."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if "message" in body:
            return str(body["message"])
    return str(body)[:300]
