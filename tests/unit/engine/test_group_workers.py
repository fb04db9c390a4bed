"""The worker side across KV-cache groups (issue 13), with stand-in group workers."""

from __future__ import annotations

from test_scheduler import BS, hashes

from cwm_connector.engine.group_workers import GroupWorkers, InertWorkers
from cwm_connector.engine.plans import CaptureJob, StepPlan
from cwm_connector.engine.scheduler import CwmScheduler


class FakeWorker:
    """Records its plans; reports a request finished when the test says it gathered it."""

    def __init__(self) -> None:
        self.plans: list[StepPlan] = []
        self.gathered: set[str] = set()
        self.waited: list[str] = []

    def submit(self, plan: StepPlan, by_layer: bool = False) -> None:
        self.plans.append(plan)

    def get_finished(self, finished_req_ids: set[str]) -> set[str]:
        done, self.gathered = self.gathered & finished_req_ids, self.gathered - finished_req_ids
        return done

    def wait_for_layer(self, layer_name: str) -> None:
        self.waited.append(layer_name)


def test_a_request_is_freed_once_every_capturing_group_copied_it() -> None:
    full, sliding = FakeWorker(), FakeWorker()
    workers = GroupWorkers([full, sliding], {"l0": 0, "l1": 1})  # type: ignore[list-item]
    both = [StepPlan(captures=[CaptureJob("r", [1], [b"h"])]) for _ in range(2)]
    workers.submit(both)
    assert [len(w.plans) for w in (full, sliding)] == [1, 1]
    full.gathered.add("r")
    assert workers.get_finished({"r"}) == set()  # the sliding group still copies it
    sliding.gathered.add("r")
    assert workers.get_finished({"r"}) == {"r"}
    only_full = [StepPlan(captures=[CaptureJob("q", [2], [b"g"])]), StepPlan()]
    workers.submit(only_full)
    full.gathered.add("q")
    assert workers.get_finished({"q"}) == {"q"}  # the other group had nothing to copy
    workers.wait_for_layer("l1")
    workers.wait_for_layer("unknown")
    assert full.waited == ["unknown"] and sliding.waited == ["l1", "unknown"]


def test_inert_workers_never_keep_blocks_or_stall_a_request() -> None:
    inert = InertWorkers(rank=0)
    hs = hashes(4)
    sched = CwmScheduler(
        block_size=BS,
        tp_size=1,
        lookup=lambda h, group=0: {x for x in h if x.startswith(b"a")},
        windows=[None, 2],
    )
    assert sched.get_num_new_matched_tokens("r", hs, 4 * BS + 1, 0) == (None, False)
    new = hashes(4, tag="c")
    assert sched.request_finished_groups("c", "salt", new, 4 * BS, ([1, 2, 3, 4], [0, 0, 3, 4]))
    plans = sched.build_plans()
    inert.submit(plans)
    for report in inert.take_reports():
        sched.apply_report(report)
    assert sched.get_num_new_matched_tokens("r", hs, 4 * BS + 1, 0) == (0, False)  # a miss now
    assert inert.get_finished(set()) == set()
    assert inert.get_finished({"c", "other"}) == {"c"}  # released once vLLM announced it
    assert inert.take_load_errors() == set() and inert.take_reports() == []
