"""The embedded disk tier: content-addressed blob files with atomic writes.

Layout under `<store_dir>`:
    blobs/ab/cd/<digest hex>.blob   one blob per distinct block content
    tmp/<pid>-<random>.tmp          writes in flight (outside the blob folders)
    quarantine/<digest hex>.blob    blobs that failed verification, kept for inspection

A blob is written to tmp/, fsynced, then renamed into place: a reader sees a
whole blob or none. Read errors are misses, never crashes.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from cwm_connector import blob
from cwm_connector.errors import BlobCorruptError, BlobMissingError, StoreError


class DiskTier:
    """Blob files under one directory."""

    def __init__(self, root: Path):
        self.root = root
        self.blob_dir = root / "blobs"
        self.tmp_dir = root / "tmp"
        self.quarantine_dir = root / "quarantine"
        for folder in (self.blob_dir, self.tmp_dir, self.quarantine_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def path_for(self, digest: bytes) -> Path:
        """Where the blob of this digest lives."""
        name = digest.hex()
        return self.blob_dir / name[:2] / name[2:4] / f"{name}.blob"

    def contains(self, digest: bytes) -> bool:
        """Whether a blob file exists for this digest."""
        return self.path_for(digest).exists()

    def put(self, digest: bytes, raw: memoryview | bytes, codec: str = "none") -> int:
        """Write a blob durably (tmp, fsync, rename); return the bytes on disk."""
        final = self.path_for(digest)
        tmp = self.tmp_dir / f"{os.getpid()}-{secrets.token_hex(8)}.tmp"
        data = blob.encode(raw, codec, raw_digest=digest)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot write blob {digest.hex()}: {exc}") from exc
        return len(data)

    def read_into(self, digest: bytes, out: memoryview) -> None:
        """Read and verify a blob into `out` (its raw length); raise on miss or corruption."""
        path = self.path_for(digest)
        try:
            with open(path, "rb") as fh:
                header = blob.parse_header(fh.read(blob.HEADER_SIZE))
                if header.digest != digest:
                    raise BlobCorruptError("blob header names another digest")
                if header.raw_len != len(out):
                    raise BlobCorruptError(
                        f"blob holds {header.raw_len} bytes, the engine expects {len(out)}"
                    )
                if header.codec == "none":
                    if fh.readinto(out) != len(out) or fh.read(1):
                        raise BlobCorruptError("blob payload length does not match its header")
                    raw: memoryview | bytes = out
                else:
                    raw = blob.decode_payload(header, fh.read(header.payload_len + 1))
                    out[:] = raw
        except FileNotFoundError as exc:
            raise BlobMissingError(f"blob {digest.hex()} is missing") from exc
        except OSError as exc:
            raise StoreError(f"cannot read blob {digest.hex()}: {exc}") from exc
        blob.verify(header, out)

    def quarantine(self, digest: bytes) -> None:
        """Move a bad blob out of the read path (best effort)."""
        with contextlib.suppress(OSError):
            os.replace(self.path_for(digest), self.quarantine_dir / f"{digest.hex()}.blob")

    def delete(self, digest: bytes) -> None:
        """Remove a blob file if present."""
        self.path_for(digest).unlink(missing_ok=True)

    def clean_orphan_tmp(self) -> int:
        """Remove temp files left by processes that no longer run; return how many."""
        removed = 0
        for entry in self.tmp_dir.glob("*.tmp"):
            pid_text = entry.name.split("-", 1)[0]
            if pid_text.isdigit() and _pid_alive(int(pid_text)) and int(pid_text) != 0:
                continue
            entry.unlink(missing_ok=True)
            removed += 1
        return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
