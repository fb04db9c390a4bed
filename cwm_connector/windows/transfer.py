"""Export and import of windows: one portable file (safetensors + a JSON manifest).

Holds the window records. Export reads every blob through the tiers; import
checks the fingerprint, recomputes the block-hash chain from the manifest's
tokens and salt (a forged manifest cannot alias another session's hashes) and
verifies every block's digest before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import msgpack

from cwm_connector.engine.fingerprint import differing_fields
from cwm_connector.engine.hash_chain import block_hash_chain
from cwm_connector.store.blob import digest as blob_digest
from cwm_connector.store.budget import blob_space
from cwm_connector.windows.args import Progress, WindowError, no_progress, user_path, validate_name
from cwm_connector.windows.export_file import EXPORT_FORMAT, ExportFile, open_export
from cwm_connector.windows.records import WindowRecords, group_index, make_room


class TransferOps:
    """export and import."""

    def __init__(self, rec: WindowRecords):
        self.rec = rec

    def export(self, name: str, file: str, _progress: Progress = no_progress) -> dict[str, Any]:
        import numpy as np
        from safetensors.numpy import save_file

        row, blocks = self.rec.load(name)
        path = self._export_path(file)
        sizes = self.rec.catalog.blob_sizes([d for _, d in blocks])
        hybrid = int(row.get("num_groups") or 1) > 1
        positions = [list(p) for p in self.rec.positions(name, row, len(blocks))]
        if len({sizes[d][0] for _, d in blocks if d in sizes}) > 1:
            raise WindowError(
                f"window {name!r}: its KV-cache groups' blocks differ in size; exporting "
                "those is not supported yet",
                code="unsupported",
            )
        raw_len = sizes[blocks[0][1]][0] if blocks else 0
        data = np.empty((len(blocks), raw_len), dtype=np.uint8)
        for i, (_, dig) in enumerate(blocks):
            self.rec.store.read_into(dig, [memoryview(data[i])])
            _progress(i + 1, len(blocks))
        manifest = {
            "format": EXPORT_FORMAT,
            "name": name,
            "salt": row["salt"],
            "token_ids": msgpack.unpackb(row["token_ids"]),
            "block_size": self.rec.block_size,
            "hash_algo": self.rec.hash_algo,
            "first_block": int(row.get("first_block") or 0),
            "block_hashes": [h.hex() for h, _ in blocks],
            **({"positions": positions} if hybrid else {}),
            "digests": [d.hex() for _, d in blocks],
            "fingerprint": json.loads(str(row["fingerprint"])),
        }
        # A fresh name made with O_EXCL: a link planted at a guessable temp name in a shared
        # folder is never followed. The final rename replaces a link, never writes through it.
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name[:64]}.", suffix=".tmp",
                                            dir=path.parent)  # fmt: skip
        except OSError as exc:
            raise WindowError(f"cannot write {path}: {exc}", code="bad_path") from exc
        os.close(fd)
        try:
            save_file({"blocks": data}, tmp_name, metadata={"cwm": json.dumps(manifest)})
            os.replace(tmp_name, path)
        except OSError as exc:
            raise WindowError(f"cannot write {path}: {exc}", code="bad_path") from exc
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
        return {"name": name, "file": str(path), "bytes": path.stat().st_size}

    def _export_path(self, file: object) -> Path:
        """An absolute target outside the store (an export must never replace store files)."""
        path = user_path(file)
        resolved = path.parent.resolve() / path.name
        if resolved.is_relative_to(self.rec.store_dir.resolve()):
            raise WindowError(f"refusing to export into the store: {path}", code="bad_path")
        if resolved.is_dir():
            raise WindowError(f"{path} is a directory", code="bad_path")
        return resolved

    def import_(
        self, file: str, name: str | None = None, _progress: Progress = no_progress
    ) -> dict[str, Any]:
        with open_export(user_path(file, must_exist=True)) as export:
            return self._import(export, name, _progress)

    def _import(self, export: ExportFile, name: str | None, progress: Progress) -> dict[str, Any]:
        """Check everything, then write the blobs, then the rows; a refusal writes nothing."""
        manifest = export.manifest
        name = validate_name(name if name is not None else manifest["name"])
        diff = differing_fields(manifest["fingerprint"], self.rec.engine_fp)
        if diff:
            raise WindowError(
                f"window was exported from another engine; differing fields: {', '.join(diff)}",
                code="fingerprint_mismatch",
            )
        token_ids = manifest["token_ids"]
        expected = block_hash_chain(
            token_ids, self.rec.block_size, manifest["salt"], self.rec.hash_algo
        )
        hashes = [bytes.fromhex(h) for h in manifest["block_hashes"]]
        first = manifest.get("first_block", 0)  # checked by open_export
        positions = [tuple(p) for p in manifest.get("positions") or []] or [
            (0, first + i) for i in range(len(hashes))
        ]
        num_groups = len(self.rec.group_engine_ids)
        if any(g >= num_groups for g, _ in positions) or (
            manifest.get("positions") is not None and num_groups == 1
        ):
            raise WindowError("import refused: the window's KV-cache groups are not this "
                              "engine's", code="bad_import")  # fmt: skip
        if (
            any(pos >= len(expected) or expected[pos] != h
                for (_, pos), h in zip(positions, hashes, strict=True))
            or len(hashes) != export.num_blocks
        ):  # fmt: skip
            raise WindowError(
                "import refused: the block hashes do not belong to the window's tokens and salt",
                code="bad_import",
            )
        digests = [bytes.fromhex(d) for d in manifest["digests"]]
        total = 2 * len(digests)  # verify, then write: two halves of the bar
        for i, dig in enumerate(digests):
            _verified_row(export, i, dig)
            progress(i + 1, total)
        blob_rows: list[tuple[bytes, int, int, str]] = []
        written: list[bytes] = []
        cat = self.rec.catalog
        # A file without its row (an orphan a crash left) is written again, row and all.
        new = {d for d in digests if not (self.rec.disk.contains(d) and cat.has_blob(d))}
        space = len(new) * blob_space(export.block_bytes)
        make_room(self.rec, space, f"importing {name!r}", set(digests))  # or store_full
        try:
            for i, dig in enumerate(digests):
                if dig in new and dig not in written:
                    # Read again and verify again: the file may have changed since.
                    stored = self.rec.disk.put(dig, [_verified_row(export, i, dig)])
                    written.append(dig)
                    blob_rows.append((dig, export.block_bytes, stored, "none"))
                progress(len(digests) + i + 1, total)
            group_fps = [self.rec.catalog.engine_fp_ids(e) for e in self.rec.group_engine_ids]
            block_rows = [
                (fp, h, d)
                for (group, _), h, d in zip(positions, hashes, digests, strict=True)
                for fp in group_fps[group]
            ]
            row = self.rec.row(name, manifest["salt"], token_ids, parent=None, first_block=first,
                               num_groups=num_groups)  # fmt: skip
            blocks = list(zip(hashes, digests, strict=True))
            indices = [group_index(g, pos) for g, pos in positions] if num_groups > 1 else None
            self.rec.insert(
                row, blocks, block_rows=block_rows, blob_rows=blob_rows, indices=indices
            )
            # A blob found stored above may have been evicted (another process's capture
            # thread) before the window's rows pinned it: write it again, now pinned.
            for i, dig in enumerate(digests):
                if not cat.has_blob(dig) and dig not in written:
                    stored = self.rec.disk.put(dig, [_verified_row(export, i, dig)])
                    written.append(dig)
                    cat.add_blocks("", [], [(dig, export.block_bytes, stored, "none")])
        except BaseException:
            for dig in written:  # never leave files of a refused import (unless now in use)
                if not self.rec.catalog.has_blob(dig):
                    self.rec.disk.delete(dig)
            raise
        return self.rec.describe(name)


def _verified_row(export: ExportFile, index: int, dig: bytes) -> bytes:
    """Block `index` of the file, refused unless it matches its digest."""
    data = export.row(index)
    if blob_digest(data) != dig:
        raise WindowError(f"import refused: block {index} does not match its digest",
                          code="bad_import")  # fmt: skip
    return data
