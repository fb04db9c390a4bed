"""Reading a window export file (safetensors + a JSON manifest), checked field by field.

The file comes from outside: every field is validated before anything is used,
and the safetensors header is parsed by the safetensors library (no pickle).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cwm_connector.errors import CwmError

EXPORT_FORMAT = "cwm-window/1"
MANIFEST_FIELDS = {
    "format": str,
    "name": str,
    "salt": str,
    "token_ids": list,
    "block_size": int,
    "hash_algo": str,
    "block_hashes": list,
    "digests": list,
    "fingerprint": dict,
}


class BadImport(CwmError):
    """An export file that is not a valid cwm window."""

    code = "bad_import"


def read_export(path: Path) -> tuple[dict[str, Any], np.ndarray]:
    """The validated manifest and the (num_blocks, block_bytes) uint8 array of a file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as fh:
            metadata = fh.metadata() or {}
            if list(fh.keys()) != ["blocks"]:
                raise BadImport("export must hold exactly one tensor named 'blocks'")
            data = fh.get_tensor("blocks")
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadImport(f"not a readable safetensors file: {exc}") from exc
    try:
        manifest = json.loads(metadata["cwm"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BadImport("export has no valid 'cwm' manifest") from exc
    _check_manifest(manifest)
    if data.dtype != np.uint8 or data.ndim != 2:
        raise BadImport("'blocks' must be a 2-D uint8 tensor")
    if data.shape[0] != len(manifest["block_hashes"]):
        raise BadImport("block count does not match the manifest")
    return manifest, data


def _check_manifest(manifest: Any) -> None:
    if not isinstance(manifest, dict):
        raise BadImport("manifest must be an object")
    for key, kind in MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(key), kind):
            raise BadImport(f"manifest field {key!r} missing or not a {kind.__name__}")
    if manifest["format"] != EXPORT_FORMAT:
        raise BadImport(f"unsupported export format {manifest['format']!r}")
    if not all(isinstance(t, int) and 0 <= t < 1 << 31 for t in manifest["token_ids"]):
        raise BadImport("token_ids must be non-negative integers")
    for key in ("block_hashes", "digests"):
        values = manifest[key]
        if not all(isinstance(v, str) and _is_hex(v) for v in values):
            raise BadImport(f"{key} must be hex strings")
    if len(manifest["digests"]) != len(manifest["block_hashes"]):
        raise BadImport("digests and block_hashes differ in length")


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return 0 < len(text) <= 128
