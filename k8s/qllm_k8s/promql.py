"""PromQL over the application's metrics, built from their `MetricSpec`s so that no metric name is typed
here: a series is named the way Ray's export names it (`ray_` prefix; `_total`, `_bucket`, `_count`), and
a query that filters or groups by a label the metric lacks, rates a gauge or averages a histogram fails
when the files are generated rather than showing nothing in Grafana."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from deployments.metrics import RAY_PREFIX, ROUTER_METRICS
from qllm_core.metrics import CLASS, ENGINE_METRICS, Kind, MetricSpec
from qllm_core.request import PriorityClass

LS = PriorityClass.LATENCY_SENSITIVE.label
BE = PriorityClass.BEST_EFFORT.label
# Labels Ray Serve adds to every metric an engine replica records (deployments/metrics.py, RayBackend).
SERVE_LABELS = ("application", "deployment", "replica")
# The router sets `application` itself: its `replica` label is its own (the target replica).
ROUTER_FIXED_LABELS = ("application",)
# The parts of a histogram a query may use. Not `_sum`: Ray's export rebuilds it from bucket midpoints,
# so a mean made from it would be made up.
HISTOGRAM_PARTS = ("_bucket", "_count")

Match = Mapping[str, str]  # label -> value, each an equality matcher


class PromQLError(ValueError):
    """A query asks a metric for something it does not have."""


@dataclass(frozen=True)
class Expr:
    """A PromQL expression and the metric specs it reads (the dashboard lists the specs it shows)."""

    text: str
    specs: tuple[MetricSpec, ...] = ()

    def __str__(self) -> str:
        return self.text


def num(value: float) -> str:
    """A number as PromQL (and a reader) reads it, without float noise (0.856 rather than 0.8560000000000001)."""
    return f"{value:.6g}"


def le_matcher(seconds: float) -> str:
    """A matcher for the histogram bucket at `seconds`: exporters write its `le` as "1" or as "1.0"."""
    spellings = sorted({num(seconds), repr(float(seconds))})
    return "le=~" + '"' + "|".join(s.replace(".", "\\\\.") for s in spellings) + '"'


def class_match(priority: PriorityClass) -> dict[str, str]:
    """The matcher of one priority class."""
    return {CLASS: priority.label}


def labels_of(spec: MetricSpec) -> frozenset[str]:
    """The labels a scraped series of `spec` carries: its own and those its recorder adds."""
    if spec in ENGINE_METRICS:
        return frozenset(spec.labels + SERVE_LABELS)
    if spec in ROUTER_METRICS:
        return frozenset(spec.labels + ROUTER_FIXED_LABELS)
    raise PromQLError(f"{spec.name} is neither an engine nor a router metric")


def _check_labels(spec: MetricSpec, labels: Sequence[str] | Match, extra: frozenset[str] = frozenset()) -> None:
    missing = sorted(set(labels) - labels_of(spec) - extra)
    if missing:
        raise PromQLError(f"{spec.name} has no label {', '.join(missing)} (it has {sorted(labels_of(spec))})")


def series(spec: MetricSpec, part: str = "") -> str:
    """The name Prometheus scrapes `spec` under: a counter's `_total`, a gauge's own name, a histogram's
    `part` (`_bucket` or `_count`)."""
    if spec.kind is Kind.HISTOGRAM:
        if part not in HISTOGRAM_PARTS:
            raise PromQLError(f"{spec.name}: a histogram query reads one of {HISTOGRAM_PARTS}, not {part!r}")
        name = spec.name + part
    elif part:
        raise PromQLError(f"{spec.name} is a {spec.kind.value}: it has no {part!r} part")
    else:
        (name,) = spec.exported_names()
    if name not in spec.exported_names():
        raise PromQLError(f"{name} is not how {spec.name} is exported")
    return RAY_PREFIX + name


def selector(spec: MetricSpec, match: Match | None = None, part: str = "", raw: str = "") -> str:
    """`spec`'s series with equality matchers `match`, then the literal matcher `raw` (e.g. an `le` range)."""
    match = match or {}
    _check_labels(spec, match)
    matchers = [f'{label}="{value}"' for label, value in match.items()] + ([raw] if raw else [])
    return series(spec, part) + ("{" + ", ".join(matchers) + "}" if matchers else "")


def aggregate(op: str, inner: Expr, by: Sequence[str] = ()) -> Expr:
    """`op` (sum, max, min, ...) over `inner`, grouped `by` labels every spec of `inner` carries."""
    for spec in inner.specs:
        _check_labels(spec, by, extra=frozenset({"le"}))
    text = f"{op} by ({', '.join(by)}) ({inner})" if by else f"{op}({inner})"
    return Expr(text, inner.specs)


def gauge(spec: MetricSpec, match: Match | None = None) -> Expr:
    """A gauge's current value."""
    if spec.kind is not Kind.GAUGE:
        raise PromQLError(f"{spec.name} is a {spec.kind.value}, not a gauge: take its rate()")
    return Expr(selector(spec, match), (spec,))


def over_window(
    function: str, spec: MetricSpec, window: str, match: Match | None = None, part: str = "", raw: str = ""
) -> Expr:
    """`function` (rate, increase) of a counter, or of a histogram's buckets or count, over `window`."""
    if spec.kind is Kind.GAUGE:
        raise PromQLError(f"{function}() of the gauge {spec.name}: it is not a counter")
    return Expr(f"{function}({selector(spec, match, part, raw)}[{window}])", (spec,))


def rate(spec: MetricSpec, window: str, match: Match | None = None, part: str = "", raw: str = "") -> Expr:
    """Per-second rate of a counter (or a histogram part) over `window`."""
    return over_window("rate", spec, window, match, part, raw)


def sum_rate(spec: MetricSpec, window: str, by: Sequence[str] = (), match: Match | None = None) -> Expr:
    """A counter's rate, summed over all replicas `by` labels."""
    return aggregate("sum", rate(spec, window, match), by)


def quantile(q: float, spec: MetricSpec, window: str, match: Match | None = None, by: Sequence[str] = (CLASS,)) -> Expr:
    """Quantile `q` of a histogram from its buckets of all replicas, per `by` group. Never a mean."""
    buckets = aggregate("sum", rate(spec, window, match, part="_bucket"), ("le", *by))
    return Expr(f"histogram_quantile({q}, {buckets})", buckets.specs)
