"""Placement rules on hand-made loads (no Ray)."""

from __future__ import annotations

from deployments.load import BE, LS, ReplicaLoad, at_risk, attainment, outlook, rank


def load(
    rid: str, ls_waiting: int = 0, be_running: int = 0, ls_ttft: tuple[float, ...] = (0.1,), kv: float = 0.1
) -> ReplicaLoad:
    return ReplicaLoad(rid, ls_waiting, 0, 0, be_running, kv, 8, ls_ttft, (), reported_at=0.0)


def test_attainment_over_a_window() -> None:
    assert attainment([0.1, 0.2, 3.0, 0.4], slo_s=1.0, window=4) == 0.75
    assert attainment([5.0, 0.1, 0.2], slo_s=1.0, window=2) == 1.0
    assert attainment([], slo_s=1.0, window=10) is None


def test_ls_goes_where_fewest_ls_prompts_wait_regardless_of_be() -> None:
    busy_ls = outlook(load("a", ls_waiting=3), 0, 0, 1.0, 100)
    busy_be = outlook(load("b", be_running=12), 0, 0, 1.0, 100)
    assert rank(LS, [busy_ls, busy_be]) == ["b", "a"]
    assert rank(BE, [busy_ls, busy_be]) == ["a", "b"]


def test_placements_since_the_last_report_count() -> None:
    a = outlook(load("a"), placed_ls=4, placed_be=0, slo_s=1.0, window=100)
    b = outlook(load("b", ls_waiting=1), placed_ls=0, placed_be=0, slo_s=1.0, window=100)
    assert rank(LS, [a, b]) == ["b", "a"]


def test_risk_from_prediction_or_attainment() -> None:
    assert not at_risk(outlook(load("a"), 0, 0, 1.0, 100), 1.0, 0.99)
    assert at_risk(outlook(load("a", ls_waiting=9), 0, 0, 1.0, 100), 1.0, 0.99)
    assert at_risk(outlook(load("a", ls_ttft=(0.1,) * 9 + (2.0,)), 0, 0, 1.0, 100), 1.0, 0.99)


def test_full_kv_leaves_no_be_spare() -> None:
    assert outlook(load("a", kv=0.97), 0, 0, 1.0, 100).be_spare <= 0
    assert outlook(load("a"), 0, 0, 1.0, 100).be_spare == 16


def test_round_trip_through_plain_data() -> None:
    original = load("a", ls_ttft=(0.1, 0.2))
    assert ReplicaLoad.from_dict(original.to_dict()) == original
