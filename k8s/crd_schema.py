"""Strict offline validation of KubeRay resources against their CRDs' `openAPIV3Schema`.

The CRDs in `k8s/crds/` (copied from KubeRay, Apache-2.0, see `crds/LICENSE`) carry structural
OpenAPI v3 schemas with Kubernetes extensions. The API server never lets an unknown field through:
`kubectl apply` (field validation `Strict`, its default) rejects it, and with validation off the
field is pruned silently, so a misspelt `shutdownAfterJobFinish` would simply be lost. A plain
JSON-Schema validator accepts unknown fields, so `strict_schema` rewrites the schema first:

- every object schema with `properties` and no `additionalProperties` gets `additionalProperties:
  false`, unless it says `x-kubernetes-preserve-unknown-fields: true` (the ray.io/v1 schemas have
  none, so the whole tree is strict);
- `nullable: true` admits null;
- `x-kubernetes-int-or-string` admits exactly an integer or a string;
- `format: int32` / `int64` bound the integer; `x-kubernetes-list-type: map` makes the
  `x-kubernetes-list-map-keys` unique (two containers named alike are an error), `set` makes items
  unique;
- `x-kubernetes-validations` (CEL rules) are not evaluated here: a manifest that sets a field
  guarded by one is reported, so nothing passes unchecked;
- the top-level `metadata` (left open by the CRD; the API server checks ObjectMeta itself) is
  checked against `OBJECT_META`, the subset a manifest here may use.

The schema is validated with JSON Schema draft 4, the dialect OpenAPI 3.0 schemas derive from
(so `1.0` is not an integer and `true` is not a number, as for the API server's decoder).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRD_DIR = Path(__file__).resolve().parent / "crds"
CRD_FILES = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml")

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

OBJECT_META: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": DNS1035_LABEL, "maxLength": 63},
        "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
"""Top-level metadata a manifest may carry (KubeRay requires DNS-1035 names for clusters it derives)."""

_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


@dataclass(frozen=True)
class SchemaError:
    """One problem: where in the document (`spec.rayClusterSpec.headGroupSpec`) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: {self.message}"


def strict_schema(node: Any) -> Any:
    """A copy of an OpenAPI v3 (structural) schema as a draft-4 JSON Schema that rejects unknown fields."""
    if not isinstance(node, dict):
        return node
    out = {k: v for k, v in node.items() if k not in ("properties", "items", "additionalProperties")}
    if "properties" in node:
        out["properties"] = {k: strict_schema(v) for k, v in node["properties"].items()}
    if isinstance(node.get("items"), dict):
        out["items"] = strict_schema(node["items"])
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_schema(node["additionalProperties"])
    elif "additionalProperties" in node:
        out["additionalProperties"] = node["additionalProperties"]
    elif "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [strict_schema(s) for s in node[key]]
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _list_map_keys(validator: Any, keys: list[str], instance: Any, schema: dict) -> Iterator[Any]:
    if schema.get("x-kubernetes-list-type") != "map" or not isinstance(instance, list):
        return
    seen: dict[tuple, int] = {}
    for i, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(k) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(
                f"items {seen[key]} and {i} share the list-map key {dict(zip(keys, key, strict=True))}"
            )
        seen[key] = i


def _list_type(validator: Any, kind: str, instance: Any, schema: dict) -> Iterator[Any]:
    if kind == "set" and isinstance(instance, list):
        for i, item in enumerate(instance):
            if item in instance[:i]:
                yield jsonschema.ValidationError(
                    f"set item {item!r} is repeated (x-kubernetes-list-type: set)"
                )
                return


def _cel_rules(validator: Any, rules: list[dict], instance: Any, schema: dict) -> Iterator[Any]:
    messages = "; ".join(r.get("message") or r.get("rule", "") for r in rules)
    yield jsonschema.ValidationError(
        f"this field is guarded by CEL rules that offline validation does not evaluate ({messages}); "
        "check it against a cluster with `kubectl apply --dry-run=server`"
    )


def _format(validator: Any, fmt: str, instance: Any, schema: dict) -> Iterator[Any]:
    bounds = _INT_RANGES.get(fmt)
    if bounds and isinstance(instance, int) and not isinstance(instance, bool):
        lo, hi = bounds
        if not lo <= instance <= hi:
            yield jsonschema.ValidationError(f"{instance} is out of range for {fmt}")


_Validator = jsonschema.validators.extend(
    jsonschema.Draft4Validator,
    {
        "x-kubernetes-list-map-keys": _list_map_keys,
        "x-kubernetes-list-type": _list_type,
        "x-kubernetes-validations": _cel_rules,
        "format": _format,
    },
)


@cache
def load_crds(crd_dir: Path = CRD_DIR) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> strict JSON Schema of every served version of the CRDs in `crd_dir`."""
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for name in CRD_FILES:
        crd = yaml.load((crd_dir / name).read_text(), Loader=_Loader)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served", False):
                continue
            schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = OBJECT_META
            schema["properties"]["apiVersion"] = {"enum": [f"{group}/{version['name']}"]}
            schema["properties"]["kind"] = {"enum": [kind]}
            schema["required"] = sorted(
                {*schema.get("required", ()), "apiVersion", "kind", "metadata", "spec"}
            )
            schemas[(f"{group}/{version['name']}", kind)] = strict_schema(schema)
    return schemas


def validate(doc: dict[str, Any], crd_dir: Path = CRD_DIR) -> list[SchemaError]:
    """Every schema problem of one resource (empty when it is valid); unknown kinds are one problem."""
    if not isinstance(doc, dict):
        return [SchemaError("", f"a resource must be a mapping, got {type(doc).__name__}")]
    schemas = load_crds(crd_dir)
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in schemas:
        known = ", ".join(f"{v} {k}" for v, k in sorted(schemas))
        return [SchemaError("", f"no CRD for apiVersion {key[0]!r} kind {key[1]!r} (known: {known})")]
    validator = _Validator(schemas[key])
    errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    return [SchemaError(".".join(str(p) for p in e.absolute_path), e.message) for e in errors]
