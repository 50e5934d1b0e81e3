"""A default panel for every metric spec that no curated section shows, so that a metric added to
qllm_core/metrics.py or deployments/metrics.py appears on the dashboard without touching the generator
(a curated panel in dashboard_sections.py can replace its default one later)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from qllm_core.metrics import Kind, MetricSpec
from qllm_k8s.panels import Query, Section, TimeSeries
from qllm_k8s.promql import Expr, aggregate, gauge, labels_of, quantile, sum_rate

TITLE = "Other metrics"
QUANTILES = (0.5, 0.99)
# Units Grafana knows, by the base-unit suffix of a metric's name (DESIGN.md: names end in their unit).
UNITS = {"_seconds": "s", "_ratio": "percentunit"}


def _unit(spec: MetricSpec) -> str:
    return next((unit for suffix, unit in UNITS.items() if spec.name.endswith(suffix)), "short")


def _legend(labels: Sequence[str], then: str = "") -> str:
    return " ".join([*("{{" + label + "}}" for label in labels), *([then] if then else [])])


def default_panel(spec: MetricSpec, rate_window: str) -> TimeSeries:
    """What a metric's kind and labels suggest: a histogram's p50 and p99 per label set, a counter's rate
    per label set (all replicas), a gauge per label set on each replica (whatever it measures, its maximum
    across replicas is honest; a sum is not, for a ratio)."""
    labels = spec.labels
    queries: tuple[Query, ...]
    if spec.kind is Kind.HISTOGRAM:
        title = f"{spec.name} p50 / p99"
        queries = tuple(
            Query(quantile(q, spec, rate_window, by=labels), _legend(labels, f"p{round(q * 100)}")) for q in QUANTILES
        )
    elif spec.kind is Kind.COUNTER:
        title = f"{spec.name} per second"
        queries = (Query(sum_rate(spec, rate_window, labels), _legend(labels)),)
    else:
        title = spec.name
        # Engine gauges are per replica (Ray Serve's `replica` label), like router gauges about a replica.
        per_replica = ("replica",) if "replica" in labels_of(spec) else ()
        by = tuple(dict.fromkeys((*per_replica, *labels)))
        expr: Expr = aggregate("max", gauge(spec), by)
        queries = (Query(expr, _legend(by)),)
    return TimeSeries(
        title, f"{spec.doc} (A default panel: no curated one shows this metric.)", queries, unit=_unit(spec)
    )


def other_metrics(specs: Iterable[MetricSpec], shown: set[MetricSpec], rate_window: str) -> Section | None:
    """A section of default panels for `specs` not in `shown`; None when every spec is shown."""
    panels = tuple(default_panel(spec, rate_window) for spec in specs if spec not in shown)
    return Section(TITLE, panels) if panels else None
