"""The synchronous engine: requests, KV memory, forward passes and the policy that orders them.

Single-threaded by design; `Engine` (engine.py) drives it from its own thread. One `step()` runs the
active forward pass to its next preemption point, asking the policy first whether a more urgent pass
should take over, and finishes the pass (sampling, stop checks, outputs) when it is done.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from qllm_core.cache import KVCache
from qllm_core.config import EngineConfig, Granularity
from qllm_core.detokenizer import Detokenizer
from qllm_core.errors import DuplicateRequestError, InvalidRequestError, PromptTooLongError
from qllm_core.forward import ForwardPass, PassEntry
from qllm_core.metrics import EngineMetrics
from qllm_core.models.registry import LoadedModel, load_model
from qllm_core.request import (
    FinishReason,
    PriorityClass,
    Request,
    RequestOutput,
    RequestState,
    SamplingParams,
)
from qllm_core.sampler import Sampler
from qllm_core.scheduler import POLICIES, BatchPlan, PassInfo, SchedulerView
from qllm_core.stats import ClassStats, EngineStats, TtftSample


@dataclass
class _Counters:
    passes: int = 0
    preemptions: int = 0
    merges: int = 0
    submissions: int = 0
    """Requests added or aborted from outside: what can change a policy's mind in the middle of a pass."""
    declined: tuple[int, int] | None = None
    """(pass id, submissions) when the policy last declined to preempt that pass."""
    recent_ttft: dict[PriorityClass, deque[TtftSample]] = field(default_factory=dict)


class EngineCore:
    """Queues, KV pool, passes and the scheduling policy; no threads, no Ray."""

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
        self.kv = KVCache.for_layout(
            self.model.kv_layout(),
            num_blocks=config.kv_cache_tokens // config.block_size,
            block_size=config.block_size,
            dtype=self.loaded.dtype,
            device=self.loaded.device,
        )
        self.policy = POLICIES[config.policy](config.scheduler_config())
        self.metrics = metrics if metrics is not None else EngineMetrics()
        self.sampler = Sampler(self.loaded.device)
        self.detokenizer = Detokenizer(self.loaded.tokenizer)
        self.requests: dict[str, Request] = {}
        self.active: ForwardPass | None = None
        self.suspended: list[ForwardPass] = []
        self._suspended_at: dict[int, float] = {}
        self._aborting: set[str] = set()
        self._emitted_text: dict[str, str] = {}
        self._in_state: Counter[tuple[PriorityClass, RequestState]] = Counter()
        """Requests per class and state, kept by `_move` so that stats and gauges need no recount."""
        self._clock = clock
        self._next_pass_id = 0
        self._counters = _Counters(recent_ttft={c: deque(maxlen=config.ttft_window) for c in PriorityClass})

    # ---- requests in and out -------------------------------------------------------------------------
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
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be a SamplingParams", param="params")
        cls = PriorityClass.parse(priority)
        if request_id in self.requests:
            raise DuplicateRequestError(f"request id {request_id!r} is already in use", param="request_id")
        self._check_prompt(prompt_token_ids, params)
        if ttft_deadline_s is not None and (
            isinstance(ttft_deadline_s, bool)
            or not isinstance(ttft_deadline_s, int | float)
            or not math.isfinite(ttft_deadline_s)
            or ttft_deadline_s <= 0
        ):
            raise InvalidRequestError("ttft_deadline_s must be a positive number of seconds", param="ttft_deadline_s")
        when = self._clock() if arrival is None else arrival
        request = Request(request_id, list(prompt_token_ids), params, cls, when, ttft_deadline_s)
        self.requests[request_id] = request
        self._in_state[(cls, request.state)] += 1
        self._counters.submissions += 1
        self.metrics.prompt_tokens.labels(cls.label).inc(len(prompt_token_ids))
        return request

    def _check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        vocab = self.loaded.vocab_size
        if not isinstance(ids, list | tuple) or not ids:
            raise InvalidRequestError("the prompt is empty; send at least one token", param="prompt")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        if any(t >= vocab for t in params.stop_token_ids):
            raise InvalidRequestError(
                f"stop_token_ids must be below the vocabulary size {vocab}", param="stop_token_ids"
            )
        limit = self.loaded.max_model_len
        if len(ids) >= limit:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens but the context is {limit}; shorten the prompt", param="prompt"
            )
        if len(ids) + params.max_tokens > limit:
            raise PromptTooLongError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context of {limit} "
                f"tokens; set max_tokens <= {limit - len(ids)}",
                param="max_tokens",
            )
        if self.kv.blocks_for(len(ids) + params.max_tokens) > self.kv.num_blocks:
            raise PromptTooLongError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the KV cache "
                f"({self.kv.capacity_tokens} tokens); lower max_tokens or raise kv_cache_tokens",
                param="max_tokens",
            )

    def abort(self, request_id: str) -> RequestOutput | None:
        """Abort a request. Queued: freed now. Inside a pass: freed when that pass ends. Unknown: None."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._counters.submissions += 1
        if request.state is RequestState.RUNNING:
            self._aborting.add(request_id)
            return None
        return self._finish(request, FinishReason.ABORT, self._clock())

    def has_work(self) -> bool:
        """True while anything is queued, running or suspended."""
        return bool(self.requests) or self.active is not None or bool(self.suspended)

    # ---- the step ------------------------------------------------------------------------------------
    def step(self, interrupted: Callable[[], bool] | None = None) -> list[RequestOutput]:
        """Advance to the next preemption point; returns outputs of requests that got a token or ended.

        With `interrupted`, a cheap probe for news from outside (the async front passes "a command is
        queued"), the pass runs on through the preemption points at which the policy has already declined
        to preempt it, until the probe fires or the pass ends: nothing else can change the policy's mind
        (`Policy.should_preempt`), so such a point costs the probe instead of a return to the caller.
        """
        now = self._clock()
        preempt = self._should_preempt(now)
        # Memory is only made room for when a new pass is about to be planned.
        outputs = self._relieve_memory() if preempt or self.active is None else []
        if preempt:
            plan = self.policy.next_batch(self._view(now))
            if plan is not None:
                self._suspend_active(now)
                self.active = self._start(plan, now)
        if self.active is None:
            self.active = self._choose_pass(now)
        if self.active is None:
            return outputs
        self._advance(self.active, interrupted)
        if not self.active.done:
            return outputs
        finished, self.active = self.active, None
        outputs += self._complete(finished)
        self._update_gauges()
        return outputs

    def _advance(self, active: ForwardPass, interrupted: Callable[[], bool] | None) -> None:
        active.step()
        self._maybe_merge()
        while (
            interrupted is not None
            and self.active is active
            and not active.done
            and self._declined(active)
            and not interrupted()
        ):
            active.step()
            self._maybe_merge()

    def _declined(self, active: ForwardPass) -> bool:
        """True when the policy said no to preempting this pass and no request arrived or left since."""
        return self._counters.declined == (active.pass_id, self._counters.submissions)

    def _should_preempt(self, now: float) -> bool:
        """Ask the policy, unless it already declined for this pass and nothing changed since
        (`Policy.should_preempt`): at expert granularity that saves a view per expert."""
        if self.active is None or self._declined(self.active):
            return False
        preempt = self.policy.should_preempt(self._view(now))
        self._counters.declined = None if preempt else (self.active.pass_id, self._counters.submissions)
        return preempt

    def _choose_pass(self, now: float) -> ForwardPass | None:
        view = self._view(now)
        if self.suspended and self.policy.should_resume(view):
            return self._resume(now)
        plan = self.policy.next_batch(view)
        if plan is not None:
            return self._start(plan, now)
        return self._resume(now) if self.suspended else None

    def _start(self, plan: BatchPlan, now: float) -> ForwardPass:
        entries = []
        for rid in plan.request_ids:
            request = self.requests[rid]
            self.kv.allocate(rid, request.num_tokens)
            self._move(request, RequestState.RUNNING)
            if request.times.first_scheduled is None:
                request.times.first_scheduled = now
                self.metrics.queue_wait.labels(request.priority.label).observe(now - request.arrival)
            start = request.num_cached_tokens
            entries.append(PassEntry(request, start, tuple(request.all_token_ids[start:])))
        self._next_pass_id += 1
        self._update_gauges()
        started = ForwardPass(
            self._next_pass_id,
            self.model,
            self.kv,
            entries,
            self.config.granularity_level,
            self.config.expert_units_per_layer,
        )
        started.queued_s = max(now - e.request.waiting_since for e in entries)
        if started.granularity is not Granularity.ITERATION and self._never_preempted(started, now):
            # No preemption points then: nothing checks in on it, and at expert granularity its experts
            # run fused. It has run nothing yet, so its granularity can still change.
            started.granularity = Granularity.ITERATION
        return started

    def _never_preempted(self, starting: ForwardPass, now: float) -> bool:
        """True when the policy rules out ever preempting a pass about to start (`Policy.may_preempt`). A
        pass that may be merged into a suspended one keeps its layer boundaries, where merging happens."""
        if self.config.merge_ls_into_be and self.suspended:
            return False
        return not self.policy.may_preempt(self._pass_info(starting, now, suspended=False))

    def _suspend_active(self, now: float) -> None:
        running = self.active
        assert running is not None  # noqa: S101
        for entry in running.entries:
            entry.request.preemptions += 1
        self._suspended_at[running.pass_id] = now
        self.suspended.append(running)
        self.active = None
        self._counters.preemptions += 1
        self.metrics.preemptions.labels(self.config.granularity).inc()

    def _resume(self, now: float) -> ForwardPass:
        resumed = self.suspended.pop()
        resumed.suspended_s += now - self._suspended_at.pop(resumed.pass_id)
        return resumed

    def _maybe_merge(self) -> None:
        """With merging on, an LS pass joins a suspended pass once it reaches the layer where that one stopped."""
        active = self.active
        if not (self.config.merge_ls_into_be and active is not None and self.suspended):
            return
        target = self.suspended[-1]
        if (
            active.layer == target.layer
            and active.at_layer_boundary
            and target.at_layer_boundary
            and not active.done
            and len(active.entries) + len(target.entries) <= self.config.max_batch_size
        ):
            try:
                target.merge(active)
            except RuntimeError:
                return  # not both before a layer's attention (e.g. embed/head): keep them apart
            self._resume(self._clock())
            self.active = target
            self._counters.merges += 1

    def _complete(self, finished: ForwardPass) -> list[RequestOutput]:
        assert finished.logits is not None  # noqa: S101
        entries = finished.entries
        tokens = self.sampler.sample(
            finished.logits, [e.request.request_id for e in entries], [e.request.params for e in entries]
        )
        now = self._clock()
        self._counters.passes += 1
        outputs = []
        generated = dict.fromkeys(PriorityClass, 0)
        for entry, token in zip(entries, tokens, strict=True):
            request = entry.request
            request.num_cached_tokens = request.num_tokens
            if request.request_id in self._aborting:
                outputs.append(self._finish(request, FinishReason.ABORT, now))
                continue
            generated[request.priority] += 1
            outputs.append(self._append_token(request, token, now))
        for cls, count in generated.items():  # once per class, not per token: a labelled inc takes a lock
            if count:
                self.metrics.generated_tokens.labels(cls.label).inc(count)
        return outputs

    def _append_token(self, request: Request, token: int, now: float) -> RequestOutput:
        request.output_token_ids.append(token)
        request.times.tokens.append(now)
        cls = request.priority
        if request.times.first_token is None:
            request.times.first_token = now
            ttft = now - request.arrival
            self.metrics.ttft.labels(cls.label).observe(ttft)
            self._counters.recent_ttft[cls].append(TtftSample(now, ttft))
        params = request.params
        text = self.detokenizer.text(request.request_id, request.output_token_ids)
        stop_hit = _stop_index(text, params.stop) >= 0
        reason: FinishReason | None = None
        if stop_hit or token in params.stop_token_ids or (token in self.loaded.eos_token_ids and not params.ignore_eos):
            reason = FinishReason.STOP
        elif len(request.output_token_ids) >= params.max_tokens or request.num_tokens >= self.loaded.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            final = self.detokenizer.full(request.output_token_ids)
            cut = _stop_index(final, params.stop)
            return self._finish(request, reason, now, text=final if cut < 0 else final[:cut], new=(token,))
        self._move(request, RequestState.READY)
        shown = _streamable(text, params.stop)
        emitted = self._emitted_text.get(request.request_id, "")
        self._emitted_text[request.request_id] = shown
        return self._output(request, (token,), shown[len(emitted) :])

    def _output(
        self, request: Request, new: tuple[int, ...], delta: str, final_text: str | None = None, error: str | None = None
    ) -> RequestOutput:
        finished = final_text is not None
        return RequestOutput(
            request_id=request.request_id,
            priority=request.priority,
            prompt_token_count=len(request.prompt_token_ids),
            new_token_ids=new,
            num_output_tokens=len(request.output_token_ids),
            text_delta=delta,
            finished=finished,
            finish_reason=request.finish_reason,
            error=error,
            ttft_s=request.times.ttft,
            preemptions=request.preemptions,
            token_ids=tuple(request.output_token_ids) if finished else (),
            text=final_text or "",
        )

    def _finish(
        self,
        request: Request,
        reason: FinishReason,
        now: float,
        text: str | None = None,
        error: str | None = None,
        new: tuple[int, ...] = (),
    ) -> RequestOutput:
        rid = request.request_id
        request.finish_reason = reason
        request.times.finished = now
        self._move(request, RequestState.FINISHED)
        self.kv.free(rid)
        self.sampler.forget(rid)
        self.detokenizer.forget(rid)
        self._aborting.discard(rid)
        del self.requests[rid]
        self._in_state[(request.priority, RequestState.FINISHED)] -= 1
        emitted = self._emitted_text.pop(rid, "")
        text = emitted if text is None else text
        # The held-back tail (a stop string's start, half a character) is what the final text adds.
        delta = text[len(emitted) :] if text.startswith(emitted) else ""
        cls = request.priority.label
        self.metrics.requests.labels(cls, reason.value).inc()
        self.metrics.e2e.labels(cls).observe(now - request.arrival)
        n = len(request.output_token_ids)
        if n > 1 and request.times.first_token is not None:
            self.metrics.tpot.labels(cls).observe((request.times.tokens[-1] - request.times.first_token) / (n - 1))
        return self._output(request, new, delta, final_text=text, error=error)

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request with an error (after an internal failure); the engine stays usable."""
        now = self._clock()
        self.active = None
        self.suspended.clear()
        self._suspended_at.clear()
        return [self._finish(r, FinishReason.ERROR, now, error=message) for r in list(self.requests.values())]

    # ---- memory pressure -------------------------------------------------------------------------------
    def _relieve_memory(self) -> list[RequestOutput]:
        """Make room for the most urgent queued request that does not fit, taking KV from less urgent ones.

        Victims, least urgent first: requests holding KV between steps, then suspended passes. They go back
        to the queue and recompute their KV later, so nothing is lost. Returns the outputs of requests that
        were aborted inside a dropped pass (they end here, and their callers must hear of it).
        """
        outputs: list[RequestOutput] = []
        queued = [r for r in self.requests.values() if r.state in (RequestState.WAITING, RequestState.READY)]
        key = self.policy.order_key
        free = self.kv.free_blocks
        for request in sorted(queued, key=key)[: self.config.max_batch_size]:
            cost = self.kv.extra_blocks(request.request_id, request.num_tokens)
            if cost <= free:
                free -= cost
                continue
            missing = cost - free
            victims = sorted(
                (r for r in queued if r.state is RequestState.READY and key(r) > key(request)), key=key, reverse=True
            )
            for victim in victims:
                if missing <= 0:
                    break
                missing -= self._evict(victim)
            for suspended in list(reversed(self.suspended)):
                if missing <= 0:
                    break
                if all(key(e.request) > key(request) for e in suspended.entries):
                    missing -= self._drop_suspended(suspended, outputs)
            break
        return outputs

    def _evict(self, request: Request) -> int:
        freed = self.kv.free(request.request_id)
        request.num_cached_tokens = 0
        request.evictions += 1
        self._move(request, RequestState.WAITING)
        self.metrics.evictions.labels(request.priority.label).inc()
        return freed

    def _drop_suspended(self, dropped: ForwardPass, outputs: list[RequestOutput]) -> int:
        self.suspended.remove(dropped)
        self._suspended_at.pop(dropped.pass_id, None)
        freed = 0
        for entry in dropped.entries:
            request = entry.request
            if request.request_id in self._aborting:
                freed += self.kv.free(request.request_id)  # _finish then finds nothing left to free
                outputs.append(self._finish(request, FinishReason.ABORT, self._clock()))
                continue
            freed += self._evict(request)
        return freed

    # ---- views and stats -------------------------------------------------------------------------------
    def _pass_info(self, p: ForwardPass, now: float, suspended: bool) -> PassInfo:
        extra = now - self._suspended_at[p.pass_id] if suspended else 0.0
        return PassInfo(
            classes=p.classes,
            ls_prefill=p.ls_prefill,
            held_back_s=p.queued_s + p.suspended_s + extra,
            layer=p.layer,
            at_layer_boundary=p.at_layer_boundary,
            num_tokens=p.num_tokens,
            layers_left=self.model.num_layers - p.layer,
        )

    def _view(self, now: float) -> SchedulerView:
        waiting: dict[PriorityClass, list[Request]] = {c: [] for c in PriorityClass}
        ready: dict[PriorityClass, list[Request]] = {c: [] for c in PriorityClass}
        for r in self.requests.values():
            if r.state is RequestState.WAITING:
                waiting[r.priority].append(r)
            elif r.state is RequestState.READY:
                ready[r.priority].append(r)
        kv = self.kv
        return SchedulerView(
            now=now,
            waiting=waiting,
            ready=ready,
            free_blocks=kv.free_blocks,
            block_cost=lambda r: kv.extra_blocks(r.request_id, r.num_tokens),
            running=None if self.active is None else self._pass_info(self.active, now, False),
            suspended=None if not self.suspended else self._pass_info(self.suspended[-1], now, True),
        )

    def _move(self, request: Request, state: RequestState) -> None:
        """Every state change goes through here, so the per-state counts stay exact without a recount."""
        self._in_state[(request.priority, request.state)] -= 1
        request.move_to(state)
        self._in_state[(request.priority, state)] += 1

    def audit(self) -> None:
        """Recount requests per class and state, and check the KV pool's books (O(requests): for tests)."""
        kept = {k: n for k, n in self._in_state.items() if n}
        recount = dict(Counter((r.priority, r.state) for r in self.requests.values()))
        if kept != recount:
            raise RuntimeError(f"request counts drifted: kept {kept}, recounted {recount}")
        self.kv.audit()

    def _update_gauges(self) -> None:
        counts = self._in_state
        for c in PriorityClass:
            self.metrics.running.labels(c.label).set(counts[(c, RequestState.RUNNING)])
            self.metrics.waiting.labels(c.label).set(
                counts[(c, RequestState.WAITING)] + counts[(c, RequestState.READY)]
            )
        self.metrics.kv_usage.set(self.kv.used_blocks / self.kv.num_blocks)

    def stats(self) -> EngineStats:
        """Per-class queue depths, running work, KV usage and recent TTFTs."""
        counts = self._in_state
        active = self.active
        return EngineStats(
            classes={
                c.label: ClassStats(
                    waiting=counts[(c, RequestState.WAITING)],
                    ready=counts[(c, RequestState.READY)],
                    running=counts[(c, RequestState.RUNNING)],
                    recent_ttft=tuple(self._counters.recent_ttft[c]),
                )
                for c in PriorityClass
            },
            kv_used_blocks=self.kv.used_blocks,
            kv_total_blocks=self.kv.num_blocks,
            active_pass=None if active is None else f"{active.stage.value}@layer{active.layer}",
            suspended_passes=len(self.suspended),
            passes_completed=self._counters.passes,
            preemptions=self._counters.preemptions,
            merges=self._counters.merges,
        )


def _stop_index(text: str, stops: tuple[str, ...]) -> int:
    """Where the first stop string starts in `text`, or -1."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


def _streamable(text: str, stops: tuple[str, ...]) -> str:
    """Text safe to show mid-stream: hold back a tail that may be the start of a stop string, or half a character."""
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
        hold = max(hold, 1)
    return text[: len(text) - hold]
