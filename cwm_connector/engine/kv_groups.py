"""What cwm knows of vLLM's KV-cache groups: their kind, window and layers, as plain data.

vLLM hands a connector a `KVCacheConfig` whose groups share a block table each
(`../shared/VLLM_NOTES.md`, "Hybrid KV caches"). cwm restores a group by its kind:

| kind | blocks a hit at block boundary B needs |
| --- | --- |
| `full` | every block before B |
| `sliding` | the `window_blocks` blocks before B (vLLM's null block elsewhere) |
| `chunked` | the blocks of B's own chunk before B (none at a chunk boundary) |
| `mamba`, `other` | not restored: cwm stays inert for the model |

The spec classes are read by name (no vLLM import here), so this module is pure
and its policy is a table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from cwm_connector.engine.fingerprint import fingerprint_id
from cwm_connector.engine.hit_run import Chunk, Rule

NULL_BLOCK_ID = 0  # vLLM's BlockPool hands its first block as the shared null block

# spec class name -> kind (subclasses are matched through their MRO)
KIND_BY_SPEC = {
    "SlidingWindowSpec": "sliding",
    "ChunkedLocalAttentionSpec": "chunked",
    "MambaSpec": "mamba",
    "FullAttentionSpec": "full",  # MLA specs derive from it
}
RESTORABLE_KINDS = frozenset({"full", "sliding", "chunked"})


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """One KV-cache group as cwm plans for it."""

    kind: str
    block_size: int
    num_layers: int
    sliding_window: int | None = None  # the window, or the chunk size of chunked-local
    spec: str = ""

    @property
    def window_blocks(self) -> Rule:
        """The group's hit rule (hit_run.py): None for full attention."""
        if self.kind == "chunked" and self.sliding_window:
            return Chunk(self.sliding_window // self.block_size)
        if self.kind != "sliding" or self.sliding_window is None:
            return None
        return blocks_for_window(self.sliding_window, self.block_size)


def blocks_for_window(sliding_window: int, block_size: int) -> int:
    """Blocks before a boundary that hold the next token's window (vLLM's own rule)."""
    return max(1, -(-(sliding_window - 1) // block_size))


def kind_of(spec: Any) -> str:
    """The kind of one vLLM KV-cache spec object."""
    for cls in type(spec).__mro__:
        if cls.__name__ in KIND_BY_SPEC:
            return KIND_BY_SPEC[cls.__name__]
    inner = getattr(spec, "kv_cache_specs", None)  # UniformTypeKVCacheSpecs
    if isinstance(inner, dict) and inner:
        kinds = {kind_of(s) for s in inner.values()}
        if len(kinds) == 1:
            return kinds.pop()
    return "other"


def describe_groups(kv_cache_config: Any) -> list[GroupSpec]:
    """The groups of a vLLM KVCacheConfig (empty when there is none)."""
    groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
    out = []
    for group in groups:
        spec = group.kv_cache_spec
        kind = kind_of(spec)
        window = {"sliding": getattr(spec, "sliding_window", None),
                  "chunked": getattr(spec, "attention_chunk_size", None)}.get(kind)  # fmt: skip
        out.append(
            GroupSpec(kind, int(spec.block_size), len(group.layer_names), window,
                      type(spec).__name__)
        )  # fmt: skip
    return out


def is_plain(groups: Sequence[GroupSpec]) -> bool:
    """One full-attention group: the shape every store before issue 13 was made with."""
    return len(groups) <= 1 and all(g.kind == "full" for g in groups)


def fingerprint_field(groups: Sequence[GroupSpec]) -> list[dict[str, Any]] | None:
    """The groups as the fingerprint records them; None for a plain model (old stores match)."""
    if is_plain(groups):
        return None
    return [asdict(g) for g in groups]


def restore_plan(
    groups: Sequence[GroupSpec], block_size: int | None = None
) -> tuple[list[Rule], str | None]:
    """(each group's window_blocks, why cwm is inert) for a KV cache.

    Every group must be full, sliding-window or chunked-local attention, with the engine's block
    size (vLLM hashes blocks of that size); else cwm stays inert for the model.
    """
    if not groups:
        return [None], None
    for group in groups:
        if group.kind not in RESTORABLE_KINDS:
            return [None], f"the {group.kind} KV-cache group ({group.spec}) is not restored"
        if group.kind == "chunked" and (group.sliding_window or 0) % group.block_size:
            return [None], "a chunked-local group's chunk is not a whole number of blocks"
        if block_size is not None and group.block_size != block_size:
            return [None], (
                f"a KV-cache group's block size {group.block_size} differs from the engine's "
                f"{block_size}"
            )
    return [g.window_blocks for g in groups], None


def group_fingerprint(engine_fp: dict[str, Any], group: int, num_groups: int) -> dict[str, Any]:
    """The fingerprint one group's blocks are stored under (the engine's, for one group)."""
    return dict(engine_fp) if num_groups <= 1 else {**engine_fp, "kv_group": group}


def group_engine_ids(engine_fp: dict[str, Any], num_groups: int) -> list[str]:
    """The catalog engine id of each group (a plain model: the engine's own id)."""
    return [
        fingerprint_id(group_fingerprint(engine_fp, g, num_groups))
        for g in range(max(1, num_groups))
    ]


def group_layer_names(kv_cache_config: Any, registered: Sequence[str]) -> list[list[str]]:
    """Each group's layers among the registered tensors (one group of all when unknown)."""
    groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
    names = [[n for n in g.layer_names if n in set(registered)] for g in groups]
    if len(names) <= 1 or not all(names):
        return [list(registered)]
    return names
