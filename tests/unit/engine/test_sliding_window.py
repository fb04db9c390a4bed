"""Sliding-window and null-block planning (issue 13), without vLLM or torch.

vLLM hands a block that left a sliding window as its null block (id 0): cwm
never captures it, never names it in a load, and a hit needs only the window's
blocks before its boundary.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from test_scheduler import BS, hashes, make, stage

from cwm_connector.engine.hit_run import Rule, common_end, served_end, span, tail_run
from cwm_connector.engine.kv_groups import (
    NULL_BLOCK_ID,
    blocks_for_window,
    describe_groups,
    fingerprint_field,
    restore_plan,
)
from cwm_connector.engine.plans import WorkerReport


def find_hit(is_stored: list[bool], start: int, rule: Rule) -> tuple[int, int]:
    """(first, end) of one group's longest hit beyond `start`."""
    end = common_end([is_stored], start, [rule])
    return span(start, end, rule), end


@pytest.mark.parametrize(
    ("stored", "start", "window", "expected"),
    [
        ([True] * 5, 0, None, (0, 5)),
        ([True, True, False, True], 0, None, (0, 2)),
        ([False, True, True, True], 0, None, (0, 0)),
        # sliding: the largest boundary whose window's blocks are all there
        ([False, False, True, True, False], 0, 2, (2, 4)),
        ([False, True, False, True, True], 0, 2, (3, 5)),
        ([False, False, False, True], 0, 2, (0, 0)),
        ([True, False, False, False], 0, 2, (0, 1)),  # from the engine's own boundary on
        ([False, False, True, True], 10, 2, (12, 14)),
        ([True, True, True, True, True], 3, 2, (6, 8)),
    ],
)
def test_find_hit(
    stored: list[bool], start: int, window: int | None, expected: tuple[int, int]
) -> None:
    assert find_hit(stored, start, window) == expected


def test_served_end_never_serves_a_window_missing_its_first_blocks() -> None:
    assert served_end(0, 7, [5], [2]) == 7
    assert served_end(0, 7, [5], [1]) == 0  # block 6's window needs block 5 and 6
    assert served_end(3, 7, [3], [2]) == 5  # from the engine's boundary: any leading run
    assert served_end(3, 7, [3], [0]) == 3


def test_tail_run_and_window_blocks() -> None:
    assert tail_run([0, 0, 0, 7, 9, 4], 5, NULL_BLOCK_ID) == 3
    assert tail_run([5, 6, 7], 3, NULL_BLOCK_ID) == 0
    assert tail_run([5, 0, 7, 0], 4, NULL_BLOCK_ID) == 4  # the last block is null: no run
    assert blocks_for_window(64, 32) == 2
    assert blocks_for_window(4096, 16) == 256
    assert blocks_for_window(65, 32) == 2
    assert blocks_for_window(66, 32) == 3


def test_capture_skips_null_blocks() -> None:
    sched, _ = make(set())
    hs = hashes(8)
    block_ids = [0, 0, 0, 0, 0, 41, 42, 43]
    assert sched.request_finished("r", "salt", hs, 8 * BS + 3, block_ids)
    (job,) = sched.build_plan().captures
    assert job.block_ids == [41, 42, 43] and job.block_hashes == hs[5:]
    assert NULL_BLOCK_ID not in job.block_ids
    assert sched.counters.null_blocks_skipped == 5


def test_sliding_hit_stages_only_the_window_and_loads_into_real_blocks() -> None:
    hs = hashes(34)
    sched, _ = make(set(hs[29:31]), windows=[2])
    first, plan = stage(sched, "r", hs, 1100)
    assert first == (None, False)
    (job,) = plan.stages
    assert job.block_hashes == hs[29:31]
    sched.apply_report(WorkerReport(rank=0, staged={job.job_id: 2}))
    # The hit ends at block 31: 31 blocks of tokens count as computed.
    assert sched.get_num_new_matched_tokens("r", hs, 1100, 0) == (31 * BS, False)
    block_ids = [NULL_BLOCK_ID] * 29 + [70, 71] + [72, 73, 74]  # as vLLM allocates them
    sched.update_state_after_alloc("r", block_ids, 31 * BS)
    (load,) = sched.build_plan().loads
    assert load.job_id == job.job_id and load.block_ids == [70, 71]


def test_sliding_hit_with_only_part_of_its_window_staged_is_a_miss() -> None:
    hs = hashes(34)
    sched, _ = make(set(hs[29:31]), windows=[2])
    _, plan = stage(sched, "r", hs, 1100)
    sched.apply_report(WorkerReport(rank=0, staged={plan.stages[0].job_id: 1}))
    assert sched.get_num_new_matched_tokens("r", hs, 1100, 0) == (0, False)
    assert plan.stages[0].job_id in sched.build_plan().drops


def test_a_null_destination_is_never_written_and_becomes_a_recompute() -> None:
    hs = hashes(34)
    sched, _ = make(set(hs[29:31]), windows=[2])
    _, plan = stage(sched, "r", hs, 1100)
    sched.apply_report(WorkerReport(rank=0, staged={plan.stages[0].job_id: 2}))
    sched.get_num_new_matched_tokens("r", hs, 1100, 0)
    sched.update_state_after_alloc("r", [NULL_BLOCK_ID] * 30 + [71, 72], 31 * BS)
    out = sched.build_plan()
    (load,) = out.loads
    assert load.job_id < 0 and load.block_ids == [71]  # no staged job: a load error
    assert plan.stages[0].job_id in out.drops
    assert sched.counters.null_dest_loads == 1


def test_full_attention_plan_is_unchanged_by_window_support() -> None:
    hs = hashes(6)
    sched, _ = make(set(hs))
    _, plan = stage(sched, "r", hs, 6 * BS + 1)
    assert plan.stages[0].block_hashes == hs


def fake_config(*groups: tuple[str, int | None, int]) -> SimpleNamespace:
    specs = {
        "full": type("FullAttentionSpec", (), {}),
        "sliding": type("SlidingWindowSpec", (), {}),
        "mamba": type("MambaSpec", (), {}),
    }
    out = []
    for kind, window, layers in groups:
        spec = specs[kind]()
        spec.block_size, spec.sliding_window = 32, window
        out.append(
            SimpleNamespace(kv_cache_spec=spec, layer_names=[f"l{i}" for i in range(layers)])
        )
    return SimpleNamespace(kv_cache_groups=out)


def test_groups_decide_the_plan_and_the_fingerprint() -> None:
    plain = describe_groups(fake_config(("full", None, 2)))
    assert restore_plan(plain) == ([None], None) and fingerprint_field(plain) is None
    sliding = describe_groups(fake_config(("sliding", 64, 2)))
    assert restore_plan(sliding) == ([2], None)
    assert fingerprint_field(sliding) == [
        {"kind": "sliding", "block_size": 32, "num_layers": 2, "sliding_window": 64,
         "spec": "SlidingWindowSpec"}
    ]  # fmt: skip
    mamba = describe_groups(fake_config(("full", None, 1), ("mamba", None, 3)))
    _, why = restore_plan(mamba)
    assert why is not None and "mamba" in why
    assert describe_groups(None) == [] and restore_plan([]) == ([None], None)
    hybrid = describe_groups(fake_config(("full", None, 1), ("sliding", 64, 1)))
    assert restore_plan(hybrid, 32) == ([None, 2], None)
    assert restore_plan(hybrid, 16)[1] is not None  # another block size: inert
    assert len(fingerprint_field(hybrid) or []) == 2


def make_groups(stored: list[set[bytes]], windows: list[int | None]):
    def lookup(hs: list[bytes], group: int = 0) -> set[bytes]:
        return {h for h in hs if h in stored[group]}

    from cwm_connector.engine.scheduler import CwmScheduler

    return CwmScheduler(block_size=BS, tp_size=1, lookup=lookup, windows=windows)


def test_hybrid_hit_is_the_largest_boundary_every_group_serves() -> None:
    hs = hashes(34)
    sched = make_groups([set(hs[:31]), set(hs[29:31])], [None, 2])
    assert sched.get_num_new_matched_tokens("r", hs, 1100, 0) == (None, False)
    full, sliding = sched.build_plans()
    assert full.stages[0].block_hashes == hs[:31] and sliding.stages[0].block_hashes == hs[29:31]
    sched.apply_report(WorkerReport(rank=0, group=0, staged={full.stages[0].job_id: 31}))
    assert sched.get_num_new_matched_tokens("r", hs, 1100, 0) == (None, False)  # group 1 next
    sched.apply_report(WorkerReport(rank=0, group=1, staged={sliding.stages[0].job_id: 2}))
    assert sched.get_num_new_matched_tokens("r", hs, 1100, 0) == (31 * BS, False)
    ids_full = list(range(100, 135))
    ids_sliding = [NULL_BLOCK_ID] * 29 + [229, 230, 231, 232, 233]
    sched.update_state_after_alloc_groups("r", (ids_full, ids_sliding), 31 * BS)
    full, sliding = sched.build_plans()
    assert full.loads[0].block_ids == ids_full[:31]
    assert sliding.loads[0].block_ids == [229, 230]


def test_hybrid_hit_needs_the_sliding_window_at_the_boundary() -> None:
    hs = hashes(34)
    # The full group holds everything, the sliding group nothing near block 31: the
    # largest common boundary is where the sliding group's window is stored (block 12).
    sched = make_groups([set(hs[:31]), set(hs[10:12])], [None, 2])
    sched.get_num_new_matched_tokens("r", hs, 1100, 0)
    full, sliding = sched.build_plans()
    assert len(full.stages[0].block_hashes) == 12 and sliding.stages[0].block_hashes == hs[10:12]
    # A sliding group whose window misses one block after staging: no hit at all.
    sched.apply_report(WorkerReport(rank=0, group=0, staged={full.stages[0].job_id: 12}))
    sched.apply_report(WorkerReport(rank=0, group=1, staged={sliding.stages[0].job_id: 1}))
    assert sched.get_num_new_matched_tokens("r", hs, 1100, 0) == (0, False)
    drops = [p.drops for p in sched.build_plans()]
    assert drops == [[full.stages[0].job_id], [sliding.stages[0].job_id]]


def test_hybrid_capture_keys_each_group_apart_and_skips_its_null_blocks() -> None:
    hs = hashes(8)
    sched = make_groups([set(), {hs[6]}], [None, 2])
    assert sched.request_finished_groups(
        "r", "salt", hs, 8 * BS, (list(range(10, 18)), [0] * 5 + [45, 46, 47])
    )
    full, sliding = sched.build_plans()
    assert full.captures[0].block_hashes == hs and full.captures[0].block_ids == list(range(10, 18))
    assert sliding.captures[0].block_hashes == [hs[5], hs[7]]  # hs[6] is stored already
    assert sliding.captures[0].block_ids == [45, 47]


def test_chunked_local_needs_only_the_boundary_chunks_blocks() -> None:
    from cwm_connector.engine.hit_run import Chunk

    # Chunks of 4 blocks: a hit at block 10 needs blocks 8, 9; at block 8 none at all.
    stored = [False] * 8 + [True, True]  # blocks 0..9 from start 0
    assert find_hit(stored, 0, Chunk(4)) == (8, 10)
    assert find_hit([False] * 8, 0, Chunk(4)) == (8, 8)  # block 8 is a boundary: a hit of 8
    assert find_hit([False] * 7, 0, Chunk(4)) == (4, 4)
    hs = hashes(12)
    sched = make_groups([set(hs[:10]), {hs[8], hs[9]}], [None, Chunk(4)])
    sched.get_num_new_matched_tokens("r", hs, 12 * BS, 0)
    full, chunked = sched.build_plans()
    assert len(full.stages[0].block_hashes) == 10 and chunked.stages[0].block_hashes == hs[8:10]
    sched.apply_report(WorkerReport(rank=0, group=0, staged={full.stages[0].job_id: 10}))
    sched.apply_report(WorkerReport(rank=0, group=1, staged={chunked.stages[0].job_id: 2}))
    assert sched.get_num_new_matched_tokens("r", hs, 12 * BS, 0) == (10 * BS, False)


def test_chunked_local_hit_at_a_chunk_boundary_stages_nothing_for_that_group() -> None:
    from cwm_connector.engine.hit_run import Chunk

    hs = hashes(10)
    sched = make_groups([set(hs[:8]), set()], [None, Chunk(4)])
    sched.get_num_new_matched_tokens("r", hs, 10 * BS, 0)
    full, chunked = sched.build_plans()
    assert len(full.stages[0].block_hashes) == 8 and chunked.stages == []
    sched.apply_report(WorkerReport(rank=0, group=0, staged={full.stages[0].job_id: 8}))
    assert sched.get_num_new_matched_tokens("r", hs, 10 * BS, 0) == (8 * BS, False)
    sched.update_state_after_alloc_groups("r", (list(range(20, 30)), [0] * 8 + [38, 39]), 8 * BS)
    full, chunked = sched.build_plans()
    assert full.loads[0].block_ids == list(range(20, 28)) and chunked.loads == []
