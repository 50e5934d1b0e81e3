"""How qllm metrics leave a Ray process, and the router's own metrics.

Every replica and the router record through Ray's metrics export: each Ray node's metrics agent serves
them on its metrics port (8080 on KubeRay pods, which the PodMonitors in k8s/ scrape), so no per-replica
endpoint or service discovery is needed when replicas move between nodes. Ray prefixes every name with
`ray_`, so `qllm_time_to_first_token_seconds` is scraped as `ray_qllm_time_to_first_token_seconds`.

Ray rebuilds histogram sums from bucket midpoints: bucket counts and `_count` are exact, `_sum` is an
estimate. Dashboards and rules therefore use quantiles and ratios of buckets and counts, never means.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.serve import metrics as serve_metrics
from ray.util import metrics as ray_metrics

from qllm_core.metrics import CLASS, Kind, MetricChild, MetricFamily, MetricsBackend, MetricSpec

# The metric names Ray's exporter gives ours.
RAY_PREFIX = "ray_"


class _RayFamily:
    """A Ray metric behind the prometheus-client calling convention the engine uses."""

    def __init__(self, metric: Any, spec: MetricSpec, tags: dict[str, str] | None = None) -> None:
        self._metric = metric
        self._spec = spec
        self._tags = tags
        self._children: dict[tuple[str, ...], _RayFamily] = {}

    def labels(self, *values: str) -> MetricChild:
        """The series with these label values (in the spec's label order)."""
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._spec.labels):
                raise ValueError(f"{self._spec.name} takes labels {self._spec.labels}, got {values}")
            child = _RayFamily(self._metric, self._spec, dict(zip(self._spec.labels, values, strict=True)))
            self._children[values] = child
        return child

    def inc(self, amount: float = 1) -> None:
        """Add to a counter."""
        if amount > 0:  # Ray refuses zero increments
            self._metric.inc(amount, tags=self._tags)

    def set(self, value: float) -> None:
        """Set a gauge."""
        self._metric.set(value, tags=self._tags)

    def observe(self, amount: float) -> None:
        """Record one histogram observation."""
        self._metric.observe(amount, tags=self._tags)


class RayBackend:
    """Ray metrics for specs.

    Inside a Serve replica with `serve_tags`, Ray Serve adds the `deployment`, `replica` and `application`
    labels, so every series says which replica it came from. `fixed_tags` adds labels with one value for
    every series of this process (the router uses it for `application`, since its `replica` label names
    the target replica, which Serve's tags would overwrite).
    """

    def __init__(self, serve_tags: bool = True, fixed_tags: Mapping[str, str] | None = None) -> None:
        self._module = serve_metrics if serve_tags else ray_metrics
        self._fixed = dict(fixed_tags or {})

    def make(self, spec: MetricSpec) -> MetricFamily:
        """A Ray metric named and labelled as the spec says."""
        m = self._module
        keys = spec.labels + tuple(self._fixed)
        metric: Any
        if spec.kind is Kind.HISTOGRAM:
            metric = m.Histogram(spec.name, spec.doc, boundaries=list(spec.buckets), tag_keys=keys)
        elif spec.kind is Kind.COUNTER:
            metric = m.Counter(spec.name, spec.doc, tag_keys=keys)
        else:
            metric = m.Gauge(spec.name, spec.doc, tag_keys=keys)
        if self._fixed:
            metric.set_default_tags(self._fixed)
        return _RayFamily(metric, spec)  # type: ignore[return-value]


# The router's metrics. `replica` is the target replica's id, the same value Ray Serve puts in the
# `replica` label of that replica's engine metrics, so the two join.
PLACEMENTS = MetricSpec(
    Kind.COUNTER, "qllm_router_placements", "Requests the router placed, by target replica.", ("replica", CLASS)
)
BE_HELD = MetricSpec(Kind.GAUGE, "qllm_router_be_held", "BE requests the router is holding back now.")
BE_HOLDS = MetricSpec(Kind.COUNTER, "qllm_router_be_holds", "BE requests the router held back before placing.")
REJECTED = MetricSpec(Kind.COUNTER, "qllm_router_rejected", "Requests refused with 429 (queue full).", (CLASS,))
QUEUE_DEPTH = MetricSpec(
    Kind.GAUGE,
    "qllm_router_queue_depth",
    "Requests of a class waiting: queued at the replicas, placed since their last report, or held here.",
    (CLASS,),
)
SLO_ATTAINMENT = MetricSpec(
    Kind.GAUGE,
    "qllm_router_slo_attainment_ratio",
    "Fraction of a replica's recent requests (slo_window) whose TTFT met the class SLO.",
    ("replica", CLASS),
)
REPLICA_LOAD = MetricSpec(
    Kind.GAUGE,
    "qllm_router_replica_load",
    "Requests running or waiting on a replica, as it reported.",
    ("replica", CLASS),
)
REPLICAS = MetricSpec(Kind.GAUGE, "qllm_router_replicas", "Replicas that reported recently.")

ROUTER_METRICS: tuple[MetricSpec, ...] = (
    PLACEMENTS,
    BE_HELD,
    BE_HOLDS,
    REJECTED,
    QUEUE_DEPTH,
    SLO_ATTAINMENT,
    REPLICA_LOAD,
    REPLICAS,
)


class RouterMetrics:
    """The router's metric families, made by `backend` (Ray's export in the app; prometheus-client in tests)."""

    def __init__(self, backend: MetricsBackend) -> None:
        make = backend.make
        self.placements = make(PLACEMENTS)
        self.be_held = make(BE_HELD)
        self.be_holds = make(BE_HOLDS)
        self.rejected = make(REJECTED)
        self.queue_depth = make(QUEUE_DEPTH)
        self.slo_attainment = make(SLO_ATTAINMENT)
        self.replica_load = make(REPLICA_LOAD)
        self.replicas = make(REPLICAS)
