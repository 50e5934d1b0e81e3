"""k8s/ ships closed: the API keys come from a Secret every Ray pod mounts (no pod starts without it), Ray's
token authentication is on, and a NetworkPolicy admits from outside the Ray pods only the API port (the
dashboard only from the KubeRay operator's namespace, metrics only from Prometheus's). The expectations are
written out here, not read from the generator, so a generator change that opens the cluster fails."""

from __future__ import annotations

from typing import Any

from tests.k8s.committed import all_of, head_group, only, ray_container, worker_group

SECRET = "qllm-api-keys"  # noqa: S105 - the Secret's name
KEY_FILE_ENV = "QLLM_API_KEY_FILE"  # what deployments/auth.py reads
RAY_PODS = {"matchLabels": {"app.kubernetes.io/name": "qllm"}}


def _keys_file(group: dict[str, Any]) -> str:
    """Where a group's Ray container is told to read the API keys; asserts they come from the Secret."""
    container = ray_container(group)
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    path = env[KEY_FILE_ENV]
    volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
    mounts = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(mounts) == 1, f"{path} is not inside one mount: {container['volumeMounts']}"
    volume = volumes[mounts[0]["name"]]
    assert volume["secret"]["secretName"] == SECRET
    assert not volume["secret"].get("optional", False), "an optional Secret would let the API start open"
    assert mounts[0]["readOnly"] is True
    return path


def test_every_ray_pod_reads_the_api_keys_from_the_secret() -> None:
    doc = only("RayService")
    assert _keys_file(head_group(doc)) == _keys_file(worker_group(doc)) == "/etc/qllm/api-keys/keys"


def test_ray_token_authentication_is_on() -> None:
    # KubeRay then sets RAY_AUTH_MODE=token and the token (from a Secret it makes) on every Ray container.
    assert only("RayService")["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}


def test_nothing_exposes_the_dashboard_beyond_the_cluster() -> None:
    assert not all_of("Ingress") and not all_of("Service"), "k8s/ must not add routes to the Ray pods"


def _rule_ports(rule: dict[str, Any]) -> set[int]:
    return {p["port"] for p in rule.get("ports", [])}


def test_the_network_policy_admits_only_the_api_port_from_outside_the_ray_pods() -> None:
    policy = only("NetworkPolicy")["spec"]
    assert policy["podSelector"] == RAY_PODS
    assert policy["policyTypes"] == ["Ingress"]
    open_to_all = [rule for rule in policy["ingress"] if "from" not in rule]
    assert [_rule_ports(rule) for rule in open_to_all] == [{8000}]
    by_source: dict[str, set[int]] = {}
    for rule in policy["ingress"]:
        for source in rule.get("from", []):
            if "podSelector" in source:
                assert source == {"podSelector": RAY_PODS} and "ports" not in rule  # the Ray pods themselves
                continue
            namespace = source["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            assert set(source) == {"namespaceSelector"}, source
            by_source[namespace] = by_source.get(namespace, set()) | _rule_ports(rule)
    assert by_source == {"kuberay-system": {8265}, "prometheus-system": {8080}}
