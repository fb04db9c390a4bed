"""vLLM's own block-hash chain, recomputed for a token list and a salt.

Used to re-key a window for a new salt (clone) and to check that an imported
window's hashes really belong to its tokens and salt (so a crafted manifest can
never map another session's hashes to its own bytes).
"""

from __future__ import annotations

from collections.abc import Sequence


def block_hash_chain(
    token_ids: Sequence[int], block_size: int, salt: str | None, hash_algo: str
) -> list[bytes]:
    """The hashes vLLM gives the full blocks of `token_ids` under `salt`."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils

    hash_fn = get_hash_fn_by_name(hash_algo)
    if getattr(kv_cache_utils, "NONE_HASH", None) is None:
        kv_cache_utils.init_none_hash(hash_fn)  # outside an engine (tests, tools)
    hashes: list[bytes] = []
    parent: bytes | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        # vLLM mixes the salt into the first block only; the chain carries it on.
        extra = (("cache_salt", salt),) if start == 0 and salt else None
        parent = kv_cache_utils.hash_block_tokens(
            hash_fn, parent, token_ids[start : start + block_size], extra
        )
        hashes.append(bytes(parent))
    return hashes
