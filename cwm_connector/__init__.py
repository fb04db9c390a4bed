"""cwm: durable, lossless KV-cache windows for vLLM.

`CWMConnector` is imported lazily so that the CLI and the MCP server work
without vLLM installed; vLLM imports it through `kv_connector_module_path`
("cwm_connector") or through the `vllm.general_plugins` entry point.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from cwm_connector.version import __version__, vllm_version

__all__ = ["CWMConnector", "__version__", "register"]

CONNECTOR_NAME = "CWMConnector"
CONNECTOR_MODULE = "cwm_connector.connector"


def register() -> None:
    """vLLM general plugin: make `"kv_connector":"CWMConnector"` resolvable by name.

    vLLM calls every plugin with no try around it, so a plugin that raises stops every
    `vllm serve` on the host (issue 14): any failure here is one log line, and vLLM
    serves on without cwm.
    """
    try:
        _register()
    except Exception as exc:
        logging.getLogger("vllm.cwm").error(
            "cwm: could not register %s with vLLM %s (%s: %s); cwm is off and vLLM serves "
            "without it",
            CONNECTOR_NAME,
            vllm_version(),
            type(exc).__name__,
            exc,
        )


def _register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    # Find the module now (cheap: nothing is executed) so a broken install is named here.
    if importlib.util.find_spec(CONNECTOR_MODULE) is None:
        raise ImportError(f"{CONNECTOR_MODULE} not found")
    registry = getattr(KVConnectorFactory, "_registry", None)  # private: read only if there
    if isinstance(registry, dict) and CONNECTOR_NAME in registry:
        return
    try:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)
    except ValueError as exc:  # registered already (a second call in one process)
        if "already" not in str(exc):
            raise


def __getattr__(name: str) -> Any:
    if name == CONNECTOR_NAME:
        from cwm_connector.connector import CWMConnector

        return CWMConnector
    raise AttributeError(name)
