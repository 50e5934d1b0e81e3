"""The NetworkPolicy around the Ray pods: from outside them, only the API port (guarded by the API keys) is
open to every pod; the dashboard port only to the KubeRay operator's namespace, the metrics port only to
Prometheus's. Between the Ray pods (GCS, raylets, object transfer, Serve's proxies) everything is open."""

from __future__ import annotations

from typing import Any

from qllm_k8s.cluster import (
    APP_LABELS,
    APP_NAME,
    DASHBOARD_PORT,
    KUBERAY_NAMESPACE,
    METRICS_PORT,
    PROMETHEUS_NAMESPACE,
    SERVE_PORT,
)

HEADER = (
    "Only the API port of the Ray pods is open to the cluster; the dashboard to the KubeRay operator, the",
    "metrics port to Prometheus. Needs a network plugin that enforces NetworkPolicy (Calico, Cilium, ...).",
)
_NAME_LABEL = "app.kubernetes.io/name"


def _from_namespace(namespace: str, port: int) -> dict[str, Any]:
    selector = {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
    return {"from": [{"namespaceSelector": selector}], "ports": [{"protocol": "TCP", "port": port}]}


def network_policy() -> dict[str, Any]:
    """The NetworkPolicy selecting every Ray pod of the app."""

    def ray_pods() -> dict[str, Any]:  # a fresh mapping each time: shared ones would dump as YAML anchors
        return {"matchLabels": {_NAME_LABEL: APP_LABELS[_NAME_LABEL]}}

    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{APP_NAME}-ray", "labels": dict(APP_LABELS)},
        "spec": {
            "podSelector": ray_pods(),
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": ray_pods()}]},  # the Ray pods among themselves
                {"ports": [{"protocol": "TCP", "port": SERVE_PORT}]},  # the OpenAI API, from anywhere
                _from_namespace(KUBERAY_NAMESPACE, DASHBOARD_PORT),
                _from_namespace(PROMETHEUS_NAMESPACE, METRICS_PORT),
            ],
        },
    }
