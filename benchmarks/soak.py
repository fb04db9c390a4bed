"""Soak: mixed traffic of many salted sessions with random freeze/thaw/clone/delete.

Against one real `vllm serve` with the connector (tiny random model): sessions
grow turn by turn, and windows are frozen, thawed (and continued), cloned
(sometimes under a new salt) and deleted at random for `--minutes`. At the end:

- every live window is complete (`status` re-reads and verifies every blob) and
  holds exactly the tokens recorded when it was made;
- after a restart, every live window thaws and its next request loads every
  block (external hits) with verify_restore on (restored bytes re-digested);
- no leak: the blob files on disk are exactly the catalog's blob rows, sizes
  included;
- no error counters moved (digest, load, store, stage timeouts, mismatches).

With `--disk-bytes` the store runs under that budget (issue 15): the blob files are
sampled after every action and must never pass it (plus one capture in flight); a
freeze that windows leave no room for (`store_full`) deletes a random window and is
counted, never an error.

    .venv/bin/python benchmarks/soak.py --minutes 10 [--disk-bytes 6MB] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cwm_connector.config import parse_bytes
from cwm_connector.control.client import ControlClient
from cwm_connector.demo.tiny_model import build_tiny_model, make_prompt
from cwm_connector.demo.vllm_process import VllmServer, kv_transfer_config
from cwm_connector.errors import CwmError
from cwm_connector.stats import read_stats

BLOCK = 32
HITS = "vllm:external_prefix_cache_hits_total"
ERROR_COUNTERS = ("digest_errors", "load_errors", "store_errors", "missing_blobs",
                  "read_errors", "restore_mismatch_blocks")  # fmt: skip
ACTIONS = {"turn": 8, "freeze": 3, "thaw": 3, "clone": 2, "delete": 2}


class Soak:
    def __init__(self, model: Path, store: Path, logs: Path, seed: int, disk_bytes: int = 0):
        self.model, self.store, self.logs = model, store, logs
        self.disk_bytes = disk_bytes
        self.store_full = 0
        self.evicted_sessions = 0
        self.max_blob_bytes = 0
        self.rng = random.Random(seed)
        self.sessions: dict[str, str] = {}  # salt -> conversation text so far
        self.windows: dict[str, tuple[str, list[int]]] = {}  # name -> (salt, tokens)
        self.counts = {a: 0 for a in ACTIONS}
        self.refused = 0
        self.ttft: list[float] = []
        self.serial = 0

    def server(self, name: str) -> VllmServer:
        extra = {"store_dir": str(self.store), "verify_restore": True}
        if self.disk_bytes:
            extra["disk_bytes"] = self.disk_bytes
        cfg = kv_transfer_config(extra)
        srv = VllmServer(str(self.model), self.logs / f"{name}.log", connector=cfg)
        srv.max_model_len = 8192
        return srv

    def step(self, srv: VllmServer, control: ControlClient) -> None:
        action = self.rng.choices(list(ACTIONS), weights=list(ACTIONS.values()))[0]
        if action != "turn" and not self.sessions:
            action = "turn"
        getattr(self, f"do_{action}")(srv, control)
        self.counts[action] += 1
        self.max_blob_bytes = max(self.max_blob_bytes, blob_bytes(self.store))

    def do_turn(self, srv: VllmServer, control: ControlClient) -> None:
        if self.sessions and self.rng.random() < 0.7:
            salt = self.rng.choice(list(self.sessions))
        else:
            salt = f"soak-{len(self.sessions)}"
            self.sessions[salt] = ""
        text = self.sessions[salt]
        if len(text) > 15_000:  # keep within max_model_len: start the session over
            text = ""
        turn = make_prompt(self.model, self.rng.randint(64, 700), seed=self.rng.randint(0, 10**6))
        prompt = f"{text} {turn}" if text else turn
        out = srv.complete(prompt, salt, max_tokens=8)
        self.ttft.append(out["ttft_s"])
        self.sessions[salt] = prompt + out["choices"][0]["text"]

    def fresh(self, stem: str) -> str:
        self.serial += 1
        return f"{stem}-{self.serial}"

    def continue_session(self, srv: VllmServer, salt: str) -> None:
        """Send the session's conversation again (a turn with no new user text)."""
        out = srv.complete(self.sessions[salt], salt, max_tokens=8)
        self.ttft.append(out["ttft_s"])
        self.sessions[salt] += out["choices"][0]["text"]

    def do_freeze(self, srv: VllmServer, control: ControlClient, salt: str | None = None) -> None:
        salt = salt or self.rng.choice(list(self.sessions))
        name = self.fresh("w")
        try:
            window = control.call("freeze", salt=salt, name=name)
        except CwmError as exc:
            if not self.disk_bytes or exc.code not in (
                "store_full",
                "not_durable",
                "capture_failed",
            ):
                raise
            if exc.code == "store_full":  # windows fill the budget: make room as a user would
                self.store_full += 1
                return self.do_delete(srv, control)
            # The session's blocks were evicted while it sat idle, or its capture found the
            # store full then: its next request captures them again, as the error says.
            self.evicted_sessions += 1
            self.continue_session(srv, salt)
            return self.do_freeze(srv, control, salt)
        thawed = control.call("thaw", name=name)
        assert thawed["tokens"] == window["tokens"] == len(thawed["token_ids"])
        self.windows[name] = (salt, thawed["token_ids"])

    def do_thaw(self, srv: VllmServer, control: ControlClient) -> None:
        if not self.windows:
            return self.do_freeze(srv, control)
        name = self.rng.choice(list(self.windows))
        salt, tokens = self.windows[name]
        thawed = control.call("thaw", name=name)
        assert thawed["token_ids"] == tokens and thawed["salt"] == salt
        out = srv.complete([*tokens, 100, 101, 102], salt, max_tokens=4)
        self.ttft.append(out["ttft_s"])
        return None

    def do_clone(self, srv: VllmServer, control: ControlClient) -> None:
        if not self.windows:
            return self.do_freeze(srv, control)
        src = self.rng.choice(list(self.windows))
        salt, tokens = self.windows[src]
        new_salt = f"clone-{self.serial}" if self.rng.random() < 0.5 else None
        dst = self.fresh("c")
        control.call("clone", src=src, dst=dst, salt=new_salt)
        self.windows[dst] = (new_salt or salt, tokens)
        return None

    def do_delete(self, srv: VllmServer, control: ControlClient) -> None:
        if not self.windows:
            return None
        name = self.rng.choice(list(self.windows))
        control.call("delete", name=name)
        del self.windows[name]
        try:  # a deleted name is gone: thaw must refuse it
            control.call("thaw", name=name)
        except CwmError as exc:
            assert exc.code == "window_not_found"
            self.refused += 1
        return None


def blob_bytes(store: Path) -> int:
    """Bytes of the blob files on disk."""
    return sum(p.stat().st_size for p in (store / "blobs").rglob("*.blob"))


def leak_check(store: Path) -> dict[str, Any]:
    """Blob files vs the catalog's blob rows."""
    db = sqlite3.connect(store / "catalog.sqlite")
    rows = {bytes(d).hex(): s for d, s in db.execute("SELECT digest, stored_bytes FROM blobs")}
    files = {p.stem: p.stat().st_size for p in (store / "blobs").rglob("*.blob")}
    return {
        "blob_rows": len(rows),
        "blob_files": len(files),
        "orphan_files": len(set(files) - set(rows)),
        "rows_without_file": len(set(rows) - set(files)),
        "size_mismatches": sum(1 for d in set(rows) & set(files) if rows[d] != files[d]),
        "stored_bytes": sum(files.values()),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--disk-bytes", type=parse_bytes, default=0, help="disk budget, e.g. 6MB")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/soak.json"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cwm-soak-"))
    model = build_tiny_model(work / "model")
    soak = Soak(model, work / "store", work / "logs", args.seed, int(args.disk_bytes))
    control = ControlClient(work / "store" / "control.sock")
    srv = soak.server("soak").start()
    started = time.monotonic()
    try:
        while time.monotonic() - started < args.minutes * 60:
            soak.step(srv, control)
        live = {name: control.call("status", name=name) for name in soak.windows}
    finally:
        srv.stop()
    soak_stats = read_stats(work / "store")  # the restart's server starts its counters anew
    incomplete = [n for n, st in live.items() if not st["complete"]]
    srv = soak.server("restart").start()
    restored_ok = 0
    external_hits = 0.0
    try:
        for name, (salt, tokens) in soak.windows.items():
            thawed = control.call("thaw", name=name)
            assert thawed["token_ids"] == tokens
            out = srv.complete(tokens, salt, max_tokens=1)
            # Windows of one session share a prefix: after one is restored, the next one's
            # shared blocks are vLLM's own (local) hits. Every full block must be cached.
            cached = out["usage"]["prompt_tokens_details"]["cached_tokens"]
            restored_ok += cached == (len(tokens) - 1) // BLOCK * BLOCK
        external_hits = srv.metric(HITS)
    finally:
        srv.stop()
    stats = read_stats(work / "store")
    errors = {k: stats.get(k, 0) + soak_stats.get(k, 0) for k in ERROR_COUNTERS}
    slack = 1 << 20  # one capture in flight: 64 blocks of the tiny model (16 KiB each)
    result = {
        "minutes": args.minutes,
        "actions": soak.counts,
        "sessions": len(soak.sessions),
        "live_windows": len(soak.windows),
        "incomplete_windows": incomplete,
        "restored_after_restart": restored_ok,
        "external_hit_tokens_after_restart": external_hits,
        "deleted_then_refused": soak.refused,
        "ttft_median_s": statistics.median(soak.ttft) if soak.ttft else None,
        "leak": leak_check(work / "store"),
        "disk_bytes": soak.disk_bytes,
        "captured_bytes": soak_stats.get("stored_bytes", 0),
        "traffic_over_budget": (
            round(soak_stats.get("stored_bytes", 0) / soak.disk_bytes, 2)
            if soak.disk_bytes
            else None
        ),
        "max_blob_bytes": soak.max_blob_bytes,
        "evicted_blobs": soak_stats.get("evicted_blobs", 0),
        "store_full_freezes": soak.store_full,
        "freezes_after_eviction": soak.evicted_sessions,
        "errors": errors,
        "worker_stats": stats,
    }
    ok = (
        not incomplete
        and restored_ok == len(soak.windows)
        and not any(errors.values())
        and result["leak"]["orphan_files"] == result["leak"]["rows_without_file"] == 0
        and result["leak"]["size_mismatches"] == 0
        and (not soak.disk_bytes or soak.max_blob_bytes <= soak.disk_bytes + slack)
    )
    result["ok"] = ok
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "worker_stats"}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
