"""`qllm`'s rules on the pass cost model, each on hand-built views (see test_policies.py for the helpers)."""

from __future__ import annotations

import dataclasses

from qllm_core.cost_model import CostFit, CostModel, PassFeatures
from qllm_core.scheduler import POLICIES, PassInfo, SchedulerView
from tests.qllm_core.scheduler.test_policies import BE, CONFIG, LS, req, view

CPU_LIKE = CostModel(CostFit("m", "cpu", 0.05, 1e-3, 0.0, 1e-2, 0.0, 0.0))
"""Decode rows dear: each costs as much as ten prompt tokens (attention row by row)."""
GPU_LIKE = CostModel(CostFit("m", "gpu", 0.02, 2e-5, 0.0, 1e-5, 0.0, 0.0))
"""Decode rows nearly free next to the weights read once per pass."""
QLLM = POLICIES["qllm"](CONFIG)


def costed(v: SchedulerView, cost: CostModel, **fields: object) -> SchedulerView:
    return dataclasses.replace(v, cost=cost, **fields)  # type: ignore[arg-type]


def planned(v: SchedulerView, config: object = CONFIG) -> list[tuple[str, int]]:
    plan = POLICIES["qllm"](config).next_batch(v)  # type: ignore[arg-type]
    return [] if plan is None else list(zip(plan.request_ids, plan.num_tokens, strict=True))


def a_pass(
    classes: set[object],
    rows: list[tuple[int, int]],
    layer: int = 2,
    ls_prefill: bool = False,
    held: float = 0.0,
    suspended_s: float | None = 0.0,
) -> PassInfo:
    features = PassFeatures.of_rows(rows)
    tokens = sum(n for _, n in rows)
    return PassInfo(
        frozenset(classes),  # type: ignore[arg-type]
        ls_prefill,
        held,
        layer,
        True,
        num_tokens=tokens,
        layers_left=8 - layer,
        features=features,
        suspended_s=suspended_s,
    )


def test_ls_prompts_go_shortest_first_at_equal_waits_and_a_long_one_ages_to_the_front() -> None:
    long, short = req("long", LS, 0.0, prompt=60), req("short", LS, 0.0, prompt=5)
    assert planned(costed(view([long, short], now=0.1), CPU_LIKE))[0][0] == "short"
    # Waited ten times its own cost: it is now the one whose slowdown would be worst.
    old, new = req("long", LS, 0.0, prompt=60), req("short", LS, 1.1, prompt=5)
    assert planned(costed(view([old, new], now=1.1), CPU_LIKE))[0][0] == "long"


def test_ls_prompts_group_when_that_lowers_the_worst_slowdown_and_not_when_one_would_multiply_it() -> None:
    pair = [req("a", LS, 1.0, prompt=40), req("b", LS, 1.0, prompt=40)]
    # Apart, b waits out a's pass (twice its own time); together both take 1.44x theirs.
    assert [rid for rid, _ in planned(costed(view(pair, now=1.0), CPU_LIKE))] == ["a", "b"]
    short, huge = req("short", LS, 1.0, prompt=5), req("huge", LS, 1.0, prompt=95)
    assert [rid for rid, _ in planned(costed(view([short, huge], now=1.0), CPU_LIKE))] == ["short"]


def test_ls_decodes_ride_in_a_prompt_pass_where_they_are_cheap_and_wait_where_they_are_dear() -> None:
    rs = [req("p", LS, 1.0, prompt=20)] + [req(f"d{i}", LS, 0.99, decoding=True) for i in range(3)]
    assert [rid for rid, _ in planned(costed(view(rs, now=1.0), GPU_LIKE))] == ["p", "d0", "d1", "d2"]
    # On the CPU-like model the three rows add 43% to the prompt's 70 ms: it runs alone, they go next.
    assert [rid for rid, _ in planned(costed(view(rs, now=1.0), CPU_LIKE))] == ["p"]


def test_ls_decodes_overdue_for_their_step_ride_in_a_prompt_pass_even_where_dear() -> None:
    rs = [req("p", LS, 1.0, prompt=20)] + [req(f"d{i}", LS, 0.0, decoding=True) for i in range(3)]
    # Their last token was a second ago: waiting out the prompt's pass would pass the TPOT target.
    assert [rid for rid, _ in planned(costed(view(rs, now=1.0), CPU_LIKE))] == ["p", "d0", "d1", "d2"]


def test_be_rides_in_an_ls_decode_pass_within_the_time_the_tpot_target_spares() -> None:
    target = dataclasses.replace(CONFIG, ls_tpot_target_s=0.1)
    rs = [
        req("lsd", LS, 0.0, decoding=True),
        req("bed1", BE, 0.1, decoding=True),
        req("bed2", BE, 0.2, decoding=True),
        req("be", BE, 0.3, prompt=80),
    ]
    # 50 ms + 10 ms a decode row: the LS decode and both BE decodes take 80 ms, 20 prompt tokens fill the rest.
    assert planned(costed(view(rs), CPU_LIKE), target) == [("lsd", 1), ("bed1", 1), ("bed2", 1), ("be", 20)]
    # Where decode rows are dear less time holds fewer of them: 76.5 ms takes one BE decode and 6 tokens.
    tighter = dataclasses.replace(CONFIG, ls_tpot_target_s=0.0765)
    assert planned(costed(view(rs), CPU_LIKE), tighter) == [("lsd", 1), ("bed1", 1), ("be", 6)]


def test_by_default_an_ls_decode_pass_costs_what_a_chunked_pass_of_those_decodes_would() -> None:
    small = dataclasses.replace(CONFIG, chunk_tokens=30)
    rs = [req("lsd", LS, 0.0, decoding=True), req("be", BE, 0.1, prompt=80)]
    # chunked would run the decode and 29 prompt tokens: the BE chunk gets the time of those 29 tokens.
    assert planned(costed(view(rs), CPU_LIKE), small) == [("lsd", 1), ("be", 29)]


def test_a_suspended_be_pass_does_not_run_between_ls_decode_steps_until_its_own_progress_has_stalled() -> None:
    lsd = req("lsd", LS, 0.5, decoding=True)
    queued_long = a_pass({BE}, [(0, 500)], held=30.0, suspended_s=0.5)  # queued long, suspended briefly
    assert not QLLM.should_resume(costed(view([lsd], suspended=queued_long), CPU_LIKE))
    assert QLLM.should_resume(costed(view([], suspended=queued_long), CPU_LIKE)), "resumes once no LS work is ready"
    stalled = a_pass({BE}, [(0, 500)], held=30.0, suspended_s=CONFIG.be_max_wait_s)
    assert QLLM.should_resume(costed(view([lsd], suspended=stalled), CPU_LIKE))
    # Once resumed that way, LS decodes do not cut into it again; a waiting LS prompt still does.
    assert not QLLM.should_preempt(costed(view([lsd], running=stalled), CPU_LIKE))
    assert QLLM.should_preempt(costed(view([req("p", LS, 0.9)], running=stalled), CPU_LIKE))


def test_ready_ls_decodes_preempt_a_be_pass_only_when_its_rest_would_push_their_step_past_the_target() -> None:
    lsd = req("lsd", LS, 0.5, decoding=True)
    long_be = a_pass({BE}, [(0, 2000)], layer=2)  # 1.55 s of its 2.05 left
    assert QLLM.should_preempt(costed(view([lsd]), CPU_LIKE, running=long_be))
    nearly_done = a_pass({BE}, [(0, 2000)], layer=7)  # 0.26 s left: within a chunked pass of 511 tokens
    assert not QLLM.should_preempt(costed(view([lsd]), CPU_LIKE, running=nearly_done))


def test_an_ls_prompt_preempts_a_pass_only_where_waiting_out_its_rest_costs_more_than_the_slack() -> None:
    prompt = req("p", LS, 0.9, prompt=50)  # 100 ms alone: the slack allows 25 ms of waiting
    decodes = [(100, 1)] * 4  # an LS decode pass of 90 ms
    early = a_pass({LS}, decodes, layer=2)
    late = a_pass({LS}, decodes, layer=7)
    assert QLLM.should_preempt(costed(view([prompt]), CPU_LIKE, running=early))
    assert not QLLM.should_preempt(costed(view([prompt]), CPU_LIKE, running=late))
    # A suspended pass is resumed first by the same measure.
    assert QLLM.should_resume(costed(view([prompt]), CPU_LIKE, suspended=dataclasses.replace(late, suspended_s=0.01)))


def test_an_ls_decode_pass_held_back_past_its_own_step_time_is_not_preempted_and_resumes() -> None:
    prompt = req("p", LS, 0.9, prompt=50)
    held = a_pass({LS}, [(100, 1)] * 4, layer=2, suspended_s=0.2)  # suspended longer than its 90 ms
    assert not QLLM.should_preempt(costed(view([prompt]), CPU_LIKE, running=held))
    assert QLLM.should_resume(costed(view([prompt]), CPU_LIKE, suspended=held))


def test_queued_be_ages_on_be_progress_not_on_time_queued() -> None:
    old = req("old", BE, 0.0, prompt=20)
    lsd = req("lsd", LS, 9.9, decoding=True)
    # Queued ten seconds, but BE work advanced a moment ago: no pass of its own, it rides in the LS step.
    progressing = costed(view([old, lsd], now=10.0), CPU_LIKE, be_stalled_s=0.1)
    assert planned(progressing) == [("lsd", 1), ("old", 20)]
    fresh = req("fresh", BE, 9.0, prompt=20)
    stalled = costed(view([fresh, req("p", LS, 9.9)], now=10.0), CPU_LIKE, be_stalled_s=CONFIG.be_max_wait_s)
    assert planned(stalled) == [("fresh", 20)]


def test_no_be_work_runs_while_the_waiting_ls_prompts_do_not_fit_the_kv() -> None:
    v = view([req("p", LS, 0.5, prompt=30), req("be", BE, 0.1, prompt=10)], free_blocks=1)
    v = dataclasses.replace(v, block_cost=lambda r, n: 5 if r.priority is LS else 1)
    assert planned(costed(v, CPU_LIKE)) == []


def test_a_pass_without_features_or_suspension_time_is_planned_from_what_it_does_tell() -> None:
    bare = PassInfo(frozenset({BE}), False, 7.0, 6, True, num_tokens=300, layers_left=2)
    assert bare.cost_features == PassFeatures(prompt_tokens=300, prompt_rows=1)
    assert bare.stalled_s == 7.0, "held_back_s stands in for the time suspended"
    assert bare.done_share == 0.75
    assert (
        SchedulerView(
            0.0, {c: [] for c in (LS, BE)}, {c: [] for c in (LS, BE)}, 1, lambda r, n: 1, None, None
        ).cost_model.fit
        == CostFit.nominal()
    )
