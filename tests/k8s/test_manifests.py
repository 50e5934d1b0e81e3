"""The k8s/ manifests are valid against the real CRD and core schemas, as strictly as the API server: every
document `kubectl apply -f k8s/` applies passes, and each kind of mistake it would reject or drop fails."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.committed import DOCUMENTS, all_of, head_group, only, ray_container, worker_group
from tests.k8s.manifest_check import CrdValidators, check_custom, check_document, load_crd_schemas, strict_schema

SCHEMAS = Path(__file__).resolve().parents[2].parent / "shared" / "schemas"


@pytest.fixture(scope="module")
def validators() -> CrdValidators:
    if not SCHEMAS.is_dir():
        pytest.fail(
            f"CRD schema folder {SCHEMAS} is missing: it holds the KubeRay and Prometheus Operator CRDs the "
            "manifests are validated against (shared/schemas beside the repository)"
        )
    return CrdValidators(load_crd_schemas(SCHEMAS))


# --- schema validation ---------------------------------------------------------------------------------


def test_schema_folder_holds_the_crds_in_use(validators: CrdValidators) -> None:
    for key in [
        ("ray.io/v1", "RayService"),
        ("ray.io/v1", "RayCluster"),
        ("monitoring.coreos.com/v1", "PodMonitor"),
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule"),
    ]:
        assert key in validators, f"{key} not found in {SCHEMAS}"


def test_k8s_folder_has_the_expected_objects() -> None:
    kinds = sorted(doc["kind"] for _, doc in DOCUMENTS)
    for kind in ("RayService", "PodMonitor", "PrometheusRule", "PersistentVolumeClaim"):
        assert kind in kinds, f"no {kind} among the k8s/ manifests ({kinds})"
    assert kinds.count("PodMonitor") == 2  # head and workers


@pytest.mark.parametrize(("where", "doc"), DOCUMENTS, ids=[where for where, _ in DOCUMENTS])
def test_manifest_is_valid(where: str, doc: dict[str, Any], validators: CrdValidators) -> None:
    assert check_document(doc, validators) == [], where


def _rename(mapping: dict[str, Any], old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


# (kind, mutation, text the error must contain): each mutation is a mistake the API server would reject
# or silently drop.
MUTATIONS: dict[str, tuple[str, Callable[[dict[str, Any]], None], str]] = {
    "rayStartParms": (
        "RayService",
        lambda d: _rename(head_group(d), "rayStartParams", "rayStartParms"),
        "rayStartParms",
    ),
    "container-field-typo": (
        "RayService",
        lambda d: _rename(ray_container(worker_group(d)), "imagePullPolicy", "imagePullPolcy"),
        "imagePullPolcy",
    ),
    "metadata-typo": ("RayService", lambda d: _rename(d["metadata"], "labels", "lables"), "lables"),
    "template-metadata-typo": (
        "RayService",
        lambda d: _rename(worker_group(d)["template"]["metadata"], "labels", "label"),
        "'label'",
    ),
    "num-cpus-not-string": (
        "RayService",
        lambda d: head_group(d)["rayStartParams"].update({"num-cpus": 0}),
        "num-cpus",
    ),
    "replicas-over-int32": ("RayService", lambda d: worker_group(d).update(replicas=2**31), "int32"),
    "duplicate-port": (
        "RayService",
        lambda d: ray_container(head_group(d))["ports"].append({"name": "metrics2", "containerPort": 8080}),
        "duplicate",
    ),
    "bad-gpu-quantity": (
        "RayService",
        lambda d: ray_container(worker_group(d))["resources"]["limits"].update({"nvidia.com/gpu": "one"}),
        "nvidia.com/gpu",
    ),
    "endpoint-not-podMetricsEndpoints": (
        "PodMonitor",
        lambda d: _rename(d["spec"], "podMetricsEndpoints", "endpoint"),
        "endpoint",
    ),
    "relabeling-typo": (
        "PodMonitor",
        lambda d: _rename(d["spec"]["podMetricsEndpoints"][0]["relabelings"][0], "sourceLabels", "source_labels"),
        "source_labels",
    ),
    "rule-typo": ("PrometheusRule", lambda d: _rename(d["spec"]["groups"][1]["rules"][0], "for", "fro"), "fro"),
    "pvc-typo": ("PersistentVolumeClaim", lambda d: _rename(d["spec"], "accessModes", "accesModes"), "accesModes"),
    "bad-name": ("PersistentVolumeClaim", lambda d: d["metadata"].update(name="Qllm_Models"), "DNS subdomain"),
    "unknown-kind": ("PersistentVolumeClaim", lambda d: d.update(kind="PersistentVolumeClame"), "no schema"),
}


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_mistakes_fail_validation(case: str, validators: CrdValidators) -> None:
    kind, mutate, expected = MUTATIONS[case]
    doc = all_of(kind)[0]
    assert check_document(doc, validators) == []  # the mutation, not the original, must cause the error
    mutate(doc)
    errors = check_document(doc, validators)
    assert errors, f"{case}: the mutated {kind} passed validation"
    assert any(expected in error for error in errors), errors


def test_plain_crd_schema_would_miss_a_typo(validators: CrdValidators) -> None:
    """Why the strict mode exists: the CRD schema alone accepts an undeclared field."""
    doc = only("RayService")
    _rename(head_group(doc), "rayStartParams", "rayStartParms")
    assert check_custom(doc, validators, strict=False) == []
    assert check_custom(doc, validators, strict=True) != []


def test_strict_schema_respects_declared_openness() -> None:
    import jsonschema

    schema = strict_schema(
        {
            "type": "object",
            "properties": {
                "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
                "open": {
                    "type": "object",
                    "properties": {"a": {"type": "string"}},
                    "x-kubernetes-preserve-unknown-fields": True,
                },
                "map": {"type": "object", "additionalProperties": {"type": "string"}},
                "list": {"type": "array", "items": {"type": "object", "properties": {"a": {"type": "string"}}}},
            },
        }
    )

    def valid(instance: Any) -> bool:
        return jsonschema.Draft4Validator(schema).is_valid(instance)

    assert valid({"closed": {"a": "x"}, "open": {"a": "x", "b": 1}, "map": {"k": "v"}, "list": [{"a": "x"}]})
    assert not valid({"closed": {"b": "x"}})
    assert not valid({"map": {"k": 1}})
    assert not valid({"list": [{"b": "x"}]})
    assert not valid({"unknown": 1})
