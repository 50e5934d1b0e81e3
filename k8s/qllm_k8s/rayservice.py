"""The KubeRay RayService: serve_config.yaml's application (its k8s variant) on a head that runs no engine
and a GPU worker group with one engine replica per worker."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from deployments.settings import AppSettings
from qllm_k8s.cluster import (
    API_KEYS_ENV,
    API_KEYS_FILE,
    API_KEYS_MOUNT,
    API_KEYS_SECRET,
    APP_LABELS,
    APP_NAME,
    CLIENT_PORT,
    DASHBOARD_PORT,
    GCS_PORT,
    IMAGE,
    METRICS_PORT,
    METRICS_PORT_NAME,
    MODELS_MOUNT,
    MODELS_PVC,
    RAY_VERSION,
    SERVE_PORT,
)
from qllm_k8s.serve_config import ManifestError, k8s_serve_config, k8s_settings
from qllm_k8s.yaml_text import dump_yaml

HEAD_RESOURCES = {"cpu": "2", "memory": "8Gi"}
# An OLMoE-1B-7B checkpoint is ~14 GB in bf16; it is loaded through host memory, and Ray's object store
# takes ~30% of the container's memory by default.
WORKER_MEMORY = "64Gi"
# Beyond the engine replica's own `num_cpus`: the raylet, the Serve proxy (proxy_location EveryNode)
# and the metrics agent also run on each worker.
WORKER_EXTRA_CPUS = 2


def worker_counts(settings: AppSettings) -> tuple[int, int, int]:
    """(replicas, minReplicas, maxReplicas) of the GPU worker group: one worker per engine replica."""
    autoscaling = settings.autoscaling
    if autoscaling:
        # Ray Serve's autoscaling_config keys; min_replicas defaults to 1 there.
        low = int(autoscaling.get("min_replicas", 1))
        high = int(autoscaling["max_replicas"])
        return low, low, high
    # Fixed size: Serve runs exactly `replicas` engines, so more workers would idle their GPUs.
    return settings.replicas, settings.replicas, settings.replicas


def _gpus_per_worker(settings: AppSettings) -> int:
    gpus = settings.num_gpus
    if gpus < 1 or gpus != int(gpus):
        raise ManifestError(f"num_gpus={gpus!r}: the k8s variant runs each engine replica on whole GPUs")
    return int(gpus)


def _container(name: str, image: str, ports: Mapping[str, int], resources: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": port_name, "containerPort": number} for port_name, number in ports.items()],
        # Requests equal to limits: the pod gets the Guaranteed QoS class, and Ray sizes itself from them.
        "resources": {"limits": dict(resources), "requests": dict(resources)},
    }


def _with_api_keys(container: dict[str, Any]) -> list[dict[str, Any]]:
    """Mount the API keys' Secret in `container` and point the ingress at it; the pod's volumes to add."""
    container.setdefault("env", []).append({"name": API_KEYS_ENV, "value": f"{API_KEYS_MOUNT}/{API_KEYS_FILE}"})
    container.setdefault("volumeMounts", []).append({"name": "api-keys", "mountPath": API_KEYS_MOUNT, "readOnly": True})
    return [{"name": "api-keys", "secret": {"secretName": API_KEYS_SECRET}}]


def _head_group(image: str) -> dict[str, Any]:
    container = _container(
        "ray-head",
        image,
        {
            "gcs-server": GCS_PORT,
            "dashboard": DASHBOARD_PORT,
            "client": CLIENT_PORT,
            "serve": SERVE_PORT,
            METRICS_PORT_NAME: METRICS_PORT,
        },
        HEAD_RESOURCES,
    )
    return {
        "rayStartParams": {
            # No logical CPUs: engine replicas (which need CPUs and a GPU) never land on the head; only
            # Serve's controller, the proxy and the 0-CPU ingress and router actors may.
            "num-cpus": "0",
            # The KubeRay operator deploys serveConfigV2 through the dashboard, so it listens on the pod IP;
            # the Ray token guards it (authOptions) and the NetworkPolicy admits only the operator to it.
            "dashboard-host": "0.0.0.0",  # noqa: S104
            "metrics-export-port": str(METRICS_PORT),
        },
        "template": {
            "metadata": {"labels": {**APP_LABELS, "app.kubernetes.io/component": "ray-head"}},
            # The ingress may run on the head (it needs no CPU), so the head has the keys too.
            "spec": {"containers": [container], "volumes": _with_api_keys(container)},
        },
    }


def _worker_group(image: str, settings: AppSettings) -> dict[str, Any]:
    replicas, low, high = worker_counts(settings)
    cpus = math.ceil(settings.num_cpus) + WORKER_EXTRA_CPUS
    container = _container(
        "ray-worker",
        image,
        {"serve": SERVE_PORT, METRICS_PORT_NAME: METRICS_PORT},
        {"cpu": str(cpus), "memory": WORKER_MEMORY, "nvidia.com/gpu": _gpus_per_worker(settings)},
    )
    container["env"] = [
        # The checkpoint is a local directory: never reach for the Hugging Face Hub.
        {"name": "HF_HUB_OFFLINE", "value": "1"},
    ]
    container["volumeMounts"] = [
        {"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True},
        # Ray's object store lives in /dev/shm, which is 64 MiB in a container by default.
        {"name": "dshm", "mountPath": "/dev/shm"},  # noqa: S108 - a mount point, not a temp file
    ]
    return {
        "groupName": "gpu",
        "replicas": replicas,
        "minReplicas": low,
        "maxReplicas": high,
        "rayStartParams": {"metrics-export-port": str(METRICS_PORT)},
        "template": {
            "metadata": {"labels": {**APP_LABELS, "app.kubernetes.io/component": "ray-worker"}},
            "spec": {
                "containers": [container],
                "volumes": [
                    {"name": "models", "persistentVolumeClaim": {"claimName": MODELS_PVC, "readOnly": True}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory"}},
                    *_with_api_keys(container),
                ],
                # GPU node pools are usually tainted so that only GPU pods land there.
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            },
        },
    }


def rayservice(serve_config: Mapping[str, Any], image: str = IMAGE) -> dict[str, Any]:
    """The RayService for serve_config.yaml (K8S_OVERRIDES applied here)."""
    settings = k8s_settings(serve_config)
    # Ray token authentication: KubeRay makes a token Secret and sets RAY_AUTH_MODE=token and the token on
    # every Ray container, so the GCS, the dashboard and job submission refuse callers without it (running
    # code on the cluster needs the token, not just a route to a pod).
    cluster: dict[str, Any] = {"rayVersion": RAY_VERSION, "authOptions": {"mode": "token"}}
    if settings.autoscaling:
        # Serve's autoscaler asks for replicas; the in-tree Ray autoscaler adds the GPU workers they need.
        cluster["enableInTreeAutoscaling"] = True
    cluster["headGroupSpec"] = _head_group(image)
    cluster["workerGroupSpecs"] = [_worker_group(image, settings)]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": APP_NAME, "labels": dict(APP_LABELS)},
        "spec": {"serveConfigV2": dump_yaml(k8s_serve_config(serve_config)), "rayClusterConfig": cluster},
    }
