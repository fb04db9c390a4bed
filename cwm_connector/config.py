"""Connector settings: `kv_connector_extra_config` keys, each overridable by `CWM_<KEY>`."""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cwm_connector.errors import ConfigError

CAPTURE_MODES = ("salted", "all", "off")
LAYERWISE_MODES = ("auto", "on", "off")
COMPRESSIONS = ("zstd", "none")
# CWM_* variables that belong to other parts (native build, the MCP server), not to the config.
OTHER_ENV = ("CWM_BUILD_EXT", "CWM_VLLM_URL", "CWM_VLLM_API_KEY")


@dataclass(frozen=True, slots=True)
class CwmConfig:
    """Resolved settings. Precedence: extra-config value, then `CWM_<KEY>`, then default."""

    store_dir: str = "~/.cache/cwm"
    memory_bytes: int = 2 << 30  # host-memory tier budget (and staged-blocks budget), bytes
    redis_url: str = ""
    compression: str = "none"
    control_socket: str = ""  # default: <store_dir>/control.sock
    capture: str = "salted"
    verify_restore: bool = False  # re-read restored blocks and compare digests (tests)
    stage_timeout_s: float = 10.0  # give up staging a request's blocks after this
    copy_backend: str = "auto"  # KV block copies: auto | triton | torch | native (KVLayout checks)
    thaw_pin_s: float = 600.0  # a thawed window's staged blocks are held this long
    auto_freeze: str = ""  # JSON object of AutoFreezePolicy fields (a map in extra config)
    layerwise_load: str = "auto"  # restore layer by layer (wait_for_layer_load): auto | on | off
    disk_bytes: int = 0  # cap on the disk tier's blob bytes; 0 = none (issue 15)
    disk_min_free: float = 0.1  # free space always left on the store's filesystem: < 1 a
    # fraction of the filesystem, >= 1 bytes
    redis_ttl_s: float = 604_800.0  # Redis blocks no window pins expire after this (a week)

    def __post_init__(self) -> None:
        if self.capture not in CAPTURE_MODES:
            raise ConfigError(f"capture must be one of {CAPTURE_MODES}, got {self.capture!r}")
        if self.compression not in COMPRESSIONS:
            raise ConfigError(
                f"compression must be one of {COMPRESSIONS}, got {self.compression!r}"
            )
        if self.layerwise_load not in LAYERWISE_MODES:
            raise ConfigError(
                f"layerwise_load must be one of {LAYERWISE_MODES}, got {self.layerwise_load!r}"
            )
        if self.memory_bytes <= 0:
            raise ConfigError("memory_bytes must be positive")
        if self.stage_timeout_s <= 0:
            raise ConfigError("stage_timeout_s must be positive")
        if self.thaw_pin_s < 0:
            raise ConfigError("thaw_pin_s must not be negative")
        if self.disk_bytes < 0:
            raise ConfigError("disk_bytes must not be negative (0: no cap)")
        if self.disk_min_free < 0:
            raise ConfigError("disk_min_free must not be negative (bytes, or a fraction < 1)")
        if self.redis_ttl_s <= 0:
            raise ConfigError("redis_ttl_s must be positive")

    def min_free_bytes(self, filesystem_bytes: int) -> int:
        """The free space the store leaves on a filesystem of this size."""
        if self.disk_min_free < 1:
            return int(self.disk_min_free * filesystem_bytes)
        return int(self.disk_min_free)

    @property
    def auto_freeze_policy(self) -> dict[str, Any]:
        """The auto_freeze map (empty: the default policy, off)."""
        return dict(json.loads(self.auto_freeze)) if self.auto_freeze else {}

    @property
    def store_path(self) -> Path:
        """The store directory, user-expanded."""
        return Path(os.path.expanduser(self.store_dir))

    @property
    def control_socket_path(self) -> Path:
        """The control socket path, defaulting inside the store."""
        if self.control_socket:
            return Path(os.path.expanduser(self.control_socket))
        return self.store_path / "control.sock"

    def worker_socket_path(self, rank: int) -> Path:
        """The socket on which the worker of this TP rank takes prestage requests."""
        path = self.control_socket_path
        return path.with_name(f"{path.name}.rank{rank}")

    @classmethod
    def resolve(
        cls, extra: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
    ) -> CwmConfig:
        """Build settings from an extra-config mapping and the environment."""
        extra = dict(extra or {})
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            env_key = f"CWM_{f.name.upper()}"
            if f.name in extra:
                raw = extra.pop(f.name)
            elif env_key in env:
                raw = env[env_key]
            else:
                continue
            values[f.name] = _coerce(f.name, raw, f.type)
        return cls(**values)


def config_warnings(
    extra: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> list[str]:
    """One sentence per unknown extra-config key or `CWM_*` variable, with the closest
    known key (issue 14: typos caught)."""
    env = os.environ if env is None else env
    known = [f.name for f in fields(CwmConfig)]
    out = []
    for key in sorted(extra or {}):
        if key not in known:
            suggestion = _closest(key, known)
            out.append(f"unknown kv_connector_extra_config key {key!r}{suggestion}")
    env_known = {f"CWM_{k.upper()}" for k in known} | set(OTHER_ENV)
    for var in sorted(v for v in env if v.startswith("CWM_") and v not in env_known):
        names = [f"CWM_{k.upper()}" for k in known]
        out.append(f"unknown environment variable {var}{_closest(var, names)}")
    return out


def _closest(key: str, known: list[str]) -> str:
    match = difflib.get_close_matches(key.lower(), [k.lower() for k in known], n=1, cutoff=0.5)
    if not match:
        return f" (known: {', '.join(known)})"
    return f"; did you mean {known[[k.lower() for k in known].index(match[0])]!r}?"


def _coerce(name: str, raw: Any, type_name: Any) -> Any:
    """Turn an env string or JSON value into the field's type, or raise ConfigError."""
    kind = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", "")
    try:
        if name == "auto_freeze":  # a map in the extra config, JSON in CWM_AUTO_FREEZE
            value = raw if isinstance(raw, dict) else json.loads(str(raw) or "{}")
            if not isinstance(value, dict):
                raise ValueError(raw)
            return json.dumps(value, sort_keys=True)
        if name == "layerwise_load":  # also a JSON or env boolean
            text = str(raw).strip().lower()
            return {"true": "on", "1": "on", "false": "off", "0": "off"}.get(text, text)
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(parse_bytes(raw))
        if kind == "float":
            return float(parse_bytes(raw)) if name == "disk_min_free" else float(raw)
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: cannot read {raw!r} as {kind}") from exc


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(raw: Any) -> int | float:
    """An int, or a size such as `64MB`, `2G`, `512KiB` (powers of 1,024); a bare fraction
    (`0.1`) stays a float. Raises ValueError."""
    if isinstance(raw, bool):
        raise ValueError(raw)
    if isinstance(raw, int | float):
        return raw if isinstance(raw, float) and raw < 1 else int(raw)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", str(raw).upper())
    if match is None:
        raise ValueError(raw)
    number, unit = float(match.group(1)), match.group(2)
    if not unit and number < 1 and "." in match.group(1):
        return number
    return int(number * _UNITS[unit])
