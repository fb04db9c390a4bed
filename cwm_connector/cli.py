"""The `cwm` command: manage windows through the connector's control socket.

Exit codes: 0 success, 1 the operation failed (error printed), 2 bad usage,
3 no connector answers on the socket, or (thaw --warm/--continue) vLLM's HTTP
server does not (retry once vLLM is up). `cwm health` exits 1 when a component
is unhealthy, `cwm store verify` when it found damage.
With no connector, `list`, `status` and `export` read the store directory itself
(--store-dir) and say so on stderr; `cwm store du|gc|verify` always work on it.
With --json, stdout holds exactly one JSON document: the result, or
{"error": {"code", "message", "retryable"}}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cwm_connector.cli_store import add_store_commands
from cwm_connector.control.client import (
    ControlClient,
    Unavailable,
    default_socket_path,
    default_store_dir,
)
from cwm_connector.errors import CwmError
from cwm_connector.windows.offline import StoreFallbackClient

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
PROGRESS_UNITS = {"freeze": "durable blocks", "export": "blocks", "import": "steps",
                  "verify": "blobs"}  # fmt: skip
WINDOW_COLUMNS = ("name", "session", "tokens", "blocks", "bytes", "stored_bytes", "created", "tags")
SESSION_COLUMNS = ("session", "tokens", "updated", "windows")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every subcommand takes --socket and --json)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", type=Path, default=None, help="control socket path")
    common.add_argument("--json", action="store_true", help="print one JSON document")
    parser = argparse.ArgumentParser(prog="cwm", description="Durable KV-cache windows for vLLM")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_text)

    def labels(p: argparse.ArgumentParser) -> None:
        p.add_argument("--description", default="", help="free text kept with the window")
        p.add_argument("--tag", dest="tags", action="append", default=[], help="repeatable")

    def vllm_url(p: argparse.ArgumentParser) -> None:
        p.add_argument("--vllm-url", default=None, help="vLLM server (default: $CWM_VLLM_URL)")

    def store_dir(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--store-dir", type=Path, default=None,
                       help="the store read when no connector answers "
                            "(default: $CWM_STORE_DIR or ~/.cache/cwm)")  # fmt: skip
        return p

    p = add("freeze", "name a session's current state (waits until it is durable)")
    p.add_argument("salt", help="the session's cache_salt, or its digest from `cwm sessions`")
    p.add_argument("name")
    p.add_argument("--overwrite", action="store_true")
    labels(p)
    p = add("thaw", "verify a window, stage its blocks and get its tokens back")
    p.add_argument("name")
    p.add_argument("--new-salt", default=None, help="branch under this salt first (zero-copy)")
    p.add_argument("--warm", action="store_true", help="send the prefix to vLLM now")
    p.add_argument("--continue", dest="continuation", default=None, metavar="TEXT",
                   help="append TEXT and print vLLM's greedy reply")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (--continue)")
    vllm_url(p)
    p = store_dir(add("list", "list windows"))
    p.add_argument("--tag", dest="tags", action="append", default=None, help="all must match")
    p.add_argument("--model", default=None)
    p.add_argument("--session", default=None, help="a salt or its digest")
    p.add_argument("--search", default=None, help="substring of name or description")
    p.add_argument("--sort", default="name", choices=("name", "created", "tokens", "bytes"))
    p.add_argument("--desc", action="store_true", help="descending order")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--offset", type=int, default=0)
    p = store_dir(add("status", "show one window and check its blobs, or one session"))
    p.add_argument("name", nargs="?", default=None)
    p.add_argument("--session", default=None, help="a salt or its digest (instead of NAME)")
    p.add_argument("--cache-stats", action="store_true", help="add the connector's counters")
    p.add_argument("--no-lineage", action="store_true", help="leave out the clone ancestry")
    p = add("clone", "branch a window (optionally under a new salt); no tensor copy")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--salt", default=None)
    labels(p)
    add("delete", "delete a window and free blobs no other window uses").add_argument("name")
    p = store_dir(add("export", "write a window to one portable file"))
    p.add_argument("name")
    p.add_argument("file", type=Path)
    p = add("import", "load a window from an export file")
    p.add_argument("file", type=Path)
    p.add_argument("--name", default=None)
    add("stats", "hits, misses, bytes, store sizes")
    p = add("sessions", "live sessions: digest, tokens, last update, windows")
    p.add_argument("--reveal", action="store_true", help="show the salts too")
    p.add_argument("--limit", type=int, default=100)
    vllm_url(add("health", "health of the store, disk, Redis, control socket and vLLM"))
    add("metrics", "counters as JSON, or --prometheus text").add_argument(
        "--prometheus", action="store_true"
    )
    p = add("auto-freeze", "show or change the auto-freeze policy")
    on_off = p.add_mutually_exclusive_group()
    on_off.add_argument("--enable", dest="enabled", action="store_const", const=True)
    on_off.add_argument("--disable", dest="enabled", action="store_const", const=False)
    p.add_argument("--threshold-tokens", type=int, default=None)
    p.add_argument("--threshold-fraction", type=float, default=None)
    p.add_argument("--cooldown", dest="cooldown_s", type=float, default=None, metavar="SECONDS")
    p.add_argument("--keep-last", type=int, default=None)
    p.add_argument("--name-pattern", default=None, help="with {salt}, {n} or {time}")
    p.add_argument("--tag", dest="tags", action="append", default=None)
    p = add("auto-freeze-check", "would the policy freeze SESSION now? (--trigger: freeze it)")
    p.add_argument("session", help="a salt or its digest")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--trigger", action="store_true")
    p = store_dir(add("mcp", "run the MCP server (stdio, or --http PORT)"))
    p.add_argument("--http", type=int, default=None, metavar="PORT")
    p.add_argument("--host", default="127.0.0.1")
    vllm_url(p)
    p = add("demo", "the first-run demo (tiny model, restart, lossless restore)")
    p.add_argument("--model", default="")
    add_store_commands(sub, common, store_dir)
    return parser


POLICY_KEYS = ("enabled", "threshold_tokens", "threshold_fraction", "cooldown_s", "keep_last",
               "name_pattern", "tags")  # fmt: skip


def request_for(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The control op and arguments of a parsed command line."""
    cmd = args.command
    if cmd == "freeze":
        return "freeze", {"salt": args.salt, "name": args.name, "overwrite": args.overwrite,
                          "description": args.description, "tags": args.tags}  # fmt: skip
    if cmd == "thaw":
        return "thaw", {"name": args.name, "new_salt": args.new_salt}
    if cmd == "list":
        return "list", {"tags": args.tags, "model": args.model, "session": args.session,
                        "search": args.search, "sort_by": args.sort,
                        "sort_order": "desc" if args.desc else "asc",
                        "limit": args.limit, "offset": args.offset}  # fmt: skip
    if cmd == "status":
        return "status", {"name": args.name, "session": args.session,
                          "include_cache_stats": args.cache_stats,
                          "include_lineage": not args.no_lineage}  # fmt: skip
    if cmd == "delete":
        return cmd, {"name": args.name}
    if cmd == "clone":
        return "clone", {"src": args.src, "dst": args.dst, "salt": args.salt,
                         "description": args.description, "tags": args.tags}  # fmt: skip
    if cmd == "export":
        return "export", {"name": args.name, "file": str(args.file.expanduser().resolve())}
    if cmd == "import":
        return "import", {"file": str(args.file.expanduser().resolve()), "name": args.name}
    if cmd == "sessions":
        return "sessions", {"limit": args.limit, "reveal": args.reveal}
    if cmd == "metrics":
        return ("prometheus" if args.prometheus else "stats"), {}
    if cmd == "auto-freeze":
        update = {k: getattr(args, k) for k in POLICY_KEYS if getattr(args, k) is not None}
        return "auto_freeze_config", {"update": update or None}
    if cmd == "auto-freeze-check":
        return "auto_freeze_check", {"session": args.session, "tokens": args.tokens,
                                     "trigger": args.trigger}  # fmt: skip
    return cmd, {}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `cwm`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "mcp":
        from cwm_mcp.server import main as mcp_main

        mcp_args = ["--socket", str(args.socket or default_socket_path())]
        if args.vllm_url:
            mcp_args += ["--vllm-url", args.vllm_url]
        if args.http is not None:
            mcp_args += ["--http", str(args.http), "--host", args.host]
        if args.store_dir is not None:
            mcp_args += ["--store-dir", str(args.store_dir)]
        return int(mcp_main(mcp_args) or 0)
    if args.command == "demo":
        from cwm_connector.demo.run import main as demo_main

        return demo_main(["--model", args.model] if args.model else [])
    if args.command == "status" and (args.name is None) == (args.session is None):
        parser.error("status: give a window NAME or --session, not both")
    if args.command == "thaw" and args.max_tokens < 1:
        parser.error("thaw: --max-tokens must be at least 1")
    if args.command == "store":
        return run_store_command(args)
    client = StoreFallbackClient(
        ControlClient(args.socket),
        getattr(args, "store_dir", None) or default_store_dir(),
        on_offline=lambda message: print(f"cwm: {message}", file=sys.stderr),
    )
    if args.command == "health":
        return run_health(client, args)
    op, op_args = request_for(args)
    started = time.monotonic()
    try:
        with ProgressBar(op, enabled=op in PROGRESS_UNITS) as bar:
            result = client.call(op, on_progress=bar.update if bar.enabled else None, **op_args)
        if args.command == "thaw" and (args.warm or args.continuation is not None):
            result = {**result, **continue_thawed(args, result)}
    except CwmError as exc:
        return report_error(exc, args.json)
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print_human(args.command, result, time.monotonic() - started)
    return EXIT_OK


def continue_thawed(args: argparse.Namespace, thawed: dict[str, Any]) -> dict[str, Any]:
    """--warm / --continue after a thaw, through vLLM's HTTP API: {warmed, reply}."""
    from cwm_mcp.vllm_api import VllmApi, resume

    try:
        return resume(
            VllmApi(args.vllm_url),
            thawed,
            warm=args.warm,
            continuation=args.continuation,
            max_tokens=args.max_tokens,
        )
    except CwmError as exc:
        message = f"window {thawed.get('name')!r} is thawed (salt {thawed.get('salt')!r}) but "
        raise CwmError(message + exc.message, code=exc.code, retryable=exc.retryable) from exc


def run_store_command(args: argparse.Namespace) -> int:
    """`cwm store du|gc|verify`: 0 when done, 1 when verify found damage or a tier failed."""
    from cwm_connector.cli_store import print_store, run_store

    try:
        with ProgressBar("verify", enabled=args.store_command == "verify") as bar:
            result, failure = run_store(args, bar.update)
    except CwmError as exc:
        return report_error(exc, args.json)
    if failure is not None:
        result = {**result, "error": failure.to_dict()}
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print_store(args.store_command, result)
        if failure is not None:
            print(f"cwm: error {failure.code}: {failure.message}", file=sys.stderr)
    return EXIT_OK if failure is None else EXIT_FAILED


def run_health(client: StoreFallbackClient, args: argparse.Namespace) -> int:
    """`cwm health`: 0 when every component is ok, 1 when one is not, 3 without a connector."""
    from cwm_mcp.health import health_report
    from cwm_mcp.vllm_api import VllmApi

    report = health_report(client.call, VllmApi(args.vllm_url))
    failing = [name for name, c in report["components"].items() if not c.get("ok")]
    if args.json:
        if failing:
            error = CwmError(f"unhealthy: {', '.join(failing)}", code="unhealthy", retryable=True)
            report = {**report, "error": error.to_dict()}
        print(json.dumps(report, default=str))
    else:
        for name, component in report["components"].items():
            details = {k: v for k, v in component.items() if k != "ok"}
            print(f"{name:<15} {'ok' if component.get('ok') else 'FAIL':<5} {_cell(details)}")
    if not failing:
        return EXIT_OK
    control_error = report["components"].get("control_socket", {}).get("error") or {}
    return EXIT_UNAVAILABLE if control_error.get("code") == Unavailable.code else EXIT_FAILED


class ProgressBar:
    """A progress bar on stderr for long ops; silent when stderr is not a terminal."""

    def __init__(self, op: str, enabled: bool):
        self.op = op
        self.enabled = enabled
        self._bar: Any = None

    def update(self, done: int, total: int) -> None:
        """Move the bar to done/total."""
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, desc=self.op, unit=f" {PROGRESS_UNITS[self.op]}", file=sys.stderr,
                disable=None, leave=False,
            )  # fmt: skip
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()


def report_error(exc: CwmError, as_json: bool) -> int:
    """Print an error the way the mode asks; return the exit code."""
    if as_json:
        print(json.dumps({"error": exc.to_dict()}))
    else:
        hint = " (retryable)" if exc.retryable else ""
        print(f"cwm: error {exc.code}{hint}: {exc.message}", file=sys.stderr)
    unreachable = isinstance(exc, Unavailable) or (exc.code == "vllm_unavailable" and exc.retryable)
    return EXIT_UNAVAILABLE if unreachable else EXIT_FAILED


def print_human(command: str, result: Any, elapsed_s: float) -> None:
    """Tables and short lines for people."""
    if command == "list":
        print_table(result, WINDOW_COLUMNS, "(no windows)")
    elif command == "sessions":
        columns = SESSION_COLUMNS + (("salt",) if any("salt" in r for r in result) else ())
        print_table(result, columns, "(no sessions)")
    elif command == "metrics" and isinstance(result, dict) and "text" in result:
        print(result["text"], end="" if str(result["text"]).endswith("\n") else "\n")
    elif command == "auto-freeze" and isinstance(result, dict):
        for key, value in result.items():
            print(f"{key}: {_cell(value) if isinstance(value, list) else value}")
    elif command == "auto-freeze-check" and isinstance(result, dict):
        verdict = "would freeze" if result.get("would_freeze") else "would not freeze"
        print(f"session {result.get('session')}: {verdict} ({result.get('reason')})")
        if result.get("window"):
            print_table([result["window"]], WINDOW_COLUMNS, "")
    elif isinstance(result, dict) and "tokens" in result and "blocks" in result:
        print_table([result], WINDOW_COLUMNS, "")
        if command == "thaw":
            print_thaw(result, elapsed_s)
        if command == "status":
            state = "complete" if result.get("complete") else f"{result['damaged_blobs']} damaged"
            print(f"blobs: {state}")
    else:
        print(json.dumps(result, indent=2, default=str))


def print_thaw(result: dict[str, Any], elapsed_s: float) -> None:
    """What a thaw did, and vLLM's reply when --continue was given."""
    print(f"thawed {result['tokens']} tokens in {elapsed_s:.2f}s; resend them with salt")
    print(f"  {result['salt']!r} and your continuation to reuse the KV cache.")
    if result.get("warmed"):
        print("warmed: the prefix was sent to vLLM")
    reply = result.get("reply")
    if reply:
        print(f"reply ({reply.get('finish_reason')}): {reply.get('text')}")


def print_table(rows: list[dict[str, Any]], columns: Sequence[str], empty: str) -> None:
    """A fixed-width table of dicts."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    if not cells and empty:
        print(empty)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return " ".join(f"{k}={_cell(v)}" for k, v in value.items())
    return "" if value is None else str(value)


if __name__ == "__main__":
    sys.exit(main())
