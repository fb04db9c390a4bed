"""cwm: durable, lossless KV-cache windows for vLLM.

`CWMConnector` is imported lazily so that the CLI and the MCP server work
without vLLM installed; vLLM imports it through `kv_connector_module_path`
("cwm_connector") or through the `vllm.general_plugins` entry point.
"""

from __future__ import annotations

from typing import Any

from cwm_connector.version import __version__

__all__ = ["CWMConnector", "__version__", "register"]

CONNECTOR_NAME = "CWMConnector"


def register() -> None:
    """vLLM general plugin: make `"kv_connector":"CWMConnector"` resolvable by name."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(
            CONNECTOR_NAME, "cwm_connector.connector", CONNECTOR_NAME
        )


def __getattr__(name: str) -> Any:
    if name == CONNECTOR_NAME:
        from cwm_connector.connector import CWMConnector

        return CWMConnector
    raise AttributeError(name)
