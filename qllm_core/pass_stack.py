"""The forward passes in flight: the one running and those suspended under it (the last suspended resumes
first), and every change to them: start from a plan, suspend, resume, merge, and requests leaving.

Starting a pass is where requests take their KV blocks and become RUNNING; a pass gives them back to the
queues (READY or WAITING, KV kept) when it is dropped, and the output processor when it completes.
"""

from __future__ import annotations

from collections.abc import Collection

from qllm_core.cache import KVCache
from qllm_core.config import EngineConfig
from qllm_core.forward import ForwardPass, PassEntry, pass_info
from qllm_core.metrics import EngineMetrics
from qllm_core.models.staged import StagedModel
from qllm_core.request import Request, RequestState
from qllm_core.request_table import RequestTable
from qllm_core.scheduler.base import BatchPlan, Granularity, Policy


class PassStack:
    """The running pass and the suspended ones."""

    def __init__(
        self,
        config: EngineConfig,
        policy: Policy,
        model: StagedModel,
        kv: KVCache,
        table: RequestTable,
        metrics: EngineMetrics,
    ) -> None:
        self._config = config
        self._policy = policy
        self._model = model
        self._kv = kv
        self._table = table
        self._metrics = metrics
        self.active: ForwardPass | None = None
        self.suspended: list[ForwardPass] = []
        self._next_id = 0
        self.preemptions = 0
        self.merges = 0

    def __bool__(self) -> bool:
        return self.active is not None or bool(self.suspended)

    def passes(self) -> list[ForwardPass]:
        """Every pass in flight, the running one first."""
        return ([] if self.active is None else [self.active]) + self.suspended[::-1]

    def holding(self, request: Request) -> ForwardPass | None:
        """The pass a RUNNING request is in."""
        return next((p for p in self.passes() if any(e.request is request for e in p.entries)), None)

    # ---- start, suspend, resume ------------------------------------------------------------------------
    def start(self, plan: BatchPlan, now: float) -> ForwardPass:
        """Make `plan` the running pass: its requests take the KV blocks they need and become RUNNING.

        The policy says first where it will stop (`Policy.points`: a pass it could never preempt runs without
        preemption points, at expert granularity its experts fused); a pass that may be merged into the
        suspended one stops at least at layer boundaries, where merging happens.
        """
        planned = zip(plan.request_ids, plan.num_tokens, strict=True)
        entries = [self._entry(self._table.by_id[rid], n) for rid, n in planned]
        queued = max(now - e.request.waiting_since for e in entries)
        info = pass_info(entries, self._model.num_layers, queued)
        granularity = self._policy.points(info)
        if (
            granularity is Granularity.ITERATION
            and self._config.granularity is not Granularity.ITERATION
            and self.suspended
            and self._policy.should_merge(info, self.suspended[-1].info(now))
        ):
            granularity = Granularity.LAYER
        total = sum(len(e.token_ids) for e in entries)
        for e in entries:
            request = e.request
            self._kv.allocate(request.request_id, e.start + len(e.token_ids))
            self._table.move(request, RequestState.RUNNING)
            if request.times.first_scheduled is None:
                request.times.first_scheduled = now
                self._metrics.queue_wait.labels(request.priority.label).observe(now - request.arrival)
            if e.start < len(request.prompt_token_ids):  # its prompt, or part of it
                marks = request.marks
                marks.prefill_passes += 1
                marks.shared_tokens += total - len(e.token_ids)
                marks.shared_requests += len(entries) - 1
        self._next_id += 1
        started = ForwardPass(
            self._next_id,
            self._model,
            self._kv,
            entries,
            granularity,
            self._config.expert_spans_per_layer,
            queued_s=queued,
        )
        self.active = started
        return started

    @staticmethod
    def _entry(request: Request, num_tokens: int) -> PassEntry:
        start = request.num_cached_tokens
        end = start + num_tokens
        prompt_len = len(request.prompt_token_ids)
        return PassEntry(
            request,
            start,
            request.token_slice(start, end),
            samples=end == request.num_tokens,
            all_logits=request.params.prompt_logprobs is not None and start < prompt_len,
        )

    def suspend_active(self, now: float) -> None:
        """Set the running pass aside for more urgent work; it keeps its tensors and its KV."""
        running = self.active
        assert running is not None  # noqa: S101
        running.suspend(now)
        self.suspended.append(running)
        self.active = None
        self.preemptions += 1
        self._metrics.preemptions.labels(self._config.granularity.value).inc()

    def resume(self, now: float) -> ForwardPass:
        """The last suspended pass runs again."""
        resumed = self.suspended.pop()
        resumed.resume(now)
        self.active = resumed
        return resumed

    def finish_active(self) -> ForwardPass:
        """The running pass has completed: it leaves the stack (its requests go to the output processor)."""
        finished = self.active
        assert finished is not None and finished.done  # noqa: S101
        self.active = None
        credit_run_time(finished)
        return finished

    def maybe_merge(self, now: float) -> None:
        """With merging on, an LS pass joins a suspended pass once it reaches the layer where that one stopped."""
        active = self.active
        if active is None or not self.suspended:
            return
        target = self.suspended[-1]
        if (
            active.layer == target.layer
            and active.at_layer_boundary
            and target.at_layer_boundary
            and not active.done
            and len(active.entries) + len(target.entries) <= self._config.max_batch_size
            and self._policy.should_merge(active.info(now), target.info(now))
        ):
            moved = list(active.entries)
            try:
                target.merge(active)
            except RuntimeError:
                return  # not both before a layer's attention (e.g. embed/head): keep them apart
            for entry in moved:  # so that the target's run time, added at its end, counts from the merge
                entry.request.marks.own_pass_s += active.run_s - target.run_s
            self.suspended.pop()
            target.resume(now)
            self.active = target
            self.merges += 1

    # ---- requests leaving a pass -----------------------------------------------------------------------
    def remove(self, holder: ForwardPass, request_ids: Collection[str]) -> list[PassEntry]:
        """Take requests out of a pass at a layer boundary (nothing lost for the others); a pass left empty
        leaves the stack. Returns the removed entries, whose requests are still RUNNING: the caller ends them."""
        gone = holder.remove(request_ids)
        for entry in gone:
            entry.request.marks.own_pass_s += holder.run_s
        if not holder.entries:
            self._discard(holder)
        return gone

    def drop(self, dropped: ForwardPass) -> list[Request]:
        """Give up a pass's work: its requests go back to the queues with the KV they had before it (what the
        pass wrote beyond that is overwritten when they run again). Returns them."""
        self._discard(dropped)
        credit_run_time(dropped)
        requests = [e.request for e in dropped.entries]
        for request in requests:
            self._table.move(request, request.queue_state)
        return requests

    def _discard(self, holder: ForwardPass) -> None:
        if holder is self.active:
            self.active = None
        else:
            self.suspended.remove(holder)


def credit_run_time(finished: ForwardPass) -> None:
    """A pass leaves: the time it ran counts as its requests' own (their timelines)."""
    for entry in finished.entries:
        entry.request.marks.own_pass_s += finished.run_s
