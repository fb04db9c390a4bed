"""CWMConnector: the vLLM KV connector facade.

vLLM builds one instance per role: the scheduler role (in EngineCore) plans
through CwmScheduler, the worker role (in each worker process) moves bytes
through CwmWorker. Every hook delegates; nothing here raises into vLLM.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from cwm_connector.config import CwmConfig, config_warnings
from cwm_connector.control.server import ControlServer
from cwm_connector.control.worker_channel import ThawStager, WorkerChannels, start_worker_channel
from cwm_connector.engine.auto_freeze import AutoFreezePolicy, AutoFreezer
from cwm_connector.engine.fingerprint import (
    PROBE_FIELD,
    canonical_json,
    engine_fingerprint,
    fingerprint_id,
    full_fingerprint,
    hash_chain_stable,
)
from cwm_connector.engine.group_workers import GroupWorkers, InertWorkers
from cwm_connector.engine.hash_chain import block_hash_chain, engine_hash_probe
from cwm_connector.engine.hit_run import tail_run
from cwm_connector.engine.kv_groups import (
    NULL_BLOCK_ID,
    describe_groups,
    fingerprint_field,
    group_engine_ids,
    group_fingerprint,
    group_layer_names,
    restore_plan,
)
from cwm_connector.engine.plans import StepPlan, WorkerReport
from cwm_connector.engine.prom import CwmPromMetrics, CwmStats, DeltaTracker
from cwm_connector.engine.scheduler import CwmScheduler, StoredHashes
from cwm_connector.engine.sessions import SessionTable
from cwm_connector.engine.vllm_compat import (
    DISK_HIT_SOURCE,
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorPromMetrics,
    KVConnectorRole,
    KVConnectorStats,
    KVConnectorWorkerMetadata,
    SupportsHMA,
    log_missing,
)
from cwm_connector.engine.worker import CwmWorker, redis_tier
from cwm_connector.errors import CwmError
from cwm_connector.stats import Stats, read_stats
from cwm_connector.store.budget import DiskBudget
from cwm_connector.store.catalog import Catalog, catalog_path
from cwm_connector.store.disk import DiskTier
from cwm_connector.store.memory import MemoryTier
from cwm_connector.store.tiered import TieredStore
from cwm_connector.version import vllm_version
from cwm_connector.windows.service import WindowService

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from cwm_connector.windows.share import SharedWindows

logger = logging.getLogger("vllm.cwm")
SCHEDULER_REDIS_TIMEOUT_S = 0.1
CATALOG_RETRY_S = 10.0


@dataclass
class CwmConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker: this step's plan (ids and hashes only)."""

    plans: list[StepPlan] = field(default_factory=list)  # one per KV-cache group


@dataclass
class CwmWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler: one report per worker rank."""

    reports: list[WorkerReport] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        """Concatenate the reports of several ranks."""
        assert isinstance(other, CwmWorkerMetadata)
        return CwmWorkerMetadata(self.reports + other.reports)


class CWMConnector(KVConnectorBase_V1, SupportsHMA):
    """Captures salted sessions' KV blocks into a durable store and restores them."""

    if DISK_HIT_SOURCE is not None:
        _cache_hit_source = DISK_HIT_SOURCE

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ):
        super().__init__(vllm_config, role, kv_cache_config)
        transfer = self._kv_transfer_config
        self.cfg = CwmConfig.resolve(transfer.kv_connector_extra_config)
        if role == KVConnectorRole.SCHEDULER:  # once per engine: typos and old vLLM names
            for warning in config_warnings(transfer.kv_connector_extra_config):
                logger.warning("cwm: %s", warning)
            log_missing()
        with contextlib.suppress(OSError):  # a read-only store still serves restores
            self.cfg.store_path.mkdir(parents=True, exist_ok=True)
        self._groups = describe_groups(kv_cache_config)
        self._engine_fp = engine_fingerprint(vllm_config)
        groups_fp = fingerprint_field(self._groups)
        if groups_fp is not None:  # a plain model keeps the fingerprint old stores were made with
            self._engine_fp["kv_groups"] = groups_fp
        if role == KVConnectorRole.SCHEDULER:  # thaw checks it; the workers need not
            self._engine_fp[PROBE_FIELD] = engine_hash_probe(
                vllm_config.cache_config.block_size,
                vllm_config.cache_config.prefix_caching_hash_algo,
            )
        self._engine_fp["vllm_version"] = vllm_version()
        self._engine_fp_id = fingerprint_id(self._engine_fp)
        # Each KV-cache group's blocks are keyed apart: a hybrid model's groups are
        # separate engines to the catalog (a plain model keeps its one id).
        self._group_fp_ids = group_engine_ids(self._engine_fp, len(self._groups))
        self._block_size = vllm_config.cache_config.block_size
        self._windows, self._inert = restore_plan(self._groups, self._block_size)
        self._scheduler: CwmScheduler | None = None
        self._worker: GroupWorkers | InertWorkers | None = None
        self._kv_caches: dict[str, torch.Tensor] | None = None
        self._deltas = DeltaTracker()  # increments for vLLM's /metrics
        self._service: WindowService | None = None
        self._channel: ControlServer | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._init_scheduler(vllm_config, transfer.kv_load_failure_policy)

    # -- roles -------------------------------------------------------------
    def _init_scheduler(self, vllm_config: VllmConfig, failure_policy: str) -> None:
        hash_algo = vllm_config.cache_config.prefix_caching_hash_algo
        stable = hash_chain_stable(hash_algo)
        if not stable:
            logger.warning(
                "cwm: prefix_caching_hash_algo=%s without PYTHONHASHSEED gives block hashes "
                "that change at every restart; cwm will capture nothing and restore nothing. "
                "Use the default sha256 or set PYTHONHASHSEED.",
                hash_algo,
            )
        if failure_policy != "recompute":
            logger.warning(
                "cwm: kv_load_failure_policy is %r: a block that fails to load after it was "
                "promised ends the request with an error. Set "
                '"kv_load_failure_policy":"recompute" to recompute it instead.',
                failure_policy,
            )
        windows, inert = self._windows, self._inert
        if inert is not None:
            logger.warning(
                "cwm: %s; cwm captures and restores nothing for this model (vLLM serves it "
                "as usual)",
                inert,
            )
            stable = False
        # The engine thread waits at most 1 s on SQLite: a lock held longer is a miss.
        self._catalog = Catalog(catalog_path(self.cfg.store_path), timeout_s=1.0)
        self._catalog_retry_at = time.monotonic()
        self._sched_stats = Stats(self.cfg.store_path / "stats" / "scheduler.json")
        # The engine thread asks Redis only with a short timeout, behind a circuit breaker.
        self._redis = redis_tier(self.cfg, SCHEDULER_REDIS_TIMEOUT_S)
        redis = self._redis
        if redis is not None:  # the first lookup pays no connect (in the background)
            threading.Thread(
                target=redis.warm, args=(1,), name="cwm-redis-warm", daemon=True
            ).start()

        group_ids = self._group_fp_ids

        def lookup(hashes: Any, group: int = 0) -> set[bytes]:
            if not hashes:
                return set()
            catalog = self._engine_catalog()
            engine_id = group_ids[group]
            found = StoredHashes(catalog.stored_hashes(engine_id, hashes))
            if redis is not None and len(found) < len(hashes):
                rest = [h for h in hashes if h not in found]
                found.remote = {fp: redis.get_blocks(fp, rest)
                                for fp in catalog.engine_fp_ids(engine_id)}  # fmt: skip
                if found.remote:
                    found |= set.intersection(*(set(m) for m in found.remote.values()))
            return found

        self._scheduler = CwmScheduler(
            block_size=self._block_size,
            tp_size=vllm_config.parallel_config.tensor_parallel_size,
            lookup=lookup,
            capture=self.cfg.capture if stable else "off",
            restore=stable,
            stage_timeout_s=self.cfg.stage_timeout_s,
            windows=windows,
        )
        self._sessions = SessionTable()
        self._auto = AutoFreezer(
            AutoFreezePolicy.from_mapping(self.cfg.auto_freeze_policy),
            vllm_config.model_config.max_model_len,
        )
        self._auto_runner = ThreadPoolExecutor(1, thread_name_prefix="cwm-auto-freeze")
        self._auto_freezes = 0
        self._auto_freeze_store_full = 0
        self._control = self._start_control(vllm_config)
        logger.info(
            "cwm: connector ready (store %s, capture=%s, engine fingerprint %s)",
            self.cfg.store_path,
            self._scheduler.capture,
            self._engine_fp_id[:12],
        )

    def _engine_catalog(self) -> Catalog:
        """The engine thread's catalog; one that failed to open is retried every 10 s."""
        now = time.monotonic()
        if not self._catalog.ok and now - self._catalog_retry_at > CATALOG_RETRY_S:
            self._catalog_retry_at = now
            self._catalog = Catalog(catalog_path(self.cfg.store_path), timeout_s=1.0)
            if self._catalog.ok:
                logger.info("cwm: catalog available again")
        return self._catalog

    def _start_control(self, vllm_config: VllmConfig) -> ControlServer | None:
        """Serve window ops on the control socket; a failure disables only the socket."""
        model = vllm_config.model_config
        store, shared = self._window_store(vllm_config)
        service = WindowService(
            store_dir=self.cfg.store_path,
            engine_fp=self._engine_fp,
            engine_fp_id=self._engine_fp_id,
            group_engine_ids=self._group_fp_ids,
            block_size=self._block_size,
            hash_algo=vllm_config.cache_config.prefix_caching_hash_algo,
            sessions=self._sessions,
            detokenize=_Detokenizer(model.tokenizer, model.trust_remote_code),
            stats=self._stats_snapshot,
            channels=ThawStager(
                WorkerChannels(
                    [
                        self.cfg.worker_socket_path(rank)
                        for rank in range(vllm_config.parallel_config.tensor_parallel_size)
                    ]
                ),
                self._scheduler,
                self.cfg.thaw_pin_s,
            ),
            store=store,
            shared=shared,
            budget=DiskBudget(
                DiskTier(self.cfg.store_path), self.cfg.disk_bytes, self.cfg.disk_min_free
            ),
            auto=self._auto,
            latency=self._deltas.observe,
            failed_captures=self._scheduler.failed_captures if self._scheduler else None,
            in_flight=self._scheduler.captures_in_flight if self._scheduler else None,
        )
        self._service = service
        server = ControlServer(self.cfg.control_socket_path, service.handle)
        try:
            server.start()
        except (CwmError, OSError) as exc:
            logger.error("cwm: control socket disabled: %s", exc)
            return None
        logger.info("cwm: control socket at %s", self.cfg.control_socket_path)
        return server

    def _window_store(self, vllm_config: VllmConfig) -> tuple[TieredStore, SharedWindows | None]:
        """Tiers the window ops read through (disk, then Redis), and Redis sharing if set."""
        disk = DiskTier(self.cfg.store_path)
        redis = redis_tier(self.cfg)
        store = TieredStore(MemoryTier(1), disk, redis, Stats(None), promote=False)
        if redis is None:
            return store, None
        from cwm_connector.windows.share import SharedWindows

        block_size = self._block_size
        algo = vllm_config.cache_config.prefix_caching_hash_algo

        def chain(token_ids: list[int], salt: str) -> list[bytes]:
            return block_hash_chain(token_ids, block_size, salt, algo)

        return store, SharedWindows(redis, store, chain)

    def _stats_snapshot(self) -> dict[str, Any]:
        assert self._scheduler is not None
        snapshot: dict[str, Any] = {
            "scheduler": asdict(self._scheduler.counters),
            "worker": read_stats(self.cfg.store_path),
        }
        if self._redis is not None:
            snapshot["redis"] = {"scheduler": self._redis.counters()}
        return snapshot

    @property
    def requires_kv_delivery(self) -> bool:
        """A best-effort cache: a dropped capture is only a future miss."""
        return False

    # -- worker side -------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Learn each KV-cache group's layout, register its fingerprint, start the threads.

        A model cwm does not restore (its scheduler side said why at start-up), or a
        layout cwm cannot read, leaves the worker side off: vLLM serves as usual.
        """
        if self._inert is not None:
            return
        try:
            self._start_workers(kv_caches)
        except Exception:
            logger.exception("cwm: cannot read this KV cache layout; cwm copies nothing")
            self._worker = InertWorkers(_tp_rank())  # answers every job: nothing waits

    def _start_workers(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from cwm_connector.engine.kv_layout import KVLayout

        num_blocks = self._kv_cache_config.num_blocks
        rank = _tp_rank()
        names = group_layer_names(self._kv_cache_config, list(kv_caches))
        stats = Stats(self.cfg.store_path / "stats" / f"worker-rank{rank}.json")
        cfg = replace(self.cfg, memory_bytes=max(1, self.cfg.memory_bytes // len(names)))
        catalog = Catalog(catalog_path(self.cfg.store_path))
        workers = []
        for group, layer_names in enumerate(names):
            caches = {name: kv_caches[name] for name in layer_names}
            layout = KVLayout(caches, num_blocks, backend=self.cfg.copy_backend)
            engine_fp = group_fingerprint(self._engine_fp, group, len(names))
            doc = full_fingerprint(engine_fp, layout.describe(), rank)
            fp_id = fingerprint_id(doc)
            catalog.register_fingerprint(fp_id, self._group_fp_ids[group], canonical_json(doc))
            workers.append(CwmWorker(cfg, fp_id, layout, rank, group=group, stats=stats))
            logger.info(
                "cwm: worker rank %d group %d: %d KV tensors, %d bytes per block",
                rank, group, len(layout.tensors), layout.block_bytes,
            )  # fmt: skip
        catalog.close()
        layer_groups = {name: g for g, group_names in enumerate(names) for name in group_names}
        self._worker = GroupWorkers(workers, layer_groups)
        self._kv_caches = kv_caches  # vLLM re-maps the same tensors after a sleep-mode wake-up
        # Thaw prestages through one group's worker (windows are single-group).
        self._channel = start_worker_channel(self.cfg.worker_socket_path(rank), workers[0])

    def unregister_kv_caches(self) -> None:
        """vLLM 0.33 sleep mode, before the KV memory is released: drop every view of it."""
        if self._worker is not None:
            self._worker.unregister()

    def restore_kv_caches(self) -> None:
        """vLLM 0.33 sleep mode, after wake-up: rebuild the layouts on the KV tensors."""
        if self._worker is not None and self._kv_caches is not None:
            self._worker.restore(self._kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Run this step's plan: loads scatter now, captures and stages go to threads."""
        if self._worker is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, CwmConnectorMetadata)
        self._worker.submit(meta.plans, by_layer=self._by_layer(forward_context))

    def _by_layer(self, forward_context: ForwardContext) -> bool:
        """Load layer by layer unless off, or the forward is a full CUDA graph (no Python
        runs between its layers, so wait_for_layer_load would never be called)."""
        mode = self.cfg.layerwise_load
        if mode == "off" or (mode == "auto" and not self._worker_is_cuda()):
            return False
        runtime = getattr(forward_context, "cudagraph_runtime_mode", None)
        return getattr(runtime, "name", "NONE") != "FULL"

    def _worker_is_cuda(self) -> bool:
        return self._worker is not None and self._worker.is_cuda

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Before this layer's attention: its restored blocks are in place (layer by
        layer), or nothing to do (the whole load was ordered before the forward)."""
        if self._worker is not None:
            self._worker.wait_for_layer(layer_name)

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        """Capture happens at request end, not per layer."""
        return

    def wait_for_save(self) -> None:
        """Saves are write-behind; nothing to wait for."""
        return

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Requests whose kept blocks were copied out (finished sending)."""
        if self._worker is None:
            return None, None
        return self._worker.get_finished(finished_req_ids) or None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks promised but not loaded this step."""
        return set() if self._worker is None else self._worker.take_load_errors()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        """Report staging results and finished captures to the scheduler."""
        reports = [] if self._worker is None else self._worker.take_reports()
        return CwmWorkerMetadata(reports) if reports else None

    def shutdown(self) -> None:
        """Let queued writes finish (bounded); close the control socket."""
        if self._worker is not None:
            self._worker.shutdown()
        if self._channel is not None:
            self._channel.stop()
        if getattr(self, "_control", None) is not None:
            self._control.stop()

    # -- scheduler side ----------------------------------------------------
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Tokens of verified, staged blocks beyond the local hit (None while staging)."""
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(
            request.request_id, request.block_hashes, request.num_tokens, num_computed_tokens
        )

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        """Plan the load of promised blocks into their new paged blocks."""
        assert self._scheduler is not None
        if num_external_tokens == 0:
            self._scheduler.update_state_after_alloc(request.request_id, [], 0)
            return
        self._scheduler.update_state_after_alloc_groups(
            request.request_id, blocks.get_block_ids(), num_external_tokens
        )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """Hand this step's plan to the workers."""
        assert self._scheduler is not None
        self._flush_scheduler_stats()
        return CwmConnectorMetadata(self._scheduler.build_plans())

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Fold worker reports into the plans."""
        assert self._scheduler is not None
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, CwmWorkerMetadata):
            for report in meta.reports:
                self._scheduler.apply_report(report)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Keep a finished request's new full blocks until the worker copied them."""
        return self.request_finished_all_groups(request, (block_ids,))

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Keep every KV-cache group's new real blocks until its worker copied them."""
        assert self._scheduler is not None
        if request.cache_salt:
            # A sliding window keeps only its last blocks: each group's part of the session
            # is the run of real blocks ending at its last full block (issue 13).
            runs = []
            for ids in block_ids:
                num_full = min(
                    len(request.block_hashes),
                    request.num_computed_tokens // self._block_size,
                    len(ids),
                )
                first = tail_run(ids, num_full, NULL_BLOCK_ID)
                runs.append((first, request.block_hashes[first:num_full]))
            self._sessions.record(
                request.cache_salt,
                list(request.all_token_ids),
                list(runs[0][1]),
                first_block=runs[0][0],
                group_runs=runs if len(runs) > 1 else (),
            )
            self._maybe_auto_freeze(request.cache_salt, request.num_tokens)
        keep = self._scheduler.request_finished_groups(
            request.request_id,
            request.cache_salt,
            request.block_hashes,
            request.num_computed_tokens,
            block_ids,
        )
        return keep, None

    def _maybe_auto_freeze(self, salt: str, num_tokens: int) -> None:
        """Freeze a session that crossed the policy, in the background (never blocks)."""
        if not self._auto.check(salt, num_tokens).would_freeze or self._service is None:
            return
        name = self._auto.claim(salt)  # the cooldown starts now: one freeze per crossing

        def run() -> None:
            try:
                self._service.admin.auto_freeze(salt, num_tokens, name=name)
                self._auto_freezes += 1
                logger.info("cwm: auto-froze a session at %d tokens as %r", num_tokens, name)
            except CwmError as exc:
                if exc.code == "store_full":  # windows fill the budget: counted, in /metrics
                    self._auto_freeze_store_full += 1
                logger.warning("cwm: auto-freeze of %r failed: %s", name, exc)

        self._auto_runner.submit(run)

    # -- metrics -------------------------------------------------------------
    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """Counter increments since the last call (both roles), for vLLM's /metrics."""
        if self._worker is not None:
            return self._deltas.take(self._worker.stats.snapshot())
        if self._scheduler is not None:
            totals = {
                **asdict(self._scheduler.counters),
                "auto_freezes": self._auto_freezes,
                "auto_freeze_store_full": self._auto_freeze_store_full,
            }
            return self._deltas.take(totals)
        return None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats:
        """Rebuild the stats vLLM passed between processes."""
        return CwmStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics:
        """cwm's counters and freeze/thaw histograms in vLLM's /metrics."""
        return CwmPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def _flush_scheduler_stats(self) -> None:
        assert self._scheduler is not None
        for name, value in asdict(self._scheduler.counters).items():
            self._sched_stats.set(name, value)
        self._sched_stats.flush(force=True)  # writes only when a counter changed


class _Detokenizer:
    """Loads the model's tokenizer on first use (only thaw needs it)."""

    def __init__(self, name: str, trust_remote_code: bool):
        self._name = name
        self._trust = trust_remote_code
        self._tokenizer: Any = None

    def __call__(self, token_ids: list[int]) -> str:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                self._name, trust_remote_code=self._trust
            )
        return str(self._tokenizer.decode(token_ids, skip_special_tokens=False))


def _tp_rank() -> int:
    """This worker's tensor-parallel rank (0 when no group is initialised)."""
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except (ImportError, AssertionError, RuntimeError):
        return 0
