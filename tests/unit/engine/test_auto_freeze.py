"""The auto-freeze policy and the window query (pure), and cwm's stats deltas for /metrics."""

from __future__ import annotations

import pytest

from cwm_connector.engine.auto_freeze import AutoFreezePolicy, AutoFreezer, surplus_windows
from cwm_connector.engine.sessions import salt_digest
from cwm_connector.errors import ConfigError, CwmError
from cwm_connector.windows.query import WindowQuery


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_threshold_cooldown_and_names() -> None:
    clock = Clock()
    policy = AutoFreezePolicy.from_mapping(
        {
            "threshold_tokens": 3000,
            "threshold_fraction": 0.5,
            "cooldown_s": 60,
            "name_pattern": "a-{salt}-{n}",
        }
    )
    auto = AutoFreezer(policy, max_model_len=8192, clock=clock)
    assert policy.enabled and policy.threshold(8192) == 3000  # the lower of the two
    assert not auto.check("s1", 2999).would_freeze
    assert auto.check("s1", 3000).would_freeze
    assert auto.claim("s1") == f"a-{salt_digest('s1')}-1"  # never the salt itself
    assert auto.check("s1", 5000).reason.startswith("in cooldown")
    assert auto.check("s2", 5000).would_freeze  # cooldown is per session
    clock.now += 61
    assert auto.check("s1", 5000).would_freeze and auto.claim("s1").endswith("-2")
    auto.release("s1")  # a failed freeze does not hold the session in cooldown
    assert auto.check("s1", 5000).would_freeze


def test_policy_updates_are_validated_and_off_by_default() -> None:
    default = AutoFreezePolicy()
    assert not default.enabled and default.threshold(4096) is None
    assert AutoFreezer(default, 4096).check("s", 10**6).reason == "auto-freeze is disabled"
    updated = default.updated({"threshold_fraction": "0.25", "tags": "mine", "keep_last": 2})
    assert updated.enabled and updated.threshold(4096) == 1024 and updated.tags == ("mine",)
    for bad in (
        {"threshold_fraction": 2},
        {"bogus": 1},
        {"keep_last": -1},
        {"name_pattern": "fixed"},
        {"enabled": True},
        {"cooldown_s": "soon"},
    ):
        with pytest.raises(ConfigError):
            default.updated(bad)


def test_keep_last_picks_the_oldest_automatic_windows() -> None:
    windows = [{"name": f"w{i}", "created": float(i), "tags": ["auto"]} for i in (3, 1, 4, 2)]
    windows.append({"name": "manual", "created": 0.0, "tags": []})
    assert surplus_windows(windows, keep_last=2) == ["w1", "w2"]
    assert surplus_windows(windows, keep_last=0) == []


def test_window_query_filters_sorts_and_pages() -> None:
    windows = [
        {"name": "a", "created": 3.0, "tokens": 10, "bytes": 5, "tags": ["x", "y"],
         "description": "Alpha run", "salt": "s1", "session": salt_digest("s1"), "model": "m1"},
        {"name": "b", "created": 1.0, "tokens": 30, "bytes": 1, "tags": ["x"],
         "description": "", "salt": "s2", "session": salt_digest("s2"), "model": "m2"},
        {"name": "c", "created": 2.0, "tokens": 20, "bytes": 9, "tags": [],
         "description": "beta", "salt": "s1", "session": salt_digest("s1"), "model": "m1"},
    ]  # fmt: skip

    def names(**query: object) -> list[str]:
        return [w["name"] for w in WindowQuery.parse(**query).apply(windows)]

    assert names() == ["a", "b", "c"]
    assert names(tags=["x"]) == ["a", "b"] and names(tags=["x", "y"]) == ["a"]
    assert names(session=salt_digest("s1")) == ["a", "c"] == names(session="s1")
    assert names(search="ALPHA") == ["a"] and names(model="m2") == ["b"]
    assert names(sort_by="tokens", sort_order="desc") == ["b", "c", "a"]
    assert names(sort_by="created", limit=2, offset=1) == ["c", "a"]
    for bad in ({"sort_by": "salt"}, {"limit": -1}, {"offset": "1"}, {"tags": [1]}):
        with pytest.raises(CwmError) as err:
            WindowQuery.parse(**bad)
        assert err.value.code == "bad_request"


def test_stats_deltas_for_vllm_metrics() -> None:
    from cwm_connector.engine.prom import CwmStats, DeltaTracker, prometheus_text

    tracker = DeltaTracker()
    assert tracker.take({"loaded_blocks": 0}) is None
    first = tracker.take({"loaded_blocks": 5, "lookups": 3})  # not an exported counter
    assert first is not None and first.data == {"loaded_blocks": 5}
    tracker.observe("thaw_seconds", 0.25)
    second = tracker.take({"loaded_blocks": 7})
    assert second is not None and second.data == {"loaded_blocks": 2, "thaw_seconds": [0.25]}
    merged = CwmStats({"loaded_blocks": 1}).aggregate(second)
    assert merged.data == {"loaded_blocks": 3, "thaw_seconds": [0.25]} and not merged.is_empty()
    assert merged.reduce() == {"loaded_blocks": 3, "thaw_seconds": 1}
    assert "cwm:loaded_blocks_total 7" in prometheus_text({"loaded_blocks": 7})
