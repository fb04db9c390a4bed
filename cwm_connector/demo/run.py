"""The first-run demo: a session, `freeze`, a vLLM restart, `thaw`, the next turn.

Without --model it builds a tiny random-weight model (no download), so it runs
on any machine. It prints cold, prefix-hit and thawed TTFT and whether the
thawed reply equals vLLM's own prefix-cache hit token for token.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cwm_connector.control.client import ControlClient
from cwm_connector.demo.tiny_model import build_tiny_model, make_prompt
from cwm_connector.demo.vllm_process import VllmServer, kv_transfer_config

SALT = "demo-session-7f3a"  # the session's cache_salt: its KV is private to it
WINDOW = "demo-window"
FOLLOW_UP = " And what did the keeper write about the winter storms?"
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


def outputs(resp: dict[str, Any]) -> tuple[list[str], list[float]]:
    lp = resp["choices"][0]["logprobs"]
    return lp["tokens"], lp["token_logprobs"]


def continuation_ids(model: str, num_tokens: int, block_size: int) -> list[int]:
    """A follow-up turn, trimmed to end inside the window's last block.

    Then the reference run (vLLM still holding the prefix) and the thawed run
    load exactly the window's blocks and compute the same tokens.
    """
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model).encode(FOLLOW_UP, add_special_tokens=False)
    room = block_size - num_tokens % block_size - 1
    return ids[: max(1, room)]


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
    connector = kv_transfer_config({"store_dir": str(store)})
    control = ControlClient(store / "control.sock")

    def serve(name: str) -> VllmServer:
        srv = VllmServer(model, work / "logs" / f"{name}.log", connector=connector)
        step(f"Starting vLLM with the cwm connector ({name}); log: {srv.log_path}")
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
        step(f"cwm freeze {SALT} {WINDOW}")
        window = control.call("freeze", salt=SALT, name=WINDOW)
        print(
            f"    window {window['name']!r}: {window['tokens']} tokens, {window['blocks']} blocks,"
        )
        print(f"    {window['bytes'] / 1e6:.1f} MB of KV on disk (durable)")
        token_ids = control.call("thaw", name=WINDOW)["token_ids"]
        follow = continuation_ids(model, len(token_ids), srv.block_size)
        step("Next turn while vLLM still holds the prefix (the reference)")
        ref = srv.complete(token_ids + follow, SALT, args.max_tokens)
        print(f"    TTFT {ref['ttft_s'] * 1000:.0f} ms")
    finally:
        srv.stop()
    step("vLLM stopped: its in-memory prefix cache is gone")

    srv = serve("after restart")
    try:
        step(f"cwm thaw {WINDOW}")
        thawed = control.call("thaw", name=WINDOW)
        text = thawed["text"][:50]
        print(
            f"    {len(thawed['token_ids'])} tokens back, {thawed.get('staged_blocks', 0)} blocks "
            f"verified and staged in host memory; text: {text!r}..."
        )
        step("Next turn after the restart: the same request, KV loaded from the window")
        restored = srv.complete(thawed["token_ids"] + follow, SALT, args.max_tokens)
        hits = int(srv.metric(EXTERNAL_HITS))
    finally:
        srv.stop()

    match = outputs(restored) == outputs(ref)
    step("Result")
    for name, resp in (("cold prefill", cold), ("vLLM prefix-cache hit (same process)", ref),
                       ("cwm thaw after restart", restored)):  # fmt: skip
        print(f"    {name:<40} TTFT {resp['ttft_s'] * 1000:8.0f} ms")
    print(f"    {'speed-up of thaw over cold':<40} {cold['ttft_s'] / restored['ttft_s']:8.1f}x")
    print(f"    external (cwm) cache hits: {hits} of {restored['usage']['prompt_tokens']} tokens")
    print(
        f"    thawed tokens and logprobs equal the prefix-cache hit's: {'YES' if match else 'NO'}"
    )
    ttfts = {"cold prefill": cold["ttft_s"], "vLLM prefix hit": ref["ttft_s"],
             "cwm thaw after restart": restored["ttft_s"]}  # fmt: skip
    write_plot(ttfts, work / "logs" / "ttft.png", f"{args.prompt_tokens}-token prompt")
    return 0 if match and hits > 0 else 1


def write_plot(ttft_s: dict[str, float], out: Path, what: str) -> None:
    """The three TTFTs as a PNG next to the logs; matplotlib is optional, so say if missing."""
    try:
        from cwm_connector.demo.plot import write_ttft_png

        path = write_ttft_png(ttft_s, out, f"cwm demo: time to first token, {what}")
    except ImportError:
        print("    (no TTFT plot: matplotlib is not installed; pip install -e '.[bench]')")
        return
    print(f"    TTFT plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
