"""Export and import of windows: one portable file (safetensors + a JSON manifest).

A mixin of WindowService. Export reads every blob through the tiers; import
checks the fingerprint, recomputes the block-hash chain from the manifest's
tokens and salt (a forged manifest cannot alias another session's hashes) and
verifies every block's digest before anything is written.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import msgpack

from cwm_connector.blob import digest as blob_digest
from cwm_connector.fingerprint import differing_fields
from cwm_connector.hash_chain import block_hash_chain
from cwm_connector.window_args import Progress, WindowError, no_progress, user_path, validate_name
from cwm_connector.window_io import EXPORT_FORMAT, read_export

if TYPE_CHECKING:
    from cwm_connector.catalog import Catalog
    from cwm_connector.store import TieredStore
    from cwm_connector.tier_disk import DiskTier


class TransferOps:
    """export and import."""

    block_size: int
    hash_algo: str
    engine_fp: dict[str, Any]
    engine_fp_id: str
    store: TieredStore
    disk: DiskTier

    if TYPE_CHECKING:

        @property
        def catalog(self) -> Catalog: ...

        def _load(self, name: str) -> tuple[dict[str, object], list[tuple[bytes, bytes]]]: ...

        def _row(self, name: str, salt: str, token_ids: list[int], parent: str | None
                 ) -> dict[str, object]: ...  # fmt: skip

        def _insert(self, row: dict[str, object], blocks: list[tuple[bytes, bytes]],
                    **kwargs: Any) -> None: ...  # fmt: skip

        def _describe(self, name: str) -> dict[str, Any]: ...

    def export(self, name: str, file: str, _progress: Progress = no_progress) -> dict[str, Any]:
        import numpy as np
        from safetensors.numpy import save_file

        row, blocks = self._load(name)
        path = user_path(file)
        sizes = self.catalog.blob_sizes([d for _, d in blocks])
        raw_len = sizes[blocks[0][1]][0] if blocks else 0
        data = np.empty((len(blocks), raw_len), dtype=np.uint8)
        for i, (_, dig) in enumerate(blocks):
            self.store.read_into(dig, [memoryview(data[i])])
            _progress(i + 1, len(blocks))
        manifest = {
            "format": EXPORT_FORMAT,
            "name": name,
            "salt": row["salt"],
            "token_ids": msgpack.unpackb(row["token_ids"]),
            "block_size": self.block_size,
            "hash_algo": self.hash_algo,
            "block_hashes": [h.hex() for h, _ in blocks],
            "digests": [d.hex() for _, d in blocks],
            "fingerprint": json.loads(str(row["fingerprint"])),
        }
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"blocks": data}, str(tmp), metadata={"cwm": json.dumps(manifest)})
        os.replace(tmp, path)
        return {"name": name, "file": str(path), "bytes": path.stat().st_size}

    def import_(
        self, file: str, name: str | None = None, _progress: Progress = no_progress
    ) -> dict[str, Any]:
        manifest, data = read_export(user_path(file, must_exist=True))
        name = validate_name(name if name is not None else manifest["name"])
        diff = differing_fields(manifest["fingerprint"], self.engine_fp)
        if diff:
            raise WindowError(
                f"window was exported from another engine; differing fields: {', '.join(diff)}",
                code="fingerprint_mismatch",
            )
        token_ids = manifest["token_ids"]
        expected = block_hash_chain(token_ids, self.block_size, manifest["salt"], self.hash_algo)
        hashes = [bytes.fromhex(h) for h in manifest["block_hashes"]]
        if hashes != expected[: len(hashes)] or len(hashes) != data.shape[0]:
            raise WindowError(
                "import refused: the block hashes do not belong to the window's tokens and salt",
                code="bad_import",
            )
        digests = [bytes.fromhex(d) for d in manifest["digests"]]
        blob_rows = []
        for i, dig in enumerate(digests):
            if blob_digest(data[i]) != dig:
                raise WindowError(
                    f"import refused: block {i} does not match its digest", code="bad_import"
                )
            _progress(i + 1, 2 * len(digests))  # verify, then write: two halves of the bar
        for i, dig in enumerate(digests):
            if not self.disk.contains(dig):
                stored = self.disk.put(dig, [memoryview(data[i])])
                blob_rows.append((dig, data.shape[1], stored, "none"))
            _progress(len(digests) + i + 1, 2 * len(digests))
        fps = self.catalog.engine_fp_ids(self.engine_fp_id)
        block_rows = [(fp, h, d) for fp in fps for h, d in zip(hashes, digests, strict=True)]
        row = self._row(name, manifest["salt"], token_ids, parent=None)
        blocks = list(zip(hashes, digests, strict=True))
        self._insert(row, blocks, block_rows=block_rows, blob_rows=blob_rows)
        return self._describe(name)
