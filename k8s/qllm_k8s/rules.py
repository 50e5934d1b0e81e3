"""The SLO rules: recording rules for TTFT attainment per class, and the alerts on them, as a plain
Prometheus rules file's groups and as a Prometheus Operator PrometheusRule. Thresholds are the k8s
variant's application settings (`slo_target`, `ls_ttft_slo_s`, `max_queued_be`, ...)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deployments import metrics as router
from deployments.load import RoutingRules
from deployments.settings import AppSettings
from qllm_core import metrics as engine
from qllm_core.metrics import CLASS
from qllm_core.request import PriorityClass
from qllm_k8s.cluster import APP_LABELS, APP_NAME, PROMETHEUS_RELEASE_LABEL
from qllm_k8s.promql import aggregate, class_match, gauge, le_matcher, num, over_window, rate, sum_rate
from qllm_k8s.serve_config import k8s_settings

ATTAINMENT_WINDOWS = ("5m", "30m", "1h")
# Multi-window burn rate (Google SRE workbook): spending the error budget 14.4x too fast over 1 h (and still
# over the last 5 min) exhausts a 30-day budget in ~2 days: page.
FAST_BURN = 14.4
BE_STARVING_WINDOW = "10m"
BE_QUEUE_NEAR_LIMIT = 0.9
LS_MATCH = class_match(PriorityClass.LATENCY_SENSITIVE)
BE_MATCH = class_match(PriorityClass.BEST_EFFORT)
# Recording rules are named level:metric:operations; the tokens' rate keeps the metric's own name.
GENERATED_RATE_RECORD = f"qllm:{engine.GENERATED.name.removeprefix('qllm_')}:rate5m"


def attainment_record(window: str) -> str:
    """The recording rule holding each class's share of requests whose first token came within its SLO."""
    return f"qllm:ttft_slo_attainment:ratio_rate{window}"


def record_selector(name: str, match: Mapping[str, str]) -> str:
    """A recording rule's series with equality matchers."""
    return name + "{" + ", ".join(f'{label}="{value}"' for label, value in match.items()) + "}"


def _attainment_rule(priority: PriorityClass, slo_s: float, window: str) -> dict[str, Any]:
    match = class_match(priority)
    within = aggregate("sum", rate(engine.TTFT, window, match, "_bucket", le_matcher(slo_s)), (CLASS,))
    total = aggregate("sum", rate(engine.TTFT, window, match, "_count"), (CLASS,))
    return {
        "record": attainment_record(window),
        # The static label makes the LS and BE rules of one name distinct to promtool's duplicate check.
        "labels": dict(match),
        "expr": f"{within}\n/\n{total}\n",
    }


def _recording_rules(settings: AppSettings) -> list[dict[str, Any]]:
    slos = RoutingRules.of(settings)
    rules = [
        _attainment_rule(priority, slos.slo_s(priority), window)
        for priority in PriorityClass
        for window in ATTAINMENT_WINDOWS
    ]
    rules.append({"record": GENERATED_RATE_RECORD, "expr": f"{sum_rate(engine.GENERATED, '5m', (CLASS,))}\n"})
    return rules


def _alert(name: str, expr: str, duration: str, severity: str, summary: str, description: str) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": duration,
        "labels": {"severity": severity, "app": APP_NAME},
        "annotations": {"summary": summary, "description": description},
    }


def _alerting_rules(settings: AppSettings) -> list[dict[str, Any]]:
    return [*_ls_alerts(settings), *_be_alerts(settings)]


def _ls_alerts(settings: AppSettings) -> list[dict[str, Any]]:
    target = settings.slo_target
    ls_slo = settings.ls_ttft_slo_s
    fast = max(0.0, 1.0 - FAST_BURN * (1.0 - target))

    def ls_ratio(window: str) -> str:
        return record_selector(attainment_record(window), LS_MATCH)

    # A window with no LS request divides 0 by 0: NaN compares false, so idle periods never alert.
    return [
        _alert(
            "QllmLsTtftSloFastBurn",
            f"{ls_ratio('1h')} < {num(fast)}\nand\n{ls_ratio('5m')} < {num(fast)}\n",
            "2m",
            "critical",
            "LS time-to-first-token SLO burning its error budget fast",
            f"Only {{{{ $value | humanizePercentage }}}} of latency-sensitive requests got their first token within "
            f"{num(ls_slo)} s over the last hour (objective {num(target * 100)}%): the error budget burns at "
            f"least {num(FAST_BURN)}x faster than it can last.",
        ),
        _alert(
            "QllmLsTtftSloAttainmentLow",
            f"{ls_ratio('30m')} < {num(target)}\nand\n{ls_ratio('5m')} < {num(target)}\n",
            "10m",
            "warning",
            "LS time-to-first-token SLO attainment below target",
            f"{{{{ $value | humanizePercentage }}}} of latency-sensitive requests got their first token within "
            f"{num(ls_slo)} s over 30 min, below the {num(target * 100)}% target (slo_target).",
        ),
        _alert(
            "QllmRouterLsSloAtRisk",
            f"{aggregate('min', gauge(router.SLO_ATTAINMENT, LS_MATCH))} < {num(target)}\n",
            "10m",
            "warning",
            "The router sees a replica's LS SLO at risk",
            f"The priority router's LS TTFT attainment over its recent window (slo_window requests) is "
            f"{{{{ $value | humanizePercentage }}}} where it is lowest, below {num(target * 100)}% (slo_target).",
        ),
    ]


def _be_alerts(settings: AppSettings) -> list[dict[str, Any]]:
    waiting_be = (
        f"({aggregate('sum', gauge(engine.WAITING, BE_MATCH))} or vector(0))\n"
        f"+ ({aggregate('sum', gauge(router.BE_HELD))} or vector(0))"
    )
    finished_be = aggregate("sum", over_window("increase", engine.FINISHED, BE_STARVING_WINDOW, BE_MATCH))
    near_limit = BE_QUEUE_NEAR_LIMIT * settings.max_queued_be
    return [
        _alert(
            "QllmBestEffortStarving",
            f"(\n{waiting_be}\n) > 0\nand on ()\n({finished_be} or vector(0)) < 1\n",
            "5m",
            "warning",
            "Best-effort requests are starving",
            f"Best-effort requests are waiting (at the engines or held by the router) but none has finished in "
            f"{BE_STARVING_WINDOW}: aging (be_hold_max_s, engine.be_max_wait_s) is not getting them served.",
        ),
        _alert(
            "QllmBestEffortQueueNearLimit",
            f"{aggregate('max', gauge(router.QUEUE_DEPTH, BE_MATCH))} >= {num(near_limit)}\n",
            "5m",
            "warning",
            "Almost max_queued_be best-effort requests are waiting",
            f"{{{{ $value }}}} best-effort requests wait (held at the router or queued at the replicas); beyond "
            f"{settings.max_queued_be} (max_queued_be) new ones get 429.",
        ),
    ]


def rule_groups(serve_config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rule groups, thresholds taken from the k8s variant's application settings."""
    settings = k8s_settings(serve_config)
    return [
        {"name": "qllm-slo.records", "interval": "30s", "rules": _recording_rules(settings)},
        {"name": "qllm-slo.alerts", "rules": _alerting_rules(settings)},
    ]


def prometheus_rule(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The PrometheusRule custom resource around `groups`."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": f"{APP_NAME}-slo", "labels": {**APP_LABELS, **PROMETHEUS_RELEASE_LABEL}},
        "spec": {"groups": groups},
    }
