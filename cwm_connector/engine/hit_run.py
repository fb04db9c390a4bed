"""Which stored blocks make a hit, per attention kind (pure).

A hit ends at a block boundary `end`. Each KV-cache group has a rule: full
attention (None) needs every block in `[start, end)`; a sliding window (an int,
its blocks) only that many blocks before `end`; chunked-local attention
(`Chunk(blocks per chunk)`) only the blocks of `end`'s own chunk before `end`,
none at a chunk boundary. Blocks before `start` the engine holds already. The
largest `end` every group serves wins, as in vLLM's own `find_longest_cache_hit`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Chunk:
    """Chunked-local attention's rule: a token attends within its chunk of `blocks` blocks."""

    blocks: int


Rule = int | Chunk | None


def needed(rule: Rule, start: int, end: int) -> int:
    """How many blocks before `end` a group with `rule` must provide for a hit [start, end)."""
    if rule is None:
        return end - start
    if isinstance(rule, Chunk):
        return min(end % rule.blocks, end - start)
    return min(rule, end - start)


def span(start: int, end: int, rule: Rule) -> int:
    """The first block a group must provide for a hit [start, end)."""
    return end - needed(rule, start, end)


def common_end(
    stored_by_group: Sequence[Sequence[bool]], start: int, windows: Sequence[Rule]
) -> int:
    """The largest boundary every group can serve from its stored blocks (start: none).

    Linear in the blocks: a full group's run from `start` caps the boundary; any other
    group needs a stored run of `needed(...)` blocks ending at the boundary.
    """
    limit = start + min((len(s) for s in stored_by_group), default=0)
    runs: list[list[int]] = []
    for stored, window in zip(stored_by_group, windows, strict=True):
        run, ending = 0, []
        for is_stored in stored:
            run = run + 1 if is_stored else 0
            ending.append(run)
        runs.append(ending)
        if window is None:
            full = next((i for i, s in enumerate(stored) if not s), len(stored))
            limit = min(limit, start + full)
    for end in range(limit, start, -1):
        if all(
            w is None or run[end - start - 1] >= needed(w, start, end)
            for run, w in zip(runs, windows, strict=True)
        ):
            return end
    return start


def served_end(start: int, end: int, firsts: Sequence[int], num_ready: Sequence[int]) -> int:
    """The boundary the verified leading blocks of every group's [first, end) still serve.

    A group whose span starts past `start` (a sliding window) serves only `end` itself;
    one that starts at `start` serves any boundary its leading run covers.
    """
    cap = min([end, *(first + ready for first, ready in zip(firsts, num_ready, strict=True))])
    if cap < end and any(first > start for first in firsts):
        return start
    return max(start, cap)


def tail_run(block_ids: Sequence[int], num_full: int, null_block_id: int) -> int:
    """The first index of the run of real (non-null) blocks that ends at num_full."""
    first = num_full
    while first > 0 and block_ids[first - 1] != null_block_id:
        first -= 1
    return first
