"""benchmarks/plot.py on the committed sweep, and the demo's TTFT chart (issue 16).

Both need matplotlib, the `bench` extra that `make test` installs.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from cwm_connector.demo.plot import write_ttft_png

ROOT = Path(__file__).resolve().parents[3]
PLOT = ROOT / "benchmarks" / "plot.py"
SWEEP = ROOT / "benchmarks" / "results" / "ttft_sweep.json"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (bytes 16-24), after checking the magic."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", head
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def plot(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(PLOT), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)  # fmt: skip


def test_plot_draws_committed_sweep(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "ttft.png"
    done = plot("--in", str(SWEEP), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    assert png_size(out) == (1000, 600)
    assert out.stat().st_size > 20_000  # lines, legend and labels, not an empty canvas
    doc = json.loads(SWEEP.read_text())
    lengths = sorted(int(n) for n in doc["ttft_s"])
    assert len(lengths) >= 3 and all(len(doc["ttft_s"][str(n)]) == 6 for n in lengths)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"machine": {}, "model": {}, "ttft_s": {', "is not valid JSON"),
        ('{"machine": {}, "model": {}}', "missing object 'ttft_s'"),
        ('{"machine": {}, "model": {}, "ttft_s": {"1000": {"cold": -1}}}', "not seconds > 0"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_plot_refuses_malformed_json(tmp_path: Path, content: str, message: str) -> None:
    src, out = tmp_path / "bad.json", tmp_path / "bad.png"
    src.write_text(content)
    done = plot("--in", str(src), "--out", str(out))
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not out.exists()


def test_plot_missing_file(tmp_path: Path) -> None:
    done = plot("--in", str(tmp_path / "none.json"), "--out", str(tmp_path / "x.png"))
    assert done.returncode == 2 and "cannot read" in done.stderr, done.stderr


def test_demo_plot_writes_small_png(tmp_path: Path) -> None:
    ttfts = {"cold prefill": 0.42, "vLLM prefix hit": 0.031, "cwm thaw after restart": 0.045}
    out = write_ttft_png(ttfts, tmp_path / "logs" / "ttft.png", "3000-token prompt")
    assert out == tmp_path / "logs" / "ttft.png"
    assert png_size(out) == (640, 360)
    assert out.stat().st_size > 5_000
