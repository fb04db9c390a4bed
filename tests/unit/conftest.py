"""Fixtures shared by the MCP and CLI unit tests: a fake connector and a fake vLLM."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from mcp_fakes import FakeConnector, FakeVllm

from cwm_connector.control.server import ControlServer


@pytest.fixture
def connector() -> Iterator[tuple[Path, FakeConnector]]:
    """A live ControlServer on a short /tmp socket path, served by a FakeConnector."""
    tmp = Path(tempfile.mkdtemp(prefix="cwm-mcp-", dir="/tmp"))
    path = tmp / "c.sock"
    fake = FakeConnector()
    server = ControlServer(path, fake.handle)
    server.start()
    try:
        yield path, fake
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def vllm() -> Iterator[FakeVllm]:
    """A fake vLLM HTTP server on a loopback port."""
    with FakeVllm() as fake:
        yield fake
