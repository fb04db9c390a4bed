"""Upkeep of the Redis tier (`cwm store du|gc`): one SCAN over its keys in bounded batches.

Each node of a cluster is scanned on its own (SCAN walks one node); every batch
of at most SCAN_BATCH keys costs one or two pipelined round trips, so the work
is O(keys) and the memory O(SCAN_BATCH). Repairs go through `redis_lua.GC_KEY`,
atomic against a window pinning the same key meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from redis.cluster import RedisCluster

from cwm_connector.store import redis_lua as lua
from cwm_connector.store.blob import DIGEST_SIZE
from cwm_connector.store.redis_pipe import Client

if TYPE_CHECKING:
    from cwm_connector.store.redis import RedisTier

SCAN_BATCH = 1000  # keys per SCAN call and per pipelined batch
PINS_SUFFIX = b":pins"


def usage(tier: RedisTier, client: Client) -> dict[str, int]:
    """Counts and bytes of windows, pinned and cache blobs, block maps and orphan maps."""
    out = dict.fromkeys(("pinned_blobs", "pinned_bytes", "cache_blobs", "cache_bytes",
                         "block_maps", "orphan_block_maps"), 0)  # fmt: skip
    out["windows"] = int(client.scard(f"{tier.prefix}:{{windows}}:index"))
    for keys in _scan(client, f"{tier.prefix}:blob:*"):
        commands = [c for k in keys for c in (("STRLEN", k), ("EXISTS", k + PINS_SUFFIX))]
        replies = tier.run(client, commands)
        for size, pinned in zip(replies[::2], replies[1::2], strict=True):
            kind = "pinned" if pinned == 1 else "cache"
            out[f"{kind}_blobs"] += 1
            out[f"{kind}_bytes"] += size if isinstance(size, int) else 0
    for keys in _scan(client, f"{tier.prefix}:blk:*"):
        out["block_maps"] += len(keys)
        out["orphan_block_maps"] += len(_orphan_maps(tier, client, keys))
    return out


def gc(tier: RedisTier, client: Client) -> dict[str, int]:
    """Delete orphan block maps and first-layout keys; fix TTLs that disagree with pins."""
    out = dict.fromkeys(("removed_block_maps", "removed_blobs", "ttl_set", "persisted"), 0)
    for kind, pattern in (("blobs", "blob"), ("block_maps", "blk")):
        for keys in _scan(client, f"{tier.prefix}:{pattern}:*"):
            legacy = [k for k in keys if not _is_tagged(k)]  # never read: garbage
            if legacy:
                tier.run(client, [("DEL", k) for k in legacy])
                out[f"removed_{kind}"] += len(legacy)
            keys = [k for k in keys if _is_tagged(k)]
            if kind == "block_maps":
                orphans = _orphan_maps(tier, client, keys)
                deleted = tier.run(client, [
                    ("EVAL", lua.DEL_IF_EQUAL, 1, k, v) for k, v in orphans.items()
                ])  # fmt: skip
                out["removed_block_maps"] += sum(1 for r in deleted if r == 1)
                keys = [k for k in keys if k not in orphans]
            fixes = [("EVAL", lua.GC_KEY, 2, k, k + PINS_SUFFIX, tier.ttl_ms) for k in keys]
            for reply in tier.run(client, fixes):
                if reply in (1, 2):
                    out["ttl_set" if reply == 1 else "persisted"] += 1
    return out


def _orphan_maps(tier: RedisTier, client: Client, keys: list[bytes]) -> dict[bytes, bytes]:
    """Block-map key -> value, for the maps whose blob is absent (or whose value is no digest)."""
    values = tier.run(client, [("GET", k) for k in keys])
    named = {k: v for k, v in zip(keys, values, strict=True) if isinstance(v, bytes)}
    valid = {k: v for k, v in named.items() if len(v) == DIGEST_SIZE}
    exists = tier.run(client, [("EXISTS", tier.blob_key(v)) for v in valid.values()])
    orphans = {k: v for k, v in named.items() if k not in valid}
    orphans.update({k: v for (k, v), e in zip(valid.items(), exists, strict=True) if e != 1})
    return orphans


def _is_tagged(key: bytes) -> bool:
    """A key of the current layout (hash-tagged), not of the first one."""
    return b"{" in key


def _scan(client: Client, match: str) -> Iterator[list[bytes]]:
    """Batches of the keys matching `match` (pin counters left out), node by node."""
    nodes: list[Any] = (
        [client.get_redis_connection(n) for n in client.get_primaries()]
        if isinstance(client, RedisCluster)
        else [client]
    )
    for node in nodes:
        cursor = 0
        while True:
            cursor, found = node.scan(cursor, match=match, count=SCAN_BATCH)
            keys = [k for k in found if not k.endswith(PINS_SUFFIX)]
            if keys:
                yield keys
            if cursor == 0:
                break
