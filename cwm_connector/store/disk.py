"""The embedded disk tier: content-addressed blob files with atomic writes.

Layout under `<store_dir>`:
    blobs/ab/cd/<digest hex>.blob   one blob per distinct block content
    tmp/<pid>-<random>.tmp          writes in flight (outside the blob folders)
    quarantine/<digest hex>.blob    blobs that failed verification, kept for inspection

A blob is written to tmp/, fsynced, then renamed into place: a reader sees a
whole blob or none. Read errors are misses, never crashes. A write that fails
(disk full, read-only) removes its temp file; temp files of processes killed
mid-write are removed at start (`clean_orphan_tmp`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

from cwm_connector.errors import BlobCorruptError, BlobMissingError, StoreError
from cwm_connector.store import blob
from cwm_connector.store.blob import Buffer

ORPHAN_TMP_AGE_S = 3600.0  # no write takes this long: older temp files are orphans whatever
# their pid (pids are reused across restarts in containers)


class DiskTier:
    """Blob files under one directory."""

    def __init__(self, root: Path):
        self.root = root
        self.blob_dir = root / "blobs"
        self.tmp_dir = root / "tmp"
        self.quarantine_dir = root / "quarantine"
        for folder in (self.blob_dir, self.tmp_dir, self.quarantine_dir):
            # An unwritable store must not stop vLLM: writes fail later, as misses.
            with contextlib.suppress(OSError):
                folder.mkdir(parents=True, exist_ok=True)
        self._blob_root = str(self.blob_dir)

    def path_for(self, digest: bytes) -> Path:
        """Where the blob of this digest lives."""
        return Path(self._path_str(digest))

    def _path_str(self, digest: bytes) -> str:
        name = digest.hex()  # plain string joins: this runs once per block on restore
        return f"{self._blob_root}/{name[:2]}/{name[2:4]}/{name}.blob"

    def contains(self, digest: bytes) -> bool:
        """Whether a blob file exists for this digest."""
        return self.path_for(digest).exists()

    def put(self, digest: bytes, segments: Sequence[Buffer], codec: str = "none") -> int:
        """Write a blob durably (tmp, fsync, rename); return the bytes on disk.

        `segments` are the block's raw bytes in order (one per layer); with no
        compression they are written with one vectored write, never joined.
        """
        raw_len = sum(len(s) for s in segments)
        if codec == "none":
            parts: list[Buffer] = [blob.encode_header(codec, raw_len, raw_len, digest), *segments]
        else:
            payload = blob.compress(b"".join(segments))
            parts = [blob.encode_header(codec, raw_len, len(payload), digest), payload]
        final = self.path_for(digest)
        tmp = self.tmp_dir / f"{os.getpid()}-{secrets.token_hex(8)}.tmp"
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                written = _write_all(fd, parts)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot write blob {digest.hex()}: {exc}") from exc
        return written

    def read_into(self, digest: bytes, segments: Sequence[memoryview]) -> None:
        """Read and verify a blob into `segments` (its raw bytes, in order).

        Raises BlobMissingError, BlobCorruptError or StoreError; on any error the
        segments' content is undefined and must not be used.
        """
        raw_len = sum(len(s) for s in segments)
        try:
            fd = os.open(self._path_str(digest), os.O_RDONLY)
        except FileNotFoundError as exc:
            raise BlobMissingError(f"blob {digest.hex()} is missing") from exc
        except OSError as exc:
            raise StoreError(f"cannot open blob {digest.hex()}: {exc}") from exc
        try:
            header = blob.parse_header(os.pread(fd, blob.HEADER_SIZE, 0))
            if header.digest != digest:
                raise BlobCorruptError("blob header names another digest")
            if header.raw_len != raw_len:
                raise BlobCorruptError(
                    f"blob holds {header.raw_len} bytes, the engine expects {raw_len}"
                )
            if os.fstat(fd).st_size != blob.HEADER_SIZE + header.payload_len:
                raise BlobCorruptError("blob file length does not match its header")
            if header.codec == "none":
                if os.preadv(fd, segments, blob.HEADER_SIZE) != raw_len:
                    raise BlobCorruptError("blob payload is short")
            else:
                raw = blob.decode_payload(
                    header, os.pread(fd, header.payload_len, blob.HEADER_SIZE)
                )
                _split_into(memoryview(raw), segments)
        except OSError as exc:
            raise StoreError(f"cannot read blob {digest.hex()}: {exc}") from exc
        finally:
            os.close(fd)
        blob.verify_segments(header, segments)

    def quarantine(self, digest: bytes) -> None:
        """Move a bad blob out of the read path (best effort)."""
        with contextlib.suppress(OSError):
            os.replace(self.path_for(digest), self.quarantine_dir / f"{digest.hex()}.blob")

    def delete(self, digest: bytes) -> None:
        """Remove a blob file if present."""
        self.path_for(digest).unlink(missing_ok=True)

    def check(self, digest: bytes) -> str | None:
        """A cheap start-up check of one blob file (header and length, not the digest).

        Returns None when it looks whole, "missing", or "corrupt".
        """
        try:
            with open(self._path_str(digest), "rb") as fh:
                header = blob.parse_header(fh.read(blob.HEADER_SIZE))
                size = os.fstat(fh.fileno()).st_size
        except FileNotFoundError:
            return "missing"
        except BlobCorruptError:
            return "corrupt"
        except OSError:
            return None  # unreadable now is not proof of damage; a load re-checks
        if header.digest != digest or size != blob.HEADER_SIZE + header.payload_len:
            return "corrupt"
        return None

    def clean_orphan_tmp(self) -> int:
        """Remove temp files of writers that no longer run (or are too old); return how many."""
        removed = 0
        now = time.time()
        try:
            entries = list(self.tmp_dir.glob("*.tmp"))
        except OSError:
            return 0
        for entry in entries:
            pid_text = entry.name.split("-", 1)[0]
            try:
                old = now - entry.stat().st_mtime > ORPHAN_TMP_AGE_S
                live = pid_text.isdigit() and int(pid_text) != 0 and _pid_alive(int(pid_text))
                if live and not old:
                    continue
                entry.unlink(missing_ok=True)
            except OSError:
                continue  # a read-only store keeps them until it is writable again
            removed += 1
        return removed


def _write_all(fd: int, parts: Sequence[Buffer]) -> int:
    """writev until every byte is written (a large writev may be partial)."""
    views = [memoryview(p).cast("B") for p in parts]
    total = sum(len(v) for v in views)
    while views:
        done = os.writev(fd, views)
        while views and done >= len(views[0]):
            done -= len(views[0])
            views.pop(0)
        if views and done:
            views[0] = views[0][done:]
    return total


def _split_into(raw: memoryview, segments: Sequence[memoryview]) -> None:
    offset = 0
    for segment in segments:
        segment[:] = raw[offset : offset + len(segment)]
        offset += len(segment)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
