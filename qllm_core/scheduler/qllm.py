"""`qllm`: LS first for a request's whole life, with sub-iteration preemption, planned on the pass cost model.

Every decision asks the view's cost model (`qllm_core.cost_model`) what a pass costs, and weighs LS requests
by slowdown (time since arrival plus the pass's cost, over the cost of their own prompt alone):
- LS prompts are ordered by deadline, then by the slowdown they would have if served now (highest first:
  short prompts go first, and a long one ages instead of starving). They are grouped only while the group
  lowers the worse slowdown of its members and the one joining, against that one waiting for the next pass.
- LS decodes ride in an LS prompt pass when they add at most `ls_ttft_slack` to its cost, or when waiting
  out the prompt pass would put them past the LS TPOT target. With no LS prompt waiting, every pass serves
  the LS decodes that are ready, and BE rides in the time that pass may spare under the target
  (`ls_tpot_target_s`, by default what a `chunked` pass of those decodes would cost): BE decodes, then BE
  prompt chunks sized by the cost model.
- A waiting LS prompt preempts a running pass without an LS prefill only when waiting out what is left of it
  would cost the prompt more than `ls_ttft_slack` of its isolated time; it preempts a running LS prefill only
  when that lowers the worse slowdown of the two sides by more than that margin (the held-back prefill's
  slowdown grows with each preemption, so none starves). Ready LS decodes preempt a BE-only pass whose rest
  would push their step past the target. An LS decode pass suspended longer than the target is not
  preempted again and resumes even while LS prompts wait.
- A suspended BE pass does not resume while LS work is ready. BE aging is measured on BE's own progress: a
  suspended pass ages by the time it has spent suspended (`PassInfo.suspended_s`), queued BE by the time no
  BE work has advanced (`SchedulerView.be_stalled_s`). An aged suspended pass resumes even with LS work
  ready; LS decodes no longer cut into it, LS prompts still do at its next point (it then advances a unit per
  LS prompt pass). Aged queued BE starts a pass of its own when nothing is in flight.
With no LS work at all, BE runs whole prompts up to `max_batched_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass

from qllm_core.cost_model import CostModel, PassFeatures
from qllm_core.request import PriorityClass, Request
from qllm_core.scheduler.base import (
    BatchBuilder,
    BatchPlan,
    Granularity,
    PassInfo,
    Policy,
    SchedulerView,
    urgency,
)

LS = PriorityClass.LATENCY_SENSITIVE
BE = PriorityClass.BEST_EFFORT


@dataclass(frozen=True)
class Member:
    """An LS prompt as grouping weighs it: how long it has waited and what its prompt costs alone."""

    wait_s: float
    alone_s: float

    def slowdown(self, more_s: float) -> float:
        """Its TTFT over its isolated TTFT if its first token comes `more_s` from now."""
        return (self.wait_s + more_s) / self.alone_s


@dataclass(frozen=True)
class LsGroup:
    """The LS prompts the next pass would prefill, as a builder holding them, their members and its cost."""

    builder: BatchBuilder
    members: tuple[Member, ...]
    cost_s: float

    def worst(self, more_s: float) -> float:
        """The worst member's slowdown if the group's pass starts `more_s` from now."""
        return max(m.slowdown(more_s + self.cost_s) for m in self.members)


def row_features(request: Request) -> PassFeatures:
    """The features of a request feeding all its uncached tokens."""
    return PassFeatures.of_row(request.num_cached_tokens, request.num_uncached_tokens)


def decode_features(decodes: list[Request]) -> PassFeatures:
    """The features of a pass feeding one token to each of `decodes`."""
    return PassFeatures.of_rows((r.num_cached_tokens, 1) for r in decodes)


class QllmPolicy(Policy):
    """LS prompts and LS decodes first, planned by cost; BE fills what LS steps spare and is protected by aging."""

    name = "qllm"
    plans_with_cost = True

    def next_batch(self, view: SchedulerView) -> BatchPlan | None:
        """An aged BE pass, else an LS prompt pass, else an LS decode pass with BE in its spare time, else BE."""
        aged = self._aged_be(view)
        if aged and view.running is None and view.suspended is None:
            plan = self._be_pass(view, aged, whole_prompts=False)
            if plan is not None:  # none of it fits the KV left: the rest runs meanwhile, so memory frees up
                return plan
        if view.waiting[LS]:
            group = self._ls_group(view)
            if group.members:
                return self._with_ls_decodes(view, group)
        if view.ready[LS]:
            return self._ls_decode_pass(view)
        if view.waiting[LS]:
            return None  # no LS prompt fits the KV left: BE taking more of it would keep them out longer
        return self._be_pass(view, [], whole_prompts=True)

    # ---- plans -----------------------------------------------------------------------------------------
    def _ls_group(self, view: SchedulerView) -> LsGroup:
        """The LS prompts of the next pass: the first by `_ls_order`, then each that `_joins` it."""
        cost = view.cost_model
        builder = BatchBuilder(self.config, view)
        members: list[Member] = []
        for request in self._ls_order(view):
            if builder.full:
                break
            features = row_features(request)
            joining = Member(view.now - request.arrival, cost.seconds(features))
            if members and not self._joins(cost, builder.features, members, joining, features):
                continue
            if builder.try_add(request):
                members.append(joining)
        return LsGroup(builder, tuple(members), cost.seconds(builder.features) if members else 0.0)

    def _joins(
        self, cost: CostModel, group: PassFeatures, members: list[Member], joining: Member, features: PassFeatures
    ) -> bool:
        """True when a prompt joining the group keeps every member within `ls_ttft_slack` of the slowdown it has
        without it, or lowers the worst slowdown among them against the joining one waiting for the next pass."""
        apart_s = cost.seconds(group)
        together_s = cost.seconds(group + features)
        near = (1 + self.config.ls_ttft_slack) * min(m.slowdown(apart_s) / m.slowdown(together_s) for m in members)
        if near >= 1:
            return True
        together = max(m.slowdown(together_s) for m in [*members, joining])
        apart = max([m.slowdown(apart_s) for m in members] + [joining.slowdown(apart_s + joining.alone_s)])
        return together <= apart

    def _ls_order(self, view: SchedulerView) -> list[Request]:
        """Deadline first, then the slowdown a prompt would have if served now, highest first, then arrival."""
        cost = view.cost_model

        def key(request: Request) -> tuple[float, float, float]:
            alone = cost.seconds(row_features(request))
            return (request.deadline_at, -(view.now - request.arrival + alone) / alone, request.arrival)

        return sorted(view.waiting[LS], key=key)

    def _with_ls_decodes(self, view: SchedulerView, group: LsGroup) -> BatchPlan | None:
        """The prompt group's pass, with the ready LS decodes when they cost it little or are due."""
        builder = group.builder
        decodes = sorted(view.ready[LS], key=urgency)
        if decodes:
            cost = view.cost_model
            riding = decode_features(decodes)
            cheap = cost.seconds(builder.features + riding) <= (1 + self.config.ls_ttft_slack) * group.cost_s
            gap_s = view.now - min(r.waiting_since for r in decodes) + group.cost_s + cost.seconds(riding)
            if cheap or gap_s > self._tpot_target(view, decodes):
                builder.add_in_order(decodes, skip_misfits=True)
        if self.config.be_decodes_in_ls_passes:
            builder.add_in_order(view.ready[BE], skip_misfits=True)
        return builder.plan()

    def _ls_decode_pass(self, view: SchedulerView) -> BatchPlan | None:
        """Every ready LS decode, then BE decodes and BE prompt chunks while the pass stays within the target."""
        decodes = sorted(view.ready[LS], key=urgency)
        builder = BatchBuilder(self.config, view)
        builder.add_in_order(decodes, skip_misfits=True)
        target = self._tpot_target(view, decodes)
        cost = view.cost_model
        for request in sorted(view.ready[BE], key=lambda r: r.waiting_since):
            if cost.seconds(builder.features + PassFeatures.of_row(request.num_cached_tokens, 1)) <= target:
                builder.try_add(request)
        # A prompt part way through its chunks continues first: its KV is held until it is done.
        prompts = sorted(view.waiting[BE], key=lambda r: (r.num_cached_tokens == 0, r.waiting_since))
        for request in prompts:
            limit = min(request.num_uncached_tokens, builder.tokens_left)
            tokens = cost.largest_chunk(builder.features, request.num_cached_tokens, limit, target)
            if tokens == 0 or builder.full:
                break
            builder.try_add_part(request, tokens)
        return builder.plan()

    def _be_pass(self, view: SchedulerView, first: list[Request], whole_prompts: bool) -> BatchPlan | None:
        """`first` (aged BE work), then BE decodes, then (with `whole_prompts`) whole BE prompts in arrival order."""
        builder = BatchBuilder(self.config, view)
        taken = {r.request_id for r in first}
        builder.add_in_order(first, skip_misfits=True)
        builder.add_in_order([r for r in view.ready[BE] if r.request_id not in taken], skip_misfits=True)
        if whole_prompts:
            builder.add_in_order(
                sorted((r for r in view.waiting[BE] if r.request_id not in taken), key=lambda r: r.waiting_since)
            )
        return builder.plan()

    def _tpot_target(self, view: SchedulerView, decodes: list[Request]) -> float:
        """`ls_tpot_target_s`, else what a `chunked` pass of these decodes costs: them plus a fresh prompt chunk
        up to `chunk_tokens` tokens in all."""
        if self.config.ls_tpot_target_s is not None:
            return self.config.ls_tpot_target_s
        features = decode_features(decodes)
        fill = self.config.chunk_tokens - len(decodes)
        if fill > 0:
            features = features + PassFeatures.of_row(0, fill)
        return view.cost_model.seconds(features)

    # ---- preemption ------------------------------------------------------------------------------------
    def should_preempt(self, view: SchedulerView) -> bool:
        """For waiting LS prompts: when they go first by `_prompts_go_first`. For ready LS decodes: a BE-only
        pass, not aged, whose rest would push their step past the target."""
        running = view.running
        if running is None:
            return False
        if view.waiting[LS]:
            return self._prompts_go_first(view, running)
        if not view.ready[LS] or running.has_ls or self._aged(view.cost_model, running):
            return False
        decodes = sorted(view.ready[LS], key=urgency)
        cost = view.cost_model
        decode_s = cost.seconds(decode_features(decodes))
        return self._left_s(cost, running) + decode_s > self._tpot_target(view, decodes)

    def may_preempt(self, info: PassInfo) -> bool:
        """Every pass: decode passes too, and LS prefills (for LS prompts that would wait far longer)."""
        return True

    def granularity_for(self, info: PassInfo) -> Granularity:
        """Expert-level points only for BE-only passes longer than a decode batch: an LS pass, or a decode-sized
        one (a layer of which is short), stops at layer boundaries and runs its experts fused."""
        configured = self.config.granularity
        if configured is Granularity.EXPERT and (info.has_ls or info.num_tokens <= self.config.max_batch_size):
            return Granularity.LAYER
        return configured

    def should_resume(self, view: SchedulerView) -> bool:
        """An aged pass resumes; else not while LS prompts go first by `_prompts_go_first`, and a BE-only pass not
        while LS decodes are ready."""
        suspended = view.suspended
        if suspended is None:
            return False
        if self._aged(view.cost_model, suspended):
            return True
        if view.waiting[LS]:
            return not self._prompts_go_first(view, suspended)
        return suspended.has_ls or not view.ready[LS]

    def _prompts_go_first(self, view: SchedulerView, holder: PassInfo) -> bool:
        """Should the waiting LS prompts' pass run before the rest of `holder` (running or suspended)?

        An LS prefill: when that lowers the worse slowdown of the two sides by more than the slack. Any other
        pass: when its rest would add more than the slack to the prompts' isolated time; never an LS decode
        pass held back past the TPOT target.
        """
        group = self._ls_group(view)
        if not group.members:
            return False  # none fits the KV left
        cost = view.cost_model
        left_s = self._left_s(cost, holder)
        if not holder.ls_prefill:
            if holder.has_ls and self._aged(cost, holder):
                return False
            return left_s > self.config.ls_ttft_slack * min(m.alone_s for m in group.members)
        pass_s = max(cost.seconds(holder.cost_features), 1e-9)
        held_s = holder.held_back_s
        keep = max((held_s + pass_s) / pass_s, group.worst(left_s))
        switch = max((held_s + pass_s + group.cost_s) / pass_s, group.worst(0.0))
        return switch * (1 + self.config.ls_ttft_slack) < keep

    @staticmethod
    def _left_s(cost: CostModel, holder: PassInfo) -> float:
        """The predicted time of the layers a pass has not finished."""
        return cost.seconds(holder.cost_features) * (1.0 - holder.done_share)

    def _aged(self, cost: CostModel, holder: PassInfo) -> bool:
        """A pass without an LS prefill whose own progress has stalled too long: `be_max_wait_s`, and for an LS
        decode pass already the TPOT target (else its own cost: held back that long, its step has doubled)."""
        if holder.ls_prefill:
            return False
        bound = self.config.be_max_wait_s
        if holder.has_ls:
            target = self.config.ls_tpot_target_s
            bound = min(bound, cost.seconds(holder.cost_features) if target is None else target)
        return holder.stalled_s >= bound

    def _aged_be(self, view: SchedulerView) -> list[Request]:
        """Queued BE work past the aging bound, longest-waiting first: all of it once no BE work has advanced for
        `be_max_wait_s` (`be_stalled_s`), else (unknown) each request by its own wait."""
        queued = sorted(view.ready[BE] + view.waiting[BE], key=lambda r: r.waiting_since)
        bound = self.config.be_max_wait_s
        if view.be_stalled_s is not None:
            return queued if view.be_stalled_s >= bound else []
        return [r for r in queued if view.now - r.waiting_since >= bound]
