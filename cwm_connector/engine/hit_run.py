"""Which stored blocks make a hit, per attention kind (pure).

A hit ends at a block boundary `end`. Full attention needs every block in
`[start, end)`; a sliding window needs only the `window_blocks` blocks before
`end` (and never those before `start`, which the engine already holds). The
largest `end` wins, as in vLLM's own `find_longest_cache_hit`.
"""

from __future__ import annotations

from collections.abc import Sequence


def find_hit(is_stored: Sequence[bool], start: int, window_blocks: int | None) -> tuple[int, int]:
    """(first, end): blocks [first, end) to load for the longest hit beyond `start`.

    `is_stored[i]` says whether block `start + i` is in the store. end == start
    means no hit.
    """
    if window_blocks is None:
        run = 0
        while run < len(is_stored) and is_stored[run]:
            run += 1
        return start, start + run
    contiguous = 0
    best = (start, start)
    for i, stored in enumerate(is_stored):
        contiguous = contiguous + 1 if stored else 0
        if contiguous >= window_blocks or contiguous == i + 1:
            end = start + i + 1
            best = (max(start, end - window_blocks), end)
    return best


def ready_end(start: int, first: int, end: int, num_ready: int) -> int:
    """The boundary that `num_ready` leading verified blocks of [first, end) still serve."""
    if num_ready >= end - first:
        return end
    if first == start:  # every block from the engine's boundary on is in hand
        return start + num_ready
    return start  # a window missing its first blocks serves nothing


def tail_run(block_ids: Sequence[int], num_full: int, null_block_id: int) -> int:
    """The first index of the run of real (non-null) blocks that ends at num_full."""
    first = num_full
    while first > 0 and block_ids[first - 1] != null_block_id:
        first -= 1
    return first
