"""Placement rules on hand-made loads (no Ray)."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest

from deployments.load import (
    BE,
    LS,
    PlacementLog,
    RoutingRules,
    Unreported,
    attainment,
    in_window,
    outlooks,
    rank,
    replica_load,
)
from deployments.protocol import ClassLoad, Outlook, ReplicaLoad, TtftObservation
from deployments.settings import AppSettings
from qllm_core.stats import ClassStats, EngineStats, TtftSample

NOW = 10_000.0
RULES = RoutingRules.of(AppSettings(ls_ttft_slo_s=1.0, slo_target=0.99, slo_window=100, slo_window_s=60.0))


def ttfts(*values: float, age_s: float = 1.0) -> tuple[TtftObservation, ...]:
    return tuple(TtftObservation(NOW - age_s, v) for v in values)


def load(
    rid: str,
    ls_waiting: int = 0,
    be_running: int = 0,
    ls_ttft: tuple[TtftObservation, ...] = ttfts(0.1),
    kv: float = 0.1,
    be_ttft: tuple[TtftObservation, ...] = (),
) -> ReplicaLoad:
    return ReplicaLoad(rid, ClassLoad(ls_waiting, 0, ls_ttft), ClassLoad(0, be_running, be_ttft), kv, 8, NOW)


def view(
    *loads: ReplicaLoad, placed: dict[str, Unreported] | None = None, rules: RoutingRules = RULES
) -> list[Outlook]:
    placed = placed or {}
    return outlooks([(x, placed.get(x.replica_id, Unreported())) for x in loads], rules, NOW)


def test_attainment_counts_only_ttfts_inside_the_time_window_and_the_count() -> None:
    samples = ttfts(5.0, age_s=120) + ttfts(0.1, 0.2, 3.0, 0.4)
    assert attainment(in_window(samples, RULES, NOW), 1.0) == 0.75  # the 5 s one is too old to count
    by_count = dataclasses.replace(RULES, slo_window=2)
    assert attainment(in_window(samples, by_count, NOW), 1.0) == 0.5
    assert attainment(in_window(ttfts(5.0, age_s=120), RULES, NOW), 1.0) is None


def test_a_slow_burst_stops_marking_a_replica_at_risk_once_it_is_older_than_the_window() -> None:
    burst = ttfts(3.0, 3.0, 3.0, age_s=30)
    (recent,) = view(load("a", ls_ttft=burst))
    assert recent.at_risk and recent.ls_attainment == 0.0
    (aged,) = view(load("a", ls_ttft=burst), rules=dataclasses.replace(RULES, slo_window_s=20.0))
    assert not aged.at_risk and aged.ls_attainment is None


def test_ls_goes_where_fewest_ls_prompts_wait_regardless_of_be() -> None:
    outlook = view(load("a", ls_waiting=3), load("b", be_running=12))
    assert rank(LS, outlook) == ("b", "a")


def test_placements_since_the_last_report_count() -> None:
    outlook = view(load("a"), load("b", ls_waiting=1), placed={"a": Unreported(ls=4)})
    assert rank(LS, outlook) == ("b", "a")


def test_be_goes_away_from_a_replica_at_risk_even_with_more_spare_slots_there() -> None:
    at_risk = load("a", ls_ttft=ttfts(0.1, 2.0))  # half its recent LS TTFTs missed the SLO
    busy = load("b", be_running=10)
    outlook = view(at_risk, busy)
    assert [o.at_risk for o in outlook] == [True, False]
    assert outlook[0].be_spare > outlook[1].be_spare
    assert rank(BE, outlook) == ("b", "a")


def test_be_goes_where_it_is_predicted_to_start_soonest_among_replicas_with_room() -> None:
    slow_start = load("a", be_ttft=ttfts(4.0, 5.0))  # long prompts ahead of any BE there
    quick_start = load("b", be_running=10, be_ttft=ttfts(0.3, 0.4))
    assert rank(BE, view(slow_start, quick_start)) == ("b", "a")
    full = load("b", be_running=16, be_ttft=ttfts(0.3, 0.4))  # no slot left
    assert rank(BE, view(slow_start, full)) == ("a", "b")


def test_a_replica_without_recent_ls_ttfts_takes_the_fleets_typical_ttft() -> None:
    quiet = load("a", ls_ttft=ttfts(3.0, age_s=300))  # slow long ago: no longer held against it
    busy = load("b", ls_ttft=ttfts(0.4, 0.4, 0.4))
    a, b = view(quiet, busy)
    assert a.predicted_ls_ttft_s == b.predicted_ls_ttft_s == pytest.approx(0.4)


def test_risk_from_prediction_or_attainment() -> None:
    assert not view(load("a"))[0].at_risk
    assert view(load("a", ls_waiting=9))[0].at_risk  # 10 x 0.1 s predicted, above 80% of the SLO
    assert view(load("a", ls_ttft=ttfts(*(0.1,) * 9, 2.0)))[0].at_risk  # 90% attainment, under 99%


def test_full_kv_leaves_no_be_spare() -> None:
    assert view(load("a", kv=0.97))[0].be_spare <= 0
    assert view(load("a"))[0].be_spare == 16


def test_engine_ttfts_are_moved_onto_the_wall_clock() -> None:
    ls = ClassStats(waiting=1, ready=2, running=3, recent_ttft=(TtftSample(observed_at=95.0, ttft_s=0.3),))
    be = ClassStats(waiting=4, ready=0, running=1, recent_ttft=())
    stats = EngineStats({LS.label: ls, BE.label: be}, 5, 10, None, 0, 0, 0, 0)
    report = replica_load("r", stats, 32, wall_now=NOW, mono_now=100.0)
    assert report.ls == ClassLoad(1, 5, (TtftObservation(NOW - 5.0, 0.3),))
    assert report.be == ClassLoad(4, 1, ())
    assert (report.kv_usage, report.reported_at) == (0.5, NOW)


def test_rules_survive_the_json_that_carries_them_to_the_request_router() -> None:
    rules = RoutingRules.of(AppSettings(ls_ttft_slo_s=0.25, slo_window_s=12.5, max_queued_be=7))
    assert RoutingRules(**json.loads(json.dumps(dataclasses.asdict(rules)))) == rules


def test_a_load_survives_ray_serves_routing_stats_and_an_empty_one_reads_as_none() -> None:
    original = load("a", ls_ttft=ttfts(0.1, 0.2))
    travelled = pickle.loads(pickle.dumps(original.as_routing_stats()))  # noqa: S301 - our own bytes
    assert ReplicaLoad.from_routing_stats(travelled) == original
    assert ReplicaLoad.from_routing_stats({}) is None


def test_a_placement_log_counts_the_sequences_a_call_fans_out_to() -> None:
    log = PlacementLog()
    log.add("a", LS, NOW, sequences=1)
    log.add("a", BE, NOW, sequences=128)
    assert log.unreported(load("a")) == Unreported(ls=1, be=128)
