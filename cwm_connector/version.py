"""Versions: cwm's own, in a module of its own so any part can read it without a cycle,
and the installed vLLM's (for log lines; never a dependency)."""

__version__ = "0.1.0"


def vllm_version() -> str:
    """The installed vLLM's version, or 'unknown' (never raises)."""
    try:
        from vllm import __version__ as version

        return str(version)
    except Exception:
        return "unknown"
