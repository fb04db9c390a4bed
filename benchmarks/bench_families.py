"""Hybrid KV caches: a model with alternating sliding-window and full layers, with vLLM's
hybrid allocator on (cwm declares SupportsHMA) and off (--disable-hybrid-kv-cache-manager).

For each prompt length and setting, in one run: store bytes per token of a captured
session, and the TTFT of the session's next turn restored by cwm after a restart,
against vLLM's own prefix hit of the same request on a server without cwm (the same
compute shape: a hit of the session's blocks, then the new tokens).
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from cwm_connector.demo.tiny_model import TinyModelSpec, build_tiny_model, count_parameters
from cwm_connector.demo.vllm_process import VllmServer, kv_transfer_config

HITS = "vllm:external_prefix_cache_hits_total"
BLOCK = 32
NEW_TOKENS = 64


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[4000, 16000])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/families.json"))
    p.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    return p.parse_args()


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(300, 3000) for _ in range(n)]


def blob_bytes(store: Path) -> int:
    with sqlite3.connect(store / "catalog.sqlite") as db:
        return int(db.execute("SELECT COALESCE(SUM(raw_bytes), 0) FROM blobs").fetchone()[0])


def wait_captured(store: Path, want: int, timeout_s: float = 300.0) -> None:
    """Until the catalog holds `want` block rows and no more arrive for 3 s (every group)."""
    deadline = time.monotonic() + timeout_s
    path = store / "catalog.sqlite"
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = 0
        if path.exists():
            with sqlite3.connect(path) as db:
                count = db.execute("SELECT COUNT(*) FROM blocks").fetchone()[0]
        if count != last:
            last, since = count, time.monotonic()
        elif count >= want and time.monotonic() - since > 3.0:
            return
        time.sleep(0.5)
    raise TimeoutError(f"fewer than {want} blocks captured in {timeout_s}s")


def one_setting(model: Path, work: Path, n: int, hma: bool, repeats: int) -> dict[str, Any]:
    extra = [] if hma else ["--disable-hybrid-kv-cache-manager"]
    name = f"{n}-{'on' if hma else 'off'}"
    sessions = [tokens(n, seed=i) for i in range(repeats)]
    turns = [s + tokens(NEW_TOKENS, seed=1000 + i) for i, s in enumerate(sessions)]
    args = {"max_model_len": n + 256, "kv_cache_gb": 4, "extra_args": extra}
    plain = VllmServer(str(model), work / f"plain-{name}.log", **args).start()
    plain.complete(tokens(48, seed=99), salt=None, max_tokens=1)  # warm-up, excluded
    try:
        prefix_hit = []
        for i, (session, turn) in enumerate(zip(sessions, turns, strict=True)):
            plain.complete(session, salt=f"s{i}", max_tokens=1)
            prefix_hit.append(plain.complete(turn, salt=f"s{i}", max_tokens=1)["elapsed_s"])
    finally:
        plain.stop()
    store = work / f"store-{name}"
    config = kv_transfer_config({"store_dir": str(store)})
    a = VllmServer(str(model), work / f"a-{name}.log", connector=config, **args).start()
    try:
        cold = [a.complete(s, salt=f"s{i}", max_tokens=1)["elapsed_s"]
                for i, s in enumerate(sessions)]  # fmt: skip
        wait_captured(store, repeats * (n // BLOCK))
    finally:
        a.stop()
    stored = blob_bytes(store)
    b = VllmServer(str(model), work / f"b-{name}.log", connector=config, **args).start()
    b.complete(tokens(48, seed=99), salt=None, max_tokens=1)  # warm-up, excluded
    try:
        restore, hits = [], []
        for i, turn in enumerate(turns):
            before = b.metric(HITS)
            restore.append(b.complete(turn, salt=f"s{i}", max_tokens=1)["elapsed_s"])
            hits.append(b.metric(HITS) - before)
    finally:
        b.stop()
    out = {
        "prompt_tokens": n, "hybrid_allocator": hma,
        "store_bytes_per_token": round(stored / (repeats * n), 1),
        "cold_s": statistics.median(cold), "prefix_hit_s": statistics.median(prefix_hit),
        "restore_s": statistics.median(restore), "external_hits": hits,
    }  # fmt: skip
    out["restore_over_prefix_hit"] = round(out["restore_s"] / out["prefix_hit_s"], 2)
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    args = parse_args()
    layer_types = tuple(
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(args.layers)
    )
    spec = TinyModelSpec(
        hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.kv_heads, intermediate_size=args.intermediate, vocab_size=4096,
        max_position_embeddings=max(8192, max(args.prompt_tokens) + 256), dtype=args.dtype,
        layer_types=layer_types, sliding_window=args.window,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="cwm-families-") as tmp:
        work = Path(tmp) if args.keep is None else args.keep
        model = build_tiny_model(work / "model", spec)
        rows = [
            one_setting(model, work, n, hma, args.repeats)
            for n in args.prompt_tokens
            for hma in (True, False)
        ]
    result = {
        "model": {"parameters": count_parameters(spec), "layers": args.layers,
                  "layer_types": "alternating sliding/full", "sliding_window": args.window,
                  "dtype": args.dtype},
        "rows": rows,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
