"""The RayService in k8s/rayservice.yaml: generated from serve_config.yaml with only the documented k8s
overrides (a test fails on drift), a head that runs no engine, and one GPU worker per engine replica."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import pytest
import yaml
from qllm_k8s.cluster import IMAGE, MODELS_MOUNT
from qllm_k8s.files import RAYSERVICE_PATH, RULES_PATH, render
from qllm_k8s.serve_config import (
    K8S_OVERRIDES,
    ManifestError,
    app_args,
    apply_overrides,
    load_serve_config,
)

from tests.k8s.committed import (
    REPO,
    all_of,
    head_group,
    only,
    ray_container,
    serve_config,
    serve_config_v2,
    worker_group,
)

# --- RayService: drift from serve_config.yaml ----------------------------------------------------------


def test_generated_files_are_up_to_date() -> None:
    stale = [
        str(path.relative_to(REPO))
        for path, text in render(load_serve_config()).items()
        if not path.exists() or path.read_text() != text
    ]
    assert not stale, f"{stale} differ from what `python k8s/generate.py` writes from serve_config.yaml: run it"


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted path -> leaf value; named list entries (applications) are addressed by name."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and all(isinstance(v, Mapping) and "name" in v for v in value):
        return {k: v for item in value for k, v in _flatten(item, f"{prefix}[{item['name']}]").items()}
    return {prefix: value}


# The k8s variant as k8s/README.md documents it, written out here rather than read from K8S_OVERRIDES, so
# that the committed manifest is compared with serve_config.yaml and the documentation, not the generator
# with itself.
DOCUMENTED_OVERRIDES = {
    "http_options.host": "0.0.0.0",  # noqa: S104
    "applications[qllm].args.model_name": "olmoe",
    "applications[qllm].args.replicas": 4,
    "applications[qllm].args.num_gpus": 1,
    "applications[qllm].args.num_cpus": 4,
    "applications[qllm].args.engine.model": f"{MODELS_MOUNT}/OLMoE-1B-7B-0924",
    "applications[qllm].args.engine.dtype": "bfloat16",
    "applications[qllm].args.engine.device": "cuda",
    "applications[qllm].args.engine.kv_cache_tokens": 262144,
}


def test_serve_config_v2_is_serve_config_with_only_the_documented_overrides() -> None:
    source, k8s = _flatten(serve_config()), _flatten(serve_config_v2())
    assert DOCUMENTED_OVERRIDES.keys() <= source.keys()  # overrides replace, never add
    assert k8s == source | DOCUMENTED_OVERRIDES
    # The generator's table says the same as the documentation.
    overridden = {
        re.sub(r"^applications\.([^.]+)", r"applications[\1]", p): v for p, v in _flatten(K8S_OVERRIDES).items()
    }
    assert overridden == DOCUMENTED_OVERRIDES


def test_a_change_to_serve_config_shows_as_drift() -> None:
    changed = serve_config()
    changed["applications"][0]["args"]["slo_window"] += 1
    changed["applications"][0]["args"]["slo_target"] = 0.95
    files = render(changed)
    assert files[RAYSERVICE_PATH] != RAYSERVICE_PATH.read_text()
    assert yaml.safe_load(yaml.safe_load(files[RAYSERVICE_PATH])["spec"]["serveConfigV2"])["applications"][0]["args"][
        "slo_window"
    ] == (serve_config()["applications"][0]["args"]["slo_window"] + 1)
    # The alert thresholds follow slo_target.
    assert "< 0.95" in files[RULES_PATH] and "< 0.95" not in RULES_PATH.read_text()


def test_overrides_cannot_add_keys() -> None:
    with pytest.raises(ManifestError, match="num_gpu"):
        apply_overrides({"args": {"num_gpus": 0}}, {"args": {"num_gpu": 1}})
    with pytest.raises(ManifestError, match="other"):
        apply_overrides({"applications": [{"name": "qllm"}]}, {"applications": {"other": {}}})


def test_k8s_args_are_accepted_by_the_app() -> None:
    from deployments.settings import AppSettings

    settings = AppSettings.from_dict(app_args(serve_config_v2()))
    assert settings.num_gpus == 1
    assert (settings.engine.device, settings.engine.dtype) == ("cuda", "bfloat16")
    assert settings.engine.model.startswith(MODELS_MOUNT + "/")


# --- RayService: cluster shape -------------------------------------------------------------------------


def test_head_does_no_work_and_exposes_dashboard_and_metrics() -> None:
    doc = only("RayService")
    assert doc["spec"]["rayClusterConfig"]["rayVersion"] == "2.60.0"
    head = head_group(doc)
    assert head["rayStartParams"]["num-cpus"] == "0"
    ports = {p["name"]: p["containerPort"] for p in ray_container(head)["ports"]}
    assert ports["metrics"] == 8080
    assert ports["dashboard"] == 8265
    assert ports["serve"] == serve_config_v2()["http_options"]["port"]


def test_worker_group_has_one_gpu_per_engine_replica() -> None:
    doc = only("RayService")
    worker = worker_group(doc)
    container = ray_container(worker)
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"] == 8080
    assert worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]
    args = app_args(serve_config_v2())
    # Fixed-size app: exactly as many GPUs as engine replicas ask for, and each worker fits a replica.
    assert worker["replicas"] * 1 == args["replicas"] * args["num_gpus"]
    assert float(container["resources"]["limits"]["cpu"]) >= args["num_cpus"]
    assert container["image"] == ray_container(head_group(doc))["image"] == IMAGE


def test_model_volume_claim_is_declared() -> None:
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in worker_group(only("RayService"))["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {pvc["metadata"]["name"] for pvc in all_of("PersistentVolumeClaim")}
