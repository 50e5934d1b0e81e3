"""What Prometheus gets: PodMonitors that scrape the head's and the workers' metrics port, and SLO rules that
use metrics the application exports, accepted and unit-tested by promtool."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from qllm_k8s.serve_config import app_args

from tests.k8s.committed import RULES, RULES_TEST, all_of, head_group, only, serve_config_v2, worker_group

# --- PodMonitors ---------------------------------------------------------------------------------------


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A Kubernetes label selector evaluated on a pod's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def test_podmonitors_select_head_and_workers_on_their_metrics_port() -> None:
    doc = only("RayService")
    # The labels KubeRay adds to the pods it creates from the templates.
    pods = {
        "head": {
            **head_group(doc)["template"]["metadata"]["labels"],
            "ray.io/node-type": "head",
            "ray.io/cluster": "c",
        },
        "worker": {
            **worker_group(doc)["template"]["metadata"]["labels"],
            "ray.io/node-type": "worker",
            "ray.io/cluster": "c",
            "ray.io/group": "gpu",
        },
    }
    other_cluster = {"ray.io/node-type": "worker", "ray.io/cluster": "other"}
    selected: dict[str, list[str]] = {}
    for monitor in all_of("PodMonitor"):
        selector = monitor["spec"]["selector"]
        assert "ray.io/cluster" in {e["key"] for e in selector.get("matchExpressions", [])} | set(
            selector.get("matchLabels", {})
        )
        assert not _selects(selector, other_cluster)
        assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
        selected[monitor["metadata"]["name"]] = [node for node, labels in pods.items() if _selects(selector, labels)]
    assert sorted(selected.values()) == [["head"], ["worker"]], selected


# --- Prometheus rules ----------------------------------------------------------------------------------


def test_rules_file_and_prometheusrule_hold_the_same_groups() -> None:
    plain = yaml.safe_load(RULES.read_text())
    assert plain == {"groups": only("PrometheusRule")["spec"]["groups"]}
    assert set(plain) == {"groups"}  # a plain rules file, nothing of the custom resource


def test_rules_use_metrics_the_app_exports() -> None:
    from deployments.metrics import RAY_PREFIX, ROUTER_METRICS
    from qllm_core.metrics import ENGINE_METRICS, LATENCY_BUCKETS, exported_names

    exported = {RAY_PREFIX + name for name in exported_names(ENGINE_METRICS + ROUTER_METRICS)}
    used = set(re.findall(r"\b(?:ray_)?qllm_[a-z_]+", RULES.read_text()))
    assert used and used <= exported, used - exported
    # The SLOs are bucket boundaries, or the `le` matchers would select nothing.
    args = app_args(serve_config_v2())
    assert args["ls_ttft_slo_s"] in LATENCY_BUCKETS
    assert args["be_ttft_slo_s"] in LATENCY_BUCKETS


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        missing = "promtool not installed (Debian: apt-get install prometheus; scripts/install.sh --dev)"
        if os.environ.get("CI") == "true":  # CI installs it: missing there is a broken set-up, not a skip
            pytest.fail(missing)
        pytest.skip(missing)
    # A fixed argv (no shell) with the promtool found on PATH.
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)  # noqa: S603


def test_promtool_checks_the_rules() -> None:
    result = _promtool("check", "rules", RULES.name, cwd=RULES.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_rule_unit_tests_pass() -> None:
    result = _promtool("test", "rules", RULES_TEST.name, cwd=RULES.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_catches_broken_rules(tmp_path: Path) -> None:
    """The two promtool tests above can fail: a syntax error and a wrong threshold are caught."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(RULES.read_text().replace("sum by (priority_class) (rate(", "sum by (priority_class (rate(", 1))
    result = _promtool("check", "rules", str(broken), cwd=tmp_path)
    assert result.returncode != 0
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    (tmp_path / RULES.name).write_text(RULES.read_text().replace("< 0.99", "< 0.5"))
    result = _promtool("test", "rules", RULES_TEST.name, cwd=tmp_path)
    assert result.returncode != 0
    assert "QllmLsTtftSloAttainmentLow" in result.stdout + result.stderr
