"""Control ops at scale: list, status, thaw, clone, delete, freeze and the engine's lookup
on stores of 1,000 / 10,000 / 100,000 windows over 1,000,000 blocks (no vLLM).

Each store is built through the real catalog and window code (`Catalog.add_blocks`,
`WindowRecords.row`, `Catalog.insert_window`, many rows per transaction for the
setup only) and then timed through `WindowService` ops, as the control socket runs
them. Every window has 8 blocks of its own; the 1,000,000 block rows beyond the
windows' are cache. Only the blobs of the windows the timed ops read (status,
thaw) are real files; the other rows name no file, so the start-up check runs as
on a store shared through Redis (`skip_absent`: a stat per blob, nothing dropped).

    .venv/bin/python benchmarks/bench_catalog.py [--sizes 1000,10000,100000]
        [--blocks 1000000] [--reps 100] [--out benchmarks/results/catalog.json]

Goal (issue 15): every op's p99 <= 10 ms at 100,000 windows, flat from 1,000.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cwm_connector.engine.fingerprint import fingerprint_id
from cwm_connector.engine.sessions import SessionTable
from cwm_connector.stats import Stats
from cwm_connector.store import check
from cwm_connector.store.blob import digest
from cwm_connector.store.catalog import Catalog
from cwm_connector.store.disk import DiskTier
from cwm_connector.windows.service import WindowService

BS = 16
ENGINE = {"model": "bench-model", "dtype": "bfloat16", "block_size": BS}
PER_WINDOW = 8  # blocks of each window
TARGETS = 100  # windows status/thaw/clone read (their blobs are real files)
BATCH = 50_000  # rows per setup transaction
LOOKUP = 128  # hashes per engine lookup (one scheduler step)


def block_hash(j: int) -> bytes:
    return hashlib.sha256(b"block-%d" % j).digest()


def fake_digest(j: int) -> bytes:
    return hashlib.blake2b(b"blob-%d" % j, digest_size=16).digest()


def service(store: Path) -> WindowService:
    engine_id = fingerprint_id(ENGINE)
    Catalog(store / "catalog.sqlite").register_fingerprint("fp-" + engine_id, engine_id, "{}")
    return WindowService(
        store_dir=store, engine_fp=ENGINE, engine_fp_id=engine_id, block_size=BS,
        hash_algo="sha256", sessions=SessionTable(), detokenize=lambda ids: "",
        stats=lambda: {"scheduler": {}, "worker": {}}, freeze_timeout_s=1.0,
    )  # fmt: skip


@contextlib.contextmanager
def bulk(cat: Catalog) -> Iterator[None]:
    """Many catalog writes in one transaction (setup only): the methods' own run inside."""
    cat._db.execute("BEGIN IMMEDIATE")
    own = cat._transaction
    cat._transaction = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        cat._transaction = own  # type: ignore[method-assign]
        cat._db.execute("COMMIT")


def build_blocks(store: Path, num_blocks: int, real: set[int]) -> None:
    """The block and blob rows (files only for the blocks in `real`)."""
    svc = service(store)
    cat = svc.records.catalog
    fp = cat.engine_fp_ids(svc.records.engine_fp_id)[0]
    for start in range(0, num_blocks, BATCH):
        rows, blobs = [], []
        for j in range(start, min(num_blocks, start + BATCH)):
            if j in real:
                raw = hashlib.sha256(b"raw-%d" % j).digest() * 8  # 256 bytes
                dig = digest(raw)
                stored = svc.records.disk.put(dig, [raw])
                blobs.append((dig, len(raw), stored, "none"))
            else:
                dig = fake_digest(j)
                blobs.append((dig, 4096, 4096, "none"))
            rows.append((block_hash(j), dig))
        with bulk(cat):
            cat.add_blocks(fp, rows, blobs)
    cat._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    cat.close()


def build_windows(svc: WindowService, num_windows: int) -> None:
    """num_windows windows of PER_WINDOW blocks each (window i: blocks i*8 .. i*8+7)."""
    cat = svc.records.catalog
    fp = cat.engine_fp_ids(svc.records.engine_fp_id)[0]
    for start in range(0, num_windows, BATCH // PER_WINDOW):
        stop = min(num_windows, start + BATCH // PER_WINDOW)
        hashes = [block_hash(j) for j in range(start * PER_WINDOW, stop * PER_WINDOW)]
        digests = cat.digests_for(fp, hashes)
        with bulk(cat):
            for i in range(start, stop):
                mine = hashes[(i - start) * PER_WINDOW : (i - start + 1) * PER_WINDOW]
                tags = [f"t{i % 10}"] + (["rare"] if i % 1000 == 7 else [])
                row = svc.records.row(f"w{i:06d}", f"salt-{i % (num_windows // 2)}",
                                      list(range(PER_WINDOW * BS + i % 13)), None,
                                      f"window {i} of the benchmark", tags)  # fmt: skip
                row["created"] = 1.7e9 + (i * 7919) % num_windows  # not in name order
                cat.insert_window(row, [(h, digests[h]) for h in mine])
    cat._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(p99 * 1000, 3),
        "n": len(ordered),
    }


def timed(fn: Callable[[int], object], reps: int) -> dict[str, float]:
    fn(reps)  # warm-up (its own argument: mutating ops never repeat a name)
    samples = []
    for k in range(reps):
        started = time.perf_counter()
        fn(k)
        samples.append(time.perf_counter() - started)
    return percentiles(samples)


def startup(store: Path, engine_id: str, num_blocks: int) -> dict[str, Any]:
    """Open the catalog and start the check (as a worker does), then serve lookups."""
    rng = random.Random(1)
    started = time.perf_counter()
    stats = Stats(None)
    args = (store / "catalog.sqlite", DiskTier(store), stats, True)
    thread = threading.Thread(target=check.check_store, args=args, daemon=True)
    thread.start()
    cat = Catalog(store / "catalog.sqlite")
    first = rng.randrange(num_blocks - LOOKUP)
    found = cat.digests_for_engine(engine_id, [block_hash(first + i) for i in range(LOOKUP)])
    to_serving = time.perf_counter() - started
    assert len(found) == LOOKUP
    during = []
    while thread.is_alive() and len(during) < 2000:
        first = rng.randrange(num_blocks - LOOKUP)
        hashes = [block_hash(first + i) for i in range(LOOKUP)]
        t0 = time.perf_counter()
        cat.digests_for_engine(engine_id, hashes)
        during.append(time.perf_counter() - t0)
        time.sleep(0.002)
    thread.join()
    check_s = time.perf_counter() - started
    cat.close()
    return {
        "to_first_lookup_ms": round(to_serving * 1000, 3),
        "check_s": round(check_s, 2),
        "lookup_during_check": percentiles(during) if during else None,
    }


def bench_size(template: Path, num_windows: int, num_blocks: int, reps: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"cwm-bench-{num_windows}-"))
    try:
        shutil.copytree(template, root, dirs_exist_ok=True)
        t0 = time.perf_counter()
        svc = service(root)
        build_windows(svc, num_windows)
        build_s = time.perf_counter() - t0
        return {"build_s": round(build_s, 1), **run_ops(svc, root, num_windows, num_blocks, reps)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_ops(svc: WindowService, root: Path, n: int, num_blocks: int, reps: int) -> dict[str, Any]:
    core, cat = svc.core, svc.records.catalog
    engine_id = svc.records.engine_fp_id
    rng = random.Random(0)
    targets = [f"w{i:06d}" for i in target_windows(n)]
    doomed = [f"w{i:06d}" for i in range(1, n, 2) if i not in set(target_windows(n))]
    rng.shuffle(doomed)
    cache = range(n * PER_WINDOW, num_blocks)  # block rows no window names
    for k in range(reps + 1):  # sessions whose blocks are durable: freeze's input
        first = cache[(k * PER_WINDOW * 2) % (len(cache) - PER_WINDOW)]
        svc.records.sessions.record(f"fz-{k}", list(range(PER_WINDOW * BS)),
                                    [block_hash(first + i) for i in range(PER_WINDOW)])  # fmt: skip
    ops: dict[str, Callable[[int], object]] = {
        "list": lambda k: core.list(limit=50),
        "list_tag": lambda k: core.list(tags=["t3"], limit=50),
        "list_rare_tag": lambda k: core.list(tags=["rare"], limit=50),
        "list_by_tokens_desc": lambda k: core.list(sort_by="tokens", sort_order="desc", limit=50),
        "list_session": lambda k: core.list(session=f"salt-{k % (n // 2)}"),
        "status": lambda k: core.status(name=targets[k % len(targets)]),
        "thaw": lambda k: core.thaw(targets[k % len(targets)]),
        "lookup_128": lambda k: cat.digests_for_engine(
            engine_id, [block_hash(rng.randrange(num_blocks)) for _ in range(LOOKUP)]
        ),
        "clone": lambda k: core.clone(targets[k % len(targets)], f"clone-{k}"),
        "delete": lambda k: core.delete(doomed[k]),
        "freeze": lambda k: core.freeze(f"fz-{k}", f"frozen-{k}"),
    }
    out: dict[str, Any] = {}
    for name, fn in ops.items():
        slow = name.startswith("list") and n >= 10_000 and not hasattr(cat, "list_windows")
        out[name] = timed(fn, min(reps, 5) if slow else reps)  # the code before issue 15
    out["windows_listed"] = len(core.list(limit=50))
    out["startup"] = startup(root, engine_id, num_blocks)
    return out


def target_windows(n: int) -> list[int]:
    return [k * (n // TARGETS) for k in range(TARGETS)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if max(sizes) * PER_WINDOW >= args.blocks:
        parser.error("--blocks must exceed 8 x the largest size (windows' blocks + cache)")
    template = Path(tempfile.mkdtemp(prefix="cwm-bench-blocks-"))
    results: dict[str, Any] = {
        "blocks": args.blocks,
        "blocks_per_window": PER_WINDOW,
        "reps": args.reps,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "bounded_check": "limits" in inspect.signature(check.check_store).parameters,
        "sizes": {},
    }
    try:
        t0 = time.perf_counter()
        real = {i * PER_WINDOW + b for s in sizes for i in target_windows(s) for b in range(8)}
        build_blocks(template, args.blocks, real)
        results["build_blocks_s"] = round(time.perf_counter() - t0, 1)
        print(f"{args.blocks:,} blocks built in {results['build_blocks_s']} s", file=sys.stderr)
        for n in sizes:
            results["sizes"][str(n)] = bench_size(template, n, args.blocks, args.reps)
            print(f"{n:,} windows done", file=sys.stderr)
    finally:
        shutil.rmtree(template, ignore_errors=True)
    print_table(results)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def print_table(results: dict[str, Any]) -> None:
    """p50 / p99 per op and size, then the start-up numbers."""
    sizes = list(results["sizes"])
    first = results["sizes"][sizes[0]]
    ops = [k for k, v in first.items() if isinstance(v, dict) and "p99_ms" in v]
    print(f"{'op (p50 / p99 ms)':<22}" + "".join(f"{int(s):>20,}" for s in sizes))

    def pair(cell: dict[str, float] | None) -> str:
        cell = cell or {"p50_ms": 0.0, "p99_ms": 0.0}
        return f"{cell['p50_ms']:>11.2f} /{cell['p99_ms']:>7.2f}"

    for op in ops:
        print(f"{op:<22}" + "".join(pair(results["sizes"][s][op]) for s in sizes))
    starts = [results["sizes"][s]["startup"] for s in sizes]
    line = "".join(f"{c['to_first_lookup_ms']:>20.2f}" for c in starts)
    print(f"{'start-up to lookup':<22}" + line)
    print(f"{'lookup during check':<22}" + "".join(pair(c["lookup_during_check"]) for c in starts))
    print(f"{'check (s)':<22}" + "".join(f"{c['check_s']:>20.2f}" for c in starts))


if __name__ == "__main__":
    sys.exit(main())
