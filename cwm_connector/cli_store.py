"""`cwm store du|gc|verify`: the store's upkeep commands (parser, run, human output).

They work on the store directory (`--store-dir`, default `$CWM_STORE_DIR` or
`~/.cache/cwm`), never through the control socket, so they run with vLLM down
and beside a server using the same store (store/upkeep.py says why each is safe).
With `--redis-url` (or `$CWM_REDIS_URL`) du and gc cover the Redis tier too.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from cwm_connector.errors import CwmError
from cwm_connector.store.upkeep import GC_GRACE_S

DU_ROWS = (  # label, count key, bytes key
    ("pinned", "pinned_blobs", "pinned_bytes"),
    ("cache", "cache_blobs", "cache_bytes"),
    ("orphans", "orphan_blobs", "orphan_bytes"),
    ("tmp", "tmp_files", "tmp_bytes"),
    ("quarantined", "quarantined_files", "quarantined_bytes"),
)


def add_store_commands(
    sub: Any,
    common: argparse.ArgumentParser,
    store_dir: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
) -> None:
    """Add `store du|gc|verify` to the `cwm` subparsers."""
    store_sub = sub.add_parser(
        "store", help="store upkeep: du, gc, verify (work with vLLM down or serving)"
    ).add_subparsers(dest="store_command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = store_dir(store_sub.add_parser(name, parents=[common], help=help_text))
        p.add_argument("--redis-url", default=None, help="also Redis (default: $CWM_REDIS_URL)")
        return p

    p = add("du", "bytes by tier: pinned by windows, cache, orphans; free space")
    p.add_argument("--disk-bytes", default=None, help="disk budget (default: $CWM_DISK_BYTES)")
    p.add_argument("--disk-min-free", default=None,
                   help="free space kept (default: $CWM_DISK_MIN_FREE or 0.1)")  # fmt: skip
    p = add("gc", "remove orphan blob files, dead temp files, dangling rows, Redis leftovers")
    p.add_argument("--grace", dest="grace_s", type=float, default=GC_GRACE_S, metavar="SECONDS",
                   help="keep orphan files younger than this (writes in flight)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="count, remove nothing")
    p = add("verify", "re-read every blob; report, drop and quarantine damage (exit 1)")
    p.add_argument("--dry-run", action="store_true", help="report, change nothing")


def run_store(
    args: argparse.Namespace, progress: Callable[[int, int], None]
) -> tuple[dict[str, Any], CwmError | None]:
    """The command's result, and the failure it found (damage, a Redis error) if any."""
    from cwm_connector.config import CwmConfig
    from cwm_connector.store import upkeep

    given = {
        "store_dir": None if args.store_dir is None else str(args.store_dir),
        "redis_url": args.redis_url,
        "disk_bytes": getattr(args, "disk_bytes", None),
        "disk_min_free": getattr(args, "disk_min_free", None),
    }
    cfg = CwmConfig.resolve({k: v for k, v in given.items() if v is not None})
    store = cfg.store_path
    failure: CwmError | None = None
    redis_op: Callable[[str, float], dict[str, Any]] | None = None
    if args.store_command == "du":
        disk = upkeep.disk_usage(store, cfg.disk_bytes)
        disk["min_free_bytes"] = cfg.min_free_bytes(disk["fs_total_bytes"])
        redis_op = upkeep.redis_usage
    elif args.store_command == "gc":
        disk = upkeep.collect_garbage(store, args.grace_s, args.dry_run)
        redis_op = None if args.dry_run else upkeep.redis_gc
    else:
        disk = upkeep.verify_store(store, progress, args.dry_run, skip_absent=bool(cfg.redis_url))
        if disk["damaged_blobs"]:
            done = "reported only" if args.dry_run else "rows dropped, corrupt files quarantined"
            affected = ", ".join(disk["windows_affected"]) or "none"
            failure = CwmError(
                f"{disk['damaged_blobs']} damaged blobs ({done}); windows affected: {affected}",
                code="store_damaged",
            )
    result: dict[str, Any] = {"store_dir": str(store), "disk": disk, "redis": None}
    if redis_op is not None and cfg.redis_url:
        try:
            result["redis"] = redis_op(cfg.redis_url, cfg.redis_ttl_s)  # $CWM_REDIS_TTL_S
        except CwmError as exc:
            result["redis"] = {"error": exc.to_dict()}
            failure = failure or exc
    return result, failure


def print_store(command: str, result: dict[str, Any]) -> None:
    """The result for people: a table for du, counts for gc and verify."""
    print(f"store: {result['store_dir']}")
    disk = result["disk"]
    if command == "du":
        print(f"{'DISK':<12} {'FILES':>8} {'BYTES':>12}")
        for label, count, size in DU_ROWS:
            print(f"{label:<12} {disk[count]:>8} {_size(disk[size]):>12}")
        budget = "none" if disk["budget_bytes"] is None else _size(disk["budget_bytes"])
        blobs, free, total = (_size(disk[k]) for k in ("blob_bytes", "fs_free_bytes",
                                                        "fs_total_bytes"))  # fmt: skip
        print(f"blob bytes {blobs} of budget {budget}; {disk['windows']} windows; "
              f"{disk['missing_blobs']} catalogued blobs missing")  # fmt: skip
        print(f"filesystem: {free} free of {total} (keeps {_size(disk['min_free_bytes'])} free)")
    elif command == "verify":
        checked = f"{disk['checked_blobs']} blobs ({_size(disk['checked_bytes'])})"
        print(f"checked {checked}: {disk['damaged_blobs']} damaged, "
              f"{disk['skipped_blobs']} not on this disk")  # fmt: skip
        for item in disk["damaged"]:
            print(f"  {item['digest']} {item['problem']}: {', '.join(item['windows']) or '-'}")
    else:
        for key, value in disk.items():
            print(f"{key}: {value}")
    if result.get("redis") is not None:
        print("redis: " + " ".join(f"{k}={v}" for k, v in result["redis"].items()))


def _size(num: int) -> str:
    """Bytes for people (powers of 1,024)."""
    value = float(num)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{num} B"
