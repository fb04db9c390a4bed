"""vLLM's own block-hash chain, recomputed for a token list and a salt.

Used to re-key a window for a new salt (clone) and to check that an imported
window's hashes really belong to its tokens and salt (so a crafted manifest can
never map another session's hashes to its own bytes).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import xxhash

logger = logging.getLogger("vllm.cwm")
PROBE_SALT = "cwm-hash-probe"


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


def engine_hash_probe(block_size: int, hash_algo: str) -> str | None:
    """A digest of the hashes vLLM's engine gives a fixed token list under a fixed salt.

    Computed with the engine's own request hasher (what `request.block_hashes` holds),
    and checked against cwm's `block_hash_chain` (what clone and import compute): a
    vLLM that changed its hashing changes the probe, and thaw names the field instead
    of missing silently. None (logged) when vLLM's functions cannot be called.
    """
    try:
        from vllm.sampling_params import SamplingParams
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher
        from vllm.v1.request import Request

        tokens = [(i * 7919) % 1000 + 1 for i in range(2 * block_size)]
        block_hash_chain(tokens, block_size, PROBE_SALT, hash_algo)  # sets NONE_HASH if unset
        hasher = get_request_block_hasher(block_size, get_hash_fn_by_name(hash_algo))
        request = Request("cwm-hash-probe", tokens, SamplingParams(max_tokens=1), None,
                          cache_salt=PROBE_SALT, block_hasher=hasher)  # fmt: skip
        engine = [bytes(h) for h in request.block_hashes]
        ours = block_hash_chain(tokens, block_size, PROBE_SALT, hash_algo)
    except Exception as exc:
        logger.warning(
            "cwm: could not probe vLLM's block hashing (%s: %s)", type(exc).__name__, exc
        )
        return None
    if engine != ours:
        logger.error(
            "cwm: vLLM's block hashes differ from cwm's recomputation of them: clone under a "
            "new salt and import will not match this engine's requests"
        )
    return xxhash.xxh3_128_hexdigest(b"".join(engine))
