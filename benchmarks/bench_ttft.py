"""TTFT against prompt length: cold prefill, vLLM's prefix hit, and cwm's restore per tier.

One tiny random Llama (the demo's shape, float32), real `vllm serve` processes and a
real `redis-server` on loopback. Every restored session is a prompt of its own (distinct
text and salt), so no source profits from another's cache:

1. server A (store S, `redis_url` set): each session is prefilled cold (`cold`), its
   capture and its write-behind copy to Redis awaited, and sent again (`prefix_hit`:
   vLLM's own in-process hit, the floor); the `memory` sessions are frozen into windows.
2. server B on S (a restart): `disk_warm` sessions restore with their blob files in the
   page cache (read once before); `disk_cold` sessions restore right after every blob
   file of S was dropped from the page cache with posix_fadvise(POSIX_FADV_DONTNEED)
   (blobs are fsynced when written, so no page stays dirty); `memory` sessions are
   thawed first (`cwm thaw` stages their blocks into host memory), then sent.
3. server C on an empty store with `redis_url`: `redis` sessions restore from Redis.

TTFT is the time to the first streamed token of a greedy 1-token completion
(`ttft_s` of VllmServer.complete). Medians of --repeats sessions per length and source; a
restore that found no external hit (recomputed) is kept out of its tier's median, listed
under `recomputed_s` and fails the `external_hits_ok` check.

    .venv/bin/python benchmarks/bench_ttft.py [--lengths 1000,4000,16000,32000] [--repeats 5]
        [--out benchmarks/results/ttft_sweep.json] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_restore import (
    BLOCK,
    HITS,
    drop_work_dir,
    first_token,
    read_stats,
    wait_durable,
    wait_metric,
)
from redis_servers import RedisServer

from cwm_connector.control.client import ControlClient
from cwm_connector.demo.tiny_model import (
    TinyModelSpec,
    build_tiny_model,
    count_parameters,
    make_prompt,
)
from cwm_connector.demo.vllm_process import VllmServer, kv_transfer_config

SOURCES = {
    "cold": "cold prefill (connector on, nothing cached)",
    "prefix_hit": "vLLM's own prefix-cache hit, same process",
    "memory": "cwm restore after restart, thawed into host memory first",
    "disk_warm": "cwm restore after restart from disk, blob files in the page cache",
    "disk_cold": "cwm restore after restart from disk, page cache dropped (posix_fadvise)",
    "redis": "cwm restore from Redis on a server with an empty store",
}
RESTORED = ("memory", "disk_warm", "disk_cold", "redis")  # each needs sessions of its own
DEFAULT_LENGTHS = "1000,4000,16000,32000"


@dataclass
class Session:
    """One salted prompt, destined to be restored from one source."""

    length: int
    source: str
    repeat: int
    salt: str
    prompt: str
    prompt_tokens: int = 0
    prefix_token: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help="prompt tokens, comma-separated")
    p.add_argument("--repeats", type=int, default=5, help="sessions per length and source")
    p.add_argument("--kv-cache-gb", type=int, default=2)
    p.add_argument("--durable-timeout-s", type=int, default=300)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/ttft_sweep.json"))
    p.add_argument("--keep", action="store_true", help="keep the temp dir (model, stores, logs)")
    args = p.parse_args(argv)
    try:
        args.lengths = sorted({int(x) for x in args.lengths.split(",") if x.strip()})
    except ValueError:
        p.error(f"--lengths: integers separated by commas, got {args.lengths!r}")
    if not args.lengths or min(args.lengths) < BLOCK or args.repeats < 1:
        p.error(f"--lengths must be >= {BLOCK} tokens and --repeats >= 1")
    return args


def machine() -> dict[str, Any]:
    """The CPU model and core count (the plot's title names them)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "loadavg_start": os.getloadavg()}


def blob_files(store: Path) -> list[Path]:
    return sorted((store / "blobs").rglob("*.blob"))


def warm_page_cache(store: Path) -> int:
    """Read every blob file once (so that disk_warm finds them cached); bytes read."""
    return sum(len(p.read_bytes()) for p in blob_files(store))


def drop_page_cache(store: Path) -> int:
    """Drop every blob file of the store from the page cache; files advised."""
    files = blob_files(store)
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # DONTNEED skips dirty pages
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return len(files)


def resident_bytes(store: Path, sample: int = 64) -> int | None:
    """Bytes of a sample of blob files still in the page cache (util-linux fincore)."""
    files = blob_files(store)[:sample]
    if not files or shutil.which("fincore") is None:
        return None
    done = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, files)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return sum(int(x) for x in done.stdout.split() if x.isdigit())


def all_stats(store: Path) -> dict[str, Any]:
    """Every stats file of a store (worker and scheduler counters), by file name."""
    out = {}
    for path in sorted((store / "stats").glob("*.json")):
        try:
            out[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return out


def wait_redis_copies(store: Path, timeout_s: float) -> dict[str, Any]:
    """Wait until the write-behind copies to Redis have caught up with the captures."""
    started = time.monotonic()
    while True:
        stats = read_stats(store)
        want = stats.get("captured_blocks", 0)
        got = stats.get("redis_written_blobs", 0)
        dropped = stats.get("redis_copy_dropped_blocks", 0)  # a failed copy: never retried
        if got + dropped >= want or time.monotonic() - started > timeout_s:
            return {"captured_blocks": want, "redis_written_blobs": got,
                    "redis_copy_dropped_blocks": dropped, "ok": got >= want,
                    "waited_s": round(time.monotonic() - started, 2)}  # fmt: skip
        time.sleep(0.2)


class Sweep:
    """The servers, sessions and samples of one run."""

    def __init__(self, args: argparse.Namespace, model: str, work: Path):
        self.args, self.model, self.work = args, model, work
        self.max_len = max(args.lengths) + 64
        self.warm = make_prompt(model, 48, seed=10_000)
        run = uuid.uuid4().hex[:8]
        self.sessions: list[Session] = []
        seed = 0
        for length in args.lengths:
            for source in RESTORED:
                for r in range(args.repeats):
                    prompt = make_prompt(model, length, seed=seed)
                    salt = f"{run}-{length}-{source}-{r}"
                    self.sessions.append(Session(length, source, r, salt, prompt))
                    seed += 1
        self.samples: dict[int, dict[str, list[float]]] = {
            n: {s: [] for s in SOURCES} for n in args.lengths
        }
        self.checks: list[dict[str, Any]] = []
        # Restores that found no external hit (recomputed): kept apart from the tier's samples.
        self.recomputed: dict[int, dict[str, list[float]]] = {n: {} for n in args.lengths}
        self.warnings: dict[str, list[str]] = {}
        self.restarts: list[str] = []
        self.stats: dict[str, dict[str, int]] = {}

    def server(self, name: str, store: Path, redis_url: str = "") -> VllmServer:
        extra = {"store_dir": str(store), **({"redis_url": redis_url} if redis_url else {})}
        srv = VllmServer(
            self.model, self.work / "logs" / f"{name}.log", connector=kv_transfer_config(extra),
            max_model_len=self.max_len, kv_cache_gb=self.args.kv_cache_gb,
        )  # fmt: skip
        print(f"  starting server {name} ...", flush=True)
        try:
            srv.start()
        except (RuntimeError, TimeoutError) as exc:  # a shared, busy machine: try once more
            print(f"  server {name} did not start ({exc}); once more", flush=True)
            self.restarts.append(f"{name}: {exc}")
            srv.start()
        srv.complete(self.warm, None, max_tokens=1)  # first-call overheads, not measured
        return srv

    def stopped(self, name: str, srv: VllmServer, store: Path) -> None:
        """Stop a server; keep its store's stats and cwm's warnings from its log."""
        srv.stop()
        self.stats[name] = all_stats(store)
        lines = srv.log_path.read_text(errors="replace").splitlines()
        keep = [x for x in lines if "cwm" in x and ("WARNING" in x or "ERROR" in x)]
        self.warnings[name] = keep[-20:]

    def capture(self, store: Path, redis_url: str) -> dict[str, Any]:
        """Server A: cold prefill and prefix hit of every session; freeze the memory ones."""
        srv = self.server("A", store, redis_url)
        control = ControlClient(store / "control.sock")
        want, durable, copied = 0, [], []
        try:
            for s in self.sessions:
                out = srv.complete(s.prompt, s.salt, max_tokens=1)
                self.samples[s.length]["cold"].append(out["ttft_s"])
                s.prompt_tokens = out["usage"]["prompt_tokens"]
                want += (s.prompt_tokens - 1) // BLOCK
                # Captured and copied to Redis before the next request, so that neither the
                # capture nor the write-behind copy taxes a measure.
                durable.append(wait_durable(srv, store, want, self.args.durable_timeout_s)["ok"])
                copied.append(wait_redis_copies(store, self.args.durable_timeout_s)["ok"])
                out = srv.complete(s.prompt, s.salt, max_tokens=1)
                self.samples[s.length]["prefix_hit"].append(out["ttft_s"])
                s.prefix_token = first_token(out)
                if s.source == "memory":
                    control.call("freeze", salt=s.salt, name=f"w-{s.salt}")
                print(f"    {s.length:>6} tokens {s.source:<9} cold "
                      f"{self.samples[s.length]['cold'][-1]:.3f} s", flush=True)  # fmt: skip
            copies = wait_redis_copies(store, self.args.durable_timeout_s)
        finally:
            self.stopped("A", srv, store)
        return {"capture_durable_ok": all(durable), "redis_copies": copies,
                "redis_copied_each_ok": all(copied)}  # fmt: skip

    def restore(self, srv: VllmServer, s: Session) -> None:
        """Send a session again on a server that does not hold it; record TTFT and checks."""
        before = srv.metric(HITS)
        out = srv.complete(s.prompt, s.salt, max_tokens=1)
        expected = (out["usage"]["prompt_tokens"] - 1) // BLOCK * BLOCK
        hits = wait_metric(srv, HITS, before + expected) - before
        if hits == expected:
            self.samples[s.length][s.source].append(out["ttft_s"])
        else:
            self.recomputed[s.length].setdefault(s.source, []).append(out["ttft_s"])
        self.checks.append({"length": s.length, "source": s.source, "repeat": s.repeat,
                            "external_hits": hits, "hits_ok": hits == expected,
                            "token_ok": first_token(out) == s.prefix_token})  # fmt: skip
        print(f"    {s.length:>6} tokens {s.source:<9} {out['ttft_s']:.3f} s", flush=True)

    def of(self, source: str) -> list[Session]:
        return [s for s in self.sessions if s.source == source]

    def restart(self, store: Path) -> dict[str, Any]:
        """Server B on the same store: disk warm, disk cold, then memory (thaw first)."""
        info: dict[str, Any] = {}
        srv = self.server("B", store)
        control = ControlClient(store / "control.sock")
        try:
            info["warmed_bytes"] = warm_page_cache(store)
            for s in self.of("disk_warm"):
                self.restore(srv, s)
            resident = []
            for s in self.of("disk_cold"):
                drop_page_cache(store)
                resident.append(resident_bytes(store))
                self.restore(srv, s)
            info["resident_bytes_after_drop_sample"] = resident
            for s in self.of("memory"):
                thawed = control.call("thaw", name=f"w-{s.salt}")
                info.setdefault("thaw_staged_blocks", []).append(thawed.get("staged_blocks"))
                self.restore(srv, s)
        finally:
            self.stopped("B", srv, store)
        return info

    def from_redis(self, store: Path, redis_url: str) -> None:
        """Server C on an empty store: every redis session restores from Redis."""
        srv = self.server("C", store, redis_url)
        try:
            for s in self.of("redis"):
                self.restore(srv, s)
        finally:
            self.stopped("C", srv, store)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    spec = TinyModelSpec(dtype="float32", max_position_embeddings=max(args.lengths) + 64)
    work = Path(tempfile.mkdtemp(prefix="cwm-ttft-"))
    print(f"work dir: {work}", flush=True)
    host = machine()
    redis = RedisServer().start()
    try:
        model = str(build_tiny_model(work / "model", spec))
        print("building prompts ...", flush=True)
        sweep = Sweep(args, model, work)
        store = work / "store"
        print("server A: cold prefill, prefix hit, freeze", flush=True)
        captured = sweep.capture(store, redis.url)
        print("server B (restart): disk warm, disk cold, memory", flush=True)
        restart = sweep.restart(store)
        print("server C (empty store): redis", flush=True)
        sweep.from_redis(work / "store-empty", redis.url)
        host["loadavg_end"] = os.getloadavg()
        kv_per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_size * 4
        result = {
            "machine": host,
            "model": {"name": "tiny random Llama (cwm_connector.demo.tiny_model)",
                      "params": count_parameters(spec), "layers": spec.num_layers,
                      "hidden": spec.hidden_size, "heads": spec.num_heads,
                      "kv_heads": spec.num_kv_heads, "dtype": spec.dtype,
                      "kv_bytes_per_token": kv_per_token},
            "config": {"lengths": args.lengths, "repeats": args.repeats, "block_size": BLOCK,
                       "max_model_len": sweep.max_len, "kv_cache_gb": args.kv_cache_gb,
                       "ttft": "time to the first streamed token, greedy, max_tokens=1",
                       "page_cache_drop": "posix_fadvise(POSIX_FADV_DONTNEED) on every blob "
                                          "file of the store before each disk_cold request"},
            "sources": SOURCES,
            "ttft_s": {str(n): {src: statistics.median(v) for src, v in per.items() if v}
                       for n, per in sweep.samples.items()},
            "samples_s": {str(n): per for n, per in sweep.samples.items()},
            "recomputed_s": {str(n): per for n, per in sweep.recomputed.items() if per},
            "checks": {"capture_durable_ok": captured["capture_durable_ok"],
                       "redis_copies_ok": captured["redis_copies"]["ok"]
                       and captured["redis_copied_each_ok"],
                       "external_hits_ok": all(c["hits_ok"] for c in sweep.checks),
                       "first_token_ok": all(c["token_ok"] for c in sweep.checks)},
            "restore_checks": sweep.checks,
            "capture": captured, "restart": restart,
            "store_stats": sweep.stats, "cwm_warnings": sweep.warnings,
            "server_start_retries": sweep.restarts,
            "wall_s": round(time.monotonic() - started, 1),
        }  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print("| tokens | " + " | ".join(SOURCES) + " |")
        print("| ---: |" + " ---: |" * len(SOURCES))
        for n, med in result["ttft_s"].items():
            print(f"| {n} | " + " | ".join(f"{med[s]:.3f} s" for s in SOURCES if s in med) + " |")
        print(f"checks: {result['checks']}  ->  {args.out}")
        return 0 if all(result["checks"].values()) else 1
    finally:
        redis.close()
        drop_work_dir(work, args.keep)


if __name__ == "__main__":
    raise SystemExit(main())
