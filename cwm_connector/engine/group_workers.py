"""The worker side of a hybrid KV cache: one CwmWorker per KV-cache group.

Groups' layers may alias one backing buffer (vLLM's hybrid allocator hands a
block id to one group at a time), so every copy goes through the layers of the
group that owns the block: each group has its own layout, fingerprint (its
blocks are keyed apart in the catalog) and jobs. A model with one group has
one worker, exactly as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cwm_connector.engine.plans import StepPlan, WorkerReport
from cwm_connector.engine.worker import CwmWorker
from cwm_connector.stats import Stats


class GroupWorkers:
    """Routes each group's plan to its worker and merges what they report."""

    def __init__(self, workers: Sequence[CwmWorker], layer_groups: dict[str, int]):
        self.workers = list(workers)
        self._layer_groups = layer_groups
        self._waiting: dict[str, set[int]] = {}  # request -> groups still gathering it

    @property
    def stats(self):
        return self.workers[0].stats

    @property
    def is_cuda(self) -> bool:
        return self.workers[0].layout.is_cuda

    def submit(self, plans: Sequence[StepPlan], by_layer: bool = False) -> None:
        """Each group's plan to its worker (a missing plan is an empty one)."""
        for group, worker in enumerate(self.workers):
            plan = plans[group] if group < len(plans) else StepPlan()
            for job in plan.captures:
                self._waiting.setdefault(job.req_id, set()).add(group)
            worker.submit(plan, by_layer=by_layer)

    def wait_for_layer(self, layer_name: str) -> None:
        """The layer's own group's loads (every group's for an unknown name)."""
        group = self._layer_groups.get(layer_name)
        targets = self.workers if group is None else [self.workers[group]]
        for worker in targets:
            worker.wait_for_layer(layer_name)

    def get_finished(self, finished_req_ids: set[str]) -> set[str]:
        """Requests every capturing group has copied out (vLLM may free them now)."""
        done: set[str] = set()
        for group, worker in enumerate(self.workers):
            for req_id in worker.get_finished(finished_req_ids):
                groups = self._waiting.get(req_id, set())
                groups.discard(group)
                if not groups:
                    self._waiting.pop(req_id, None)
                    done.add(req_id)
        return done

    def take_load_errors(self) -> set[int]:
        errors: set[int] = set()
        for worker in self.workers:
            errors |= worker.take_load_errors()
        return errors

    def take_reports(self) -> list[WorkerReport]:
        return [r for w in self.workers if (r := w.take_report()) is not None]

    def unregister(self) -> None:
        for worker in self.workers:
            worker.unregister()

    def restore(self, kv_caches: dict[str, torch.Tensor]) -> None:
        for worker in self.workers:
            worker.restore({name: kv_caches[name] for name in worker.layout.layer_names})

    def shutdown(self) -> None:
        for worker in self.workers:
            worker.shutdown()


class InertWorkers:
    """The worker side when cwm cannot read this KV cache: holds nothing, copies nothing.

    It still answers the scheduler's jobs so nothing waits on it: kept blocks are
    released once vLLM announces their request finished, and every staging job
    reports zero blocks at once (a miss, recomputed), so no request stalls.
    """

    is_cuda = False

    def __init__(self, rank: int):
        self._rank = rank
        self._released: set[str] = set()
        self._announced: set[str] = set()
        self._reports: list[WorkerReport] = []
        self.stats = Stats(None)

    def submit(self, plans: Sequence[StepPlan], by_layer: bool = False) -> None:
        for group, plan in enumerate(plans):
            self._released.update(job.req_id for job in plan.captures)
            if plan.stages:
                staged = {job.job_id: 0 for job in plan.stages}
                self._reports.append(WorkerReport(self._rank, group, staged=staged))

    def get_finished(self, finished_req_ids: set[str]) -> set[str]:
        self._announced |= finished_req_ids & self._released
        done, self._announced = self._announced, set()
        self._released -= done
        return done

    def take_reports(self) -> list[WorkerReport]:
        reports, self._reports = self._reports, []
        return reports

    def take_load_errors(self) -> set[int]:
        return set()

    def wait_for_layer(self, layer_name: str) -> None:
        return

    def unregister(self) -> None:
        return

    def restore(self, kv_caches: dict[str, torch.Tensor]) -> None:
        return

    def shutdown(self) -> None:
        return
