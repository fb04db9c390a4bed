"""Windows shared through Redis: every vLLM server on the same Redis sees the same windows.

Redis is the authority for names when it is configured: a freeze, clone or
import first copies the window's blobs and block rows to Redis, then claims
the name there atomically (`put_window` NX), then mirrors the window into the
local catalog. A thaw of a name the local catalog lacks fetches the manifest
from Redis, checks that its block hashes are the chain of its own tokens and
salt (so a forged manifest cannot map another session's hashes to its bytes),
and mirrors it locally; its blobs are read from Redis when staged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from cwm_connector.errors import CwmError, StoreError
from cwm_connector.store.redis import RedisTier
from cwm_connector.store.tiered import TieredStore

MANIFEST_VERSION = 1
Row = dict[str, Any]
Blocks = list[tuple[bytes, bytes]]
HashChain = Callable[[list[int], str], list[bytes]]


class SharedWindows:
    """Window manifests and their blobs in Redis."""

    def __init__(self, redis: RedisTier, store: TieredStore, hash_chain: HashChain):
        self.redis = redis
        self.store = store
        self._hash_chain = hash_chain

    def publish(
        self,
        row: Row,
        blocks: Blocks,
        sizes: dict[bytes, tuple[int, int, str]],
        fp_rows: dict[str, Blocks],
        replace: bool,
        indices: Sequence[int] | None = None,
    ) -> bool:
        """Copy blobs and rows to Redis, then claim the name; False if it is taken.

        `indices`: a hybrid model's window_blocks indices (group x 2^32 + position).
        """
        for fp_id, rows in fp_rows.items():
            self.store.upload(fp_id, rows)
        manifest = {
            "v": MANIFEST_VERSION,
            "row": dict(row),
            "blocks": [[h, d] for h, d in blocks],
            "sizes": [[d, *sizes[d]] for d in dict.fromkeys(d for _, d in blocks) if d in sizes],
            **({"indices": list(indices)} if indices is not None else {}),
        }
        packed = msgpack.packb(manifest, use_bin_type=True)
        claimed = self.redis.put_window(str(row["name"]), packed, replace=replace)
        return claimed

    def fetch(
        self, name: str
    ) -> tuple[Row, Blocks, list[tuple[bytes, int, int, str]], list[int] | None] | None:
        """A window's row, blocks, blob sizes and indices from Redis, checked; None if absent."""
        packed = self.redis.get_window(name)
        if packed is None:
            if not self.redis.available():
                raise StoreError(f"redis is unavailable; window {name!r} may live there")
            return None
        try:
            manifest = msgpack.unpackb(packed, raw=False)
            row = manifest["row"]
            blocks = [(bytes(h), bytes(d)) for h, d in manifest["blocks"]]
            sizes = [(bytes(d), int(r), int(s), str(c)) for d, r, s, c in manifest["sizes"]]
            token_ids = msgpack.unpackb(row["token_ids"])
            salt = row["salt"]
            indices = manifest.get("indices")
            if indices is not None:
                indices = [int(i) for i in indices]
                if len(indices) != len(blocks):
                    raise ValueError("indices")
            if manifest["v"] != MANIFEST_VERSION or row["name"] != name:
                raise ValueError("version or name")
        except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
            raise CwmError(
                f"window {name!r} in redis has a malformed manifest", code="window_damaged"
            ) from exc
        first = int(row.get("first_block") or 0)
        chain = self._hash_chain(list(token_ids), str(salt))
        stride = 1 << 32  # window_blocks.idx of a hybrid window: group x 2^32 + position
        positions = (
            [first + i for i in range(len(blocks))]
            if indices is None
            else [i % stride for i in indices]
        )
        if any(
            p >= len(chain) or chain[p] != h for p, (h, _) in zip(positions, blocks, strict=True)
        ):
            raise CwmError(
                f"window {name!r} in redis names block hashes that are not its tokens' chain",
                code="window_damaged",
            )
        return row, blocks, sizes, indices

    def names(self) -> list[str]:
        """Window names in Redis (empty while Redis is unavailable)."""
        return self.redis.window_names()

    def remove(self, name: str) -> bool:
        """Drop a window's manifest from Redis; True if it was there."""
        return self.redis.delete_window(name)

    def has_blobs(self, digests: Sequence[bytes]) -> bool:
        """Whether Redis holds every one of these blobs."""
        wanted = set(digests)
        return bool(wanted) and self.redis.has_blobs(list(wanted)) == wanted
