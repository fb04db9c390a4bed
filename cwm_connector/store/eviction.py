"""The disk tier's eviction policy: how much room a write needs, and which blobs go.

Pure arithmetic over byte counts (no files, no SQL): `budget.py` applies it.
The limit is the tighter of `disk_bytes` and what keeps `disk_min_free` of the
filesystem free. A write that would pass it first frees blocks no window pins,
least recently used first, down to `LOW_WATER` of the limit (so eviction runs
in batches, not once per capture). Windows are never evicted: when unpinned
blobs cannot make the room, the write is refused (`store_full`).
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from dataclasses import dataclass

LOW_WATER = 0.9  # once over the limit, free down to this share of it
BATCH = 512  # LRU candidates read per round
FS_BLOCK = 4096  # a file occupies whole filesystem blocks: count writes rounded up


@dataclass(frozen=True, slots=True)
class Room:
    """What a write of `incoming` bytes needs: `free` bytes evicted first; `fits` False when
    even evicting every unpinned blob would not make it fit."""

    limit: int
    used: int
    pinned: int
    incoming: int
    free: int
    fits: bool


NO_LIMIT = 1 << 62


def limit_bytes(used: int, budget: int, fs_free: int, min_free: int) -> int:
    """The most blob bytes the disk tier may hold now (`budget` 0: no cap of its own;
    `min_free` 0: free space is not watched, a full disk is a write error)."""
    by_fs = used + fs_free - min_free if min_free > 0 else NO_LIMIT
    return by_fs if budget <= 0 else min(budget, by_fs)


def room_for(incoming: int, used: int, pinned: int, limit: int) -> Room:
    """How many bytes to evict before writing `incoming` bytes."""
    if used + incoming <= limit:
        return Room(limit, used, pinned, incoming, 0, True)
    free = used + incoming - int(limit * LOW_WATER)
    fits = pinned + incoming <= limit
    return Room(limit, used, pinned, incoming, min(free, used - pinned), fits)


def on_disk_bytes(stored: int) -> int:
    """The space a file of `stored` bytes takes on the filesystem (whole blocks)."""
    return -(-stored // FS_BLOCK) * FS_BLOCK


def pick_victims(
    candidates: Iterable[tuple[bytes, int]], need: int, protected: Set[bytes]
) -> tuple[list[bytes], int]:
    """Blobs to evict, in the candidates' (LRU) order, until `need` bytes are freed;
    never one in `protected` (a staged or promised load still reads it)."""
    victims: list[bytes] = []
    freed = 0
    for digest, size in candidates:
        if freed >= need:
            break
        if digest in protected:
            continue
        victims.append(digest)
        freed += size
    return victims, freed
