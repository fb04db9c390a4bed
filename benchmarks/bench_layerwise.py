"""Restore TTFT with layer-by-layer loads on and off, one server at a time, in ABBA order.

Layer by layer (`layerwise_load`), each attention layer waits only for its own
restored blocks, so the first layers compute while later ones are still being
copied; off, the whole load ends before the forward starts. Same model, same
store contents, same prompts:

1. server A captures one salted prompt per window and freezes it;
2. four servers, one after the other, on copies of that store: off, on, on, off
   (ABBA, so a linear drift hits both settings alike; two engines side by side
   on a small machine disturb each other's timings). Each runs rounds/2
   restores: `thaw` the window (its blocks staged in host memory, so the measure
   is the scatter and the forward, not the disk), reset vLLM's prefix cache,
   send the prompt; TTFT, external hits and the first token are checked.

    .venv/bin/python benchmarks/bench_layerwise.py [--layers 16 --prompt-tokens 4000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import requests
from bench_restore import BLOCK, HITS, Bench, first_token, model_spec, wait_durable, wait_metric

from cwm_connector.control.client import ControlClient
from cwm_connector.demo.tiny_model import build_tiny_model, count_parameters
from cwm_connector.demo.vllm_process import VllmServer, kv_transfer_config

MODES = ("off", "on")
ORDER = ("off", "on", "on", "off")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = {"layers": 16, "hidden": 1024, "heads": 16, "kv-heads": 8, "intermediate": 2816,
            "vocab": 32000, "prompt-tokens": 4000, "windows": 2, "rounds": 12, "kv-cache-gb": 2,
            "durable-timeout-s": 300}  # fmt: skip
    for flag, default in ints.items():
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/layerwise.json"))
    return p.parse_args()


def restore(server: VllmServer, store: Path, bench: Bench, k: int, salt: str) -> dict[str, Any]:
    """Thaw window k, clear vLLM's own prefix cache, send its prompt: one measure."""
    ControlClient(store / "control.sock").call("thaw", name=f"w{k}")
    requests.post(server.url + "/reset_prefix_cache", timeout=30).raise_for_status()
    before = server.metric(HITS)
    out = bench.send(server, k, salt)
    expected = (out["usage"]["prompt_tokens"] - 1) // BLOCK * BLOCK
    hits = wait_metric(server, HITS, before + expected) - before
    return {"ttft_s": out["elapsed_s"], "hits_ok": hits == expected, "first": first_token(out)}


def main() -> int:
    args = parse_args()
    args.repeats = args.windows  # Bench makes one prompt per repeat
    spec = model_spec(args)
    work = Path(tempfile.mkdtemp(prefix="cwm-layerwise-"))
    try:
        model = str(build_tiny_model(work / "model", spec))
        bench = Bench(args, model, work)
        salts = [f"{bench.run_id}-{k}" for k in range(args.windows)]
        store = work / "store"
        a = bench.started(bench.server("A", kv_transfer_config({"store_dir": str(store)})))
        try:
            want = sum((bench.send(a, k, s)["usage"]["prompt_tokens"] - 1) // BLOCK
                       for k, s in enumerate(salts))  # fmt: skip
            durable = wait_durable(a, store, want, args.durable_timeout_s)
            reference = [first_token(bench.send(a, k, s)) for k, s in enumerate(salts)]
            for k, salt in enumerate(salts):
                ControlClient(store / "control.sock").call("freeze", salt=salt, name=f"w{k}")
        finally:
            a.stop()
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
        waits = 0
        for block, mode in enumerate(ORDER):
            copy = work / f"store-{block}"
            shutil.copytree(store, copy, ignore=shutil.ignore_patterns("*.sock*", "stats"))
            cfg = {"store_dir": str(copy), "layerwise_load": mode}
            server = bench.server(f"{block}-{mode}", kv_transfer_config(cfg))
            server.env = {"VLLM_SERVER_DEV_MODE": "1"}
            try:
                bench.started(server)
                for r in range(args.rounds // 2):
                    k = r % args.windows
                    run = restore(server, copy, bench, k, salts[k])
                    run["token_ok"] = run.pop("first") == reference[k]
                    runs[mode].append(run)
            finally:
                server.stop()
            stats = json.loads((copy / "stats" / "worker-rank0.json").read_text())
            waits += stats.get("layer_load_waits", 0)
        ttft = {m: statistics.median(x["ttft_s"] for x in runs[m]) for m in MODES}
        result = {
            "config": {**vars(args), "out": str(args.out), "num_parameters": count_parameters(spec),
                       "loadavg_end": os.getloadavg()},
            "durable": durable,
            "restore_s": ttft,
            "on_vs_off": ttft["on"] / ttft["off"],
            "layer_load_waits_on": waits,
            "checks": {m: all(x["hits_ok"] and x["token_ok"] for x in runs[m]) for m in MODES},
            "runs": runs,
        }  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"restore TTFT (thawed, {args.prompt_tokens} tokens, {args.layers} layers): "
              f"off {ttft['off']:.4f} s, on {ttft['on']:.4f} s, "
              f"on/off {result['on_vs_off']:.3f}; checks {result['checks']}, "
              f"layer waits {result['layer_load_waits_on']}")  # fmt: skip
        return 0 if all(result["checks"].values()) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
