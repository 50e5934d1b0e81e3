"""The Grafana dashboard in k8s/grafana-dashboard-configmap.yaml: the ConfigMap carries exactly the generated
JSON, every query goes to the `datasource` variable, every query names metrics the application exports (as
Ray's export spells them, from the metric specs in the code, not from a list kept here) with labels those
metrics have, the panels the operators asked for exist, their SLO lines at serve_config.yaml's values, and
every metric spec is on some panel (a new one gets a default panel)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from qllm_k8s.cluster import APP_LABELS
from qllm_k8s.dashboard import ALL_METRICS, DASHBOARD_KEY, dashboard_json
from qllm_k8s.files import DASHBOARD_CONFIGMAP_PATH, render
from qllm_k8s.serve_config import app_args, k8s_serve_config, load_serve_config
from qllm_k8s.spec_panels import TITLE as DEFAULT_PANELS_ROW

from qllm_core.metrics import CLASS, Kind, MetricSpec
from tests.k8s.manifest_check import load_documents
from tests.k8s.promql_check import (
    SERVE_LABELS,
    datasource_problems,
    grouping_labels,
    known_series,
    metric_names,
    metric_problems,
    query_panels,
    query_problems,
    spec_series,
    targets,
)

CONFIGMAP = Path(__file__).resolve().parents[2] / "k8s" / "grafana-dashboard-configmap.yaml"
# kubectl apply (client side) keeps the whole object in an annotation; annotations are limited to 256 KiB.
KUBECTL_ANNOTATION_LIMIT = 256 * 1024


def _args() -> dict[str, Any]:
    """The application args the generated files are made from (the k8s variant's)."""
    return app_args(k8s_serve_config(load_serve_config()))


def _configmap() -> dict[str, Any]:
    docs = load_documents(CONFIGMAP)
    assert len(docs) == 1 and docs[0]["kind"] == "ConfigMap", docs
    return docs[0]


def _dashboard() -> dict[str, Any]:
    """The dashboard as committed, parsed from the ConfigMap."""
    return json.loads(_configmap()["data"][DASHBOARD_KEY])


# --- the ConfigMap -------------------------------------------------------------------------------------


def test_configmap_holds_exactly_the_generated_dashboard() -> None:
    configmap = _configmap()
    assert configmap["apiVersion"] == "v1"
    labels = configmap["metadata"]["labels"]
    assert labels["grafana_dashboard"] == "1"  # the string the sidecar matches, not the YAML integer 1
    assert APP_LABELS.items() <= labels.items()
    assert "namespace" not in configmap["metadata"]  # like every manifest in k8s/: the namespace applied to
    assert set(configmap["data"]) == {DASHBOARD_KEY}
    assert configmap["data"][DASHBOARD_KEY] == dashboard_json(load_serve_config())
    assert CONFIGMAP == DASHBOARD_CONFIGMAP_PATH


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
    panels = query_panels(dashboard)
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
    used = {name for _, target in targets(_dashboard()) for name in metric_names(target["expr"])}
    assert not {name for name in used if name.endswith("_sum")}


def _typo(dashboard: dict[str, Any], old: str, new: str) -> None:
    """Replace `old` by `new` in the first query that has it."""
    for _, target in targets(dashboard):
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
    query_panels(dashboard)[3]["targets"][0]["datasource"] = {"type": "prometheus", "uid": "prometheus"}
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
    matching = [panel["title"] for panel in query_panels(_dashboard()) if REQUIRED[what](panel, args)]
    assert matching, f"no panel shows {what}"


def test_slo_lines_follow_serve_config() -> None:
    serve_config = load_serve_config()
    args = serve_config["applications"][0]["args"]
    args["ls_ttft_slo_s"], args["slo_target"] = 0.5, 0.95
    changed = json.loads(dashboard_json(serve_config))
    panels = {panel["title"]: panel for panel in query_panels(changed)}
    ls = [p for p in panels.values() if _ttft_against_slo(LS, "ls_ttft_slo_s")(p, app_args(serve_config))]
    assert ls and all(_line_values(p) == {0.5} for p in ls)
    assert any(_attainment(p, app_args(serve_config)) for p in panels.values())
    # The committed ConfigMap is now stale: the drift check (`generate.py --check`) sees the change.
    assert render(serve_config)[DASHBOARD_CONFIGMAP_PATH] != CONFIGMAP.read_text()


def test_panels_tile_the_grid() -> None:
    """Panels stay inside Grafana's 24 columns and do not overlap (Grafana would shuffle them)."""
    taken: set[tuple[int, int]] = set()
    for panel in _dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"]) for dy in range(pos["h"])}
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells


# --- every metric on a panel ---------------------------------------------------------------------------


def _panels_by_row(dashboard: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The data panels under each row's title."""
    rows: dict[str, list[dict[str, Any]]] = {}
    current = ""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            current = panel["title"]
            rows[current] = []
        else:
            rows.setdefault(current, []).append(panel)
    return rows


def _series_used(panels: list[dict[str, Any]]) -> set[str]:
    return {name for panel in panels for t in panel["targets"] for name in metric_names(t["expr"])}


def test_every_metric_spec_is_on_a_panel() -> None:
    used = _series_used(query_panels(_dashboard()))
    unshown = [spec.name for spec in ALL_METRICS if not spec_series([spec]).keys() & used]
    assert not unshown, f"no panel shows {unshown}"


def test_default_panels_show_only_what_no_curated_panel_does() -> None:
    rows = _panels_by_row(_dashboard())
    defaults = rows.pop(DEFAULT_PANELS_ROW, [])
    curated = _series_used([panel for panels in rows.values() for panel in panels])
    for panel in defaults:
        assert not _series_used([panel]) & curated, panel["title"]


# Metrics another engineer might add: one of each kind, with and without labels.
NEW_SPECS = (
    MetricSpec(Kind.HISTOGRAM, "qllm_new_wait_seconds", "A new latency.", (CLASS,), (0.1, 1.0)),
    MetricSpec(Kind.COUNTER, "qllm_new_events", "New events.", (CLASS, "reason")),
    MetricSpec(Kind.GAUGE, "qllm_new_ratio", "A new share."),
)


def test_a_new_metric_spec_gets_a_sound_default_panel(monkeypatch: pytest.MonkeyPatch) -> None:
    import qllm_k8s.promql

    # As if the specs were added to qllm_core/metrics.py's ENGINE_METRICS.
    monkeypatch.setattr(qllm_k8s.promql, "ENGINE_METRICS", qllm_k8s.promql.ENGINE_METRICS + NEW_SPECS)
    dashboard = json.loads(dashboard_json(load_serve_config(), ALL_METRICS + NEW_SPECS))
    defaults = _panels_by_row(dashboard)[DEFAULT_PANELS_ROW]
    for spec in NEW_SPECS:
        panels = [p for p in defaults if spec_series([spec]).keys() & _series_used([p])]
        assert len(panels) == 1, spec.name
        assert spec.doc in panels[0]["description"]
    units = {p["title"]: p["fieldConfig"]["defaults"]["unit"] for p in defaults}
    assert units["qllm_new_wait_seconds p50 / p99"] == "s"
    assert units["qllm_new_ratio"] == "percentunit"
    known = {**known_series(), **spec_series(NEW_SPECS, SERVE_LABELS)}
    assert metric_problems(dashboard, known) == []
    assert query_problems(dashboard, known) == []
    assert datasource_problems(dashboard) == []
    events = [t["expr"] for p in defaults for t in p["targets"] if "qllm_new_events" in t["expr"]]
    assert events and all(grouping_labels(e) == {CLASS, "reason"} for e in events)
