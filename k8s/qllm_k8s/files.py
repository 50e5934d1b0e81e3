"""Every file the generator writes, and its text: the one list `python k8s/generate.py` and the drift test
compare the committed files with."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qllm_k8s.cluster import IMAGE, K8S_DIR
from qllm_k8s.dashboard import dashboard_configmap, dashboard_json
from qllm_k8s.networkpolicy import HEADER as NETWORK_POLICY_HEADER
from qllm_k8s.networkpolicy import network_policy
from qllm_k8s.podmonitors import HEADER as PODMONITORS_HEADER
from qllm_k8s.podmonitors import podmonitors
from qllm_k8s.rayservice import rayservice
from qllm_k8s.rules import prometheus_rule, rule_groups
from qllm_k8s.yaml_text import dump_documents, dump_yaml, generated_header

RAYSERVICE_PATH = K8S_DIR / "rayservice.yaml"
PODMONITORS_PATH = K8S_DIR / "podmonitors.yaml"
PROMETHEUS_RULE_PATH = K8S_DIR / "prometheusrule.yaml"
RULES_PATH = K8S_DIR / "rules" / "qllm-rules.yaml"
DASHBOARD_CONFIGMAP_PATH = K8S_DIR / "grafana-dashboard-configmap.yaml"
NETWORK_POLICY_PATH = K8S_DIR / "networkpolicy.yaml"


def render(serve_config: Mapping[str, Any], image: str = IMAGE) -> dict[Path, str]:
    """Every generated file's path and text."""
    groups = rule_groups(serve_config)
    return {
        RAYSERVICE_PATH: generated_header("qllm as a KubeRay RayService (ray.io/v1).")
        + dump_yaml(rayservice(serve_config, image)),
        NETWORK_POLICY_PATH: generated_header(*NETWORK_POLICY_HEADER) + dump_yaml(network_policy()),
        PODMONITORS_PATH: generated_header(*PODMONITORS_HEADER) + dump_documents(podmonitors()),
        RULES_PATH: generated_header("qllm SLO rules as a plain Prometheus rules file (promtool check rules).")
        + dump_yaml({"groups": groups}),
        PROMETHEUS_RULE_PATH: generated_header("qllm SLO rules as a Prometheus Operator PrometheusRule.")
        + dump_yaml(prometheus_rule(groups)),
        DASHBOARD_CONFIGMAP_PATH: generated_header(
            "The qllm Grafana dashboard, for kube-prometheus-stack's Grafana sidecar."
        )
        + dump_yaml(dashboard_configmap(dashboard_json(serve_config))),
    }


def stale_files(files: Mapping[Path, str]) -> list[Path]:
    """The files of `files` missing on disk or differing from the text given."""
    return [path for path, text in files.items() if not path.exists() or path.read_text() != text]
