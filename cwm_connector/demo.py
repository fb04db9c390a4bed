"""The first-run demo: a real vLLM server with cwm, a restart, and a lossless restore.

Without --model it builds a tiny random-weight model (no download), so it runs
on any machine. It prints cold, prefix-hit and restored TTFT and whether the
restored reply equals vLLM's own prefix-cache hit token for token.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cwm_connector.stats import read_stats
from cwm_connector.tiny_model import build_tiny_model, make_prompt
from cwm_connector.vllm_process import VllmServer, kv_transfer_config

SALT = "demo-session-7f3a"  # the session's cache_salt: its KV is private to it
EXTERNAL_HITS = "vllm:external_prefix_cache_hits_total"
PARAGRAPH = (
    "The archive kept every letter the lighthouse keeper wrote, one a week for forty years, "
    "about storms, ships, the price of oil and the slow silting of the harbour. "
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cwm-demo", description=__doc__)
    parser.add_argument("--model", default=os.environ.get("MODEL", ""), help="model to serve")
    parser.add_argument("--workdir", default=".cwm-demo", help="model, store and logs go here")
    parser.add_argument("--prompt-tokens", type=int, default=3000)
    parser.add_argument("--max-tokens", type=int, default=16)
    return parser.parse_args(argv)


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def session_prompt(model: str, built: bool, num_tokens: int) -> str:
    if built:
        return make_prompt(model, num_tokens)
    return PARAGRAPH * max(1, num_tokens // 30)  # ~30 tokens a paragraph on common tokenizers


def wait_for_capture(store: Path, num_blocks: int, timeout_s: float = 120.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = read_stats(store).get("captured_blocks", 0)
        if done >= num_blocks:
            return done
        time.sleep(0.2)
    return read_stats(store).get("captured_blocks", 0)


def outputs(resp: dict[str, Any]) -> tuple[list[str], list[float]]:
    lp = resp["choices"][0]["logprobs"]
    return lp["tokens"], lp["token_logprobs"]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.workdir).resolve()
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    model = args.model
    built = not model
    if built:
        step("Building a tiny random-weight model and a BPE tokenizer (no download)")
        model = str(build_tiny_model(work / "model"))
        print(f"    {model}")
    prompt = session_prompt(model, built, args.prompt_tokens)
    extra = {"store_dir": str(store)}
    connector = kv_transfer_config(extra)

    def serve(name: str) -> VllmServer:
        srv = VllmServer(model, work / "logs" / f"{name}.log", connector=connector)
        step(f"Starting vLLM with the cwm connector ({name}); log: {srv.log_path}")
        print("    " + " ".join(srv.command()[:3]) + " ... --kv-transfer-config '" + "...'")
        srv.start()
        srv.complete("warm up", salt=None, max_tokens=2)  # first-call overheads, not captured
        return srv

    srv = serve("first run")
    try:
        step(f"Session {SALT!r}: a {args.prompt_tokens}-token prompt, cold")
        cold = srv.complete(prompt, SALT, args.max_tokens)
        print(
            f"    TTFT {cold['ttft_s'] * 1000:.0f} ms, reply: {cold['choices'][0]['text'][:60]!r}"
        )
        step("Same request again: vLLM's own in-memory prefix-cache hit (the reference)")
        ref = srv.complete(prompt, SALT, args.max_tokens)
        print(f"    TTFT {ref['ttft_s'] * 1000:.0f} ms")
        num_blocks = (cold["usage"]["total_tokens"] - 1) // srv.block_size
        captured = wait_for_capture(store, num_blocks)
        print(f"    cwm captured {captured} KV blocks into {store}")
    finally:
        srv.stop()
    step("vLLM stopped: its GPU/CPU prefix cache is gone")

    srv = serve("after restart")
    try:
        step("Same session after the restart: cwm restores its KV blocks")
        restored = srv.complete(prompt, SALT, args.max_tokens)
        hits = int(srv.metric(EXTERNAL_HITS))
    finally:
        srv.stop()

    match = outputs(restored) == outputs(ref)
    rows = [
        ("cold prefill", cold["ttft_s"]),
        ("vLLM prefix-cache hit (same process)", ref["ttft_s"]),
        ("cwm restore after restart", restored["ttft_s"]),
    ]
    step("Result")
    for name, seconds in rows:
        print(f"    {name:<40} TTFT {seconds * 1000:8.0f} ms")
    print(f"    {'speed-up of restore over cold':<40} {cold['ttft_s'] / restored['ttft_s']:8.1f}x")
    print(f"    external (cwm) cache hits: {hits} of {restored['usage']['prompt_tokens']} tokens")
    print(
        f"    restored tokens and logprobs equal the prefix-cache hit's: {'YES' if match else 'NO'}"
    )
    return 0 if match and hits > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
