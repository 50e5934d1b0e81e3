"""The k8s/ manifests: valid against the real CRD and core schemas, in sync with serve_config.yaml, consistent
with each other (ports, labels, GPUs), and their Prometheus rules accepted and unit-tested by promtool."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.manifest_check import (
    CrdValidators,
    check_custom,
    check_document,
    load_crd_schemas,
    load_documents,
    load_generator,
    manifest_files,
    strict_schema,
)

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
SCHEMAS = Path(__file__).resolve().parents[2].parent / "shared" / "schemas"
RULES = K8S / "rules" / "qllm-rules.yaml"
RULES_TEST = K8S / "rules" / "qllm-rules-test.yaml"

# Every document `kubectl apply -f k8s/` would apply, named "file#index" (any file added later is covered).
DOCUMENTS = [(f"{path.name}#{i}", doc) for path in manifest_files(K8S) for i, doc in enumerate(load_documents(path))]


gen = load_generator(K8S / "generate.py")


@pytest.fixture(scope="module")
def validators() -> CrdValidators:
    if not SCHEMAS.is_dir():
        pytest.fail(
            f"CRD schema folder {SCHEMAS} is missing: it holds the KubeRay and Prometheus Operator CRDs the "
            "manifests are validated against (shared/schemas beside the repository)"
        )
    return CrdValidators(load_crd_schemas(SCHEMAS))


def _only(kind: str) -> dict[str, Any]:
    docs = [doc for _, doc in DOCUMENTS if doc.get("kind") == kind]
    assert len(docs) == 1, f"expected one {kind} in k8s/, found {len(docs)}"
    return copy.deepcopy(docs[0])


def _all(kind: str) -> list[dict[str, Any]]:
    return [copy.deepcopy(doc) for _, doc in DOCUMENTS if doc.get("kind") == kind]


def _serve_config() -> dict[str, Any]:
    return yaml.safe_load((REPO / "serve_config.yaml").read_text())


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


def _head(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterConfig"]["headGroupSpec"]


def _worker(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]


def _container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]


# (kind, mutation, text the error must contain): each mutation is a mistake the API server would reject
# or silently drop.
MUTATIONS: dict[str, tuple[str, Callable[[dict[str, Any]], None], str]] = {
    "rayStartParms": ("RayService", lambda d: _rename(_head(d), "rayStartParams", "rayStartParms"), "rayStartParms"),
    "container-field-typo": (
        "RayService",
        lambda d: _rename(_container(_worker(d)), "imagePullPolicy", "imagePullPolcy"),
        "imagePullPolcy",
    ),
    "metadata-typo": ("RayService", lambda d: _rename(d["metadata"], "labels", "lables"), "lables"),
    "template-metadata-typo": (
        "RayService",
        lambda d: _rename(_worker(d)["template"]["metadata"], "labels", "label"),
        "'label'",
    ),
    "num-cpus-not-string": ("RayService", lambda d: _head(d)["rayStartParams"].update({"num-cpus": 0}), "num-cpus"),
    "replicas-over-int32": ("RayService", lambda d: _worker(d).update(replicas=2**31), "int32"),
    "duplicate-port": (
        "RayService",
        lambda d: _container(_head(d))["ports"].append({"name": "metrics2", "containerPort": 8080}),
        "duplicate",
    ),
    "bad-gpu-quantity": (
        "RayService",
        lambda d: _container(_worker(d))["resources"]["limits"].update({"nvidia.com/gpu": "one"}),
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
    doc = _all(kind)[0]
    assert check_document(doc, validators) == []  # the mutation, not the original, must cause the error
    mutate(doc)
    errors = check_document(doc, validators)
    assert errors, f"{case}: the mutated {kind} passed validation"
    assert any(expected in error for error in errors), errors


def test_plain_crd_schema_would_miss_a_typo(validators: CrdValidators) -> None:
    """Why the strict mode exists: the CRD schema alone accepts an undeclared field."""
    doc = _only("RayService")
    _rename(_head(doc), "rayStartParams", "rayStartParms")
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


# --- RayService: drift from serve_config.yaml ----------------------------------------------------------


def test_generated_files_are_up_to_date() -> None:
    stale = [
        str(path.relative_to(REPO))
        for path, text in gen.render(gen.load_serve_config()).items()
        if not path.exists() or path.read_text() != text
    ]
    assert not stale, f"{stale} differ from what `python k8s/generate.py` writes from serve_config.yaml: run it"


def _serve_config_v2() -> dict[str, Any]:
    return yaml.safe_load(_only("RayService")["spec"]["serveConfigV2"])


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


def test_serve_config_v2_is_serve_config_with_only_the_documented_overrides() -> None:
    embedded = _serve_config_v2()
    assert embedded == gen.k8s_serve_config(_serve_config())
    source, k8s = _flatten(_serve_config()), _flatten(embedded)
    assert source.keys() == k8s.keys()  # overrides replace, never add or drop
    changed = {path for path in source if source[path] != k8s[path]}
    # K8S_OVERRIDES addresses applications by name as a mapping key: `applications.qllm.args...`.
    overridden = {re.sub(r"^applications\.([^.]+)", r"applications[\1]", p) for p in _flatten(gen.K8S_OVERRIDES)}
    assert changed, "the k8s variant overrides nothing?"
    assert changed <= overridden, changed - overridden
    assert k8s["http_options.host"] == "0.0.0.0"  # noqa: S104
    assert k8s["applications[qllm].import_path"] == "deployments.app:build_app"
    assert k8s["applications[qllm].args.num_gpus"] == 1
    assert k8s["applications[qllm].args.engine.device"] == "cuda"


def test_a_change_to_serve_config_shows_as_drift() -> None:
    changed = _serve_config()
    changed["applications"][0]["args"]["slo_window"] += 1
    changed["applications"][0]["args"]["slo_target"] = 0.95
    files = gen.render(changed)
    assert files[gen.RAYSERVICE_PATH] != gen.RAYSERVICE_PATH.read_text()
    assert yaml.safe_load(yaml.safe_load(files[gen.RAYSERVICE_PATH])["spec"]["serveConfigV2"])["applications"][0][
        "args"
    ]["slo_window"] == (_serve_config()["applications"][0]["args"]["slo_window"] + 1)
    # The alert thresholds follow slo_target.
    assert "< 0.95" in files[gen.RULES_PATH] and "< 0.95" not in gen.RULES_PATH.read_text()


def test_overrides_cannot_add_keys() -> None:
    with pytest.raises(gen.ManifestError, match="num_gpu"):
        gen.apply_overrides({"args": {"num_gpus": 0}}, {"args": {"num_gpu": 1}})
    with pytest.raises(gen.ManifestError, match="other"):
        gen.apply_overrides({"applications": [{"name": "qllm"}]}, {"applications": {"other": {}}})


def test_k8s_args_are_accepted_by_the_app() -> None:
    from deployments.settings import AppSettings

    settings = AppSettings.from_dict(gen.app_args(_serve_config_v2()))
    assert settings.num_gpus == 1
    assert (settings.engine.device, settings.engine.dtype) == ("cuda", "bfloat16")
    assert settings.engine.model.startswith(gen.MODELS_MOUNT + "/")


# --- RayService: cluster shape -------------------------------------------------------------------------


def test_head_does_no_work_and_exposes_dashboard_and_metrics() -> None:
    doc = _only("RayService")
    assert doc["spec"]["rayClusterConfig"]["rayVersion"] == "2.60.0"
    head = _head(doc)
    assert head["rayStartParams"]["num-cpus"] == "0"
    ports = {p["name"]: p["containerPort"] for p in _container(head)["ports"]}
    assert ports["metrics"] == 8080
    assert ports["dashboard"] == 8265
    assert ports["serve"] == _serve_config_v2()["http_options"]["port"]


def test_worker_group_has_one_gpu_per_engine_replica() -> None:
    doc = _only("RayService")
    worker = _worker(doc)
    container = _container(worker)
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"] == 8080
    assert worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]
    args = gen.app_args(_serve_config_v2())
    # Fixed-size app: exactly as many GPUs as engine replicas ask for, and each worker fits a replica.
    assert worker["replicas"] * 1 == args["replicas"] * args["num_gpus"]
    assert float(container["resources"]["limits"]["cpu"]) >= args["num_cpus"]
    assert container["image"] == _container(_head(doc))["image"] == gen.IMAGE


def test_model_volume_claim_is_declared() -> None:
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in _worker(_only("RayService"))["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {pvc["metadata"]["name"] for pvc in _all("PersistentVolumeClaim")}


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
    doc = _only("RayService")
    # The labels KubeRay adds to the pods it creates from the templates.
    pods = {
        "head": {**_head(doc)["template"]["metadata"]["labels"], "ray.io/node-type": "head", "ray.io/cluster": "c"},
        "worker": {
            **_worker(doc)["template"]["metadata"]["labels"],
            "ray.io/node-type": "worker",
            "ray.io/cluster": "c",
            "ray.io/group": "gpu",
        },
    }
    other_cluster = {"ray.io/node-type": "worker", "ray.io/cluster": "other"}
    selected: dict[str, list[str]] = {}
    for monitor in _all("PodMonitor"):
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
    assert plain == {"groups": _only("PrometheusRule")["spec"]["groups"]}
    assert set(plain) == {"groups"}  # a plain rules file, nothing of the custom resource


def test_rules_use_metrics_the_app_exports() -> None:
    from deployments.metrics import RAY_PREFIX, ROUTER_METRICS
    from qllm_core.metrics import ENGINE_METRICS, LATENCY_BUCKETS, exported_names

    exported = {RAY_PREFIX + name for name in exported_names(ENGINE_METRICS + ROUTER_METRICS)}
    used = set(re.findall(r"\b(?:ray_)?qllm_[a-z_]+", RULES.read_text()))
    assert used and used <= exported, used - exported
    # The SLOs are bucket boundaries, or the `le` matchers would select nothing.
    args = gen.app_args(_serve_config_v2())
    assert args["ls_ttft_slo_s"] in LATENCY_BUCKETS
    assert args["be_ttft_slo_s"] in LATENCY_BUCKETS


def test_le_matcher_accepts_both_spellings() -> None:
    matcher = gen._le_matcher(1.0)
    pattern = matcher.split("=~", 1)[1].strip('"').replace("\\\\", "\\")  # PromQL string -> regex
    assert all(re.fullmatch(pattern, le) for le in ("1", "1.0"))
    assert not any(re.fullmatch(pattern, le) for le in ("10", "1x0", "0.1"))


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
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
