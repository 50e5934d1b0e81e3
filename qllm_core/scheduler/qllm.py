"""`qllm`: per-class queues with sub-iteration preemption, so an LS prompt waits for at most one layer (or
one expert span) of other work, and LS decodes for at most one layer of a long BE pass.

What a waiting LS prompt does to the running pass:
- a pass without an LS prefill (BE work, decodes of either class) is suspended at its next preemption
  point, and resumed after the LS pass. Decode passes too: on a CPU one decode iteration is as long as a
  short prompt's whole prefill. (Merging the LS pass into the suspended one where it stopped,
  `merge_ls_into_be`, measured worse: the decodes' rows then ride through the LS prompt's last layers.);
- a pass with an LS prefill is suspended only when it is long (over `chunk_tokens`) and a much shorter LS
  prompt waits (shortest remaining work first: a short prompt behind a long one is what multiplies TTFT
  over its isolated value). A short LS pass is not: it ends soon, and preempting it for every newcomer
  that then merges back could postpone it without end.

Batches: LS prompts go first, most urgent first, grouped up to a token budget so that a short prompt does
not ride with a long one; LS decodes fill the pass, BE decodes only with `be_decodes_in_ls_passes` (each
lengthens the pass the LS prompts wait out). With LS decodes and no LS prompt waiting, BE
prompts join the decode pass in chunks of at most `chunk_tokens` (the pass stays short: LS time per output
token does not stall behind a long prefill); with no LS work at all, BE runs whole prompts. A long BE pass
is suspended for LS decodes too, and resumed after their pass, so BE and LS decodes alternate a layer and
a decode step at a time.

BE progress is guaranteed by an aging bound (`be_max_wait_s`): BE work queued that long starts a pass of
its own even while LS prompts wait, and a suspended pass held back that long resumes even while LS
prompts wait. Either way it can still be preempted at its next point, so under LS overload BE advances a
layer per LS pass and an LS prompt waits at most one layer for it.
"""

from __future__ import annotations

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
SRPT_FACTOR = 2
"""An LS prompt preempts a running LS prefill only when that pass has this many times its work left."""


class QllmPolicy(Policy):
    """LS prompts first, inside the forward pass; BE fills the rest and is protected by aging."""

    name = "qllm"

    def next_batch(self, view: SchedulerView) -> BatchPlan | None:
        """An aged BE pass, else an LS prefill batch, else a decode batch with BE chunks, else BE work."""
        ls_prompts = sorted(view.waiting[LS], key=urgency)
        ls_decodes = sorted(view.ready[LS], key=urgency)
        be_prompts = sorted(view.waiting[BE], key=lambda r: r.waiting_since)
        be_decodes = view.ready[BE]
        aged = self._aged_be(view)
        if aged and view.running is None and view.suspended is None:
            # Its own pass: the LS prompts that wait preempt it at its first point, after one unit of it.
            builder = BatchBuilder(self.config, view)
            taken = {r.request_id for r in aged}
            builder.add_in_order(aged, skip_misfits=True)
            builder.add_in_order([r for r in be_decodes if r.request_id not in taken], skip_misfits=True)
            plan = builder.plan()
            if plan is not None:  # none of it fits the KV left: the rest runs meanwhile, so memory frees up
                return plan
        if ls_prompts:
            first = ls_prompts[0].num_uncached_tokens
            budget = max(self.config.chunk_tokens, first) + self.config.max_batch_size
            builder = BatchBuilder(self.config, view, token_budget=budget)
            builder.add_in_order(ls_prompts, skip_misfits=True)
            builder.add_in_order(ls_decodes, skip_misfits=True)
            if self.config.be_decodes_in_ls_passes:
                builder.add_in_order(be_decodes, skip_misfits=True)
            return builder.plan()
        if ls_decodes:
            builder = BatchBuilder(self.config, view, token_budget=self.config.chunk_tokens)
            builder.add_in_order(ls_decodes, skip_misfits=True)
            builder.add_in_order(be_decodes, skip_misfits=True)
            builder.add_in_order(be_prompts, chunks=True)
            return builder.plan()
        builder = BatchBuilder(self.config, view)
        builder.add_in_order(be_decodes, skip_misfits=True)
        builder.add_in_order(be_prompts)
        return builder.plan()

    def should_preempt(self, view: SchedulerView) -> bool:
        """For a waiting LS prompt: any pass without an LS prefill, or one with far more LS work left. For
        waiting LS decodes: a long pass with no LS work in it."""
        running = view.running
        if running is None:
            return False
        if view.waiting[LS]:
            if not running.ls_prefill:
                return True
            return self._much_shorter_prompt_waits(view, running)
        long_pass = running.num_tokens > self.config.chunk_tokens
        return bool(view.ready[LS]) and not running.has_ls and long_pass

    def may_preempt(self, info: PassInfo) -> bool:
        """Every pass: decode passes too, and LS prefills (for a far shorter LS prompt)."""
        return True

    def points(self, info: PassInfo) -> Granularity:
        """Expert-level points only for BE-only passes longer than a decode batch: an LS pass, or a decode-sized
        one (a layer of which is short), stops at layer boundaries and runs its experts fused."""
        configured = self.config.granularity
        if configured is Granularity.EXPERT and (info.has_ls or info.num_tokens <= self.config.max_batch_size):
            return Granularity.LAYER
        return configured

    def should_resume(self, view: SchedulerView) -> bool:
        """Resume once no LS prompt waits (a suspended LS prefill: once none far shorter waits), or once aged."""
        suspended = view.suspended
        if suspended is None:
            return False
        if not view.waiting[LS]:
            return True
        if suspended.ls_prefill:
            return not self._much_shorter_prompt_waits(view, suspended)
        return suspended.held_back_s >= self.config.be_max_wait_s

    def _much_shorter_prompt_waits(self, view: SchedulerView, holder: PassInfo) -> bool:
        """Shortest remaining work first, among long LS prefills, with a margin against churn."""
        if holder.num_tokens <= self.config.chunk_tokens:
            return False
        shortest = min(r.num_uncached_tokens for r in view.waiting[LS])
        num_layers = holder.layer + holder.layers_left
        left = holder.num_tokens * holder.layers_left / max(1, num_layers)
        return shortest * SRPT_FACTOR < left

    def _aged_be(self, view: SchedulerView) -> list[Request]:
        """BE requests queued at least `be_max_wait_s`, longest-waiting first."""
        queued = view.ready[BE] + view.waiting[BE]
        aged = [r for r in queued if view.now - r.waiting_since >= self.config.be_max_wait_s]
        return sorted(aged, key=lambda r: r.waiting_since)
