"""Planning without vLLM: hit length, partial prefix, staging, captures, timeouts."""

from __future__ import annotations

from collections.abc import Sequence

from cwm_connector.engine.plans import WorkerReport
from cwm_connector.engine.scheduler import CwmScheduler, StoredHashes

BS = 32


def hashes(n: int, tag: str = "a") -> list[bytes]:
    return [f"{tag}{i:04d}".encode() for i in range(n)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(stored: set[bytes], **kw: object) -> tuple[CwmScheduler, FakeClock]:
    clock = FakeClock()

    def lookup(hs: Sequence[bytes], group: int = 0) -> set[bytes]:
        return {h for h in hs if h in stored}

    return CwmScheduler(block_size=BS, tp_size=1, lookup=lookup, clock=clock, **kw), clock


def stage(sched: CwmScheduler, req: str, hs: list[bytes], num_tokens: int, local: int = 0):
    first = sched.get_num_new_matched_tokens(req, hs, num_tokens, local)
    plan = sched.build_plan()
    return first, plan


def test_no_stored_blocks_is_an_immediate_miss() -> None:
    sched, _ = make(set())
    assert sched.get_num_new_matched_tokens("r", hashes(10), 10 * BS + 5, 0) == (0, False)
    assert sched.build_plan().is_empty()


def test_hit_waits_for_staging_then_promises_exactly_what_is_staged() -> None:
    hs = hashes(10)
    sched, _ = make(set(hs))
    first, plan = stage(sched, "r", hs, 10 * BS + 5)
    assert first == (None, False)
    assert [len(j.block_hashes) for j in plan.stages] == [10]
    job = plan.stages[0].job_id
    # Still staging: ask again later.
    assert sched.get_num_new_matched_tokens("r", hs, 10 * BS + 5, 0) == (None, False)
    sched.apply_report(WorkerReport(rank=0, staged={job: 7}))  # block 7 failed its digest
    assert sched.get_num_new_matched_tokens("r", hs, 10 * BS + 5, 0) == (7 * BS, False)
    sched.update_state_after_alloc("r", list(range(100, 111)), 7 * BS)
    plan = sched.build_plan()
    assert len(plan.loads) == 1
    assert plan.loads[0].job_id == job
    assert plan.loads[0].block_ids == list(range(100, 107))


def test_last_token_is_never_promised() -> None:
    hs = hashes(4)
    sched, _ = make(set(hs))
    # 4 full blocks exactly: the 4th block holds the last token, which must be computed.
    _, plan = stage(sched, "r", hs, 4 * BS)
    assert len(plan.stages[0].block_hashes) == 3


def test_partial_prefix_stops_at_first_unstored_block() -> None:
    hs = hashes(10)
    sched, _ = make(set(hs[:6]) | {hs[8]})
    _, plan = stage(sched, "r", hs, 10 * BS + 1)
    assert plan.stages[0].block_hashes == hs[:6]


def test_longer_prompt_reuses_stored_prefix() -> None:
    stored = hashes(5)
    longer = stored + hashes(20, "b")
    sched, _ = make(set(stored))
    _, plan = stage(sched, "r", longer, 25 * BS)
    assert plan.stages[0].block_hashes == stored


def test_lookup_starts_after_local_hit() -> None:
    hs = hashes(10)
    sched, _ = make(set(hs))
    _, plan = stage(sched, "r", hs, 10 * BS + 3, local=4 * BS)
    assert plan.stages[0].block_hashes == hs[4:10]
    job = plan.stages[0].job_id
    sched.apply_report(WorkerReport(rank=0, staged={job: 6}))
    assert sched.get_num_new_matched_tokens("r", hs, 10 * BS + 3, 4 * BS) == (6 * BS, False)
    sched.update_state_after_alloc("r", list(range(50, 61)), 6 * BS)
    assert sched.build_plan().loads[0].block_ids == list(range(54, 60))


def test_staging_timeout_becomes_a_miss_and_drops_the_job() -> None:
    hs = hashes(3)
    sched, clock = make(set(hs), stage_timeout_s=2.0)
    _, plan = stage(sched, "r", hs, 3 * BS + 1)
    clock.now = 2.5
    assert sched.get_num_new_matched_tokens("r", hs, 3 * BS + 1, 0) == (0, False)
    assert sched.build_plan().drops == [plan.stages[0].job_id]
    assert sched.counters.stage_timeouts == 1


def test_tensor_parallel_waits_for_every_rank_and_takes_the_minimum() -> None:
    hs = hashes(5)
    stored = set(hs)
    sched = CwmScheduler(
        block_size=BS, tp_size=2, lookup=lambda h, group=0: {x for x in h if x in stored}
    )
    sched.get_num_new_matched_tokens("r", hs, 5 * BS + 1, 0)
    job = sched.build_plan().stages[0].job_id
    sched.apply_report(WorkerReport(rank=0, staged={job: 5}))
    assert sched.get_num_new_matched_tokens("r", hs, 5 * BS + 1, 0) == (None, False)
    sched.apply_report(WorkerReport(rank=1, staged={job: 3}))
    assert sched.get_num_new_matched_tokens("r", hs, 5 * BS + 1, 0) == (3 * BS, False)


def test_capture_keeps_only_new_full_computed_blocks() -> None:
    hs = hashes(6)
    sched, _ = make({hs[0], hs[1]})
    # 6 hashes, but only 5 blocks have KV for every token (num_computed = 5*BS + 7).
    keep = sched.request_finished("r", "salt", hs, 5 * BS + 7, list(range(10, 16)))
    assert keep is True
    plan = sched.build_plan()
    assert plan.captures[0].block_hashes == hs[2:5]
    assert plan.captures[0].block_ids == [12, 13, 14]
    assert sched.counters.skipped_stored_blocks == 2


def test_capture_skips_blocks_already_in_flight_until_reported() -> None:
    hs = hashes(3)
    sched, _ = make(set())
    assert sched.request_finished("r1", "s", hs, 3 * BS, [1, 2, 3])
    sched.build_plan()
    # Same prefix finishing again while the first capture is in flight: nothing new.
    assert sched.request_finished("r2", "s", hs, 3 * BS, [1, 2, 3]) is False
    sched.apply_report(WorkerReport(rank=0, store_failed=hs))
    assert sched.request_finished("r3", "s", hs, 3 * BS, [1, 2, 3]) is True


def test_capture_modes() -> None:
    hs = hashes(2)
    salted, _ = make(set())
    assert salted.request_finished("r", None, hs, 2 * BS, [1, 2]) is False
    everything, _ = make(set(), capture="all")
    assert everything.request_finished("r", None, hs, 2 * BS, [1, 2]) is True
    off, _ = make(set(), capture="off")
    assert off.request_finished("r", "salt", hs, 2 * BS, [1, 2]) is False


def test_finished_request_with_pending_stage_drops_it() -> None:
    hs = hashes(3)
    sched, _ = make(set(hs), capture="off")
    _, plan = stage(sched, "r", hs, 3 * BS + 1)
    sched.request_finished("r", "s", hs, 0, [])
    assert sched.build_plan().drops == [plan.stages[0].job_id]
    assert sched.num_pending == 0


def test_broken_lookup_is_a_miss() -> None:
    def broken(_: Sequence[bytes]) -> set[bytes]:
        raise OSError("database disk image is malformed")

    sched = CwmScheduler(block_size=BS, tp_size=1, lookup=broken)
    assert sched.get_num_new_matched_tokens("r", hashes(4), 4 * BS + 1, 0) == (0, False)
    assert sched.request_finished("r", "s", hashes(4), 4 * BS, [1, 2, 3, 4]) is False
    assert sched.counters.lookup_errors == 2


def test_thawed_job_is_promised_at_the_first_call_once() -> None:
    hs = hashes(10)
    sched, _ = make(set(hs))
    job = sched.prepare_ready()
    sched.complete_ready(job, hs[:8], ttl_s=100.0)  # the workers staged 8 of 10 blocks
    # A request with the window's tokens plus a continuation: no staging round trip.
    longer = [*hs, *hashes(3, "x")]
    assert sched.get_num_new_matched_tokens("r", longer, 13 * BS + 1, 0) == (8 * BS, False)
    assert sched.build_plan().stages == []
    sched.update_state_after_alloc("r", list(range(200, 214)), 8 * BS)
    (load,) = sched.build_plan().loads
    assert (load.job_id, load.block_ids) == (job, list(range(200, 208)))
    assert sched.counters.prestaged_hit_blocks == 8
    # One use: the next request with that prefix takes the normal path.
    first, plan = stage(sched, "r2", hs, 10 * BS + 5)
    assert first == (None, False) and len(plan.stages) == 1


def test_thawed_job_matches_only_its_own_prefix_and_expires() -> None:
    hs = hashes(6)
    sched, clock = make(set())
    job = sched.prepare_ready()
    sched.complete_ready(job, hs, ttl_s=10.0)
    other = [hs[0], *hashes(5, "z")]  # diverges after the first block
    assert sched.get_num_new_matched_tokens("r", other, 6 * BS + 1, 0) == (1 * BS, False)
    sched.request_finished("r", None, other, 0, [])  # finished before allocation: dropped
    assert job in sched.build_plan().drops

    again = sched.prepare_ready()
    sched.complete_ready(again, hs, ttl_s=10.0)
    clock.now += 9.5  # past 90% of the workers' hold: never promised
    assert sched.get_num_new_matched_tokens("r3", hs, 6 * BS + 1, 0) == (0, False)
    assert again in sched.build_plan().drops


def test_a_second_thaw_of_a_window_replaces_and_drops_the_first_job() -> None:
    hs = hashes(4)
    sched, _ = make(set())
    first, second = sched.prepare_ready(), sched.prepare_ready()
    sched.complete_ready(first, hs, ttl_s=60.0)
    sched.complete_ready(second, hs, ttl_s=60.0)
    assert sched.build_plan().drops == [first]
    assert sched.get_num_new_matched_tokens("r", hs, 4 * BS + 1, 0) == (4 * BS, False)
    sched.update_state_after_alloc("r", [1, 2, 3, 4, 5], 4 * BS)
    assert sched.build_plan().loads[0].job_id == second


def test_captures_in_flight_until_their_report() -> None:
    sched, _ = make(set())
    hs = hashes(2)
    assert sched.request_finished("r", "salt", hs, 2 * BS, [1, 2]) is True
    assert sched.captures_in_flight(hs) == 2
    sched.apply_report(WorkerReport(rank=0, stored=[hs[0]], store_failed=[hs[1]]))
    assert sched.captures_in_flight(hs) == 0


def test_failed_captures_are_remembered_until_stored() -> None:
    sched, _ = make(set())
    hs = hashes(3)
    sched.apply_report(WorkerReport(rank=0, store_failed=hs[:2]))
    assert sched.failed_captures(hs) == 2
    sched.apply_report(WorkerReport(rank=0, stored=[hs[0]]))  # a later capture worked
    assert sched.failed_captures(hs) == 1


def test_stage_job_carries_the_digests_redis_gave_the_lookup() -> None:
    """The worker need not ask Redis again for a block map the scheduler just read."""
    hs = hashes(6)
    local = set(hs[:2])  # on this disk: the worker reads the catalog for those
    remote = {"fp-r0": {h: b"d" + h for h in hs[2:]}, "fp-r1": {h: b"e" + h for h in hs[2:5]}}

    def lookup(wanted: Sequence[bytes], group: int = 0) -> set[bytes]:
        known = {fp: {h: d for h, d in m.items() if h in wanted} for fp, m in remote.items()}
        return StoredHashes({h for h in wanted if h in local or h in known["fp-r1"]}, known)

    sched = CwmScheduler(block_size=BS, tp_size=2, lookup=lookup)
    assert sched.get_num_new_matched_tokens("r", hs, 6 * BS + 1, BS) == (None, False)
    (job,) = sched.build_plan().stages
    assert job.block_hashes == hs[1:5]  # from the engine's own hit to rank 1's last block
    assert (
        job.remote
        == {
            "fp-r0": {h: b"d" + h for h in hs[2:5]},  # only the job's blocks
            "fp-r1": {h: b"e" + h for h in hs[2:5]},
        }
    )
    plain, _ = make(set(hs))  # a lookup that returns a plain set: nothing to pass on
    plain.get_num_new_matched_tokens("q", hs, 6 * BS + 1, 0)
    assert plain.build_plan().stages[0].remote == {}
