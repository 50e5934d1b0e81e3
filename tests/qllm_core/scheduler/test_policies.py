"""Policies decide on hand-built views: no model, no tensors."""

from __future__ import annotations

import dataclasses

from qllm_core.config import EngineConfig, Granularity
from qllm_core.params import SamplingParams
from qllm_core.request import PriorityClass, Request, RequestState
from qllm_core.scheduler import POLICIES, BatchPlan, PassInfo, Policy, SchedulerView

LS, BE = PriorityClass.LATENCY_SENSITIVE, PriorityClass.BEST_EFFORT
CONFIG = EngineConfig(
    policy="qllm", granularity=Granularity.LAYER, max_batch_size=4, max_batched_tokens=100, be_max_wait_s=5.0
).scheduler_config()


def req(rid: str, cls: PriorityClass, arrival: float, prompt: int = 10, decoding: bool = False) -> Request:
    r = Request(rid, list(range(prompt)), SamplingParams(), cls, arrival)
    if decoding:
        r.output_token_ids.append(1)
        r.times.tokens.append(arrival)
        r.num_cached_tokens = prompt
        r.state = RequestState.READY
    return r


def view(
    requests: list[Request],
    now: float = 1.0,
    free_blocks: int = 100,
    running: PassInfo | None = None,
    suspended: PassInfo | None = None,
) -> SchedulerView:
    waiting = {c: [r for r in requests if r.priority is c and r.state is RequestState.WAITING] for c in PriorityClass}
    ready = {c: [r for r in requests if r.priority is c and r.state is RequestState.READY] for c in PriorityClass}
    return SchedulerView(now, waiting, ready, free_blocks, lambda r, n: 1, running, suspended)


def running_pass(
    classes: set[PriorityClass], ls_prefill: bool = False, held: float = 0.0, tokens: int = 2000
) -> PassInfo:
    return PassInfo(frozenset(classes), ls_prefill, held, 2, True, num_tokens=tokens, layers_left=6)


def plan_ids(policy: str, v: SchedulerView) -> list[str]:
    plan = POLICIES[policy](CONFIG).next_batch(v)
    return [] if plan is None else list(plan.request_ids)


def test_fcfs_is_arrival_order_and_blind_to_class() -> None:
    rs = [req("be1", BE, 0.1), req("ls1", LS, 0.2), req("be2", BE, 0.3)]
    assert plan_ids("fcfs", view(rs)) == ["be1", "ls1", "be2"]


def test_fcfs_stops_at_the_first_misfit() -> None:
    rs = [req("big", BE, 0.1, prompt=60), req("huge", BE, 0.2, prompt=60), req("small", LS, 0.3, prompt=5)]
    assert plan_ids("fcfs", view(rs)) == ["big"]


def test_priority_orders_by_class_and_never_preempts() -> None:
    rs = [req("be1", BE, 0.1), req("ls1", LS, 0.2), req("bed", BE, 0.0, decoding=True)]
    assert plan_ids("priority", view(rs)) == ["bed", "ls1", "be1"]
    policy = POLICIES["priority"](CONFIG)
    assert not policy.should_preempt(view(rs, running=running_pass({BE})))


def test_qllm_ls_prefill_pass_carries_ls_work_alone_unless_be_decodes_may_ride() -> None:
    rs = [
        req("be1", BE, 0.1),
        req("ls1", LS, 0.2),
        req("bed", BE, 0.0, decoding=True),
        req("lsd", LS, 0.0, decoding=True),
    ]
    assert plan_ids("qllm", view(rs)) == ["ls1", "lsd"]  # the default: BE decodes take the next pass
    filled = POLICIES["qllm"](dataclasses.replace(CONFIG, be_decodes_in_ls_passes=True))
    plan = filled.next_batch(view(rs))
    assert plan is not None and list(plan.request_ids) == ["ls1", "lsd", "bed"]  # never a BE prompt


def test_qllm_without_ls_prompts_runs_a_continuous_batch_ls_first() -> None:
    rs = [req("be1", BE, 0.1), req("bed", BE, 0.0, decoding=True), req("lsd", LS, 0.05, decoding=True)]
    assert plan_ids("qllm", view(rs)) == ["lsd", "bed", "be1"]


def test_qllm_deadlines_order_ls_prompts() -> None:
    late, urgent = req("late", LS, 0.1), req("urgent", LS, 0.2)
    urgent.ttft_deadline_s = 0.05
    assert plan_ids("qllm", view([late, urgent]))[:2] == ["urgent", "late"]


def test_qllm_preempts_any_pass_without_an_ls_prefill_for_a_waiting_ls_prompt() -> None:
    policy = POLICIES["qllm"](CONFIG)
    ls_prompt = req("ls", LS, 0.5)
    assert policy.should_preempt(view([ls_prompt], running=running_pass({BE})))
    assert policy.should_preempt(view([ls_prompt], running=running_pass({LS, BE}, ls_prefill=False)))
    # A decode pass too: on a CPU a decode iteration is as long as a short prompt's prefill.
    decodes = running_pass({LS, BE}, tokens=4)
    assert policy.should_preempt(view([ls_prompt], running=decodes))
    assert not policy.should_merge(running_pass({LS}, tokens=10), decodes), "merging is opt-in"


def test_qllm_preempts_an_ls_prefill_only_for_a_far_shorter_ls_prompt() -> None:
    policy = POLICIES["qllm"](CONFIG)
    short, long = req("short", LS, 0.5, prompt=10), req("long", LS, 0.5, prompt=900)
    running_long = running_pass({LS}, ls_prefill=True, tokens=2000)  # 1500 token-layers of 2000 left
    assert policy.should_preempt(view([short], running=running_long))
    assert not policy.should_preempt(view([long], running=running_pass({LS}, ls_prefill=True, tokens=500)))
    # A suspended long prefill held back a while resumes before newer prompts of its size, not before a far
    # shorter one (on the nominal cost model: 50 ms a pass, 1 ms a token).
    held_long = running_pass({LS}, ls_prefill=True, held=3.0, tokens=2000)
    assert policy.should_resume(view([long], suspended=held_long))
    assert not policy.should_resume(view([short], suspended=held_long))


def test_qllm_lets_ls_decodes_cut_into_a_long_be_pass_and_keeps_short_ones() -> None:
    policy = POLICIES["qllm"](CONFIG)
    ls_decode = req("lsd", LS, 0.5, decoding=True)
    assert policy.should_preempt(view([ls_decode], running=running_pass({BE}, tokens=2000)))
    assert not policy.should_preempt(view([ls_decode], running=running_pass({BE}, tokens=40)))
    assert not policy.should_preempt(view([ls_decode], running=running_pass({LS, BE}, tokens=2000)))


def test_qllm_joins_be_prompts_to_ls_decodes_in_chunks_only() -> None:
    small = dataclasses.replace(CONFIG, chunk_tokens=30)
    rs = [req("lsd", LS, 0.0, decoding=True), req("bed", BE, 0.0, decoding=True), req("be", BE, 0.1, prompt=80)]
    plan = POLICIES["qllm"](small).next_batch(view(rs))
    assert plan is not None and list(zip(plan.request_ids, plan.num_tokens, strict=True)) == [
        ("lsd", 1),
        ("bed", 1),
        ("be", 28),
    ]
    # Without LS decodes the BE prompt runs whole.
    assert plan_ids("qllm", view(rs[1:])) == ["bed", "be"]


def test_qllm_groups_ls_prompts_so_a_short_one_does_not_ride_with_a_long_one() -> None:
    rs = [req("a", LS, 0.1, prompt=20), req("huge", LS, 0.2, prompt=900), req("b", LS, 0.3, prompt=30)]
    # Shortest first; a prompt joins while no member's slowdown grows much (the huge one would multiply it).
    assert plan_ids("qllm", view(rs)) == ["a", "b"]


def test_may_preempt_is_true_wherever_should_preempt_can_say_yes() -> None:
    ls_prompt = req("ls", LS, 0.5)
    for name in POLICIES:
        policy = POLICIES[name](CONFIG)
        for tokens in (1, CONFIG.max_batch_size, CONFIG.max_batch_size + 1, 400, 4000):
            for ls_prefill in (False, True):
                starting = PassInfo(frozenset({BE, LS}), ls_prefill, 0.0, 0, True, num_tokens=tokens, layers_left=8)
                if policy.should_preempt(view([ls_prompt], running=starting)):
                    assert policy.may_preempt(starting), (name, tokens, ls_prefill)
    prefill = PassInfo(frozenset({BE}), False, 0.0, 0, True, num_tokens=512, layers_left=8)
    for name in ("fcfs", "priority", "chunked"):
        assert not POLICIES[name](CONFIG).may_preempt(prefill)


def test_qllm_stops_decode_sized_and_ls_passes_at_layers_only() -> None:
    expert = POLICIES["qllm"](dataclasses.replace(CONFIG, granularity=Granularity.EXPERT))
    assert expert.points(running_pass({BE}, tokens=400)) is Granularity.EXPERT
    assert expert.points(running_pass({BE}, tokens=CONFIG.max_batch_size)) is Granularity.LAYER
    assert expert.points(running_pass({LS, BE}, tokens=400)) is Granularity.LAYER


def test_a_policy_that_overrides_should_preempt_may_preempt_by_default() -> None:
    class Eager(Policy):
        name = "eager"

        def next_batch(self, view: SchedulerView) -> BatchPlan | None:
            return None

        def should_preempt(self, view: SchedulerView) -> bool:
            return True

    class Never(Eager):
        should_preempt = Policy.should_preempt  # type: ignore[assignment]

    prefill = PassInfo(frozenset({BE}), False, 0.0, 0, True, num_tokens=512, layers_left=8)
    # Forgetting may_preempt must not silently turn preemption off: the default follows should_preempt.
    assert Eager(CONFIG).may_preempt(prefill)
    assert not Never(CONFIG).may_preempt(prefill)


def test_qllm_aged_be_starts_its_own_pass_and_still_yields_to_ls_at_its_next_point() -> None:
    policy = POLICIES["qllm"](CONFIG)
    ls_prompt = req("ls", LS, 9.9)
    aged = [req(f"old{i}", BE, i * 0.1, prompt=25) for i in range(2)]
    young = req("young", BE, 9.0, prompt=5)
    rs = [*aged, young, ls_prompt, req("bed", BE, 9.8, decoding=True)]
    # Nothing in flight: the BE work past the bound starts now, with the BE decodes; not the young prompt.
    assert plan_ids("qllm", view(rs, now=10.0)) == ["old0", "old1", "bed"]
    # It is preempted like any BE pass, so the LS prompt waits one unit of it...
    assert policy.should_preempt(view([ls_prompt], now=10.0, running=running_pass({BE}, held=6.0)))
    # ...and while suspended it resumes even with LS prompts waiting: it advances a unit per LS pass.
    assert policy.should_resume(view([ls_prompt], now=10.0, suspended=running_pass({BE}, held=6.0)))
    assert not policy.should_resume(view([ls_prompt], now=10.0, suspended=running_pass({BE}, held=1.0)))
    # With a pass in flight, the next pass is the LS prompt's, not a second aged pass.
    assert plan_ids("qllm", view(rs, now=10.0, running=running_pass({BE}, held=6.0)))[0] == "ls"


def test_batch_limits_and_kv_headroom_are_respected() -> None:
    rs = [req(f"be{i}", BE, i * 0.1, prompt=30) for i in range(6)]
    assert plan_ids("qllm", view(rs)) == ["be0", "be1", "be2"]  # 3 x 30 tokens; a 4th would pass 100
    assert plan_ids("qllm", view(rs, free_blocks=2)) == ["be0", "be1"]
    lone = [req("long", BE, 0.0, prompt=500)]
    assert plan_ids("fcfs", view(lone)) == ["long"], "a prompt over the token limit still runs, alone"


def test_registry_names_match_classes() -> None:
    assert sorted(POLICIES) == ["chunked", "fcfs", "priority", "qllm"]


CHUNKED = dataclasses.replace(CONFIG, policy="chunked", chunk_tokens=50)


def chunked_plan(v: SchedulerView) -> list[tuple[str, int]]:
    plan = POLICIES["chunked"](CHUNKED).next_batch(v)
    return [] if plan is None else list(zip(plan.request_ids, plan.num_tokens, strict=True))


def test_chunked_runs_decodes_first_then_prompts_by_priority_within_the_token_budget() -> None:
    rs = [req("be", BE, 0.1, prompt=20), req("ls", LS, 0.2, prompt=20), req("bed", BE, 0.0, decoding=True)]
    # The decode (one token), then the LS prompt (20), then as much of the BE prompt as the budget has left.
    assert chunked_plan(view(rs)) == [("bed", 1), ("ls", 20), ("be", 20)]
    rs.append(req("ls2", LS, 0.3, prompt=20))
    assert chunked_plan(view(rs)) == [("bed", 1), ("ls", 20), ("ls2", 20), ("be", 9)]


def test_chunked_splits_a_long_prompt_and_continues_it_before_new_prompts() -> None:
    long = req("long", BE, 0.1, prompt=120)
    assert chunked_plan(view([long])) == [("long", 50)], "a lone prompt is held to the budget too"
    long.num_cached_tokens = 100  # two chunks in: what is left comes next, before a newer LS prompt
    assert chunked_plan(view([long, req("ls", LS, 0.5, prompt=45)])) == [("long", 20), ("ls", 30)]


def test_chunked_never_preempts_a_pass() -> None:
    policy = POLICIES["chunked"](CHUNKED)
    assert not policy.should_preempt(view([req("ls", LS, 0.5)], running=running_pass({BE})))
    assert not policy.may_preempt(running_pass({BE}))
    assert all(cls.name == name for name, cls in POLICIES.items())


def test_qllm_runs_other_work_when_no_aged_be_fits_the_kv_left() -> None:
    old = req("old", BE, 0.0, prompt=30)
    lsd = req("lsd", LS, 9.0, decoding=True)
    blocks = {"old": 5, "lsd": 0}
    v = view([old, lsd], now=10.0, free_blocks=2)
    v = dataclasses.replace(v, block_cost=lambda r, n: blocks[r.request_id])
    # The aged prompt does not fit: the LS decode runs instead of nothing (which would wait forever).
    assert plan_ids("qllm", v) == ["lsd"]
