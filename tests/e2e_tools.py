"""Helpers shared by the end-to-end tests: the `cwm` CLI as a subprocess, reply outputs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cwm_connector.vllm_process import VllmServer, kv_transfer_config

BLOCK = 32
EXTERNAL_HITS = "vllm:external_prefix_cache_hits_total"
CONTINUATION = list(range(100, 120))  # 20 token ids: stays inside the window's last block


def cwm(socket: Path, *args: str) -> tuple[int, Any]:
    """Run `cwm ARGS --socket S --json`; its exit code and JSON document."""
    proc = subprocess.run(
        [sys.executable, "-m", "cwm_connector.cli", *args, "--socket", str(socket), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, json.loads(proc.stdout)


def server(model: Path, store: Path, logs: Path, name: str, **extra: Any) -> VllmServer:
    """A vLLM server with the connector on `store` (restores verified), not started."""
    config = kv_transfer_config({"store_dir": str(store), "verify_restore": True, **extra})
    return VllmServer(str(model), logs / f"{name}.log", connector=config)


def outputs(resp: dict[str, Any]) -> tuple[list[str], list[float], list[Any]]:
    """Tokens, logprobs and top logprobs of a completion."""
    lp = resp["choices"][0]["logprobs"]
    return lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]


def blob_files(store: Path) -> int:
    """Blob files in a store's disk tier."""
    return len(list((store / "blobs").rglob("*.blob")))


def metric_at_least(srv: VllmServer, name: str, value: float, timeout_s: float = 30.0) -> float:
    """Wait until a /metrics counter reaches value. Connector stats reach vLLM only with engine
    steps, so an idle server is nudged with an unsalted 1-token request each second."""
    deadline = time.monotonic() + timeout_s
    while (got := srv.metric(name)) < value:
        assert time.monotonic() < deadline, f"{name} = {got}, expected >= {value}"
        srv.complete("nudge", None, max_tokens=1)
        time.sleep(1.0)
    return got
