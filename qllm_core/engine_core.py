"""The synchronous engine: one `step()` is schedule -> run -> postprocess.

Schedule: ask the policy whether to preempt the running pass, or what to run next (making KV room first).
Run: advance the running pass to its next preemption point. Postprocess: when it completes, the output
processor samples and builds outputs. Each job has its own module; this one wires them. Single-threaded
by design: `Engine` (engine.py) drives it from its own thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from qllm_core.cache import KVCache
from qllm_core.config import EngineConfig
from qllm_core.forward import ForwardPass
from qllm_core.memory_relief import MemoryRelief
from qllm_core.metrics import EngineMetrics
from qllm_core.models.registry import LoadedModel, load_model
from qllm_core.output_processor import OutputProcessor
from qllm_core.outputs import RequestOutput
from qllm_core.params import SamplingParams
from qllm_core.pass_stack import PassStack
from qllm_core.request import FinishReason, PriorityClass, Request, RequestState
from qllm_core.request_table import Limits, RequestTable
from qllm_core.scheduler import POLICIES, BatchPlan, SchedulerView
from qllm_core.stats import ClassStats, EngineStats


class EngineCore:
    """Requests, KV pool, passes and the scheduling policy; no threads, no Ray."""

    def __init__(
        self,
        config: EngineConfig,
        metrics: EngineMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        loaded: LoadedModel | None = None,
    ) -> None:
        self.config = config
        self.loaded = loaded if loaded is not None else load_model(config)
        self.model = self.loaded.staged
        self.metrics = metrics if metrics is not None else EngineMetrics()
        self.kv = KVCache.for_layout(
            self.model.kv_layout(),
            num_blocks=config.kv_cache_tokens // config.block_size,
            block_size=config.block_size,
            dtype=self.loaded.dtype,
            device=self.loaded.device,
        )
        self.policy = POLICIES[config.policy](config.scheduler_config())
        self.table = RequestTable(Limits(self.loaded.vocab_size, self.loaded.max_model_len), self.kv)
        self.passes = PassStack(config, self.policy, self.model, self.kv, self.table, self.metrics)
        self.outputs = OutputProcessor(
            self.loaded, self.kv, self.table, self.metrics, config.ttft_window, lambda: self._busy_s
        )
        self.memory = MemoryRelief(
            self.kv,
            self.table,
            self.passes,
            self.metrics,
            self.policy.order_key,
            config.max_batch_size,
        )
        self._clock = clock
        self._busy_s = 0.0
        """Time spent advancing passes so far: the timelines' busy clock."""
        self._last_run = (0.0, 0.0)
        """When the latest advance started and ended: a request that arrived during it waited for part of it."""
        self._submissions = 0
        """Requests added or aborted from outside: what can change a policy's mind in the middle of a pass."""
        self._declined: tuple[int, int] | None = None
        """(pass id, submissions) when the policy last declined to preempt that pass."""
        self._aborts_pending = 0
        """Requests marked to leave the running pass at its next layer boundary."""
        m = self.metrics
        self._gauges = [(m.running.labels(c.label), m.waiting.labels(c.label)) for c in PriorityClass]

    @property
    def requests(self) -> dict[str, Request]:
        """Every unfinished request by id (read-only)."""
        return self.table.by_id

    @property
    def active(self) -> ForwardPass | None:
        """The running pass."""
        return self.passes.active

    @property
    def suspended(self) -> list[ForwardPass]:
        """The suspended passes, the next to resume last."""
        return self.passes.suspended

    # ---- requests in and out ---------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: PriorityClass | str,
        ttft_deadline_s: float | None = None,
        arrival: float | None = None,
    ) -> Request:
        """Validate and queue a request; raises `InvalidRequestError` (or a subclass) naming what to fix.

        `arrival` is when the caller submitted it (the clock's time); by default, now.
        """
        when = self._clock() if arrival is None else arrival
        request = self.table.admit(request_id, prompt_token_ids, params, priority, ttft_deadline_s, when)
        # Commands are taken between steps: the part of the latest one after its arrival is time it waited.
        started, ended = self._last_run
        request.marks.busy_at_arrival = self._busy_s - max(0.0, ended - max(when, started))
        self._submissions += 1
        self.metrics.prompt_tokens.labels(request.priority.label).inc(len(prompt_token_ids))
        return request

    def abort(self, request_id: str) -> RequestOutput | None:
        """Abort a request and free its KV now, wherever it is; None when it is unknown, or (the one exception)
        when it is in the running pass between two experts: then it leaves at that pass's next layer."""
        request = self.table.get(request_id)
        if request is None:
            return None
        self._submissions += 1
        now = self._clock()
        holder = self.passes.holding(request) if request.state is RequestState.RUNNING else None
        if holder is not None and holder.at_layer_boundary:
            self.passes.remove(holder, {request_id})
        elif holder is not None and holder is not self.passes.active:
            self.passes.drop(holder)  # suspended mid-layer: its work is redone, its other requests keep their KV
        elif holder is not None:
            request.abort_requested = True
            self._aborts_pending += 1
            return None
        output = self.outputs.finish(request, FinishReason.ABORT, now)
        self._update_gauges()
        return output

    def has_work(self) -> bool:
        """True while anything is queued, running or suspended."""
        return bool(len(self.table)) or bool(self.passes)

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request with an error (after an internal failure); the engine stays usable."""
        now = self._clock()
        self.passes.active = None
        self.passes.suspended.clear()
        return [self.outputs.finish(r, FinishReason.ERROR, now, error=message) for r in self.table]

    # ---- the step: schedule -> run -> postprocess --------------------------------------------------------
    def step(self, interrupted: Callable[[], bool] | None = None) -> list[RequestOutput]:
        """Advance to the next preemption point; returns outputs of requests that got a token or ended.

        With `interrupted`, a cheap probe for news from outside (the async front passes "a command is
        queued"), the pass runs on through the preemption points at which the policy has already declined
        to preempt it, until the probe fires or the pass ends: nothing else can change the policy's mind
        (`Policy.should_preempt`), so such a point costs the probe instead of a return to the caller.
        """
        now = self._clock()
        outputs = self._schedule(now)
        if self.passes.active is None:
            return outputs
        outputs += self._run(interrupted)
        finished = self.passes.active
        if finished is None or not finished.done:
            return outputs
        self.passes.finish_active()
        self._aborts_pending = 0  # the output processor ends whatever was still marked to leave
        outputs += self.outputs.complete(finished, self._clock())
        self._update_gauges()
        return outputs

    def _schedule(self, now: float) -> list[RequestOutput]:
        """Preempt, start or resume a pass, as the policy says; KV room is made only when a new pass may be
        planned."""
        passes = self.passes
        preempt = self._should_preempt(now)
        outputs: list[RequestOutput] = []
        if preempt or passes.active is None:
            self.memory.relieve()
        if preempt:
            plan = self.policy.next_batch(self._view(now))
            if plan is not None:
                outputs += self._suspend(now)
                self._start(plan, now)
        if passes.active is None:
            view = self._view(now)
            if passes.suspended and self.policy.should_resume(view):
                passes.resume(now)
            elif (plan := self.policy.next_batch(view)) is not None:
                self._start(plan, now)
            elif passes.suspended:
                passes.resume(now)
        return outputs

    def _suspend(self, now: float) -> list[RequestOutput]:
        """Suspend the running pass. Requests marked to leave it at its next layer boundary would wait out the
        suspension holding their KV, so the pass's work is dropped instead and they end now."""
        active = self.passes.active
        assert active is not None  # noqa: S101
        self.passes.suspend_active(now)
        marked = [e.request for e in active.entries if e.request.abort_requested]
        if not marked:
            return []
        self._aborts_pending = 0
        self.passes.drop(active)
        return [self.outputs.finish(r, FinishReason.ABORT, now) for r in marked]

    def _start(self, plan: BatchPlan, now: float) -> None:
        self.passes.start(plan, now)
        self._update_gauges()

    def _run(self, interrupted: Callable[[], bool] | None) -> list[RequestOutput]:
        active = self.passes.active
        assert active is not None  # noqa: S101
        started = self._clock()
        outputs = self._advance(active)
        while (
            interrupted is not None
            and self.passes.active is active
            and not active.done
            and self._declined_for(active)
            and not interrupted()
        ):
            outputs += self._advance(active)
        ended = self._clock()
        elapsed = ended - started
        self._last_run = (started, ended)
        self._busy_s += elapsed
        (self.passes.active or active).run_s += elapsed
        return outputs

    def _advance(self, active: ForwardPass) -> list[RequestOutput]:
        active.step()
        self.passes.maybe_merge(self._clock())
        if not self._aborts_pending or not active.at_layer_boundary or active.done:
            return []
        # Requests aborted between two experts leave here, at the layer boundary.
        leaving = {e.request.request_id for e in active.entries if e.request.abort_requested}
        self._aborts_pending -= len(leaving)
        self.passes.remove(active, leaving)
        now = self._clock()
        outputs = [self.outputs.finish(self.table.by_id[rid], FinishReason.ABORT, now) for rid in leaving]
        self._update_gauges()
        return outputs

    def _declined_for(self, active: ForwardPass) -> bool:
        """True when the policy said no to preempting this pass and no request arrived or left since."""
        return self._declined == (active.pass_id, self._submissions)

    def _should_preempt(self, now: float) -> bool:
        """Ask the policy, unless it already declined for this pass and nothing changed since
        (`Policy.should_preempt`): at expert granularity that saves a view per expert."""
        active = self.passes.active
        if active is None or self._declined_for(active):
            return False
        preempt = self.policy.should_preempt(self._view(now))
        self._declined = None if preempt else (active.pass_id, self._submissions)
        return preempt

    # ---- views and stats ---------------------------------------------------------------------------------
    def _view(self, now: float) -> SchedulerView:
        queues = self.table.queues()
        kv, passes = self.kv, self.passes
        return SchedulerView(
            now=now,
            waiting=queues.waiting,
            ready=queues.ready,
            free_blocks=kv.free_blocks,
            block_cost=lambda r, n: kv.extra_blocks(r.request_id, r.num_cached_tokens + n),
            running=None if passes.active is None else passes.active.info(now),
            suspended=None if not passes.suspended else passes.suspended[-1].info(now),
        )

    def audit(self) -> None:
        """Recount requests per class and state, and check the KV pool's books (O(requests): for tests)."""
        self.table.audit()
        self.kv.audit()

    def _update_gauges(self) -> None:
        table = self.table
        for c, (running, waiting) in zip(PriorityClass, self._gauges, strict=True):
            running.set(table.count(c, RequestState.RUNNING))
            waiting.set(table.count(c, RequestState.WAITING) + table.count(c, RequestState.READY))
        self.metrics.kv_usage.set(self.kv.used_blocks / self.kv.num_blocks)

    def stats(self) -> EngineStats:
        """Per-class queue depths, running work, KV usage and recent TTFTs."""
        table, active = self.table, self.passes.active
        return EngineStats(
            classes={
                c.label: ClassStats(
                    waiting=table.count(c, RequestState.WAITING),
                    ready=table.count(c, RequestState.READY),
                    running=table.count(c, RequestState.RUNNING),
                    recent_ttft=tuple(self.outputs.recent_ttft[c]),
                )
                for c in PriorityClass
            },
            kv_used_blocks=self.kv.used_blocks,
            kv_total_blocks=self.kv.num_blocks,
            active_pass=None if active is None else f"{active.stage.label}@layer{active.layer}",
            suspended_passes=len(self.passes.suspended),
            passes_completed=self.outputs.passes_completed,
            preemptions=self.passes.preemptions,
            merges=self.passes.merges,
        )
