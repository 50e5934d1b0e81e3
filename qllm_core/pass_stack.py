"""The forward passes in flight: the one running and those suspended under it (the last suspended resumes
first), and every change to them: start from a plan, suspend, resume, merge, complete, requests leaving.
Nothing else changes this state.

Starting a pass is where requests take their KV blocks and become RUNNING; a pass gives them back to the
queues (READY or WAITING, KV kept) when it is dropped, and to the lifecycle when it completes.

A request aborted inside a pass is flagged and let go at the first point where it can leave (`let_go`).
"""

from __future__ import annotations

from collections.abc import Collection

from qllm_core.accounting import TimeAccounts
from qllm_core.cache import KVCache
from qllm_core.config import EngineConfig
from qllm_core.forward import ForwardPass, PassEntry, UnitObserver, features_of, pass_info
from qllm_core.metrics import EngineMetrics
from qllm_core.models.staged import StagedModel
from qllm_core.request import Request, RequestState
from qllm_core.request_table import RequestTable
from qllm_core.sampler import Sampler
from qllm_core.scheduler.base import BatchPlan, Policy


class PassStack:
    """The running pass and the suspended ones."""

    def __init__(
        self,
        config: EngineConfig,
        policy: Policy,
        model: StagedModel,
        kv: KVCache,
        table: RequestTable,
        sampler: Sampler,
        accounts: TimeAccounts,
        metrics: EngineMetrics,
        on_unit: UnitObserver | None = None,
    ) -> None:
        """`on_unit`: observes every unit every pass runs (tests)."""
        self._config = config
        self._policy = policy
        self._model = model
        self._kv = kv
        self._table = table
        self._sampler = sampler
        self._accounts = accounts
        self._metrics = metrics
        self._on_unit = on_unit
        self.active: ForwardPass | None = None
        self.suspended: list[ForwardPass] = []
        self._leaving: set[str] = set()
        """Requests aborted inside a pass that could not leave it yet."""
        self._next_id = 0
        self.completed = 0
        self.preemptions = 0
        self.resumes = 0
        self.merges = 0

    def __bool__(self) -> bool:
        return self.active is not None or bool(self.suspended)

    def passes(self) -> list[ForwardPass]:
        """Every pass in flight, the running one first."""
        return ([] if self.active is None else [self.active]) + self.suspended[::-1]

    # ---- start, suspend, resume, complete --------------------------------------------------------------
    def start(self, plan: BatchPlan, now: float) -> ForwardPass:
        """Make `plan` the running pass: its requests take the KV blocks they need and become RUNNING. The
        policy decides here, once, where it will stop (`Policy.points`); the pass carries that."""
        planned = zip(plan.request_ids, plan.num_tokens, strict=True)
        entries = [self._entry(self._table.by_id[rid], n) for rid, n in planned]
        queued = max(now - e.request.waiting_since for e in entries)
        features = features_of(entries)
        info = pass_info(entries, self._model.num_layers, queued, features)
        under = self.suspended[-1].info(now) if self.suspended else None
        granularity = self._policy.points(info, under)
        for e in entries:
            self._kv.allocate(e.request.request_id, e.start + len(e.token_ids))
            self._table.move(e.request, RequestState.RUNNING)
        self._accounts.pass_started(
            [e.request for e in entries],
            [len(e.token_ids) for e in entries],
            [e.start < len(e.request.prompt_token_ids) for e in entries],
            now,
        )
        self._next_id += 1
        started = ForwardPass(
            self._next_id,
            self._model,
            self._kv,
            entries,
            granularity,
            self._config.expert_spans_per_layer,
            queued_s=queued,
            sampler=self._sampler,
            on_unit=self._on_unit,
            features=features,
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
        self._metrics.preemptions.labels(running.granularity.value).inc()

    def resume(self, now: float) -> ForwardPass:
        """The last suspended pass runs again."""
        resumed = self.suspended.pop()
        resumed.resume(now)
        self.active = resumed
        self.resumes += 1
        return resumed

    def complete_active(self) -> ForwardPass:
        """The running pass has reached its end: it leaves the stack, its result goes to the lifecycle."""
        finished = self.active
        assert finished is not None and finished.result is not None  # noqa: S101
        assert not self._leaving.intersection(e.request.request_id for e in finished.entries)  # noqa: S101
        self.active = None
        self.completed += 1
        self._accounts.credit((e.request for e in finished.entries), finished.run_s)
        return finished

    def maybe_merge(self, now: float) -> None:
        """With merging on, an LS pass joins a suspended pass once it reaches the layer where that one stopped."""
        active = self.active
        if active is None or not self.suspended:
            return
        target = self.suspended[-1]
        if (
            target.can_merge(active)
            and len(active.entries) + len(target.entries) <= self._config.max_batch_size
            and self._policy.should_merge(active.info(now), target.info(now))
        ):
            # So that the target's run time, credited at its end, counts for the moved requests from the merge.
            self._accounts.credit((e.request for e in active.entries), active.run_s - target.run_s)
            target.merge(active)
            self.suspended.pop()
            target.resume(now)
            self.active = target
            self.merges += 1

    # ---- requests leaving ------------------------------------------------------------------------------
    def flag(self, request: Request) -> None:
        """A RUNNING request was aborted: it leaves its pass at the first point where it can (`let_go`)."""
        self._leaving.add(request.request_id)

    def let_go(self) -> list[Request]:
        """Flagged requests out of every pass they can leave now: a pass between layers lets them go with
        nothing lost for the others; a suspended pass between two experts is dropped (its work is redone, its
        other requests keep the KV they had before it). The running pass keeps them until its next layer
        boundary. Returns the requests let go, still RUNNING: the caller ends them."""
        if not self._leaving:
            return []
        gone: list[Request] = []
        for holder in self.passes():
            ids = self._leaving.intersection(e.request.request_id for e in holder.entries)
            if not ids:
                continue
            if holder.at_layer_boundary:
                gone += [e.request for e in self.remove(holder, ids)]
            elif holder is not self.active:
                gone += [r for r in self.drop(holder) if r.request_id in ids]
        self._leaving.difference_update(r.request_id for r in gone)
        return gone

    def remove(self, holder: ForwardPass, request_ids: Collection[str]) -> list[PassEntry]:
        """Take requests out of a pass at a layer boundary (nothing lost for the others); a pass left empty
        leaves the stack. Returns the removed entries, whose requests are still RUNNING: the caller ends them."""
        gone = holder.remove(request_ids)
        self._accounts.credit((e.request for e in gone), holder.run_s)
        if not holder.entries:
            self._discard(holder)
        return gone

    def drop(self, dropped: ForwardPass) -> list[Request]:
        """Give up a pass's work: its requests go back to the queues with the KV they had before it (what the
        pass wrote beyond that is overwritten when they run again). Returns them.

        On a model with recurrent layers they give up their KV and state too and recompute from the start: the
        state has taken in the pass's tokens in the layers it ran, and feeding them again would count them twice."""
        self._discard(dropped)
        requests = [e.request for e in dropped.entries]
        self._accounts.credit(requests, dropped.run_s)
        for request in requests:
            if self._kv.state is not None:
                self._kv.free(request.request_id)
                request.num_cached_tokens = 0
            self._table.move(request, request.queue_state)
        return requests

    def clear(self) -> None:
        """Forget every pass (after an engine failure, whose caller ends every request)."""
        for holder in self.passes():
            self._accounts.credit((e.request for e in holder.entries), holder.run_s)
        self.active = None
        self.suspended.clear()
        self._leaving.clear()

    def _discard(self, holder: ForwardPass) -> None:
        if holder is self.active:
            self.active = None
        else:
            self.suspended.remove(holder)
