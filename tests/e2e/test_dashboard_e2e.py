"""The Grafana dashboard (examples/grafana/cwm.json) against a real server's `/metrics`.

A salted session is captured and frozen on server A; server B (a restart on the same store)
thaws the window, restores the session and freezes it again, so hits, loads, the disk
gauges (`disk_bytes` set) and both latency histograms have samples. Every metric name in
every panel's PromQL must then be a sample name that server B really exposes, and every
cwm metric it exposes must be on the dashboard.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from e2e_tools import BLOCK, EXTERNAL_HITS, cwm, metric_at_least, server

from cwm_connector.demo.tiny_model import make_prompt

DASHBOARD = Path(__file__).resolve().parents[2] / "examples" / "grafana" / "cwm.json"
# A metric name in PromQL: an identifier holding a colon (vllm:..., cwm:...); label names
# and functions hold none, and a subquery's `[5m:1m]` starts with a digit.
METRIC = re.compile(r"(?<![\w:])([A-Za-z_]\w*:[\w:]+)")
SUFFIXES = re.compile(r"_(total|created|bucket|sum|count)$")
# The topics: each needs one panel whose queries read all of these metrics.
TOPICS = {
    "external hit rate": {"vllm:external_prefix_cache_hits_total",
                          "vllm:external_prefix_cache_queries_total"},
    "blocks loaded per tier": {"cwm:memory_hit_blocks_total", "cwm:disk_hit_blocks_total",
                               "cwm:redis_hit_blocks_total"},
    "bytes loaded and stored": {"cwm:loaded_bytes_total", "cwm:stored_bytes_total"},
    "load errors and recomputes": {"cwm:load_errors_total", "cwm:stage_timeouts_total"},
    "store bytes against the budget": {"cwm:disk_used_bytes", "cwm:disk_pinned_bytes",
                                       "cwm:disk_limit_bytes"},
    "evictions": {"cwm:evicted_blobs_total", "cwm:evicted_bytes_total"},
    "freeze latency": {"cwm:freeze_seconds_bucket"},
    "thaw latency": {"cwm:thaw_seconds_bucket"},
    "auto-freezes": {"cwm:auto_freezes_total", "cwm:auto_freeze_store_full_total"},
}  # fmt: skip


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def panel_metrics(panel: dict[str, Any]) -> set[str]:
    """The metric names a panel's PromQL queries read."""
    return {m for t in panel.get("targets", []) for m in METRIC.findall(t.get("expr", ""))}


def family(name: str) -> str:
    """A sample name without its _total, _created, _bucket, _sum or _count suffix."""
    return SUFFIXES.sub("", name)


def exposed(metrics_text: str) -> set[str]:
    """The sample names in a Prometheus text exposition."""
    names = set()
    for line in metrics_text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_shape_and_topics(dashboard: dict[str, Any]) -> None:
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "model_name" in variables and variables["model_name"]["type"] == "query"
    every = list(panels(dashboard["panels"]))
    assert len({p["id"] for p in every}) == len(every)  # Grafana needs distinct panel ids
    graphs = [p for p in every if p["type"] != "row"]
    for panel in graphs:
        assert panel["title"] and panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert '{model_name="$model_name"}' in target["expr"], (panel["title"], target)
    for topic, wanted in TOPICS.items():
        assert any(wanted <= panel_metrics(p) for p in graphs), f"no panel for {topic}: {wanted}"


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_dashboard_metrics_exist_on_real_server(
    dashboard: dict[str, Any], tiny_model: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    sock = store / "control.sock"
    prompt = make_prompt(tiny_model, 8 * BLOCK, seed=16)
    budget = {"disk_bytes": 256 << 20}  # the disk gauges are exported with a budget
    srv = server(tiny_model, store, tmp_path, "A", **budget).start()
    try:
        srv.complete(prompt, salt="dash", max_tokens=2)
        metric_at_least(srv, "cwm:captured_blocks_total", 8)
        code, window = cwm(sock, "freeze", "dash", "w-dash")
        assert code == 0 and window["blocks"] == 8, window
    finally:
        srv.stop()
    srv = server(tiny_model, store, tmp_path, "B", **budget).start()
    try:
        code, thawed = cwm(sock, "thaw", "w-dash")
        assert code == 0, thawed
        srv.complete(prompt, salt="dash", max_tokens=2)  # restored from the thawed window
        metric_at_least(srv, EXTERNAL_HITS, 8 * BLOCK)
        assert cwm(sock, "freeze", "dash", "w-dash-2")[0] == 0
        metric_at_least(srv, "cwm:thaw_seconds_count", 1)
        metric_at_least(srv, "cwm:freeze_seconds_count", 1)
        metric_at_least(srv, "cwm:loaded_blocks_total", 8)
        metric_at_least(srv, "cwm:disk_limit_bytes", 1)
        text = requests.get(srv.url + "/metrics", timeout=10).text
    finally:
        srv.stop()
    names = exposed(text)
    graphs = [p for p in panels(dashboard["panels"]) if p["type"] != "row"]
    used = set().union(*(panel_metrics(p) for p in graphs))
    missing = sorted(used - names)
    assert not missing, f"dashboard metrics not in /metrics: {missing}"
    cwm_exported = {family(n) for n in names if n.startswith("cwm:")}
    assert len(cwm_exported) >= 20, cwm_exported  # cwm's counters, gauges and histograms
    not_shown = sorted(cwm_exported - {family(n) for n in used})
    assert not not_shown, f"cwm metrics with no panel: {not_shown}"
