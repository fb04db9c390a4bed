"""TTFT benchmark: cold prefill vs prefix hit vs cwm restore after a vLLM restart.

Runs real `vllm serve` processes (see cwm_connector.demo.vllm_process) on a random-weight
Llama built on the spot; see benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import requests

from cwm_connector.demo.tiny_model import (
    TinyModelSpec,
    build_tiny_model,
    count_parameters,
    make_prompt,
)
from cwm_connector.demo.vllm_process import VllmServer, kv_transfer_config

BLOCK = 32  # tokens per KV block (VllmServer.block_size)
HITS = "vllm:external_prefix_cache_hits_total"
EXAMPLE_BATCHED_TOKENS = 8192  # ExampleConnector only: one prefill chunk for the whole prompt


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = {"layers": 16, "hidden": 1024, "heads": 16, "kv-heads": 8, "intermediate": 2816,
            "vocab": 32000, "prompt-tokens": 4000, "repeats": 3, "kv-cache-gb": 2,
            "durable-timeout-s": 300}  # fmt: skip
    for flag, default in ints.items():
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--compression", choices=("none", "zstd"), default="none")
    # bf16 matmuls on a CPU without AVX512-BF16 run at ~1 GFLOPS here; fp32 at ~100.
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/restore.json"))
    p.add_argument("--keep", action="store_true", help="keep the temp dir (model, store, logs)")
    return p.parse_args()


def model_spec(args: argparse.Namespace) -> TinyModelSpec:
    """The random Llama the flags describe."""
    return TinyModelSpec(
        hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.kv_heads, intermediate_size=args.intermediate, vocab_size=args.vocab,
        max_position_embeddings=max(8192, args.prompt_tokens + 64), dtype=args.dtype,
    )  # fmt: skip


def first_token(out: dict[str, Any]) -> str:
    return out["choices"][0]["text"]


def cached_tokens(out: dict[str, Any]) -> int | None:
    return ((out.get("usage") or {}).get("prompt_tokens_details") or {}).get("cached_tokens")


def read_stats(store: Path) -> dict[str, int]:
    try:
        return json.loads((store / "stats" / "worker-rank0.json").read_text())
    except (OSError, ValueError):
        return {}


def wait_durable(server: VllmServer, store: Path, want_blocks: int, timeout_s: float) -> dict:
    """Poll the worker stats until `captured_blocks` reaches want_blocks (bounded).

    Stats are flushed at most every 0.5 s and only while the worker thread runs, so
    after 3 s without progress an unsalted 1-token request nudges an engine step.
    """
    started = last_change = time.monotonic()
    last, nudges = -1, 0
    while (got := read_stats(store).get("captured_blocks", 0)) < want_blocks:
        now = time.monotonic()
        if now - started > timeout_s:
            break
        if got != last:
            last, last_change = got, now
        elif now - last_change > 3.0:
            server.complete("nudge", None, max_tokens=1)
            nudges, last_change = nudges + 1, now
        time.sleep(0.2)
    return {"captured_blocks": got, "want_blocks": want_blocks, "nudges": nudges,
            "waited_s": round(time.monotonic() - started, 2), "ok": got >= want_blocks}  # fmt: skip


def wait_metric(server: VllmServer, name: str, at_least: float, timeout_s: float = 3.0) -> float:
    """The metric once it reaches at_least (Prometheus updates may trail the response)."""
    deadline = time.monotonic() + timeout_s
    while (value := server.metric(name)) < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


class Bench:
    def __init__(self, args: argparse.Namespace, model: str, work: Path):
        self.args, self.model, self.work = args, model, work
        self.warm = make_prompt(model, 48, seed=10_000)
        self.prompts = [make_prompt(model, args.prompt_tokens, seed=i) for i in range(args.repeats)]
        self.run_id = uuid.uuid4().hex[:8]

    def server(self, name: str, connector: dict | None, extra: list[str] | None = None):
        return VllmServer(
            model=self.model, log_path=self.work / "logs" / f"{name}.log", connector=connector,
            max_model_len=self.args.prompt_tokens + 64, kv_cache_gb=self.args.kv_cache_gb,
            extra_args=extra or [],
        )  # fmt: skip

    def started(self, server: VllmServer) -> VllmServer:
        server.start()
        server.complete(self.warm, None, max_tokens=1)  # warm-up, excluded
        return server

    def send(self, server: VllmServer, i: int, salt: str) -> dict[str, Any]:
        return server.complete(self.prompts[i], salt, max_tokens=1)

    def cold_off(self) -> list[float]:
        server = self.server("cold_off", None)
        try:
            self.started(server)
            n = range(self.args.repeats)
            return [self.send(server, i, f"{self.run_id}-off-{i}")["elapsed_s"] for i in n]
        finally:
            server.stop()

    def connector_run(self, cfg: dict, store: Path) -> dict[str, Any]:
        res: dict[str, Any] = {"cold_on": [], "prefix_hit": [], "restore_after_restart": []}
        salts = [f"{self.run_id}-on-{i}" for i in range(self.args.repeats)]
        firsts: list[str] = []
        res["prompt_tokens"], res["prefix_hit_cached_tokens"] = [], []
        server = self.server("cold_on", cfg)
        try:
            self.started(server)
            for i, salt in enumerate(salts):  # capture of request i-1 runs meanwhile
                out = self.send(server, i, salt)
                res["cold_on"].append(out["elapsed_s"])
                res["prompt_tokens"].append(out["usage"]["prompt_tokens"])
            want = sum((n - 1) // BLOCK for n in res["prompt_tokens"])
            # Let capture finish first so that it does not tax the prefix-hit floor.
            res["durable"] = wait_durable(server, store, want, self.args.durable_timeout_s)
            for i, salt in enumerate(salts):
                out = self.send(server, i, salt)
                res["prefix_hit"].append(out["elapsed_s"])
                firsts.append(first_token(out))
                res["prefix_hit_cached_tokens"].append(cached_tokens(out))
            res["durable_before_stop"] = wait_durable(server, store, want, 30)
            res["stats_before_stop"] = read_stats(store)
        finally:
            server.stop()
        server = self.server("restore", cfg)
        checks = []
        try:
            self.started(server)
            for i, salt in enumerate(salts):
                before = server.metric(HITS)
                out = self.send(server, i, salt)
                expected = (out["usage"]["prompt_tokens"] - 1) // BLOCK * BLOCK
                hits = wait_metric(server, HITS, before + expected) - before
                res["restore_after_restart"].append(out["elapsed_s"])
                checks.append({"external_hits": hits, "expected_hits": expected,
                               "hits_ok": hits == expected, "cached_tokens": cached_tokens(out),
                               "first_token": first_token(out), "prefix_hit_token": firsts[i],
                               "token_ok": first_token(out) == firsts[i]})  # fmt: skip
        finally:
            server.stop()
        res["restore_checks"] = checks
        res["stats_after_restore"] = read_stats(store)
        return res

    def example_connector(self) -> dict[str, Any]:
        extra = {"shared_storage_path": str(self.work / "example")}
        cfg = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
               "kv_connector_extra_config": extra}  # fmt: skip
        batched = max(EXAMPLE_BATCHED_TOKENS, self.args.prompt_tokens + 64)
        res: dict[str, Any] = {"max_num_batched_tokens": batched, "note": (
            f"its server alone has --max-num-batched-tokens {batched} (cwm's keep the default "
            "2048) so that the whole prompt is one prefill chunk")}  # fmt: skip
        salt = f"{self.run_id}-example"
        try:
            for phase in ("store", "restore"):
                flags = ["--max-num-batched-tokens", str(batched)]
                server = self.server(f"example_{phase}", cfg, flags)
                try:
                    self.started(server)
                    before = server.metric(HITS)
                    out = self.send(server, 0, salt)
                    res[f"{phase}_s"] = out["elapsed_s"]
                    res[f"{phase}_first_token"] = first_token(out)
                    expected = (out["usage"]["prompt_tokens"] - 1) // BLOCK * BLOCK
                    at_least = before + (expected if phase == "restore" else 0)
                    res[f"{phase}_external_hits"] = wait_metric(server, HITS, at_least) - before
                finally:
                    server.stop()
        except Exception as exc:  # record, never crash: it is only a comparison
            res["error"] = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, requests.HTTPError) and exc.response is not None:
                res["error"] += f" | {exc.response.text[:500]}"
        return res


def table(r: dict[str, Any]) -> str:
    """The Markdown summary table."""
    med = {k: v["median_s"] for k, v in r["ttft"].items()}
    rat, ex = r["ratios"], r["example_connector"]

    def sec(x: float) -> str:
        return f"{x:.3f} s"

    def times(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}x"

    ex_cell = sec(ex["restore_s"]) if "restore_s" in ex else f"failed: {ex.get('error', '?')[:80]}"
    ex_note = f"{times(rat['example_vs_prefix_hit'])} of prefix hit; {ex['note'][:45]}"
    restore_note = f"{times(rat['restore_vs_prefix_hit'])} of prefix hit (target <= 1.10x)"
    bpt = r["bytes_per_token"]
    rows = [
        ("cold, connector off", sec(med["cold_off"]), ""),
        ("cold, connector on", sec(med["cold_on"]), f"{times(rat['cold_on_vs_off'])} of off"),
        ("prefix hit (vLLM in-process)", sec(med["prefix_hit"]), "the floor"),
        ("restore after restart (cwm)", sec(med["restore_after_restart"]), restore_note),
        ("cold / restore speed-up", times(rat["cold_vs_restore"]), "cold off / restore"),
        ("ExampleConnector restore", ex_cell, ex_note),
        ("bytes on disk per token", "n/a" if bpt is None else f"{bpt:.0f} B", r["compression"]),
    ]
    lines = ["| measure | median TTFT / value | note |", "| --- | --- | --- |"]
    return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in rows])


def drop_work_dir(work: Path, keep: bool) -> None:
    """Remove a run's temp dir (model, stores, logs), or say where it was kept."""
    if keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    args = parse_args()
    spec = model_spec(args)
    work = Path(tempfile.mkdtemp(prefix="cwm-bench-"))
    load_start = os.getloadavg()  # the machine is shared: record how busy it was
    print(f"work dir: {work}", flush=True)
    try:
        bench = Bench(args, str(build_tiny_model(work / "model", spec)), work)
        store = work / "store"
        cfg = kv_transfer_config({"store_dir": str(store), "compression": args.compression})
        print("cold_off ...", flush=True)
        cold_off = bench.cold_off()
        print("cold_on / prefix_hit / restore ...", flush=True)
        run = bench.connector_run(cfg, store)
        print("example_connector ...", flush=True)
        example = bench.example_connector()
        blob_bytes = sum(f.stat().st_size for f in (store / "blobs").rglob("*") if f.is_file())
        captured = run["stats_before_stop"].get("captured_blocks", 0) * BLOCK
        phases = ("cold_on", "prefix_hit", "restore_after_restart")
        samples = {"cold_off": cold_off, **{k: run.pop(k) for k in phases}}
        med = {k: statistics.median(v) for k, v in samples.items()}
        ex_ratio = example["restore_s"] / med["prefix_hit"] if "restore_s" in example else None
        ttft = {k: {"median_s": med[k], "samples_s": v} for k, v in samples.items()}
        checks = run["restore_checks"]
        result = {
            "config": {**vars(args), "out": str(args.out), "num_parameters": count_parameters(spec),
                       "block_size": BLOCK, "connector": cfg,
                       "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
            "ttft": ttft,
            "ratios": {"cold_on_vs_off": med["cold_on"] / med["cold_off"],
                       "restore_vs_prefix_hit": med["restore_after_restart"] / med["prefix_hit"],
                       "cold_vs_restore": med["cold_off"] / med["restore_after_restart"],
                       "example_vs_prefix_hit": ex_ratio},
            "checks": {"capture_durable_ok": run["durable"]["ok"],
                       "external_hits_ok": all(c["hits_ok"] for c in checks),
                       "first_token_ok": all(c["token_ok"] for c in checks)},
            "compression": args.compression,
            "bytes_per_token": blob_bytes / captured if captured else None,
            "blob_bytes": blob_bytes, "captured_tokens": captured,
            "connector_run": run, "example_connector": example,
        }  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(table(result))
        print(f"checks: {result['checks']}  ->  {args.out}")
        return 0 if all(result["checks"].values()) else 1
    finally:
        drop_work_dir(work, args.keep)


if __name__ == "__main__":
    raise SystemExit(main())
