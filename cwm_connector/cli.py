"""The `cwm` command: manage windows through the connector's control socket.

Exit codes: 0 success, 1 the operation failed (error printed), 2 bad usage,
3 no connector answers on the socket (retry once vLLM is up).
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

from cwm_connector.client import ControlClient, Unavailable, default_socket_path
from cwm_connector.errors import CwmError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
PROGRESS_UNITS = {"freeze": "durable blocks", "export": "blocks", "import": "steps"}
WINDOW_COLUMNS = ("name", "session", "tokens", "blocks", "bytes", "stored_bytes", "created")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every subcommand takes --socket and --json)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", type=Path, default=None, help="control socket path")
    common.add_argument("--json", action="store_true", help="print one JSON document")
    parser = argparse.ArgumentParser(prog="cwm", description="Durable KV-cache windows for vLLM")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_text)

    p = add("freeze", "name a session's current state (waits until it is durable)")
    p.add_argument("salt")
    p.add_argument("name")
    p.add_argument("--overwrite", action="store_true")
    add("thaw", "verify a window and get its tokens back").add_argument("name")
    add("list", "list windows")
    add("status", "show one window and check its blobs").add_argument("name")
    p = add("clone", "branch a window (optionally under a new salt); no tensor copy")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--salt", default=None)
    add("delete", "delete a window and free blobs no other window uses").add_argument("name")
    p = add("export", "write a window to one portable file")
    p.add_argument("name")
    p.add_argument("file", type=Path)
    p = add("import", "load a window from an export file")
    p.add_argument("file", type=Path)
    p.add_argument("--name", default=None)
    add("stats", "hits, misses, bytes, store sizes")
    p = add("mcp", "run the MCP server (stdio, or --http PORT)")
    p.add_argument("--http", type=int, default=None, metavar="PORT")
    p.add_argument("--host", default="127.0.0.1")
    p = add("demo", "the first-run demo (tiny model, restart, lossless restore)")
    p.add_argument("--model", default="")
    return parser


def request_for(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The control op and arguments of a parsed command line."""
    cmd = args.command
    if cmd == "freeze":
        return "freeze", {"salt": args.salt, "name": args.name, "overwrite": args.overwrite}
    if cmd in ("thaw", "status", "delete"):
        return cmd, {"name": args.name}
    if cmd == "clone":
        return "clone", {"src": args.src, "dst": args.dst, "salt": args.salt}
    if cmd == "export":
        return "export", {"name": args.name, "file": str(args.file.expanduser().resolve())}
    if cmd == "import":
        return "import", {"file": str(args.file.expanduser().resolve()), "name": args.name}
    return cmd, {}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `cwm`."""
    args = build_parser().parse_args(argv)
    if args.command == "mcp":
        from cwm_mcp.server import main as mcp_main

        mcp_args = ["--socket", str(args.socket or default_socket_path())]
        if args.http is not None:
            mcp_args += ["--http", str(args.http), "--host", args.host]
        return int(mcp_main(mcp_args) or 0)
    if args.command == "demo":
        from cwm_connector.demo import main as demo_main

        return demo_main(["--model", args.model] if args.model else [])
    op, op_args = request_for(args)
    client = ControlClient(args.socket)
    started = time.monotonic()
    try:
        with ProgressBar(op, enabled=op in PROGRESS_UNITS) as bar:
            result = client.call(op, on_progress=bar.update if bar.enabled else None, **op_args)
    except CwmError as exc:
        return report_error(exc, args.json)
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print_human(args.command, result, time.monotonic() - started)
    return EXIT_OK


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
    return EXIT_UNAVAILABLE if isinstance(exc, Unavailable) else EXIT_FAILED


def print_human(command: str, result: Any, elapsed_s: float) -> None:
    """Tables and short lines for people."""
    if command == "list":
        print_table(result)
    elif isinstance(result, dict) and "tokens" in result and "blocks" in result:
        print_table([result])
        if command == "thaw":
            print(f"thawed {result['tokens']} tokens in {elapsed_s:.2f}s; resend them with salt")
            print(f"  {result['salt']!r} and your continuation to reuse the KV cache.")
        if command == "status":
            state = "complete" if result.get("complete") else f"{result['damaged_blobs']} damaged"
            print(f"blobs: {state}")
    else:
        print(json.dumps(result, indent=2, default=str))


def print_table(windows: list[dict[str, Any]]) -> None:
    """A fixed-width table of windows."""
    rows = [[_cell(w.get(c)) for c in WINDOW_COLUMNS] for w in windows]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(WINDOW_COLUMNS)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(WINDOW_COLUMNS, widths, strict=True)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    if not rows:
        print("(no windows)")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
