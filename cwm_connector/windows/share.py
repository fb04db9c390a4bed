"""Windows shared through Redis: every vLLM server on the same Redis sees the same windows.

Redis is the authority for names when it is configured: a freeze, clone or
import first copies the window's blobs and block rows to Redis, then claims
the name there atomically (`put_window` NX), then mirrors the window into the
local catalog. A thaw of a name the local catalog lacks fetches the manifest
from Redis, checks that its block hashes are the chain of its own tokens and
salt (so a forged manifest cannot map another session's hashes to its bytes),
and mirrors it locally; its blobs are read from Redis when staged.

Pins. A window pins its blobs and its block maps in Redis (they lose their
TTL, see `store/redis.py`); its manifest lists the block maps it pinned under
`pins` ([fingerprint id, block positions or None for all]) so that any server
can release exactly them. Order: pin the blobs, upload the missing ones, pin
the block maps, then claim the name; a claim that fails, or an upload that
does, releases the pins again; a claim that replaced a window, and a delete,
release the pins of the manifest the script handed back (to exactly one
caller). A manifest without `pins` (written before pins existed) pinned nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from cwm_connector.errors import CwmError, StoreError
from cwm_connector.store.redis import RedisTier
from cwm_connector.store.tiered import TieredStore

logger = logging.getLogger("vllm.cwm.windows")
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
        """Pin and copy blobs and rows to Redis, then claim the name; False if it is taken.

        `indices`: a hybrid model's window_blocks indices (group x 2^32 + position).
        """
        digests = list(dict.fromkeys(d for _, d in blocks))
        maps = {fp: list(dict.fromkeys(rows)) for fp, rows in fp_rows.items()}
        manifest = {
            "v": MANIFEST_VERSION,
            "row": dict(row),
            "blocks": [[h, d] for h, d in blocks],
            "sizes": [[d, *sizes[d]] for d in digests if d in sizes],
            **({"indices": list(indices)} if indices is not None else {}),
            "pins": [[fp, _positions(blocks, rows)] for fp, rows in fp_rows.items()],
        }
        packed = msgpack.packb(manifest, use_bin_type=True)
        self.redis.pin_blobs(digests)  # first: an upload then lands without TTL
        try:
            self.store.upload(None, blocks)
            self.redis.pin_blocks(maps)
            claimed, replaced = self.redis.claim_window(str(row["name"]), packed, replace)
        except BaseException:
            self._release(digests, maps)
            raise
        if not claimed:
            self._release(digests, maps)
        elif replaced is not None:
            self._release_manifest(replaced)
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
        """Drop a window's manifest from Redis and release its pins; True if it was there."""
        packed = self.redis.pop_window(name)
        if packed is None:
            return False
        self._release_manifest(packed)
        return True

    def _release_manifest(self, packed: bytes) -> None:
        """Release the pins a removed or replaced manifest held (none if it predates pins)."""
        try:
            manifest = msgpack.unpackb(packed, raw=False)
            blocks = [(bytes(h), bytes(d)) for h, d in manifest["blocks"]]
            maps = {
                str(fp): blocks if sel is None else [blocks[int(i)] for i in sel]
                for fp, sel in manifest.get("pins", None) or []
            }
            pinned = "pins" in manifest
        except (KeyError, TypeError, ValueError, IndexError, msgpack.UnpackException) as exc:
            logger.warning("cwm: a malformed manifest left redis; its pins stay: %s", exc)
            return
        if pinned:
            self._release(list(dict.fromkeys(d for _, d in blocks)), maps)

    def _release(self, digests: list[bytes], maps: dict[str, Blocks]) -> None:
        """Remove one pin from each block map, then from each blob (maps never outlive blobs).

        Best effort: a failure leaves counts one too high (those keys never expire).
        """
        try:
            self.redis.unpin_blocks(maps)
            self.redis.unpin_blobs(digests)
        except StoreError as exc:
            logger.warning("cwm: could not release %d pinned blobs in redis: %s", len(digests), exc)

    def has_blobs(self, digests: Sequence[bytes]) -> bool:
        """Whether Redis holds every one of these blobs."""
        wanted = set(digests)
        return bool(wanted) and self.redis.has_blobs(list(wanted)) == wanted


def _positions(blocks: Blocks, rows: Blocks) -> list[int] | None:
    """Where `rows` (an ordered subsequence of `blocks`) sit in it; None when it is all of it."""
    if len(rows) == len(blocks):
        return None
    out, start = [], 0
    for wanted in rows:
        start = blocks.index(wanted, start)
        out.append(start)
        start += 1
    return out
