"""The PriorityRouter's decisions (no Ray cluster): where its code runs, how it holds and releases BE, how
its view of a replica ages."""

from __future__ import annotations

import asyncio
import inspect

from deployments.load import BE, LS
from deployments.protocol import Placed, Rejected
from deployments.router import PriorityRouter
from deployments.settings import AppSettings
from qllm_core.metrics import PrometheusBackend
from tests.deployments.test_router_metrics import report

# Four batch slots per replica in `report`, so eight BE sequences fill one.
FULL = 8


def router(**settings: object) -> PriorityRouter:
    return PriorityRouter(AppSettings(**settings), PrometheusBackend())  # type: ignore[arg-type]


def test_every_method_serve_calls_is_a_coroutine_so_none_runs_in_serves_thread_pool() -> None:
    public = [name for name, _ in inspect.getmembers(PriorityRouter, inspect.isfunction) if not name.startswith("_")]
    assert {"admit", "report", "stats", "check_health"} <= set(public)
    assert [name for name in public if not inspect.iscoroutinefunction(getattr(PriorityRouter, name))] == []


def test_held_be_is_released_first_in_first_out_all_that_fit_at_one_report() -> None:
    r = router(be_hold_max_s=30.0)
    order: list[str] = []

    async def admit(name: str) -> Placed | Rejected:
        answer = await r.admit(BE)
        order.append(name)
        return answer

    async def scenario() -> tuple[int, int, list[Placed | Rejected]]:
        await r.report(report("a", be_running=FULL))
        first = [asyncio.create_task(admit(name)) for name in ("first", "second", "third")]
        await asyncio.sleep(0.01)
        held_before = (await r.stats()).be_held
        await r.report(report("a", be_running=0))  # room for all three at once
        await asyncio.sleep(0.01)
        held_after = (await r.stats()).be_held
        late = await admit("late")
        return held_before, held_after, [*await asyncio.gather(*first), late]

    held_before, held_after, answers = asyncio.run(scenario())
    assert (held_before, held_after) == (3, 0)
    assert order == ["first", "second", "third", "late"]
    assert all(isinstance(a, Placed) and a.ranking == ("a",) for a in answers)


def test_a_report_releases_only_as_many_held_be_as_it_has_room_for_and_newcomers_queue_behind() -> None:
    r = router(be_hold_max_s=30.0)

    async def scenario() -> tuple[list[bool], bool]:
        await r.report(report("a", be_running=FULL))
        held = [asyncio.create_task(r.admit(BE)) for _ in range(3)]
        await asyncio.sleep(0.01)
        await r.report(report("a", be_running=FULL - 2))  # two slots free
        await asyncio.sleep(0.01)
        newcomer = asyncio.create_task(r.admit(BE))
        await asyncio.sleep(0.01)
        done = [t.done() for t in held]
        newcomer_done = newcomer.done()
        for t in [*held, newcomer]:
            t.cancel()
        await asyncio.gather(*held, newcomer, return_exceptions=True)
        return done, newcomer_done

    done, newcomer_done = asyncio.run(scenario())
    assert done == [True, True, False]
    assert not newcomer_done  # no room left, and the third is still ahead of it


def test_a_held_be_whose_caller_gives_up_leaves_the_queue() -> None:
    r = router(be_hold_max_s=30.0)

    async def scenario() -> tuple[int, int, Placed | Rejected]:
        await r.report(report("a", be_running=FULL))
        gone = asyncio.create_task(r.admit(BE))
        staying = asyncio.create_task(r.admit(BE))
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        held = (await r.stats()).be_held
        await r.report(report("a", be_running=FULL - 1))  # one slot: for the one still waiting
        await asyncio.sleep(0.01)
        return held, (await r.stats()).be_held, await staying

    held, held_after, answer = asyncio.run(scenario())
    assert (held, held_after) == (1, 0)
    assert isinstance(answer, Placed)


def test_be_is_placed_away_from_a_replica_whose_ls_slo_is_at_risk() -> None:
    r = router(ls_ttft_slo_s=1.0)

    async def scenario() -> Placed | Rejected:
        await r.report(report("risky", ls_ttft=(0.2, 2.5)))  # idle, but half its LS TTFTs missed
        await r.report(report("busy", be_running=FULL - 2))
        return await r.admit(BE)

    answer = asyncio.run(scenario())
    assert isinstance(answer, Placed) and answer.ranking == ("busy", "risky")


def test_a_replica_marked_at_risk_by_a_burst_recovers_when_the_burst_ages_out() -> None:
    r = router(ls_ttft_slo_s=1.0, slo_window_s=0.2)

    async def scenario() -> tuple[bool, bool]:
        await r.report(report("a", ls_ttft=(3.0, 3.0)))  # observed 1 s ago, by `report`
        stats = await r.stats()
        return stats.replicas["a"].at_risk, stats.replicas["a"].ls_attainment is None

    at_risk, aged_out = asyncio.run(scenario())
    assert not at_risk and aged_out


def test_ls_is_never_held_and_goes_where_it_is_predicted_fastest() -> None:
    r = router()

    async def scenario() -> Placed | Rejected:
        await r.report(report("slow", ls_ttft=(0.6, 0.7, 0.8)))
        await r.report(report("fast", be_running=FULL, ls_ttft=(0.1, 0.1)))
        return await r.admit(LS)

    answer = asyncio.run(scenario())
    assert answer == Placed(("fast", "slow"), 0.0)


def test_a_held_call_counts_its_sequences_in_the_be_queue() -> None:
    r = router(be_hold_max_s=30.0, max_queued_be=10)

    async def scenario() -> Placed | Rejected:
        await r.report(report("a", be_running=FULL))  # no room: the next BE call is held
        held = asyncio.create_task(r.admit(BE, 10))
        await asyncio.sleep(0.01)
        assert (await r.stats()).be_held == 1
        try:  # ten sequences wait already: the queue is full, so this is refused at once (never held)
            return await asyncio.wait_for(r.admit(BE, 1), timeout=5)
        finally:
            held.cancel()

    assert isinstance(asyncio.run(scenario()), Rejected)
