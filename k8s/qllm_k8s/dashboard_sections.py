"""The dashboard's curated sections: the panels operators asked for (TTFT against the SLOs, attainment,
throughput, queues, preemption, KV cache, replica load, BE held back), their SLO lines and limits taken from
the k8s variant's application settings."""

from __future__ import annotations

from deployments import metrics as router
from deployments.settings import AppSettings
from qllm_core import metrics as engine
from qllm_core.metrics import CLASS, MetricSpec
from qllm_k8s.panels import Line, Query, RightAxis, Section, Stat, Step, TimeSeries
from qllm_k8s.promql import Expr, aggregate, gauge, num, quantile, sum_rate
from qllm_k8s.rules import BE_MATCH, BE_QUEUE_NEAR_LIMIT, LS_MATCH, attainment_record, record_selector

# Grafana sizes this window to at least four scrape intervals, so rate() always has two samples.
RATE = "$__rate_interval"
# Utilisation above which a KV gauge turns orange/red: near full, new prompts wait for blocks and KV
# gets evicted (see the evictions panel).
KV_WARN, KV_CRIT = 0.8, 0.95


def _attainment(window: str, match: dict[str, str] | None = None) -> Expr:
    """A recording rule of the SLO rules (they read the TTFT histogram; the dashboard reads the record)."""
    name = attainment_record(window)
    return Expr(record_selector(name, match) if match else name)


def _p50_p99(spec: MetricSpec, match: dict[str, str] | None = None, prefix: str = "") -> tuple[Query, ...]:
    return tuple(Query(quantile(q, spec, RATE, match), f"{prefix}p{round(q * 100)}") for q in (0.5, 0.99))


def overview(settings: AppSettings) -> Section:
    """One number each: attainment, LS TTFT p99, tokens/s, replicas, BE waiting, KV usage."""
    ls_slo, target, max_be = settings.ls_ttft_slo_s, settings.slo_target, settings.max_queued_be
    return Section(
        "Overview",
        (
            Stat(
                "LS SLO attainment (1h)",
                f"Share of latency-sensitive requests whose first token came within ls_ttft_slo_s = {num(ls_slo)} s "
                f"over the last hour (recording rule {attainment_record('1h')}). Objective: slo_target = "
                f"{num(target)}. NaN: no LS request in the hour.",
                Query(_attainment("1h", LS_MATCH)),
                unit="percentunit",
                decimals=2,
                steps=(Step("red"), Step("green", target)),
            ),
            Stat(
                "LS TTFT p99",
                f"99th percentile of latency-sensitive time to first token; red above ls_ttft_slo_s = {num(ls_slo)} s.",
                Query(quantile(0.99, engine.TTFT, RATE, LS_MATCH)),
                unit="s",
                steps=(Step("green"), Step("red", ls_slo)),
            ),
            Stat(
                "Output tokens/s",
                "Tokens generated per second, all replicas and classes.",
                Query(sum_rate(engine.GENERATED, RATE)),
                unit="short",
                steps=(Step("blue"),),
            ),
            Stat(
                "Replicas reporting",
                "Engine replicas whose load reports the priority router received recently.",
                Query(aggregate("max", gauge(router.REPLICAS))),
                unit="short",
                steps=(Step("red"), Step("green", 1)),
            ),
            Stat(
                "BE waiting",
                "Best-effort requests waiting (held back at the router, or queued at the replicas); beyond "
                f"max_queued_be = {max_be} new ones get 429.",
                Query(aggregate("max", gauge(router.QUEUE_DEPTH, BE_MATCH))),
                unit="short",
                steps=(Step("green"), Step("orange", BE_QUEUE_NEAR_LIMIT * max_be), Step("red", max_be)),
            ),
            Stat(
                "KV cache usage (fullest replica)",
                "Fraction of KV blocks in use on the replica where it is highest.",
                Query(aggregate("max", gauge(engine.KV_USAGE))),
                unit="percentunit",
                dial=True,
                steps=(Step("green"), Step("orange", KV_WARN), Step("red", KV_CRIT)),
            ),
        ),
    )


def latency(settings: AppSettings) -> Section:
    """TTFT per class against its SLO, attainment (the rules' and the router's), TPOT, queue wait."""
    ls_slo, be_slo, target = settings.ls_ttft_slo_s, settings.be_ttft_slo_s, settings.slo_target
    return Section(
        "Latency against the SLOs",
        (
            TimeSeries(
                "LS TTFT p50 / p99",
                "Latency-sensitive time to first token, quantiles of the histogram buckets of all replicas.",
                _p50_p99(engine.TTFT, LS_MATCH),
                unit="s",
                line=Line("ls_ttft_slo_s", ls_slo),
            ),
            TimeSeries(
                "BE TTFT p50 / p99",
                "Best-effort time to first token against its own, looser objective; quantiles of the histogram "
                "buckets.",
                _p50_p99(engine.TTFT, BE_MATCH),
                unit="s",
                line=Line("be_ttft_slo_s", be_slo),
            ),
            TimeSeries(
                "TTFT SLO attainment",
                f"Share of requests whose first token came within their class's objective (ls_ttft_slo_s = "
                f"{num(ls_slo)} s, be_ttft_slo_s = {num(be_slo)} s), from the recording rules the alerts use.",
                (
                    Query(_attainment("5m"), "{{priority_class}} 5m"),
                    Query(_attainment("1h", LS_MATCH), "{{priority_class}} 1h"),
                ),
                unit="percentunit",
                line=Line("slo_target", target, bad_below=True),
                minimum=None,  # attainment lives near 1: a 0 floor would flatten 0.98 against 0.99
                maximum=1,
            ),
            TimeSeries(
                "Router's LS SLO attainment per replica",
                "The priority router's view, which steers LS requests away from replicas at risk: each replica's "
                "LS attainment over its last slo_window requests.",
                (Query(aggregate("max", gauge(router.SLO_ATTAINMENT, LS_MATCH), ("replica",)), "{{replica}}"),),
                unit="percentunit",
                line=Line("slo_target", target, bad_below=True),
                minimum=None,  # attainment lives near 1: a 0 floor would flatten 0.98 against 0.99
                maximum=1,
            ),
            TimeSeries(
                "Time per output token p50 / p99",
                "Mean time between the output tokens of a finished request, quantiles per class.",
                _p50_p99(engine.TPOT, prefix="{{priority_class}} "),
                unit="s",
            ),
            TimeSeries(
                "Queue wait p99",
                "Arrival to first scheduled at an engine, 99th percentile per class.",
                (Query(quantile(0.99, engine.QUEUE_WAIT, RATE), "{{priority_class}}"),),
                unit="s",
            ),
        ),
    )


def traffic(settings: AppSettings) -> Section:
    """Tokens and requests per second, queue depths, BE held back at the router."""
    by_class = (CLASS,)
    return Section(
        "Throughput and queues",
        (
            TimeSeries(
                "Tokens/s per class",
                "Output tokens generated and prompt tokens admitted per second, all replicas.",
                (
                    Query(sum_rate(engine.GENERATED, RATE, by_class), "{{priority_class}} output"),
                    Query(sum_rate(engine.PROMPT, RATE, by_class), "{{priority_class}} prompt"),
                ),
                unit="short",
            ),
            TimeSeries(
                "Requests/s",
                "Requests finished per second by class and finish reason, and requests refused with 429 (queue "
                f"full: max_queued_ls = {settings.max_queued_ls}, max_queued_be = {settings.max_queued_be}).",
                (
                    Query(
                        sum_rate(engine.FINISHED, RATE, (CLASS, "finish_reason")),
                        "{{priority_class}} {{finish_reason}}",
                    ),
                    Query(sum_rate(router.REJECTED, RATE, by_class), "{{priority_class}} rejected (429)"),
                ),
                unit="reqps",
            ),
            TimeSeries(
                "Queue depths",
                "Router: requests of a class waiting anywhere (queued at replicas, placed since their last report, "
                "or held at the router). Engines: requests queued for a forward pass, and inside one.",
                (
                    Query(aggregate("max", gauge(router.QUEUE_DEPTH), by_class), "{{priority_class}} waiting (router)"),
                    Query(aggregate("sum", gauge(engine.WAITING), by_class), "{{priority_class}} waiting (engines)"),
                    Query(aggregate("sum", gauge(engine.RUNNING), by_class), "{{priority_class}} running (engines)"),
                ),
                unit="short",
            ),
            TimeSeries(
                "BE held back at the router",
                "Best-effort requests the router holds back (until LS load allows, at most be_hold_max_s), and "
                "how many it starts holding per second.",
                (
                    Query(aggregate("sum", gauge(router.BE_HELD)), "held now"),
                    Query(sum_rate(router.BE_HOLDS, RATE), "new holds/s"),
                ),
                unit="short",
                right_axis=RightAxis("new holds/s", "reqps"),
            ),
        ),
    )


def engines() -> Section:
    """Preemptions, KV cache and evictions, and each replica's load and placements."""
    return Section(
        "Engines and replicas",
        (
            TimeSeries(
                "Preemptions/s by granularity",
                "Forward passes suspended for more urgent work, by where they were paused (iteration, layer, "
                "expert), all replicas.",
                (Query(sum_rate(engine.PREEMPTIONS, RATE, ("granularity",)), "{{granularity}}"),),
                unit="short",
                width=8,
            ),
            TimeSeries(
                "KV cache usage per replica",
                "Fraction of each replica's KV blocks in use.",
                (Query(aggregate("max", gauge(engine.KV_USAGE), ("replica",)), "{{replica}}"),),
                unit="percentunit",
                width=8,
                maximum=1,
            ),
            TimeSeries(
                "KV evictions/s per class",
                "Requests whose KV cache was dropped under memory pressure (they recompute it later).",
                (Query(sum_rate(engine.EVICTIONS, RATE, (CLASS,)), "{{priority_class}}"),),
                unit="short",
                width=8,
            ),
            TimeSeries(
                "Load per replica",
                "Requests running or waiting on each replica, per class, as the replica last reported to the router.",
                (
                    Query(
                        aggregate("max", gauge(router.REPLICA_LOAD), ("replica", CLASS)),
                        "{{replica}} {{priority_class}}",
                    ),
                ),
                unit="short",
            ),
            TimeSeries(
                "Placements/s per replica",
                "Requests the priority router sent to each replica per second, per class.",
                (Query(sum_rate(router.PLACEMENTS, RATE, ("replica", CLASS)), "{{replica}} {{priority_class}}"),),
                unit="reqps",
            ),
        ),
    )


def curated_sections(settings: AppSettings) -> list[Section]:
    """The sections operators asked for, in dashboard order."""
    return [overview(settings), latency(settings), traffic(settings), engines()]
