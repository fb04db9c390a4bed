"""The fingerprint: everything that must match for stored KV bytes to be valid in an engine.

Two levels:
- the engine fingerprint, computed from the vLLM config and the weights in
  both the scheduler and worker processes (they must agree);
- the full fingerprint, the engine one plus what only a worker sees (its TP
  rank and the real tensor layout of its KV cache).
The catalog keys blocks by the full one, so a block captured under another
model, checkpoint, dtype, block size or layout never matches.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import xxhash

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SLICE_BYTES = 64 * 1024
STABLE_HASH_ALGOS = ("sha256", "sha256_cbor")
# Checked by thaw but not part of the catalog's engine id, so stores made before these
# fields existed keep their blocks (issue 14): a probe of vLLM's block hashing, compared
# only when both sides have one, and the vLLM version, for information only.
PROBE_FIELD = "hash_probe"
INFO_FIELDS = ("vllm_version",)


def canonical_json(doc: Mapping[str, Any]) -> str:
    """Sorted, compact JSON: the stored form of a fingerprint and the input of its id."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)


def canonical_id(doc: Mapping[str, Any]) -> str:
    """A short stable id of a JSON-able mapping."""
    return xxhash.xxh3_128_hexdigest(canonical_json(doc).encode())


def fingerprint_id(doc: Mapping[str, Any]) -> str:
    """The catalog's id of a fingerprint: every field but the probe and the info fields."""
    return canonical_id({k: v for k, v in doc.items() if k != PROBE_FIELD and k not in INFO_FIELDS})


def hash_chain_stable(hash_algo: str, env: Mapping[str, str] | None = None) -> bool:
    """Whether vLLM's block hashes are reproducible across processes and restarts."""
    env = os.environ if env is None else env
    return hash_algo in STABLE_HASH_ALGOS or "PYTHONHASHSEED" in env


def weights_identity(model: str, revision: str | None = None) -> dict[str, Any]:
    """Identify the checkpoint: the hub commit where known, else a digest of the files."""
    path = Path(model)
    if not path.is_dir():
        snapshot = _hub_snapshot_dir(model, revision)
        if snapshot is None:
            return {"source": "unknown", "model": model, "revision": revision}
        return {"source": "hub", "commit": snapshot.name}
    hasher = xxhash.xxh3_128()
    config = path / "config.json"
    if config.exists():
        hasher.update(config.read_bytes())
    for weight in sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES):
        size = weight.stat().st_size
        hasher.update(f"{weight.name}:{size}".encode())
        with open(weight, "rb") as fh:
            for offset in sorted(
                {0, max(0, size // 2 - SLICE_BYTES // 2), max(0, size - SLICE_BYTES)}
            ):
                fh.seek(offset)
                hasher.update(fh.read(SLICE_BYTES))
    return {"source": "local", "digest": hasher.hexdigest()}


def _hub_snapshot_dir(model: str, revision: str | None) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(model, "config.json", revision=revision)
    if isinstance(found, str):
        return Path(found).parent
    return None


def engine_fingerprint(vllm_config: Any) -> dict[str, Any]:
    """Fields both connector roles can compute from the vLLM config."""
    model = vllm_config.model_config
    cache = vllm_config.cache_config
    parallel = vllm_config.parallel_config
    seed = os.environ.get("PYTHONHASHSEED")
    return {
        "model": model.model,
        "revision": model.revision,
        "weights": weights_identity(model.model, model.revision),
        "dtype": str(model.dtype),
        "kv_cache_dtype": str(cache.cache_dtype),
        "block_size": cache.block_size,
        "num_layers": model.get_num_layers(parallel),
        "num_kv_heads": model.get_num_kv_heads(parallel),
        "head_size": model.get_head_size(),
        "tp_size": parallel.tensor_parallel_size,
        "pp_size": parallel.pipeline_parallel_size,
        "hash_algo": cache.prefix_caching_hash_algo,
        "hash_seed": None if seed is None else xxhash.xxh3_64_hexdigest(seed.encode()),
    }


def full_fingerprint(
    engine: Mapping[str, Any], layout: Mapping[str, Any], tp_rank: int
) -> dict[str, Any]:
    """The engine fingerprint plus one worker's rank and KV tensor layout."""
    return {**engine, "tp_rank": tp_rank, "layout": dict(layout)}


def differing_fields(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Names of the top-level fields whose values differ (for clear refusals).

    Info fields never differ; the hash probe differs only when both sides have one
    (a window frozen before probes existed is checked by the other fields).
    """

    def differs(key: str) -> bool:
        if key in INFO_FIELDS:
            return False
        if key == PROBE_FIELD and (a.get(key) is None or b.get(key) is None):
            return False
        return a.get(key) != b.get(key)

    return sorted(k for k in set(a) | set(b) if differs(k))
