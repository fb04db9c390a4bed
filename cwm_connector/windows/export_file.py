"""Reading a window export file (safetensors + a JSON manifest), checked field by field.

The file comes from outside: every field is validated before anything is used,
and the safetensors header is parsed by the safetensors library (no pickle).
The blocks are then read one row at a time with plain reads of the same open
file (never mapped: a file truncated meanwhile is a short read, not a SIGBUS in
the engine), so memory stays at one block whatever size the header declares.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cwm_connector.errors import CwmError

EXPORT_FORMAT = "cwm-window/1"
MAX_BLOCK_BYTES = 1 << 28  # one block of one rank: far above any real model's (MBs)
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


@dataclass
class ExportFile:
    """An open, validated export: its manifest and its rows of `block_bytes` bytes."""

    manifest: dict[str, Any]
    num_blocks: int
    block_bytes: int
    fd: int
    data_start: int

    def row(self, index: int) -> bytes:
        """The bytes of block `index`, read from the file now."""
        if not 0 <= index < self.num_blocks:
            raise BadImport(f"block {index} is outside the export")
        try:
            data = os.pread(self.fd, self.block_bytes, self.data_start + index * self.block_bytes)
        except OSError as exc:
            raise BadImport(f"cannot read block {index}: {exc}") from exc
        if len(data) != self.block_bytes:
            raise BadImport("export file is shorter than its header says")
        return data


@contextlib.contextmanager
def open_export(path: Path) -> Iterator[ExportFile]:
    """Open and validate an export file; its rows are read on demand until the block ends."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise BadImport(f"cannot open {path}: {exc}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadImport(f"{path} is not a regular file")
        yield _validate(fd, path)
    finally:
        os.close(fd)


def _validate(fd: int, path: Path) -> ExportFile:
    from safetensors import SafetensorError, safe_open

    # The same open file the rows are read from (a rename meanwhile changes nothing).
    proc_path = f"/proc/self/fd/{fd}"
    name = proc_path if os.path.exists(proc_path) else str(path)
    try:
        with safe_open(name, framework="np") as fh:
            metadata = fh.metadata() or {}
            if list(fh.keys()) != ["blocks"]:
                raise BadImport("export must hold exactly one tensor named 'blocks'")
            blocks = fh.get_slice("blocks")
            dtype, shape = blocks.get_dtype(), list(blocks.get_shape())
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadImport(f"not a readable safetensors file: {exc}") from exc
    try:
        manifest = json.loads(metadata["cwm"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BadImport("export has no valid 'cwm' manifest") from exc
    _check_manifest(manifest)
    if dtype != "U8" or len(shape) != 2:
        raise BadImport("'blocks' must be a 2-D uint8 tensor")
    if shape[0] != len(manifest["block_hashes"]):
        raise BadImport("block count does not match the manifest")
    if shape[0] and not 0 < shape[1] <= MAX_BLOCK_BYTES:
        raise BadImport(f"block size {shape[1]} bytes is out of range")
    # safetensors checked that the header fits the file and the offsets cover the data
    # exactly; read where the one tensor starts.
    (header_len,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    header = json.loads(os.pread(fd, header_len, 8))
    start = 8 + header_len + int(header["blocks"]["data_offsets"][0])
    return ExportFile(manifest, shape[0], shape[1], fd, start)


def _check_manifest(manifest: Any) -> None:
    if not isinstance(manifest, dict):
        raise BadImport("manifest must be an object")
    for key, kind in MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(key), kind):
            raise BadImport(f"manifest field {key!r} missing or not a {kind.__name__}")
    if manifest["format"] != EXPORT_FORMAT:
        raise BadImport(f"unsupported export format {manifest['format']!r}")
    if not all(type(t) is int and 0 <= t < 1 << 31 for t in manifest["token_ids"]):
        raise BadImport("token_ids must be non-negative integers")
    for key in ("block_hashes", "digests"):
        values = manifest[key]
        if not all(isinstance(v, str) and _is_hex(v) for v in values):
            raise BadImport(f"{key} must be hex strings")
    if len(manifest["digests"]) != len(manifest["block_hashes"]):
        raise BadImport("digests and block_hashes differ in length")
    # A window's tokens end inside (or just past) its last full block: far more tokens
    # than blocks only makes the hash-chain check expensive.
    block_size = manifest["block_size"]
    if not 0 < block_size <= 1 << 16:
        raise BadImport(f"block_size {block_size} is out of range")
    first = manifest.get("first_block", 0)  # a sliding window's run starts past block 0
    if not isinstance(first, int) or isinstance(first, bool) or not 0 <= first < 1 << 24:
        raise BadImport("first_block must be a non-negative integer")
    last = first + len(manifest["block_hashes"])
    positions = manifest.get("positions")  # a hybrid model's window: [group, position] each
    if positions is not None:
        if not isinstance(positions, list) or len(positions) != len(manifest["block_hashes"]):
            raise BadImport("positions must list one [group, position] per block")
        if not all(
            isinstance(p, list) and len(p) == 2 and all(type(v) is int for v in p)
            and 0 <= p[0] < 64 and 0 <= p[1] < 1 << 24
            for p in positions
        ):  # fmt: skip
            raise BadImport("positions must be [group, position] pairs of small integers")
        last = max((p[1] + 1 for p in positions), default=0)
    if len(manifest["token_ids"]) > (last + 2) * block_size:
        raise BadImport("token_ids are longer than the window's blocks")


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return 0 < len(text) <= 128
