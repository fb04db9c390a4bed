"""Blob codecs on real captured KV blobs: size on disk, encode cost, read+verify cost.

Reads the blobs a real `vllm serve` captured (default: the store `make demo`
leaves in `.cwm-demo/store`), rewrites each with `none` and with `zstd` (byte
planes + zstd) into temp stores, and times reading them back through the disk
tier (page cache, digest verified) against a plain memcpy of the same bytes.
Every decoded blob is compared with the original: the codec must be bit-exact.

    .venv/bin/python benchmarks/bench_codec.py [--store DIR] [--repeats N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cwm_connector.store import blob
from cwm_connector.store.disk import DiskTier


def load_raw_blobs(store: Path) -> list[bytes]:
    """The raw (decoded, verified) bytes of every blob in a store."""
    disk = DiskTier(store)
    raws = []
    for path in sorted((store / "blobs").rglob("*.blob")):
        header = blob.parse_header(path.read_bytes()[: blob.HEADER_SIZE])
        out = bytearray(header.raw_len)
        disk.read_into(header.digest, [memoryview(out)])
        raws.append(bytes(out))
    return raws


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over repeats."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def bench(raws: list[bytes], repeats: int) -> dict[str, object]:
    """Sizes and times for each codec, and the memcpy baseline."""
    digests = [blob.digest(r) for r in raws]
    total = sum(len(r) for r in raws)
    outs = [memoryview(bytearray(len(r))) for r in raws]
    sources = [np.frombuffer(r, dtype=np.uint8) for r in raws]
    dests = [np.frombuffer(o, dtype=np.uint8) for o in outs]

    def memcpy() -> None:
        for src, dst in zip(sources, dests, strict=True):
            np.copyto(dst, src)

    result: dict[str, object] = {"blobs": len(raws), "raw_bytes": total}
    result["memcpy_s"] = timed(memcpy, repeats)
    for codec in ("none", "zstd"):
        with tempfile.TemporaryDirectory() as tmp:
            disk = DiskTier(Path(tmp))
            started = time.perf_counter()
            stored = sum(disk.put(d, [r], codec) for d, r in zip(digests, raws, strict=True))
            encode_s = time.perf_counter() - started

            def read(disk: DiskTier = disk) -> None:
                for dig, out in zip(digests, outs, strict=True):
                    disk.read_into(dig, [out])

            read_s = timed(read, repeats)
            exact = all(bytes(o) == r for o, r in zip(outs, raws, strict=True))
        result[codec] = {
            "stored_bytes": stored,
            "ratio": stored / total,
            "write_s": encode_s,
            "read_verify_s": read_s,
            "read_gbps": total / read_s / 1e9,
            "read_vs_memcpy": read_s / result["memcpy_s"],
            "bit_exact": exact,
        }
    result["zstd_read_vs_none"] = result["zstd"]["read_verify_s"] / result["none"]["read_verify_s"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", type=Path, default=Path(".cwm-demo/store"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/codec.json"))
    args = parser.parse_args()
    raws = load_raw_blobs(args.store)
    if not raws:
        print(f"no blobs under {args.store}: run `make demo` first", file=sys.stderr)
        return 2
    result = bench(raws, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{result['blobs']} real KV blobs, {result['raw_bytes'] / 1e6:.1f} MB raw")
    print("| codec | on disk | write | read + verify | vs memcpy | bit-exact |")
    print("| --- | --- | --- | --- | --- | --- |")
    for codec in ("none", "zstd"):
        r = result[codec]
        print(
            f"| {codec} | {r['ratio']:.3f} of raw | {r['write_s'] * 1e3:.1f} ms | "
            f"{r['read_verify_s'] * 1e3:.1f} ms ({r['read_gbps']:.2f} GB/s) | "
            f"{r['read_vs_memcpy']:.1f}x | {r['bit_exact']} |"
        )
    print(f"memcpy of the same bytes: {result['memcpy_s'] * 1e3:.2f} ms")
    ok = result["none"]["bit_exact"] and result["zstd"]["bit_exact"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
