"""The synchronous engine: one `step()` is schedule -> run -> postprocess.

Schedule: ask the policy whether to preempt the running pass, or what to run next (making KV room first).
Run: advance the running pass to its next preemption point. Postprocess: when it completes, the output
processor samples and builds outputs. Each job has its own module; this one wires them. Single-threaded
by design: `Engine` (engine.py) drives it from its own thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from qllm_core.accounting import TimeAccounts
from qllm_core.cache import KVCache
from qllm_core.calibration import cost_model_for
from qllm_core.config import EngineConfig
from qllm_core.detokenizer import Detokenizer
from qllm_core.forward import ForwardPass, UnitObserver
from qllm_core.lifecycle import Lifecycle
from qllm_core.memory_relief import MemoryRelief
from qllm_core.metrics import EngineMetrics
from qllm_core.models.registry import LoadedModel, load_model
from qllm_core.output_processor import OutputProcessor
from qllm_core.outputs import RequestOutput
from qllm_core.params import SamplingParams
from qllm_core.pass_stack import PassStack
from qllm_core.request import FinishReason, PriorityClass, Request, RequestState
from qllm_core.request_table import Limits, RequestTable
from qllm_core.sampler import Sampler
from qllm_core.scheduler import POLICIES, BatchPlan, SchedulerView
from qllm_core.stats import ClassStats, EngineStats

BE = PriorityClass.BEST_EFFORT


class EngineCore:
    """Requests, KV pool, passes and the scheduling policy; no threads, no Ray."""

    def __init__(
        self,
        config: EngineConfig,
        metrics: EngineMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        loaded: LoadedModel | None = None,
        on_unit: UnitObserver | None = None,
    ) -> None:
        """`on_unit` observes every unit of every pass (tests)."""
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
        self.accounts = TimeAccounts(self.metrics, config.ttft_window)
        sampler = Sampler(self.loaded.device)
        self.passes = PassStack(
            config, self.policy, self.model, self.kv, self.table, sampler, self.accounts, self.metrics, on_unit
        )
        outputs = OutputProcessor(
            Detokenizer(self.loaded.tokenizer), self.loaded.eos_token_ids, self.loaded.max_model_len
        )
        self.lifecycle = Lifecycle(self.table, self.kv, sampler, outputs, self.accounts, self.metrics)
        self.memory = MemoryRelief(
            self.kv, self.table, self.passes, self.metrics, self.policy.order_key, config.max_batch_size
        )
        self.cost = cost_model_for(self)
        """What a pass costs on this model and device: policies plan with it, completed passes refine its error."""
        self._clock = clock
        self._submissions = 0
        """Requests added or aborted from outside: what can change a policy's mind in the middle of a pass."""
        self._declined: tuple[int, int] | None = None
        """(pass id, submissions) when the policy last declined to preempt that pass."""
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
        self.accounts.arrived(request)
        self._submissions += 1
        self.metrics.prompt_tokens.labels(request.priority.label).inc(len(prompt_token_ids))
        return request

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Abort a request: it ends, and its KV is freed, at the first point where it can leave: at once when
        it is queued or in a pass between layers, at the running pass's next layer boundary when that pass is
        between two experts (`PassStack.let_go`). Returns the outputs of the requests that ended now."""
        request = self.table.get(request_id)
        if request is None:
            return []
        self._submissions += 1
        if request.state is RequestState.RUNNING:
            self.passes.flag(request)
            return self._let_go()
        output = self.lifecycle.end(request, FinishReason.ABORT, self._clock())
        self._update_gauges()
        return [output]

    def has_work(self) -> bool:
        """True while anything is queued, running or suspended."""
        return bool(len(self.table)) or bool(self.passes)

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request with an error (after an internal failure); the engine stays usable."""
        now = self._clock()
        self.passes.clear()
        outputs = [self.lifecycle.end(r, FinishReason.ERROR, now, error=message) for r in self.table]
        self._update_gauges()
        return outputs

    # ---- the step: schedule -> run -> postprocess --------------------------------------------------------
    def step(self, interrupted: Callable[[], bool] | None = None) -> list[RequestOutput]:
        """Advance to the next preemption point; returns outputs of requests that got a token or ended.

        With `interrupted`, a cheap probe for news from outside (the async front passes "a command is
        queued"), the pass runs on through the preemption points at which the policy has already declined
        to preempt it, until the probe fires or the pass ends: nothing else can change the policy's mind
        (`Policy.should_preempt`), so such a point costs the probe instead of a return to the caller.
        """
        outputs = self._schedule(self._clock())
        if self.passes.active is None:
            return outputs
        outputs += self._run(interrupted)
        finished = self.passes.active
        if finished is None or finished.result is None:
            return outputs
        self.passes.complete_active()
        if not finished.reshaped:
            self.cost.observe(finished.features, finished.run_s)
        outputs += self.lifecycle.after_pass(finished.result, self._clock())
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
                passes.suspend_active(now)
                outputs += self._let_go()  # requests flagged in a pass suspended between two experts
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
        (self.passes.active or active).run_s += self.accounts.ran(started, ended)
        if any(e.request.priority is BE for e in active.entries):
            self.accounts.be_advanced(ended)
        return outputs

    def _advance(self, active: ForwardPass) -> list[RequestOutput]:
        active.step()
        self.passes.maybe_merge(self._clock())
        return self._let_go()

    def _let_go(self) -> list[RequestOutput]:
        """End the aborted requests that can leave their passes now."""
        gone = self.passes.let_go()
        if not gone:
            return []
        now = self._clock()
        outputs = [self.lifecycle.end(r, FinishReason.ABORT, now) for r in gone]
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
        self.accounts.be_queue_seen(now, bool(queues.waiting[BE] or queues.ready[BE]))
        return SchedulerView(
            now=now,
            waiting=queues.waiting,
            ready=queues.ready,
            free_blocks=kv.free_blocks,
            block_cost=lambda r, n: kv.extra_blocks(r.request_id, r.num_cached_tokens + n),
            running=None if passes.active is None else passes.active.info(now),
            suspended=None if not passes.suspended else passes.suspended[-1].info(now),
            cost=self.cost,
            be_stalled_s=self.accounts.be_stalled_s(now),
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
                    recent_ttft=tuple(self.accounts.recent_ttft[c]),
                )
                for c in PriorityClass
            },
            kv_used_blocks=self.kv.used_blocks,
            kv_total_blocks=self.kv.num_blocks,
            active_pass=None if active is None else f"{active.stage.label}@layer{active.layer}",
            suspended_passes=len(self.passes.suspended),
            passes_completed=self.passes.completed,
            preemptions=self.passes.preemptions,
            resumes=self.passes.resumes,
            merges=self.passes.merges,
        )
