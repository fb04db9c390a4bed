"""Layer-by-layer loads on the CPU: each layer's wait sees its blocks; errors never hang."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from test_worker import LAYOUTS, make_caches, make_worker, wait_report

from cwm_connector.config import CwmConfig
from cwm_connector.engine.plans import CaptureJob, LoadJob, StageJob, StepPlan
from cwm_connector.engine.worker import CwmWorker
from cwm_connector.errors import ConfigError

HASHES = [b"h1", b"h2", b"h3"]
SOURCE_BLOCKS = [3, 5, 7]
TARGET_BLOCKS = [10, 11, 12]


def staged_reader(tmp_path: Path, **cfg: object) -> tuple[dict, dict, CwmWorker]:
    """Capture three blocks with one worker; a second (fresh caches) stages them as job 7."""
    source = make_caches(LAYOUTS["cpu"], seed=1)
    writer = make_worker(tmp_path, source)
    writer.submit(StepPlan(captures=[CaptureJob("req", SOURCE_BLOCKS, HASHES)]))
    wait_report(writer, lambda r: set(r.stored) == set(HASHES))
    writer.shutdown()
    target = make_caches(LAYOUTS["cpu"], seed=2)
    reader = make_worker(tmp_path, target, **cfg)
    reader.submit(StepPlan(stages=[StageJob(7, HASHES)]))
    wait_report(reader, lambda r: 7 in r.staged)
    return source, target, reader


def layer_restored(source: dict, target: dict, name: str) -> bool:
    return all(
        torch.equal(target[name][dst], source[name][src])
        for src, dst in zip(SOURCE_BLOCKS, TARGET_BLOCKS, strict=True)
    )


def test_each_layer_wait_sees_that_layer_restored(tmp_path: Path) -> None:
    source, target, reader = staged_reader(tmp_path, verify_restore=True)
    names = list(target)
    assert not any(layer_restored(source, target, n) for n in names)
    reader.submit(StepPlan(loads=[LoadJob("r", 7, TARGET_BLOCKS)]), by_layer=True)
    for name in names:  # as vLLM's attention layers ask, in order
        reader.wait_for_layer(name)
        assert layer_restored(source, target, name), name
    assert reader.take_load_errors() == set()
    stats = reader.stats.snapshot()
    assert stats["loaded_blocks"] == 3 and stats["restore_verified_blocks"] == 3
    assert stats["layer_load_waits"] == len(names)
    reader.shutdown()


def test_unknown_layer_name_waits_for_every_layer(tmp_path: Path) -> None:
    source, target, reader = staged_reader(tmp_path)
    reader.submit(StepPlan(loads=[LoadJob("r", 7, TARGET_BLOCKS)]), by_layer=True)
    reader.wait_for_layer("model.layers.99.shared_kv")
    assert all(layer_restored(source, target, n) for n in target)
    reader.shutdown()


def test_layer_never_asked_is_complete_after_the_step(tmp_path: Path) -> None:
    source, target, reader = staged_reader(tmp_path)
    reader.submit(StepPlan(loads=[LoadJob("r", 7, TARGET_BLOCKS)]), by_layer=True)
    assert reader.take_load_errors() == set()  # the end of the step, no layer asked
    assert all(layer_restored(source, target, n) for n in target)
    reader.shutdown()


def test_scatter_failure_mid_load_reports_every_block_and_never_hangs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, target, reader = staged_reader(tmp_path)
    real = reader.layout.scatter

    def failing(block_ids, src, stream=None, layers=None):  # the injected fault
        if layers == [1]:
            raise RuntimeError("device lost")
        return real(block_ids, src, stream, layers)

    monkeypatch.setattr(reader.layout, "scatter", failing)
    reader.submit(StepPlan(loads=[LoadJob("r", 7, TARGET_BLOCKS)]), by_layer=True)
    started = time.monotonic()
    for name in target:
        reader.wait_for_layer(name)
    assert time.monotonic() - started < 5
    assert reader.take_load_errors() == set(TARGET_BLOCKS)  # vLLM recomputes them
    assert reader.stats.snapshot()["load_errors"] == 3
    reader.shutdown()


def test_two_requests_in_one_step_load_layer_by_layer(tmp_path: Path) -> None:
    source, target, reader = staged_reader(tmp_path)
    reader.submit(StepPlan(stages=[StageJob(8, HASHES[:2])]))
    wait_report(reader, lambda r: 8 in r.staged)
    loads = [LoadJob("a", 7, TARGET_BLOCKS), LoadJob("b", 8, [13, 14])]
    reader.submit(StepPlan(loads=loads), by_layer=True)
    for name in target:
        reader.wait_for_layer(name)
        assert layer_restored(source, target, name)
        assert torch.equal(target[name][14], source[name][SOURCE_BLOCKS[1]])
    assert reader.take_load_errors() == set()
    reader.shutdown()


@pytest.mark.parametrize(("raw", "mode"), [(True, "on"), ("false", "off"), ("AUTO", "auto")])
def test_layerwise_load_setting_reads_booleans_and_names(raw: object, mode: str) -> None:
    assert CwmConfig.resolve({"layerwise_load": raw}).layerwise_load == mode


def test_layerwise_load_setting_refuses_other_values() -> None:
    with pytest.raises(ConfigError, match="layerwise_load"):
        CwmConfig.resolve({"layerwise_load": "sometimes"})
