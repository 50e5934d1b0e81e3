"""The Grafana dashboard in k8s/grafana-dashboard-configmap.yaml: the ConfigMap carries exactly the generated
JSON, every query goes to the `datasource` variable, every query names metrics the application exports (as
Ray's export spells them, from the metric specs in the code, not from a list kept here) with labels those
metrics have, and the panels the operators asked for exist, their SLO lines at serve_config.yaml's values.

PromQL is not parsed: the checks are regular expressions over the queries, which is enough for the plain
aggregations the dashboard uses, and each check is shown to catch a broken copy of the dashboard."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.manifest_check import load_documents, load_generator

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
CONFIGMAP = K8S / "grafana-dashboard-configmap.yaml"
RULES = K8S / "rules" / "qllm-rules.yaml"

# Labels Ray Serve adds to the metrics a replica records (deployments/metrics.py, RayBackend).
SERVE_LABELS = frozenset({"deployment", "replica", "application"})
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# kubectl apply (client side) keeps the whole object in an annotation; annotations are limited to 256 KiB.
KUBECTL_ANNOTATION_LIMIT = 256 * 1024


gen = load_generator(K8S / "generate.py")


def _args() -> dict[str, Any]:
    """The application args the generated files are made from (the k8s variant's)."""
    return gen.app_args(gen.k8s_serve_config(gen.load_serve_config()))


def _configmap() -> dict[str, Any]:
    docs = load_documents(CONFIGMAP)
    assert len(docs) == 1 and docs[0]["kind"] == "ConfigMap", docs
    return docs[0]


def _dashboard() -> dict[str, Any]:
    """The dashboard as committed, parsed from the ConfigMap."""
    return json.loads(_configmap()["data"][gen.DASHBOARD_KEY])


# --- what the application exports ----------------------------------------------------------------------


@functools.cache
def known_series() -> Mapping[str, frozenset[str]]:
    """Every series name a query may use, mapped to the labels it carries: the engine's and the router's
    metrics as Ray's export names them, and the recording rules of k8s/rules/qllm-rules.yaml."""
    from deployments.metrics import RAY_PREFIX, ROUTER_METRICS
    from qllm_core.metrics import ENGINE_METRICS, exported_names

    known: dict[str, frozenset[str]] = {}
    for specs, extra in ((ENGINE_METRICS, SERVE_LABELS), (ROUTER_METRICS, frozenset())):
        names = exported_names(specs)
        for spec in specs:
            for name in spec.exported_names():
                assert name in names
                le = {"le"} if name.endswith("_bucket") else set()
                known[RAY_PREFIX + name] = frozenset(spec.labels) | extra | le
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                labels = set(rule.get("labels", {})) | grouping_labels(rule["expr"])
                known[rule["record"]] = known.get(rule["record"], frozenset()) | labels
    return known


def _priority_classes() -> set[str]:
    from qllm_core.request import PriorityClass

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


def _balanced(expr: str) -> bool:
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


def _query_panels(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The panels that show data (rows only group them)."""
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def _targets(dashboard: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in _query_panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} query {target.get('refId')}", target


def metric_problems(dashboard: Mapping[str, Any], known: Mapping[str, frozenset[str]]) -> list[str]:
    """Queries that name no known series, or a series the application does not export."""
    problems = []
    for where, target in _targets(dashboard):
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
    classes = _priority_classes()
    for where, target in _targets(dashboard):
        expr = target["expr"]
        labels = set().union(*(known.get(name, frozenset()) for name in metric_names(expr)))
        if not _balanced(expr):
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
    for panel in _query_panels(dashboard):
        if panel.get("datasource") != DATASOURCE:
            problems.append(f"panel {panel['title']!r}: datasource {panel.get('datasource')!r}")
    for where, target in _targets(dashboard):
        if target.get("datasource") != DATASOURCE:
            problems.append(f"{where}: datasource {target.get('datasource')!r}")
    return problems


# --- the ConfigMap -------------------------------------------------------------------------------------


def test_configmap_holds_exactly_the_generated_dashboard() -> None:
    configmap = _configmap()
    assert configmap["apiVersion"] == "v1"
    labels = configmap["metadata"]["labels"]
    assert labels["grafana_dashboard"] == "1"  # the string the sidecar matches, not the YAML integer 1
    assert gen.APP_LABELS.items() <= labels.items()
    assert "namespace" not in configmap["metadata"]  # like every manifest in k8s/: the namespace applied to
    assert set(configmap["data"]) == {gen.DASHBOARD_KEY}
    text = configmap["data"][gen.DASHBOARD_KEY]
    assert text == gen.dashboard_json(gen.load_serve_config())
    assert json.loads(text) == gen.dashboard(gen.load_serve_config())


def test_configmap_fits_kubectl_apply() -> None:
    assert len(CONFIGMAP.read_bytes()) < KUBECTL_ANNOTATION_LIMIT


def test_dashboard_identity_and_time_settings() -> None:
    dashboard = _dashboard()
    assert (dashboard["uid"], dashboard["title"]) == ("qllm", "qllm")
    assert dashboard["refresh"] == "10s"
    assert dashboard["time"] == {"from": "now-1h", "to": "now"}
    assert dashboard["schemaVersion"] >= 39


# --- queries -------------------------------------------------------------------------------------------


def test_datasource_is_a_variable_every_query_uses() -> None:
    assert datasource_problems(_dashboard()) == []


def test_every_panel_has_a_query() -> None:
    dashboard = _dashboard()
    panels = _query_panels(dashboard)
    assert len(panels) >= 9
    for panel in panels:
        exprs = [t.get("expr", "").strip() for t in panel.get("targets", [])]
        assert exprs and all(exprs), f"panel {panel['title']!r} has an empty query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_known_series_come_from_the_specs() -> None:
    known = known_series()
    assert "ray_qllm_time_to_first_token_seconds_bucket" in known
    assert "ray_qllm_router_be_held" in known
    assert "qllm:ttft_slo_attainment:ratio_rate5m" in known
    assert "ray_qllm_requests_finished" not in known  # a counter is exported with `_total`
    assert known["ray_qllm_kv_cache_usage_ratio"] == SERVE_LABELS
    assert known["ray_qllm_router_replica_load"] == {"replica", "priority_class"}


def test_every_query_names_exported_series() -> None:
    assert metric_problems(_dashboard(), known_series()) == []


def test_queries_fit_the_series_they_use() -> None:
    assert query_problems(_dashboard(), known_series()) == []


def test_no_query_uses_a_histogram_mean() -> None:
    """Ray rebuilds histogram `_sum`s from bucket midpoints: a mean from them would be made up."""
    used = {name for _, target in _targets(_dashboard()) for name in metric_names(target["expr"])}
    assert not {name for name in used if name.endswith("_sum")}


def _typo(dashboard: dict[str, Any], old: str, new: str) -> None:
    """Replace `old` by `new` in the first query that has it."""
    for _, target in _targets(dashboard):
        if old in target["expr"]:
            target["expr"] = target["expr"].replace(old, new)
            return
    raise AssertionError(f"no query uses {old}")


# (old, new, the problem report must contain): mistakes the checks must catch.
NAME_MISTAKES = {
    "typo": ("ray_qllm_generation_tokens_total", "ray_qllm_generated_tokens_total", "ray_qllm_generated_tokens_total"),
    "no-ray-prefix": ("ray_qllm_requests_waiting", "qllm_requests_waiting", "qllm_requests_waiting is not"),
    "counter-without-total": ("ray_qllm_preemptions_total", "ray_qllm_preemptions", "ray_qllm_preemptions is not"),
    "misspelt-prefix": ("ray_qllm_router_be_held", "ray_qlm_router_be_held", "ray_qlm_router_be_held"),
    "unknown-rule": ("qllm:ttft_slo_attainment:ratio_rate5m", "qllm:ttft_slo_attainment:ratio_rate2m", "rate2m"),
}
QUERY_MISTAKES = {
    "label-typo": ("by (granularity)", "by (granularty)", "granularty"),
    "matcher-on-missing-label": ("ray_qllm_router_be_held", 'ray_qllm_router_be_held{replica="r"}', "no label replica"),
    "class-typo": ('"latency_sensitive"', '"latency-sensitive"', "latency-sensitive"),
    "fixed-rate-window": ("[$__rate_interval]", "[1m]", "[1m]"),
    "rate-of-gauge": (
        "max by (replica) (ray_qllm_kv_cache_usage_ratio)",
        "rate(ray_qllm_kv_cache_usage_ratio[$__rate_interval])",
        "not a counter",
    ),
    "unbalanced": ("sum by (priority_class) (rate(", "sum by (priority_class (rate(", "unbalanced"),
    "legend-label-aggregated-away": ("sum by (granularity)", "sum", "legend uses granularity"),
}


@pytest.mark.parametrize("case", sorted(NAME_MISTAKES))
def test_metric_name_mistakes_are_reported(case: str) -> None:
    old, new, expected = NAME_MISTAKES[case]
    dashboard = _dashboard()
    _typo(dashboard, old, new)
    problems = metric_problems(dashboard, known_series())
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize("case", sorted(QUERY_MISTAKES))
def test_query_mistakes_are_reported(case: str) -> None:
    old, new, expected = QUERY_MISTAKES[case]
    dashboard = _dashboard()
    _typo(dashboard, old, new)
    problems = query_problems(dashboard, known_series())
    assert any(expected in problem for problem in problems), problems


def test_a_pinned_datasource_is_reported() -> None:
    dashboard = _dashboard()
    _query_panels(dashboard)[3]["targets"][0]["datasource"] = {"type": "prometheus", "uid": "prometheus"}
    assert len(datasource_problems(dashboard)) == 1
    dashboard["templating"]["list"] = []
    assert any("template variable" in p for p in datasource_problems(dashboard))


# --- the panels asked for ------------------------------------------------------------------------------

LS = 'priority_class="latency_sensitive"'
BE = 'priority_class="best_effort"'


def _line_values(panel: Mapping[str, Any]) -> set[float]:
    """The values of the threshold lines a time series panel draws (none when its thresholds are not shown)."""
    defaults = panel["fieldConfig"]["defaults"]
    if defaults.get("custom", {}).get("thresholdsStyle", {}).get("mode", "off") == "off":
        return set()
    return {step["value"] for step in defaults["thresholds"]["steps"] if step["value"] is not None}


def _queries(panel: Mapping[str, Any], series: str, *, by: str | None = None, has: tuple[str, ...] = ()) -> list[str]:
    """The panel's queries over `series`, grouped `by` a label and containing every string in `has`."""
    return [
        t["expr"]
        for t in panel["targets"]
        if series in metric_names(t["expr"])
        and (by is None or by in grouping_labels(t["expr"]))
        and all(s in t["expr"] for s in has)
    ]


def _ttft_against_slo(selector: str, slo_arg: str) -> Callable[[Mapping[str, Any], Mapping[str, Any]], bool]:
    def check(panel: Mapping[str, Any], args: Mapping[str, Any]) -> bool:
        series = "ray_qllm_time_to_first_token_seconds_bucket"
        return (
            panel["type"] == "timeseries"
            and all(_queries(panel, series, has=(f"histogram_quantile({q},", selector)) for q in (0.5, 0.99))
            and _line_values(panel) == {float(args[slo_arg])}
        )

    return check


def _attainment(panel: Mapping[str, Any], args: Mapping[str, Any]) -> bool:
    exprs = [t["expr"] for t in panel["targets"]]
    uses = any("qllm:ttft_slo_attainment:" in e or "ray_qllm_router_slo_attainment_ratio" in e for e in exprs)
    return panel["type"] == "timeseries" and uses and _line_values(panel) == {float(args["slo_target"])}


# What each panel the issue asks for must show: (panel, serve args) -> whether this panel is it.
REQUIRED: dict[str, Callable[[Mapping[str, Any], Mapping[str, Any]], bool]] = {
    "LS TTFT p50/p99 against ls_ttft_slo_s": _ttft_against_slo(LS, "ls_ttft_slo_s"),
    "BE TTFT p50/p99 against be_ttft_slo_s": _ttft_against_slo(BE, "be_ttft_slo_s"),
    "SLO attainment against slo_target": _attainment,
    "tokens/s per class": lambda p, _: bool(
        _queries(p, "ray_qllm_generation_tokens_total", by="priority_class", has=("rate(",))
    ),
    "queue depths": lambda p, _: bool(
        _queries(p, "ray_qllm_router_queue_depth", by="priority_class")
        and _queries(p, "ray_qllm_requests_waiting", by="priority_class")
    ),
    "preemptions/s by granularity": lambda p, _: bool(
        _queries(p, "ray_qllm_preemptions_total", by="granularity", has=("rate(",))
    ),
    "KV usage": lambda p, _: bool(_queries(p, "ray_qllm_kv_cache_usage_ratio")),
    "load per replica": lambda p, _: bool(_queries(p, "ray_qllm_router_replica_load", by="replica")),
    "BE held back": lambda p, _: bool(_queries(p, "ray_qllm_router_be_held")),
}


@pytest.mark.parametrize("what", sorted(REQUIRED))
def test_required_panel_exists(what: str) -> None:
    args = _args()
    matching = [panel["title"] for panel in _query_panels(_dashboard()) if REQUIRED[what](panel, args)]
    assert matching, f"no panel shows {what}"


def test_slo_lines_follow_serve_config() -> None:
    serve_config = gen.load_serve_config()
    args = serve_config["applications"][0]["args"]
    args["ls_ttft_slo_s"], args["slo_target"] = 0.5, 0.95
    changed = gen.dashboard(serve_config)
    panels = {panel["title"]: panel for panel in _query_panels(changed)}
    ls = [p for p in panels.values() if _ttft_against_slo(LS, "ls_ttft_slo_s")(p, gen.app_args(serve_config))]
    assert ls and all(_line_values(p) == {0.5} for p in ls)
    assert any(_attainment(p, gen.app_args(serve_config)) for p in panels.values())
    # The committed ConfigMap is now stale: the drift check (`generate.py --check`) sees the change.
    assert gen.render(serve_config)[gen.DASHBOARD_CONFIGMAP_PATH] != CONFIGMAP.read_text()


def test_panels_tile_the_grid() -> None:
    """Panels stay inside Grafana's 24 columns and do not overlap (Grafana would shuffle them)."""
    taken: set[tuple[int, int]] = set()
    for panel in _dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"]) for dy in range(pos["h"])}
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells
