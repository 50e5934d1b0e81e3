"""Every engine metric, defined once as a `MetricSpec`, and the backend that gives specs a home.

A backend turns a spec into a live metric family. `PrometheusBackend` registers prometheus-client metrics
on a registry the caller owns (no global state, so engines never collide); the Ray Serve deployment
plugs in Ray's metrics export instead (deployments/metrics.py). Either way the engine talks to the same
small interface: `family.labels(*values).inc()/observe()/set()`, or the method on the family itself when
it has no labels. Names are the Prometheus names without the `_total` suffix counters get on export.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# LLM latencies span from milliseconds (a decode step) to a minute (a queued prompt under overload).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

CLASS = "priority_class"


class Kind(Enum):
    """Prometheus metric types we use."""

    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its type, name, help text, label names and (histograms) bucket bounds."""

    kind: Kind
    name: str
    doc: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    def exported_names(self) -> tuple[str, ...]:
        """The sample names this metric appears under in an exposition."""
        if self.kind is Kind.COUNTER:
            return (f"{self.name}_total",)
        if self.kind is Kind.HISTOGRAM:
            return tuple(f"{self.name}{s}" for s in ("_bucket", "_count", "_sum"))
        return (self.name,)


class MetricChild(Protocol):
    """One labelled series (the methods its kind supports)."""

    def inc(self, amount: float = 1) -> None: ...
    def set(self, value: float) -> None: ...
    def observe(self, amount: float) -> None: ...


class MetricFamily(MetricChild, Protocol):
    """A metric with all its series; `labels` picks one by label values, in spec order."""

    def labels(self, *values: str) -> MetricChild: ...


class MetricsBackend(Protocol):
    """Makes live metric families from specs."""

    def make(self, spec: MetricSpec) -> MetricFamily: ...


class PrometheusBackend:
    """prometheus-client metrics on `registry` (a fresh one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()

    def make(self, spec: MetricSpec) -> MetricFamily:
        """Register the metric on this backend's registry."""
        if spec.kind is Kind.HISTOGRAM:
            return Histogram(spec.name, spec.doc, spec.labels, registry=self.registry, buckets=spec.buckets)  # type: ignore[return-value]
        cls = Counter if spec.kind is Kind.COUNTER else Gauge
        return cls(spec.name, spec.doc, spec.labels, registry=self.registry)  # type: ignore[return-value]


TTFT = MetricSpec(
    Kind.HISTOGRAM, "qllm_time_to_first_token_seconds", "Arrival to first token.", (CLASS,), LATENCY_BUCKETS
)
TPOT = MetricSpec(
    Kind.HISTOGRAM,
    "qllm_time_per_output_token_seconds",
    "Mean time between output tokens of a finished request.",
    (CLASS,),
    TOKEN_BUCKETS,
)
E2E = MetricSpec(Kind.HISTOGRAM, "qllm_e2e_request_latency_seconds", "Arrival to finish.", (CLASS,), LATENCY_BUCKETS)
QUEUE_WAIT = MetricSpec(
    Kind.HISTOGRAM, "qllm_queue_wait_seconds", "Arrival to first scheduled.", (CLASS,), LATENCY_BUCKETS
)
FINISHED = MetricSpec(Kind.COUNTER, "qllm_requests_finished", "Finished requests by reason.", (CLASS, "finish_reason"))
GENERATED = MetricSpec(Kind.COUNTER, "qllm_generation_tokens", "Output tokens.", (CLASS,))
PROMPT = MetricSpec(Kind.COUNTER, "qllm_prompt_tokens", "Prompt tokens of admitted requests.", (CLASS,))
PREEMPTIONS = MetricSpec(
    Kind.COUNTER, "qllm_preemptions", "Forward passes suspended for more urgent work.", ("granularity",)
)
EVICTIONS = MetricSpec(
    Kind.COUNTER, "qllm_kv_evictions", "Requests whose KV was dropped under memory pressure.", (CLASS,)
)
RUNNING = MetricSpec(Kind.GAUGE, "qllm_requests_running", "Requests inside a forward pass.", (CLASS,))
WAITING = MetricSpec(Kind.GAUGE, "qllm_requests_waiting", "Requests queued for a pass.", (CLASS,))
KV_USAGE = MetricSpec(Kind.GAUGE, "qllm_kv_cache_usage_ratio", "Fraction of KV blocks in use.")

ENGINE_METRICS: tuple[MetricSpec, ...] = (
    TTFT,
    TPOT,
    E2E,
    QUEUE_WAIT,
    FINISHED,
    GENERATED,
    PROMPT,
    PREEMPTIONS,
    EVICTIONS,
    RUNNING,
    WAITING,
    KV_USAGE,
)


def exported_names(specs: Sequence[MetricSpec]) -> set[str]:
    """Every sample name `specs` can appear under."""
    return {name for spec in specs for name in spec.exported_names()}


class EngineMetrics:
    """The engine's metrics, made by `backend` (prometheus-client on a fresh registry by default)."""

    def __init__(self, backend: MetricsBackend | None = None) -> None:
        self.backend = backend if backend is not None else PrometheusBackend()
        make = self.backend.make
        self.ttft = make(TTFT)
        self.tpot = make(TPOT)
        self.e2e = make(E2E)
        self.queue_wait = make(QUEUE_WAIT)
        self.requests = make(FINISHED)
        self.generated_tokens = make(GENERATED)
        self.prompt_tokens = make(PROMPT)
        self.preemptions = make(PREEMPTIONS)
        self.evictions = make(EVICTIONS)
        self.running = make(RUNNING)
        self.waiting = make(WAITING)
        self.kv_usage = make(KV_USAGE)
