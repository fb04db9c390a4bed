"""The demo's three TTFTs as a small bar chart (PNG); matplotlib is optional (`cwm[bench]`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

WIDTH_PX, HEIGHT_PX, DPI = 640, 360, 100
COLORS = ("tab:red", "black", "tab:green")  # cold, prefix hit, thaw: as in benchmarks/plot.py


def write_ttft_png(ttft_s: Mapping[str, float], out: Path, title: str = "") -> Path:
    """Draw one bar per (label, seconds) in order, in milliseconds; return the PNG's path.

    Raises ImportError when matplotlib is missing (the caller says so and goes on).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values = list(ttft_s), [1000 * v for v in ttft_s.values()]
    fig, ax = plt.subplots(figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI)
    try:
        colors = [COLORS[i % len(COLORS)] for i in range(len(labels))]
        bars = ax.bar(labels, values, color=colors)
        ax.bar_label(bars, labels=[f"{v:.0f} ms" for v in values], padding=2)
        ax.set_ylabel("time to first token (ms)")
        ax.set_ylim(0, max(values, default=1) * 1.18)  # room for the labels above the bars
        ax.set_title(title or "cwm demo: time to first token", fontsize=10)
        ax.tick_params(axis="x", labelsize=9)
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=DPI, format="png")
    finally:
        plt.close(fig)
    return out
