"""What every generated manifest agrees on: the app's name and labels, the image, the Ray ports, the
checkpoint volume and the Prometheus release, and where the repository's files are."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "k8s"
SERVE_CONFIG = REPO_ROOT / "serve_config.yaml"

APP_NAME = "qllm"
RAY_VERSION = "2.60.0"
# Built by k8s/Dockerfile (`docker build -f k8s/Dockerfile -t qllm:0.1.0 .`); the tag is the package version.
IMAGE = "qllm:0.1.0"
# Labels every object and pod of the app carries; the PodMonitors select pods on the first one.
APP_LABELS = {"app.kubernetes.io/name": APP_NAME, "app.kubernetes.io/part-of": APP_NAME}
# kube-prometheus-stack's Prometheus only picks up monitors and rules labelled with its Helm release name.
PROMETHEUS_RELEASE_LABEL = {"release": "prometheus"}

METRICS_PORT = 8080  # Ray's metrics export port, the one KubeRay's docs scrape
METRICS_PORT_NAME = "metrics"  # the pod templates' name for it, which the PodMonitors scrape
DASHBOARD_PORT = 8265
SERVE_PORT = 8000
GCS_PORT = 6379
CLIENT_PORT = 10001

MODELS_PVC = "qllm-models"  # declared in k8s/models-pvc.yaml
MODELS_MOUNT = "/models"

# The API keys: a Secret the operator creates (k8s/README.md, Deploy), mounted on every Ray pod, where the
# ingress reads it ($QLLM_API_KEY_FILE, deployments/auth.py). Not optional: without it no pod starts, so the
# API is never served open by mistake.
API_KEYS_SECRET = "qllm-api-keys"  # noqa: S105 - the Secret's name, not a secret
API_KEYS_FILE = "keys"  # the Secret's key, the file's name in the mount
API_KEYS_MOUNT = "/etc/qllm/api-keys"
API_KEYS_ENV = "QLLM_API_KEY_FILE"

# Namespaces whose pods the NetworkPolicy lets in beyond the API port: the KubeRay operator (it deploys
# serveConfigV2 through the dashboard port, with the Ray token) and Prometheus (it scrapes the metrics port).
KUBERAY_NAMESPACE = "kuberay-system"
PROMETHEUS_NAMESPACE = "prometheus-system"
