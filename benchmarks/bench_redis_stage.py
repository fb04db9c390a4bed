"""Stage a session's blobs from Redis in-process: fetch_remote + read_into, idle and under GIL load.

Starts a real redis-server on 127.0.0.1 (tests/redis_servers.py), writes N blobs of
BLOCK bytes through the real code (RedisTier.put_blobs), then times what the
worker's stage thread does for a restore that only Redis holds: `fetch_remote`,
then `read_into` per blob (verify + copy into staging segments, promotion into the
memory tier) on two reader threads. Medians of `--repeats`; once with the process
idle and once with a second thread spinning in pure Python (as vLLM's busy worker
thread holds the GIL). Then the floor: the same values read over bare sockets
(pipelined GETs, one `recv_into(MSG_WAITALL)` of the exact reply length into a
buffer already touched, no parsing, no verify) on 1 and on 4 connections at once.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_redis_stage.py [--blobs 125] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from redis_servers import RedisServer

from cwm_connector.stats import Stats
from cwm_connector.store import blob
from cwm_connector.store.disk import DiskTier
from cwm_connector.store.memory import MemoryTier
from cwm_connector.store.redis import RedisTier
from cwm_connector.store.tiered import TieredStore

SEGMENTS = 8  # 4 layers x (K, V), as bench_tiers' tiny model


def spin(stop: threading.Event) -> None:
    """Pure-Python work that holds the GIL whenever it can (a busy engine thread)."""
    x = 0
    while not stop.is_set():
        for i in range(1000):
            x += i * i


def stage_once(store: TieredStore, digests: list[bytes], block: int) -> float:
    """One restore into fresh staging segments; milliseconds."""
    staging = np.empty((len(digests), block), dtype=np.uint8)
    seg = block // SEGMENTS
    readers = ThreadPoolExecutor(2)
    started = time.perf_counter()
    remote = store.fetch_remote(digests)

    def read(i: int) -> str:
        row = memoryview(staging[i])
        return store.read_into(digests[i], [row[s * seg : (s + 1) * seg] for s in range(SEGMENTS)],
                               remote)  # fmt: skip

    tiers = list(readers.map(read, range(len(digests))))
    elapsed = (time.perf_counter() - started) * 1e3
    readers.shutdown()
    assert tiers == ["redis"] * len(digests), set(tiers)
    return elapsed


def raw_read_ms(host: str, port: int, keys: list[bytes], value_len: int, conns: int) -> float:
    """Pipelined GETs of `keys` (values all `value_len` bytes) split over `conns` sockets,
    each reply stream read with one recv_into of its exact length; milliseconds."""
    reply = len(b"$%d\r\n" % value_len) + value_len + 2
    parts = [keys[i::conns] for i in range(conns)]
    socks = [socket.create_connection((host, port)) for _ in parts]
    buffers = [bytearray(b"\1" * (reply * len(p))) for p in parts]

    def read(j: int) -> None:
        view, got = memoryview(buffers[j]), 0
        socks[j].sendall(b"".join(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k), k)
                                  for k in parts[j]))  # fmt: skip
        while got < len(view):
            n = socks[j].recv_into(view[got:], len(view) - got, socket.MSG_WAITALL)
            if n == 0:
                raise ConnectionError("redis-server closed the connection")
            got += n

    started = time.perf_counter()
    threads = [threading.Thread(target=read, args=(j,)) for j in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = (time.perf_counter() - started) * 1e3
    for sock in socks:
        sock.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blobs", type=int, default=125)
    parser.add_argument("--block", type=int, default=262_144)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    raws = [rng.integers(0, 256, args.block, dtype=np.uint8).tobytes() for _ in range(args.blobs)]
    digests = [blob.digest(r) for r in raws]
    out = {"blobs": args.blobs, "bytes": args.blobs * args.block}
    with RedisServer() as server, tempfile.TemporaryDirectory() as tmp:
        tier = RedisTier(server.url, socket_timeout_s=2.0)
        tier.put_blobs([(d, blob.encode(r)) for d, r in zip(digests, raws, strict=True)])
        for load in ("idle", "gil_busy"):
            stop = threading.Event()
            spinner = threading.Thread(target=spin, args=(stop,), daemon=True)
            if load == "gil_busy":
                spinner.start()
            times = []
            for _ in range(args.repeats + 1):  # the first warms connections and threads
                store = TieredStore(MemoryTier(1 << 30), DiskTier(Path(tmp)), tier, Stats(None))
                times.append(stage_once(store, digests, args.block))
                store.close()
            stop.set()
            if spinner.is_alive():
                spinner.join()
            out[f"{load}_ms_median"] = round(statistics.median(times[1:]), 1)
            out[f"{load}_ms_all"] = [round(t, 1) for t in times[1:]]
        keys = [tier.blob_key(d).encode() for d in digests]
        value_len = len(blob.encode(raws[0]))
        for conns in (1, 4):
            times = [raw_read_ms("127.0.0.1", server.port, keys, value_len, conns)
                     for _ in range(args.repeats + 1)][1:]  # fmt: skip
            out[f"raw_socket_{conns}conn_ms_median"] = round(statistics.median(times), 1)
        out["loadavg"] = os.getloadavg()
        tier.close()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
