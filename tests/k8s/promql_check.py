"""Reading the dashboard's PromQL, independently of the generator: which series a query names, which labels
it filters and groups by, and the problems that makes (names the application does not export, labels its
series lack, a rate() of a gauge, a legend naming a label aggregated away, a panel not on the `datasource`
variable).

PromQL is not parsed: the checks are regular expressions over the queries, which is enough for the plain
aggregations the dashboard uses; tests/k8s/test_dashboard.py shows each check catching a broken copy."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from deployments.metrics import RAY_PREFIX, ROUTER_METRICS
from qllm_core.metrics import ENGINE_METRICS, MetricSpec
from qllm_core.request import PriorityClass

RULES = Path(__file__).resolve().parents[2] / "k8s" / "rules" / "qllm-rules.yaml"
# Labels Ray Serve adds to the metrics a replica records (deployments/metrics.py, RayBackend).
SERVE_LABELS = frozenset({"deployment", "replica", "application"})
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


# --- what the application exports ----------------------------------------------------------------------


def spec_series(specs: Sequence[MetricSpec], extra: frozenset[str] = frozenset()) -> dict[str, frozenset[str]]:
    """The series `specs` are scraped as (Ray's `ray_` prefix, the exposition's suffixes), mapped to their
    labels: the spec's, `extra` (what the recorder adds), and `le` on buckets."""
    return {
        RAY_PREFIX + name: frozenset(spec.labels) | extra | ({"le"} if name.endswith("_bucket") else set())
        for spec in specs
        for name in spec.exported_names()
    }


@functools.cache
def known_series() -> Mapping[str, frozenset[str]]:
    """Every series name a query may use, mapped to the labels it carries: the engine's and the router's
    metrics as Ray's export names them, and the recording rules of k8s/rules/qllm-rules.yaml."""
    known = spec_series(ENGINE_METRICS, SERVE_LABELS) | spec_series(ROUTER_METRICS)
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                labels = set(rule.get("labels", {})) | grouping_labels(rule["expr"])
                known[rule["record"]] = known.get(rule["record"], frozenset()) | labels
    return known


def priority_classes() -> set[str]:
    """The values the `priority_class` label takes."""
    return {c.label for c in PriorityClass}


# --- reading PromQL ------------------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\bby\s*\(([^)]*)\)")  # `without` keeps unknown labels: the dashboard does not use it
_AGGREGATION = re.compile(r"\b(?:sum|min|max|avg|count|group|stddev|stdvar|topk|bottomk|quantile)\s*(?:by\b|\()")
_RANGE_FUNCTION = re.compile(r"\b(rate|irate|increase)\s*\(\s*([A-Za-z_:][A-Za-z0-9_:]*)[^\[]*\[([^\]]*)\]")
_LEGEND_LABEL = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def metric_names(expr: str) -> set[str]:
    """The names in `expr` that claim to be the application's series: every identifier outside string
    literals that mentions `qllm` (`ray_qllm_...`, a recording rule `qllm:...`, a bare `qllm_...` missing
    Ray's prefix) or starts with `ray_`."""
    code = _STRING.sub('""', expr)
    return {name for name in _IDENTIFIER.findall(code) if "qllm" in name or name.startswith("ray_")}


def grouping_labels(expr: str) -> set[str]:
    """The labels of every `by (...)` clause in `expr`."""
    return {label.strip() for clause in _GROUPING.findall(expr) for label in clause.split(",") if label.strip()}


def balanced(expr: str) -> bool:
    """Whether the brackets of `expr` (outside string literals) pair up."""
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for char in _STRING.sub('""', expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            return False
    return not stack


# --- the checks ----------------------------------------------------------------------------------------


def query_panels(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The panels that show data (rows only group them)."""
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def targets(dashboard: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every query of the dashboard, with where it is ("panel 'title' query A")."""
    for panel in query_panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} query {target.get('refId')}", target


def metric_problems(dashboard: Mapping[str, Any], known: Mapping[str, frozenset[str]]) -> list[str]:
    """Queries that name no known series, or a series the application does not export."""
    problems = []
    for where, target in targets(dashboard):
        names = metric_names(target.get("expr", ""))
        if not names & known.keys():
            problems.append(f"{where}: names none of the application's series")
        problems += [
            f"{where}: {name} is not a series the application exports" for name in sorted(names - known.keys())
        ]
    return problems


def query_problems(dashboard: Mapping[str, Any], known: Mapping[str, frozenset[str]]) -> list[str]:
    """Queries whose labels, rate() windows, legends or brackets cannot be right for the series they use."""
    problems = []
    classes = priority_classes()
    for where, target in targets(dashboard):
        expr = target["expr"]
        labels = set().union(*(known.get(name, frozenset()) for name in metric_names(expr)))
        if not balanced(expr):
            problems.append(f"{where}: unbalanced brackets")
        for metric, matchers in _SELECTOR.findall(expr):
            for label, value in _MATCHER.findall(matchers):
                if label not in known.get(metric, frozenset()):
                    problems.append(f"{where}: {metric} has no label {label}")
                if label == "priority_class" and value not in classes:
                    problems.append(f"{where}: priority_class {value!r} is not one of {sorted(classes)}")
        grouped = grouping_labels(expr)
        problems += [f"{where}: groups by {label}, which none of its series has" for label in sorted(grouped - labels)]
        # Legends name labels that survive the aggregation (`le` does not survive histogram_quantile).
        legend_labels = set(_LEGEND_LABEL.findall(target.get("legendFormat", "")))
        available = grouped - {"le"} if _AGGREGATION.search(expr) else labels
        problems += [
            f"{where}: legend uses {label}, absent from the result" for label in sorted(legend_labels - available)
        ]
        for function, metric, window in _RANGE_FUNCTION.findall(expr):
            if window != "$__rate_interval":
                problems.append(f"{where}: {function}() over [{window}] rather than [$__rate_interval]")
            if not metric.endswith(("_total", "_bucket", "_count")):
                problems.append(f"{where}: {function}() of {metric}, which is not a counter")
    return problems


def datasource_problems(dashboard: Mapping[str, Any]) -> list[str]:
    """A missing `datasource` variable, or a panel or query not using it."""
    problems = []
    variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    variable = variables.get("datasource", {})
    if (variable.get("type"), variable.get("query")) != ("datasource", "prometheus"):
        problems.append("no `datasource` template variable of type datasource for prometheus")
    for panel in query_panels(dashboard):
        if panel.get("datasource") != DATASOURCE:
            problems.append(f"panel {panel['title']!r}: datasource {panel.get('datasource')!r}")
    for where, target in targets(dashboard):
        if target.get("datasource") != DATASOURCE:
            problems.append(f"{where}: datasource {target.get('datasource')!r}")
    return problems
