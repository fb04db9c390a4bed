"""The connector against the installed vLLM's API (issue 14): no GPU, no server.

Introspects `KVConnectorBase_V1` so a vLLM release that adds an abstract hook or
changes a hook's parameters fails here, not in a user's `vllm serve`.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from pathlib import Path

import pytest
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

import cwm_connector
from cwm_connector.connector import CWMConnector


def shape(func: object) -> list[tuple[str, object]]:
    """Parameter names and kinds (annotations and defaults may differ)."""
    return [(p.name, p.kind) for p in inspect.signature(func).parameters.values()]  # type: ignore[arg-type]


def test_every_abstract_hook_is_implemented() -> None:
    abstract = set(getattr(KVConnectorBase_V1, "__abstractmethods__", ()))
    assert abstract, "the installed vLLM's base class declares abstract hooks"
    assert not getattr(CWMConnector, "__abstractmethods__", frozenset())
    for name in abstract:
        assert name in vars(CWMConnector) or any(
            name in vars(c) for c in CWMConnector.__mro__[1:] if c is not KVConnectorBase_V1
        ), name


def test_no_hook_is_overridden_with_another_signature() -> None:
    checked = []
    for name, ours in vars(CWMConnector).items():
        theirs = getattr(KVConnectorBase_V1, name, None)
        if name.startswith("__") or theirs is None or not callable(theirs):
            continue
        if isinstance(ours, classmethod | staticmethod):
            ours = ours.__func__
            theirs = getattr(theirs, "__func__", theirs)
        assert shape(ours) == shape(theirs), name
        checked.append(name)
    assert {"get_num_new_matched_tokens", "request_finished", "start_load_kv"} <= set(checked)


def test_registration_survives_a_failed_import(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tiny_model: Path
) -> None:
    real_find_spec = importlib.util.find_spec

    def broken(name: str, *args: object) -> object:
        if name == "cwm_connector.connector":
            raise ImportError("injected: cwm_connector.connector cannot be imported")
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", broken)
    monkeypatch.delitem(KVConnectorFactory._registry, "CWMConnector", raising=False)
    with caplog.at_level(logging.ERROR, logger="vllm.cwm"):
        cwm_connector.register()  # vLLM calls this with no try around it
    assert "CWMConnector" not in KVConnectorFactory._registry
    line = next(r.getMessage() for r in caplog.records if r.name == "vllm.cwm")
    assert "cwm is off" in line and "injected" in line and "vLLM" in line
    # vLLM still builds its config (a server without a connector).
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=str(tiny_model), enforce_eager=True).create_engine_config()
    assert config.kv_transfer_config is None


def test_registration_twice_is_harmless() -> None:
    cwm_connector.register()
    cwm_connector.register()
    assert "CWMConnector" in KVConnectorFactory._registry
