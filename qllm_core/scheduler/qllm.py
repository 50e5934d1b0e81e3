"""`qllm`: per-class prefill and decode queues with sub-iteration preemption for LS prefills.

An LS prompt is what LS requests are judged by (TTFT), so a waiting LS prefill suspends the running
pass at its next layer or expert boundary, unless that pass already carries an LS prefill. Batch
selection follows the paper's Algorithm 1 in spirit, with two changes found by measuring: an LS
prefill batch takes spare slots from BE *decodes* only (one BE prompt in it would add its whole
prefill to the LS TTFT), and when only LS decodes are queued the batch is filled with any BE work,
prompts included, since that pass can still be suspended for the next LS prompt; without that,
steady LS decoding starves BE prefills. An aging bound (`be_max_wait_s`) guarantees BE progress:
BE work that has waited that long goes into the next pass ahead of everything, and a pass held back that
long is no longer preempted. The LS prompts still join that pass, so under overload an LS prompt waits
for at most one pass carrying aged BE work, never for a queue of them.
"""

from __future__ import annotations

from qllm_core.request import PriorityClass, Request
from qllm_core.scheduler.base import BatchBuilder, BatchPlan, PassInfo, Policy, SchedulerView, urgency

LS = PriorityClass.LATENCY_SENSITIVE
BE = PriorityClass.BEST_EFFORT


class QllmPolicy(Policy):
    """LS prompts first, inside the forward pass; BE fills the rest and is protected by aging."""

    name = "qllm"

    def next_batch(self, view: SchedulerView) -> BatchPlan | None:
        """LS prefill batch (with BE decode fill), else a continuous batch with LS first."""
        builder = BatchBuilder(self.config, view)
        ls_prefill = sorted(view.waiting[LS], key=urgency)
        ls_decode = sorted(view.ready[LS], key=urgency)
        be_prefill, be_decode = view.waiting[BE], view.ready[BE]
        aged = self._aged_be(view)
        if aged:
            builder.add_in_order(aged, skip_misfits=True)
            builder.add_in_order(ls_prefill, skip_misfits=True)
            builder.add_in_order(ls_decode, skip_misfits=True)
            taken = {r.request_id for r in aged}
            builder.add_in_order([r for r in be_decode if r.request_id not in taken], skip_misfits=True)
        elif ls_prefill:
            builder.add_in_order(ls_prefill, skip_misfits=True)
            builder.add_in_order(ls_decode, skip_misfits=True)
            builder.add_in_order(be_decode, skip_misfits=True)
        else:
            builder.add_in_order(ls_decode, skip_misfits=True)
            builder.add_in_order(be_decode, skip_misfits=True)
            builder.add_in_order(be_prefill)
        return builder.plan()

    def should_preempt(self, view: SchedulerView) -> bool:
        """Suspend the running pass for a waiting LS prompt, unless it carries one, BE has aged, or what is
        left of it is no more work than one full decode iteration: then the LS prompt waits for the next
        pass instead, which costs it about as much as a pass of its own would and saves that pass."""
        running = view.running
        if running is None or not view.waiting[LS] or not self.may_preempt(running):
            return False
        return running.held_back_s < self.config.be_max_wait_s

    def may_preempt(self, info: PassInfo) -> bool:
        """Not a pass carrying an LS prefill, nor one whose work left is no more than a decode iteration's
        (at its start: a pass of at most `max_batch_size` tokens, such as any decode-only pass)."""
        num_layers = info.layer + info.layers_left
        return not info.ls_prefill and info.num_tokens * info.layers_left > self.config.max_batch_size * num_layers

    def should_resume(self, view: SchedulerView) -> bool:
        """Resume the suspended pass once no LS prompt waits, or when it has aged."""
        suspended = view.suspended
        if suspended is None:
            return False
        return not view.waiting[LS] or suspended.held_back_s >= self.config.be_max_wait_s

    def _aged_be(self, view: SchedulerView) -> list[Request]:
        """BE requests queued at least `be_max_wait_s`, longest-waiting first."""
        queued = view.ready[BE] + view.waiting[BE]
        aged = [r for r in queued if view.now - r.waiting_since >= self.config.be_max_wait_s]
        return sorted(aged, key=lambda r: r.waiting_since)
