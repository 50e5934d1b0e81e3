"""The PromQL the generators build from metric specs: names as Ray's export spells them, and a query that
cannot be right (a label the metric lacks, a rate of a gauge, a histogram's `_sum`) refused at generation."""

from __future__ import annotations

import re

import pytest
from qllm_k8s.dashboard import check_layout
from qllm_k8s.panels import Query, Section, TimeSeries
from qllm_k8s.promql import (
    LS,
    Expr,
    PromQLError,
    aggregate,
    class_match,
    gauge,
    labels_of,
    le_matcher,
    quantile,
    rate,
    selector,
    series,
    sum_rate,
)
from qllm_k8s.serve_config import ManifestError

from deployments import metrics as router
from qllm_core import metrics as engine
from qllm_core.metrics import CLASS
from qllm_core.request import PriorityClass


def test_series_are_named_as_rays_export_names_them() -> None:
    assert series(engine.GENERATED) == "ray_qllm_generation_tokens_total"
    assert series(engine.KV_USAGE) == "ray_qllm_kv_cache_usage_ratio"
    assert series(engine.TTFT, "_bucket") == "ray_qllm_time_to_first_token_seconds_bucket"
    assert series(router.BE_HELD) == "ray_qllm_router_be_held"


def test_a_histogram_sum_or_a_missing_part_is_refused() -> None:
    with pytest.raises(PromQLError, match="_sum"):
        series(engine.TTFT, "_sum")  # Ray's _sum is an estimate
    with pytest.raises(PromQLError):
        series(engine.TTFT)
    with pytest.raises(PromQLError, match="no '_bucket'"):
        series(engine.GENERATED, "_bucket")


def test_engine_series_carry_serve_labels_and_router_series_their_own() -> None:
    assert {"replica", "deployment", "application", CLASS} <= labels_of(engine.WAITING)
    assert labels_of(router.BE_HELD) == {"application"}
    assert "replica" in labels_of(router.REPLICA_LOAD)


def test_a_label_the_metric_lacks_is_refused() -> None:
    with pytest.raises(PromQLError, match="no label replica"):
        selector(router.BE_HELD, {"replica": "r"})
    with pytest.raises(PromQLError, match="no label granularty"):
        sum_rate(engine.PREEMPTIONS, "5m", ("granularty",))
    with pytest.raises(PromQLError, match="no label replica"):
        aggregate("max", gauge(router.QUEUE_DEPTH), ("replica",))


def test_a_rate_of_a_gauge_and_a_gauge_of_a_counter_are_refused() -> None:
    with pytest.raises(PromQLError, match="not a counter"):
        rate(engine.KV_USAGE, "5m")
    with pytest.raises(PromQLError, match="not a gauge"):
        gauge(engine.GENERATED)


def test_queries_read_as_promql_and_remember_their_specs() -> None:
    ls = class_match(PriorityClass.LATENCY_SENSITIVE)
    assert ls == {CLASS: LS}
    p99 = quantile(0.99, engine.TTFT, "5m", ls)
    assert str(p99) == (
        "histogram_quantile(0.99, sum by (le, priority_class) "
        '(rate(ray_qllm_time_to_first_token_seconds_bucket{priority_class="latency_sensitive"}[5m])))'
    )
    assert p99.specs == (engine.TTFT,)
    assert str(aggregate("max", gauge(engine.KV_USAGE))) == "max(ray_qllm_kv_cache_usage_ratio)"
    assert str(sum_rate(engine.GENERATED, "1m")) == "sum(rate(ray_qllm_generation_tokens_total[1m]))"


def test_le_matcher_accepts_both_spellings() -> None:
    matcher = le_matcher(1.0)
    pattern = matcher.split("=~", 1)[1].strip('"').replace("\\\\", "\\")  # PromQL string -> regex
    assert all(re.fullmatch(pattern, le) for le in ("1", "1.0"))
    assert not any(re.fullmatch(pattern, le) for le in ("10", "1x0", "0.1"))


def _panel(width: int) -> TimeSeries:
    return TimeSeries("p", "d", (Query(Expr("up")),), unit="short", width=width)


def test_a_panel_sticking_out_of_the_grid_line_is_refused() -> None:
    check_layout(Section("fits", (_panel(12), _panel(12), _panel(8), _panel(8), _panel(8), _panel(12))))
    with pytest.raises(ManifestError, match="does not fit"):
        check_layout(Section("overflows", (_panel(12), _panel(8), _panel(8))))
