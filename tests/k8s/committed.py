"""The documents committed in k8s/, as `kubectl apply -f k8s/` reads them, and the parts of the RayService
the tests look into."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from tests.k8s.manifest_check import load_documents, manifest_files

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
RULES = K8S / "rules" / "qllm-rules.yaml"
RULES_TEST = K8S / "rules" / "qllm-rules-test.yaml"

# Every document `kubectl apply -f k8s/` would apply, named "file#index" (any file added later is covered).
DOCUMENTS = [(f"{path.name}#{i}", doc) for path in manifest_files(K8S) for i, doc in enumerate(load_documents(path))]


def only(kind: str) -> dict[str, Any]:
    """A copy of the one document of `kind`."""
    docs = [doc for _, doc in DOCUMENTS if doc.get("kind") == kind]
    assert len(docs) == 1, f"expected one {kind} in k8s/, found {len(docs)}"
    return copy.deepcopy(docs[0])


def all_of(kind: str) -> list[dict[str, Any]]:
    """Copies of every document of `kind`."""
    return [copy.deepcopy(doc) for _, doc in DOCUMENTS if doc.get("kind") == kind]


def serve_config() -> dict[str, Any]:
    """serve_config.yaml as written (not its k8s variant)."""
    return yaml.safe_load((REPO / "serve_config.yaml").read_text())


def serve_config_v2() -> dict[str, Any]:
    """The serve config the committed RayService embeds."""
    return yaml.safe_load(only("RayService")["spec"]["serveConfigV2"])


def head_group(doc: dict[str, Any]) -> dict[str, Any]:
    """A RayService's head group."""
    return doc["spec"]["rayClusterConfig"]["headGroupSpec"]


def worker_group(doc: dict[str, Any]) -> dict[str, Any]:
    """A RayService's (only) worker group."""
    return doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    """A group's Ray container."""
    return group["template"]["spec"]["containers"][0]
