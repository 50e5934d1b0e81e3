"""serve_config.yaml and its k8s variant: the file with `K8S_OVERRIDES` applied, which the RayService embeds
and whose application settings set the alert thresholds and the dashboard's SLO lines."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from deployments.settings import AppSettings
from qllm_k8s.cluster import APP_NAME, MODELS_MOUNT, SERVE_CONFIG


class ManifestError(ValueError):
    """The serve config or the overrides cannot be turned into a consistent manifest."""


# The k8s variant of serve_config.yaml: every key here REPLACES an existing key there (a key that does
# not exist is an error, so a typo cannot silently add a setting); everything else comes from
# serve_config.yaml unchanged, and the drift test compares the committed manifest with that result.
# Entries of a list of named mappings (`applications`) are addressed by their `name`.
K8S_OVERRIDES: dict[str, Any] = {
    # Inside the pod the proxy must listen on the pod IP, not loopback: KubeRay's serve Service and
    # health checks reach it from outside the container.
    "http_options": {"host": "0.0.0.0"},  # noqa: S104
    "applications": {
        APP_NAME: {
            "args": {
                "model_name": "olmoe",
                "replicas": 4,  # one engine replica per GPU worker (see rayservice.worker_counts)
                "num_gpus": 1,
                "num_cpus": 4,
                "engine": {
                    # A checkpoint directory on the volume mounted from MODELS_PVC: nothing is downloaded.
                    "model": f"{MODELS_MOUNT}/OLMoE-1B-7B-0924",
                    "dtype": "bfloat16",
                    "device": "cuda",
                    "kv_cache_tokens": 262144,
                },
            }
        }
    },
}


def load_serve_config(path: Path = SERVE_CONFIG) -> dict[str, Any]:
    """serve_config.yaml as a mapping."""
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ManifestError(f"{path} is not a mapping")
    return data


def apply_overrides(base: Any, overrides: Any, where: str = "") -> Any:
    """`base` with `overrides` merged in; only existing keys may be replaced (see K8S_OVERRIDES)."""
    if isinstance(overrides, Mapping) and isinstance(base, list):
        # A list of named mappings (Serve's `applications`), addressed by name.
        by_name = {item.get("name"): i for i, item in enumerate(base) if isinstance(item, Mapping)}
        merged_list = copy.deepcopy(base)
        for name, value in overrides.items():
            if name not in by_name:
                raise ManifestError(f"override {where}[{name}]: no entry named {name!r} in serve_config.yaml")
            merged_list[by_name[name]] = apply_overrides(base[by_name[name]], value, f"{where}[{name}]")
        return merged_list
    if isinstance(overrides, Mapping):
        if not isinstance(base, Mapping):
            raise ManifestError(f"override {where or '<root>'}: serve_config.yaml has no mapping there")
        merged = copy.deepcopy(dict(base))
        for key, value in overrides.items():
            path = f"{where}.{key}" if where else key
            if key not in base:
                raise ManifestError(f"override {path}: serve_config.yaml has no such key to replace")
            merged[key] = apply_overrides(base[key], value, path)
        return merged
    return copy.deepcopy(overrides)


def k8s_serve_config(serve_config: Mapping[str, Any]) -> dict[str, Any]:
    """The serve config the RayService embeds: serve_config.yaml with K8S_OVERRIDES applied."""
    return apply_overrides(serve_config, K8S_OVERRIDES)


def app_args(serve_config: Mapping[str, Any], name: str = APP_NAME) -> dict[str, Any]:
    """The `args` of application `name`, as written."""
    for app in serve_config.get("applications") or []:
        if app.get("name") == name:
            return dict(app.get("args") or {})
    raise ManifestError(f"serve config has no application named {name!r}")


def k8s_settings(serve_config: Mapping[str, Any]) -> AppSettings:
    """The k8s variant's application settings, validated and defaulted by the app's own `AppSettings`."""
    return AppSettings.from_dict(app_args(k8s_serve_config(serve_config)))
