"""Restore TTFT from each tier, as a ratio to vLLM's own prefix-cache hit, in one run.

One random Llama, real `vllm serve` processes, a real `redis-server` on loopback:

1. server A (connector on, `redis_url` set) prefills one salted prompt per
   phase, then sends each again (vLLM's in-process prefix hit: the floor), and
   freezes each session into a window. Meanwhile it measures decode throughput
   of salted requests (captured) against unsalted ones (not captured),
   interleaved so that each capture overlaps the next request's decode.
2. a restart on the same store: restore from disk (`compression: none`), then
   `thaw` (prestage) and restore from host memory;
3. a server on a copy of the store whose blobs were rewritten with zstd: restore
   from disk (compressed);
4. a server on an empty store pointed at Redis: restore from Redis.

Each restore phase also records the CPU seconds each process used over its
restores (the vLLM server's API, EngineCore and worker processes, redis-server)
against the wall time: on a 2-core machine this shows what a restore competes with.

    .venv/bin/python benchmarks/bench_tiers.py [--layers 4 --prompt-tokens 4000] [--out FILE]
        [--phases disk,redis]  (a short run: only these restores)
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import argparse
import json
import os
import tempfile
from collections import Counter

import psutil  # a vLLM dependency
from bench_restore import (
    BLOCK,
    HITS,
    Bench,
    drop_work_dir,
    first_token,
    model_spec,
    read_stats,
    wait_durable,
)
from redis_servers import RedisServer

from cwm_connector.control.client import ControlClient
from cwm_connector.demo.tiny_model import (
    build_tiny_model,
    count_parameters,
    make_prompt,
)
from cwm_connector.demo.vllm_process import VllmServer, kv_transfer_config
from cwm_connector.store import blob
from cwm_connector.store.disk import DiskTier

PHASES = ("disk", "memory", "disk_zstd", "redis")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = {"layers": 4, "hidden": 1024, "heads": 16, "kv-heads": 8, "intermediate": 2816,
            "vocab": 32000, "prompt-tokens": 4000, "repeats": 2, "kv-cache-gb": 2,
            "durable-timeout-s": 300, "decode-tokens": 64}  # fmt: skip
    for flag, default in ints.items():
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/tiers.json"))
    p.add_argument("--keep", action="store_true", help="keep the temp dir (model, stores, logs)")
    p.add_argument(
        "--phases",
        default=",".join(PHASES),
        help="comma-separated subset of " + ", ".join(PHASES) + " (a short run)",
    )
    args = p.parse_args()
    args.phases = tuple(x for x in PHASES if x in args.phases.split(","))
    return args


def zstd_copy(store: Path, dest: Path) -> tuple[int, int]:
    """Copy a store, rewriting every blob with zstd; return (raw bytes, stored bytes)."""
    shutil.copytree(store, dest, ignore=shutil.ignore_patterns("blobs", "*.sock*"))
    src, out = DiskTier(store), DiskTier(dest)
    raw_total = stored_total = 0
    for path in (store / "blobs").rglob("*.blob"):
        header = blob.parse_header(path.read_bytes()[: blob.HEADER_SIZE])
        raw = bytearray(header.raw_len)
        src.read_into(header.digest, [memoryview(raw)])
        raw_total += len(raw)
        stored_total += out.put(header.digest, [raw], "zstd")
    return raw_total, stored_total


def cpu_seconds(pids: list[int]) -> Counter[str]:
    """CPU seconds (user + system) used so far by these processes and their children,
    summed by process name (vLLM names its processes VLLM::EngineCore, VLLM::Worker...)."""
    out: Counter[str] = Counter()
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                times = proc.cpu_times()
                out[proc.name()] += times.user + times.system
        except psutil.Error:  # gone meanwhile: counted as far as it was read
            continue
    return out


class TierBench(Bench):
    """Bench's server helpers plus the tier phases."""

    def restore(self, server: VllmServer, i: int, salt: str, prefix_token: str) -> dict[str, Any]:
        before = server.metric(HITS)
        out = self.send(server, i, salt)
        expected = (out["usage"]["prompt_tokens"] - 1) // BLOCK * BLOCK
        time.sleep(0.3)  # Prometheus may trail the response
        hits = server.metric(HITS) - before
        return {"ttft_s": out["elapsed_s"], "hits_ok": hits == expected,
                "token_ok": first_token(out) == prefix_token}  # fmt: skip

    def decode_rates(self, server: VllmServer) -> dict[str, list[float]]:
        """Tokens/s after the first token: salted (captured) vs unsalted, interleaved."""
        rates: dict[str, list[float]] = {"capture_on": [], "capture_off": []}
        for i in range(2 * self.args.repeats):
            salt = f"{self.run_id}-dec-{i}" if i % 2 == 0 else None
            prompt = self.decode_prompts[i]
            out = server.complete(prompt, salt, max_tokens=self.args.decode_tokens)
            n = len(out["choices"][0]["logprobs"]["tokens"])
            rate = (n - 1) / max(out["elapsed_s"] - out["ttft_s"], 1e-9)
            rates["capture_on" if salt else "capture_off"].append(rate)
        return rates


def main() -> int:
    args = parse_args()
    spec = model_spec(args)
    work = Path(tempfile.mkdtemp(prefix="cwm-tiers-"))
    print(f"work dir: {work}", flush=True)
    redis = RedisServer().start()
    try:
        model = str(build_tiny_model(work / "model", spec))
        bench = TierBench(args, model, work)
        n = args.repeats
        # One prompt per phase and repeat, and fresh prompts for the decode measure.
        phases = args.phases
        count = n * len(PHASES)
        bench.prompts = [make_prompt(model, args.prompt_tokens, seed=i) for i in range(count)]
        bench.decode_prompts = [make_prompt(model, 256, seed=500 + i) for i in range(2 * n)]
        store = work / "store"
        cfg = kv_transfer_config({"store_dir": str(store), "redis_url": redis.url})
        salts = [f"{bench.run_id}-{k}" for k in range(n * len(PHASES))]
        used = [k for i, p in enumerate(PHASES) if p in phases for k in range(i * n, i * n + n)]
        res: dict[str, Any] = {"prefix_hit": [], "restore": {p: [] for p in PHASES}}
        prefix_tokens: dict[int, str] = {}
        a = bench.started(bench.server("A", cfg))
        try:
            want = 0
            for k in used:
                want += (bench.send(a, k, salts[k])["usage"]["prompt_tokens"] - 1) // BLOCK
            res["durable"] = wait_durable(a, store, want, args.durable_timeout_s)
            for k in used:
                out = bench.send(a, k, salts[k])
                res["prefix_hit"].append(out["elapsed_s"])
                prefix_tokens[k] = first_token(out)
            control = ControlClient(store / "control.sock")
            for k in used:
                control.call("freeze", salt=salts[k], name=f"w{k}")
            res["decode"] = bench.decode_rates(a)
        finally:
            a.stop()
        time.sleep(1.0)  # let the write-behind copies to Redis land before the stores move
        if "disk_zstd" in phases:
            raw, stored = zstd_copy(store, work / "store-zstd")
            res["zstd"] = {"raw_bytes": raw, "stored_bytes": stored, "ratio": raw / stored}
        plan = [("disk", store, {}), ("disk_zstd", work / "store-zstd", {}),
                ("redis", work / "store-empty", {"redis_url": redis.url})]  # fmt: skip
        for phase, phase_store, extra in plan:
            if phase not in phases and not (phase == "disk" and "memory" in phases):
                continue
            server = bench.started(bench.server(phase, kv_transfer_config(
                {"store_dir": str(phase_store), **extra})))  # fmt: skip
            try:
                offset = PHASES.index(phase) * n
                pids = [p for p in (server.proc.pid, redis.pid) if p is not None]
                cpu_before, wall_before = cpu_seconds(pids), time.perf_counter()
                for k in range(offset, offset + n if phase in phases else offset):
                    r = bench.restore(server, k, salts[k], prefix_tokens[k])
                    res["restore"][phase].append(r)
                used = cpu_seconds(pids) - cpu_before
                res.setdefault("cpu_s", {})[phase] = {
                    "wall_s": time.perf_counter() - wall_before,
                    **{name: round(sec, 3) for name, sec in sorted(used.items())}}  # fmt: skip
                if phase == "disk" and "memory" in phases:  # thaw prestages, then restore
                    control = ControlClient(phase_store / "control.sock")
                    offset = PHASES.index("memory") * n
                    for k in range(offset, offset + n):
                        control.call("thaw", name=f"w{k}")
                        r = bench.restore(server, k, salts[k], prefix_tokens[k])
                        res["restore"]["memory"].append(r)
                res[f"stats_{phase}"] = read_stats(phase_store)
            finally:
                server.stop()
        floor = statistics.median(res["prefix_hit"])
        summary = {p: statistics.median(r["ttft_s"] for r in res["restore"][p]) for p in phases}
        dec = {k: statistics.median(v) for k, v in res["decode"].items()}
        result = {
            "config": {**vars(args), "out": str(args.out), "num_parameters": count_parameters(spec),
                       "loadavg_end": os.getloadavg()},
            "prefix_hit_s": floor,
            "restore_s": summary,
            "restore_vs_prefix_hit": {p: summary[p] / floor for p in phases},
            "decode_tokens_per_s": dec,
            "decode_loss": 1 - dec["capture_on"] / dec["capture_off"],
            "checks": {p: all(r["hits_ok"] and r["token_ok"] for r in res["restore"][p])
                       for p in phases},
            **res,
        }  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print("| restore from | TTFT | vs prefix hit | hits + first token ok |")
        print("| --- | --- | --- | --- |")
        print(f"| (vLLM prefix hit) | {floor:.3f} s | 1.00x | |")
        for p in phases:
            ratio = result["restore_vs_prefix_hit"][p]
            print(f"| {p} | {summary[p]:.3f} s | {ratio:.2f}x | {result['checks'][p]} |")
        if "zstd" in result:
            print(f"zstd on real KV: {result['zstd']['ratio']:.2f}x smaller")
        for phase, cpu in result.get("cpu_s", {}).items():
            shares = ", ".join(
                f"{k} {v / cpu['wall_s']:.0%}" for k, v in cpu.items() if k != "wall_s"
            )
            print(f"CPU during the {phase} restores (share of one core): {shares}")
        print(f"decode tok/s capture on {dec['capture_on']:.1f} / off {dec['capture_off']:.1f}")
        return 0 if all(result["checks"].values()) else 1
    finally:
        redis.close()
        drop_work_dir(work, args.keep)


if __name__ == "__main__":
    raise SystemExit(main())
