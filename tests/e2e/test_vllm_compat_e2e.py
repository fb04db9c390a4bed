"""cwm never breaks vLLM (issue 14), on real `vllm serve` processes on the CPU.

A fault is injected the only way a user would meet it: cwm's connector module
cannot be imported (a sitecustomize on PYTHONPATH makes its import fail, as an
incompatible vLLM or a broken install would).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_tools import server

from cwm_connector.demo.vllm_process import VllmServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

BREAK_IMPORT = '''
import importlib.abc
import sys


class _BreakCwmConnector(importlib.abc.MetaPathFinder):
    """Test fault: cwm_connector.connector cannot be imported in this process."""

    def find_spec(self, name, path=None, target=None):
        if name == "cwm_connector.connector":
            raise ImportError("injected: cwm_connector.connector is broken")
        return None


sys.meta_path.insert(0, _BreakCwmConnector())
'''


def broken_env(tmp_path: Path) -> dict[str, str]:
    folder = tmp_path / "fault"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(BREAK_IMPORT)
    return {"PYTHONPATH": str(folder)}


def test_a_broken_cwm_never_stops_vllm(tiny_model: Path, tmp_path: Path) -> None:
    env = broken_env(tmp_path)
    plain = VllmServer(str(tiny_model), tmp_path / "plain.log", env=env).start()
    try:  # no connector configured: vLLM starts and serves, cwm says it is off
        reply = plain.complete("hello there", salt=None, max_tokens=4)
        assert reply["usage"]["completion_tokens"] == 4
    finally:
        plain.stop()
    log = (tmp_path / "plain.log").read_text()
    assert "cwm: could not register CWMConnector" in log and "injected" in log
    assert "cwm is off" in log

    configured = server(tiny_model, tmp_path / "store", tmp_path, "configured")
    configured.env = env
    with pytest.raises(RuntimeError, match="vLLM exited"):
        configured.start()  # a configured connector that cannot load is an error...
    log = (tmp_path / "configured.log").read_text()
    # ...that names cwm and the cause.
    assert "cwm: could not register CWMConnector" in log and "injected" in log


def test_a_config_typo_is_named_with_the_closest_key(tiny_model: Path, tmp_path: Path) -> None:
    srv = server(tiny_model, tmp_path / "store", tmp_path, "typo", disk_byte=1 << 20)
    srv.env = {"CWM_MEMORY_BYTE": "1000"}
    srv.start()
    try:
        assert srv.complete("hello there", salt="s", max_tokens=2)["usage"]["completion_tokens"]
    finally:
        srv.stop()
    log = (tmp_path / "typo.log").read_text()
    assert "unknown kv_connector_extra_config key 'disk_byte'; did you mean 'disk_bytes'?" in log
    assert "unknown environment variable CWM_MEMORY_BYTE; did you mean 'CWM_MEMORY_BYTES'?" in log
