"""Prometheus Operator PodMonitors for the RayService's Ray pods, the way KubeRay's monitoring docs do it:
each Ray node exports Ray's metrics and the app's (prefixed `ray_`) on its metrics port."""

from __future__ import annotations

from typing import Any

from qllm_k8s.cluster import APP_LABELS, APP_NAME, METRICS_PORT, METRICS_PORT_NAME, PROMETHEUS_RELEASE_LABEL

HEADER = (
    "Prometheus Operator PodMonitors for the qllm RayService's Ray pods, the way KubeRay's monitoring docs do it:",
    "each Ray node exports Ray's metrics (and the app's custom metrics, prefixed `ray_`) on the metrics export",
    f"port {METRICS_PORT}, which the pod templates in rayservice.yaml name `{METRICS_PORT_NAME}`.",
    "",
    "Pods are selected by KubeRay's own labels (`ray.io/node-type`, and `ray.io/cluster`, which KubeRay sets to",
    "the RayCluster's generated name, so it is matched on existence: a RayService upgrade creates a new cluster)",
    "plus the app label from the pod templates, so that other Ray clusters in the namespace are not scraped.",
    "`release: prometheus` is the label kube-prometheus-stack's Prometheus selects monitors on (Helm release",
    "name `prometheus`, as in k8s/README.md). No namespaceSelector: a PodMonitor looks in its own namespace,",
    "the one the RayService is applied to.",
)
# The SLO windows are 5 min: a 15 s scrape gives every rate() enough samples.
SCRAPE_INTERVAL = "15s"
NAME_LABEL = "app.kubernetes.io/name"


def _copy_pod_label(label: str) -> dict[str, Any]:
    """A relabeling that keeps KubeRay's pod label `ray.io/<label>` on every series as `ray_io_<label>`
    (Ray's own Grafana dashboards filter on `ray_io_cluster`)."""
    return {
        "action": "replace",
        "sourceLabels": [f"__meta_kubernetes_pod_label_ray_io_{label}"],
        "targetLabel": f"ray_io_{label}",
    }


def _podmonitor(name: str, node_type: str, pod_labels: tuple[str, ...]) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": f"{APP_NAME}-{name}", "labels": {**APP_LABELS, **PROMETHEUS_RELEASE_LABEL}},
        "spec": {
            "selector": {
                "matchLabels": {"ray.io/node-type": node_type, NAME_LABEL: APP_LABELS[NAME_LABEL]},
                "matchExpressions": [{"key": "ray.io/cluster", "operator": "Exists"}],
            },
            "podMetricsEndpoints": [
                {
                    "port": METRICS_PORT_NAME,
                    "path": "/metrics",
                    "interval": SCRAPE_INTERVAL,
                    "relabelings": [_copy_pod_label(label) for label in pod_labels],
                }
            ],
        },
    }


def podmonitors() -> list[dict[str, Any]]:
    """The head's PodMonitor and the workers' (which also keep the worker group, e.g. `gpu`, on each series)."""
    return [
        _podmonitor("ray-head", "head", ("cluster", "node_type")),
        _podmonitor("ray-workers", "worker", ("cluster", "node_type", "group")),
    ]
