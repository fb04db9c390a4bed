"""Draw TTFT against prompt length, one line per source, from bench_ttft.py's JSON.

    .venv/bin/python benchmarks/plot.py [--in benchmarks/results/ttft_sweep.json]
        [--out benchmarks/results/ttft.png]

Needs matplotlib (`pip install -e '.[bench]'`); draws with the Agg backend, no display.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

WIDTH_PX, HEIGHT_PX, DPI = 1000, 600, 100
# Line order, legend label and style of each source bench_ttft.py measures.
STYLES = {
    "cold": ("cold prefill", "tab:red", "o", "-"),
    "prefix_hit": ("vLLM prefix hit (same process)", "black", "s", "--"),
    "memory": ("cwm restore: host memory (thawed)", "tab:green", "^", "-"),
    "disk_warm": ("cwm restore: disk, page cache warm", "tab:blue", "v", "-"),
    "disk_cold": ("cwm restore: disk, page cache dropped", "tab:purple", "D", "-"),
    "redis": ("cwm restore: Redis (loopback)", "tab:orange", "P", "-"),
}


class SweepError(ValueError):
    """The results file cannot be plotted (missing, not JSON, or the wrong shape)."""


def load(path: Path) -> dict[str, Any]:
    """The sweep document, checked for what the plot needs."""
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise SweepError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise SweepError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    if not isinstance(doc, dict):
        raise SweepError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    for key in ("machine", "model", "ttft_s"):
        if not isinstance(doc.get(key), dict):
            raise SweepError(f"{path}: missing object {key!r} (write it with bench_ttft.py)")
    if not doc["ttft_s"]:
        raise SweepError(f"{path}: 'ttft_s' holds no prompt length")
    for length, per in doc["ttft_s"].items():
        if not str(length).isdigit() or not isinstance(per, dict):
            raise SweepError(f"{path}: ttft_s[{length!r}] is not tokens -> {{source: seconds}}")
        for source, value in per.items():
            if not isinstance(value, int | float) or value <= 0:
                raise SweepError(f"{path}: ttft_s[{length!r}][{source!r}] is not seconds > 0")
    return doc


def title(doc: dict[str, Any]) -> str:
    """The machine and the model, for the plot's title."""
    model, host = doc["model"], doc["machine"]
    params = model.get("params")
    size = f"{params / 1e6:.1f}M params, " if isinstance(params, int | float) else ""
    what = f"{size}{model.get('layers', '?')} layers, {model.get('dtype', '?')}"
    cpu = f"{host.get('cpu', '?')}, {host.get('cores', '?')} cores"
    return f"TTFT vs prompt length: random Llama ({what}) on CPU ({cpu})"


def tokens_label(n: int) -> str:
    return f"{n / 1000:g}k" if n >= 1000 else str(n)


def seconds_label(value: float) -> str:
    return f"{value * 1000:g} ms" if value < 1 else f"{value:g} s"


def draw(doc: dict[str, Any], out: Path) -> Path:
    """Write the PNG (WIDTH_PX x HEIGHT_PX) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    lengths = sorted(int(n) for n in doc["ttft_s"])
    sources = list(STYLES) + sorted(
        {s for per in doc["ttft_s"].values() for s in per} - set(STYLES)
    )
    fig, ax = plt.subplots(figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI)
    try:
        for source in sources:
            points = [(n, doc["ttft_s"][str(n)].get(source)) for n in lengths]
            points = [(n, t) for n, t in points if t is not None]
            if not points:
                continue
            label, color, marker, line = STYLES.get(source, (source, None, "x", ":"))
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=label, color=color, marker=marker, linestyle=line)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [tokens_label(n) for n in lengths])
        ax.xaxis.set_minor_locator(NullLocator())  # only the measured lengths on x
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: seconds_label(v)))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("time to first token (log scale)")
        ax.set_title(title(doc), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper left", fontsize=9)
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=DPI, format="png")
    finally:
        plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--in", dest="src", type=Path,
                   default=Path("benchmarks/results/ttft_sweep.json"))  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/ttft.png"))
    args = p.parse_args(argv)
    try:
        doc = load(args.src)
    except SweepError as exc:
        print(f"plot.py: error: {exc}", file=sys.stderr)
        return 2
    try:
        out = draw(doc, args.out)
    except ImportError:
        print("plot.py: error: needs matplotlib: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
