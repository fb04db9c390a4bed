"""One health report for the MCP tool, the resource and `cwm health`: cwm's parts plus vLLM."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cwm_connector.errors import CwmError
from cwm_mcp.vllm_api import VllmApi


def health_report(
    call: Callable[..., Any], vllm: VllmApi, component: str | None = None
) -> dict[str, Any]:
    """{ok, components}: the connector's `health` op plus a `vllm` component (GET /health).

    A control socket that does not answer is reported as the `control_socket`
    component, not raised: health never fails for an unhealthy part. An unknown
    `component` is a `bad_request` error.
    """
    try:
        report = call("health")
        if not isinstance(report, dict):
            raise CwmError(f"health returned {type(report).__name__}", code="bad_response")
        components = dict(report.get("components") or {})
    except CwmError as exc:
        components = {"control_socket": {"ok": False, "error": exc.to_dict()}}
    components["vllm"] = vllm.health()
    if component is not None:
        if component not in components:
            raise CwmError(
                f"unknown component {component!r}; known: {sorted(components)}", code="bad_request"
            )
        components = {component: components[component]}
    ok = all(isinstance(c, dict) and bool(c.get("ok")) for c in components.values())
    return {"ok": ok, "components": components}
