"""Offline validation of Kubernetes manifests, as strict as the API server where it matters.

Custom resources are checked against their CRD's `openAPIV3Schema` with `jsonschema`. Those schemas never
say `additionalProperties: false`, yet the API server drops (and `kubectl apply --validate=strict` rejects)
fields a schema does not declare, so a typo like `rayStartParms` would pass plain JSON Schema validation and
be silently lost on the cluster. `strict_schema` therefore closes every object schema that declares
`properties`, unless it sets `additionalProperties` or `x-kubernetes-preserve-unknown-fields: true`.
The validator also understands the OpenAPI/Kubernetes extensions the CRDs use (`nullable`,
`x-kubernetes-list-type` set/map uniqueness, int32/int64 formats); CEL rules (`x-kubernetes-validations`)
are not evaluated. A custom resource's `metadata` (just `type: object` in a CRD) is checked as ObjectMeta.

Core objects (ConfigMap, PersistentVolumeClaim, Service, ...) are checked against Kubernetes' own schemas in
their strict form (unknown fields rejected) by the `kubernetes-validate` package, which bundles them.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

# Kubernetes version of the core schemas (kubernetes-validate bundles one set per minor version).
K8S_VERSION = "1.33"
# What `kubectl apply -f DIR` reads: the folder's own files (not sub-folders) with these suffixes.
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
# RFC 1123 subdomain: what metadata.name must be for nearly every kind.
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

CrdKey = tuple[str, str]  # (apiVersion, kind), e.g. ("ray.io/v1", "RayService")


# --- loading -------------------------------------------------------------------------------------------


def load_crd_schemas(folder: Path) -> dict[CrdKey, dict[str, Any]]:
    """The `openAPIV3Schema` of every served version of every CRD in `folder`'s YAML files."""
    schemas: dict[CrdKey, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.yaml")):
        # libyaml when present: the KubeRay CRDs are ~1 MB each.
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        for doc in yaml.load_all(path.read_text(), Loader=loader):
            if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                if version.get("served", True):
                    key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                    schemas[key] = version["schema"]["openAPIV3Schema"]
    return schemas


def manifest_files(folder: Path) -> list[Path]:
    """The files `kubectl apply -f folder` would read, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in MANIFEST_SUFFIXES)


def load_documents(path: Path) -> list[dict[str, Any]]:
    """The non-empty YAML (or JSON) documents of a manifest file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# --- strict CRD schemas --------------------------------------------------------------------------------


def strict_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of an OpenAPI v3 (structural) schema in which undeclared object fields are errors."""
    node = dict(schema)
    if "properties" in node:
        node["properties"] = {name: strict_schema(sub) for name, sub in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
    if isinstance(node.get("items"), Mapping):
        node["items"] = strict_schema(node["items"])
    if isinstance(node.get("additionalProperties"), Mapping):
        node["additionalProperties"] = strict_schema(node["additionalProperties"])
    for keyword in ("anyOf", "allOf", "oneOf"):
        if keyword in node:
            node[keyword] = [strict_schema(sub) for sub in node[keyword]]
    if isinstance(node.get("not"), Mapping):
        node["not"] = strict_schema(node["not"])
    return node


_draft4_type = jsonschema.Draft4Validator.VALIDATORS["type"]


def _type(validator: Any, types: Any, instance: Any, schema: Mapping[str, Any]) -> Iterator[Any]:
    # OpenAPI's `nullable: true` admits null besides the declared type.
    if instance is None and schema.get("nullable"):
        return
    yield from _draft4_type(validator, types, instance, schema)


def _list_type(validator: Any, list_type: str, instance: Any, schema: Mapping[str, Any]) -> Iterator[Any]:
    """`x-kubernetes-list-type`: `set` items and `map` items' keys must be unique, as the API server checks."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        yield from _set_duplicates(instance)
    elif list_type == "map":
        yield from _map_duplicates(instance, schema)


def _set_duplicates(instance: list[Any]) -> Iterator[Any]:
    seen: list[Any] = []
    for item in instance:
        if item in seen:
            yield jsonschema.ValidationError(f"duplicate item {item!r} in a list of type set")
        seen.append(item)


def _map_duplicates(instance: list[Any], schema: Mapping[str, Any]) -> Iterator[Any]:
    keys = schema.get("x-kubernetes-list-map-keys", [])
    item_props = (schema.get("items") or {}).get("properties", {})
    seen_keys: set[tuple[Any, ...]] = set()
    for item in instance:
        if not isinstance(item, Mapping):
            continue
        # A key the item omits takes its schema default (a container port's protocol is TCP).
        missing = [key for key in keys if key not in item and "default" not in item_props.get(key, {})]
        if missing:
            yield jsonschema.ValidationError(f"list-map key {missing[0]!r} missing in {item!r}")
            continue
        found = tuple(item[key] if key in item else item_props[key]["default"] for key in keys)
        if found in seen_keys:
            yield jsonschema.ValidationError(f"duplicate entries for list-map keys {keys}: {found!r}")
        seen_keys.add(found)


_FORMATS = jsonschema.FormatChecker(formats=())


@_FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@_FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


# OpenAPI 3.0 schema objects follow JSON Schema draft 4/5 (boolean exclusiveMinimum, single `type`).
_CrdValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"type": _type, "x-kubernetes-list-type": _list_type}
)


class CrdValidators:
    """Compiled validators for a folder's CRDs, built on first use (a KubeRay schema is large)."""

    def __init__(self, schemas: Mapping[CrdKey, Mapping[str, Any]]) -> None:
        self.schemas = schemas
        self._compiled: dict[tuple[CrdKey, bool], Any] = {}

    def __contains__(self, key: object) -> bool:
        return key in self.schemas

    def get(self, key: CrdKey, strict: bool = True) -> Any:
        """The validator of custom resource kind `key`; `strict=False` keeps the CRD's schema as it is."""
        if (key, strict) not in self._compiled:
            raw = self.schemas[key]
            schema = strict_schema(raw) if strict else copy.deepcopy(dict(raw))
            self._compiled[key, strict] = _CrdValidator(schema, format_checker=_FORMATS)
        return self._compiled[key, strict]


# --- validation ----------------------------------------------------------------------------------------


def _where(error: jsonschema.ValidationError) -> str:
    return "." + ".".join(str(p) for p in error.absolute_path) if error.absolute_path else "<root>"


def _check_object_meta(doc: Mapping[str, Any]) -> list[str]:
    """A custom resource's metadata, checked as ObjectMeta in its strict core schema.

    kubernetes-validate exposes whole kinds only, so the metadata rides in a ConfigMap, whose other
    fields are all optional.
    """
    probe = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata")}
    return [f"metadata: {msg}" for msg in check_core(probe)]


def check_custom(doc: Mapping[str, Any], validators: CrdValidators, strict: bool = True) -> list[str]:
    """Errors of a custom resource against its CRD schema (strict: undeclared fields are errors)."""
    key = (doc["apiVersion"], doc["kind"])
    errors = [f"{_where(e)}: {e.message}" for e in validators.get(key, strict).iter_errors(doc)]
    if strict:
        errors += _check_object_meta(doc)
    return sorted(errors)


def check_core(doc: Mapping[str, Any]) -> list[str]:
    """Errors of a core Kubernetes object against the strict schema of its kind (kubernetes-validate)."""
    try:
        kubernetes_validate.validate(dict(doc), K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{_where(error)}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [f"no schema: {error.message} (nor a CRD in the schema folder)"]
    return []


def check_document(doc: Any, validators: CrdValidators) -> list[str]:
    """Every error found in one manifest document; empty when it is valid."""
    if not isinstance(doc, Mapping):
        return [f"a manifest document must be a mapping, not {type(doc).__name__}"]
    missing = [field for field in ("apiVersion", "kind", "metadata") if field not in doc]
    if missing:
        return [f"missing {', '.join(missing)}"]
    errors = []
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        errors.append(f"metadata.name {name!r} is not a DNS subdomain name")
    if "status" in doc:
        errors.append("status is written by controllers, not by manifests")
    key = (doc["apiVersion"], doc["kind"])
    errors += check_custom(doc, validators) if key in validators else check_core(doc)
    return errors
