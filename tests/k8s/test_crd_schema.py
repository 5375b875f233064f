"""Strict CRD-schema validation: the manifests pass, and each kind of mistake is caught with its path."""

from __future__ import annotations

import pytest

WORKER = ("spec", "rayClusterSpec", "workerGroupSpecs", 0)


def _at(doc, *path):
    for key in path:
        doc = doc[key]
    return doc


def _errors(crd_schema, doc) -> list[str]:
    return [str(e) for e in crd_schema.validate(doc)]


def test_every_built_resource_matches_its_crd(crd_schema, built):
    for target, docs in built.items():
        assert {d["kind"] for d in docs} == {"RayJob", "RayService"}, target
        for doc in docs:
            assert _errors(crd_schema, doc) == [], (target, doc["kind"])


@pytest.mark.parametrize(
    ("kind", "path", "right", "wrong"),
    [
        ("RayJob", ("spec",), "shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
        ("RayJob", ("spec",), "ttlSecondsAfterFinished", "ttlSecondAfterFinished"),
        ("RayJob", WORKER, "rayStartParams", "rayStartParam"),
        ("RayJob", ("spec", "rayClusterSpec", "headGroupSpec"), "rayStartParams", "rayStartParam"),
        ("RayJob", (*WORKER, "template", "spec", "containers", 0), "resources", "resource"),
        ("RayJob", (*WORKER, "template", "metadata"), "labels", "label"),
        ("RayService", ("spec", "rayClusterConfig"), "enableInTreeAutoscaling", "enableInTreeAutoScaling"),
        ("RayService", ("spec", "rayClusterConfig", "workerGroupSpecs", 0), "maxReplicas", "maxReplica"),
        ("RayService", ("spec",), "serveConfigV2", "serveConfig"),
        ("RayService", ("metadata",), "name", "nmae"),
    ],
)
def test_a_misspelt_field_fails(crd_schema, resource, kind, path, right, wrong):
    doc = resource(kind)
    parent = _at(doc, *path)
    parent[wrong] = parent.pop(right)
    errors = _errors(crd_schema, doc)
    assert any(f"'{wrong}' was unexpected" in e for e in errors), errors


@pytest.mark.parametrize(
    ("path", "value", "expect"),
    [
        (
            ("spec", "rayClusterSpec", "headGroupSpec", "rayStartParams", "num-cpus"),
            0,
            "is not of type 'string'",
        ),
        ((*WORKER, "replicas"), "2", "is not of type 'integer'"),
        ((*WORKER, "replicas"), 2.0, "is not of type 'integer'"),
        ((*WORKER, "maxReplicas"), 2**31, "out of range for int32"),
        (
            (*WORKER, "template", "spec", "containers", 0, "resources", "limits", "memory"),
            "64 GB",
            "does not match",
        ),
        (("spec", "shutdownAfterJobFinishes"), "true", "is not of type 'boolean'"),
        (("apiVersion",), "ray.io/v2", "no CRD for apiVersion"),
    ],
)
def test_a_wrong_type_or_value_fails(crd_schema, resource, path, value, expect):
    doc = resource("RayJob")
    _at(doc, *path[:-1])[path[-1]] = value
    errors = _errors(crd_schema, doc)
    assert any(expect in e for e in errors), errors


def test_quantities_and_int_or_string(crd_schema, resource):
    doc = resource("RayService")
    worker = _at(doc, "spec", "rayClusterConfig", "workerGroupSpecs", 0, "template", "spec", "containers", 0)
    worker["resources"]["limits"]["cpu"] = "500m"
    worker["resources"]["limits"]["memory"] = 34359738368
    worker["readinessProbe"] = {"httpGet": {"path": "/-/healthz", "port": "serve"}}
    assert _errors(crd_schema, doc) == []
    worker["readinessProbe"]["httpGet"]["port"] = 8000
    assert _errors(crd_schema, doc) == []
    worker["readinessProbe"]["httpGet"]["port"] = 8000.5
    assert any("is not valid under any of the given schemas" in e for e in _errors(crd_schema, doc))


def test_list_map_keys_are_unique(crd_schema, resource):
    doc = resource("RayJob")
    container = _at(doc, *WORKER, "template", "spec", "containers", 0)
    container["env"].append(dict(container["env"][0]))
    errors = _errors(crd_schema, doc)
    assert any("share the list-map key {'name': 'AWS_ACCESS_KEY_ID'}" in e for e in errors), errors
    doc = resource("RayJob")
    containers = _at(doc, *WORKER, "template", "spec", "containers")
    containers.append(dict(containers[0]))
    assert any("{'name': 'ray-worker'}" in e for e in _errors(crd_schema, doc))


def test_a_field_guarded_by_a_cel_rule_is_reported_not_passed(crd_schema, resource):
    doc = resource("RayJob")
    doc["spec"]["managedBy"] = "ray.io/kuberay-operator"
    errors = _errors(crd_schema, doc)
    assert any("spec.managedBy" in e and "CEL rules" in e for e in errors), errors


def test_required_fields_and_top_level_metadata(crd_schema, resource):
    doc = resource("RayService")
    del doc["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert any("'headGroupSpec' is a required property" in e for e in _errors(crd_schema, doc))
    doc = resource("RayService")
    doc["metadata"]["name"] = "Falcon_Serve"
    assert any(e.startswith("metadata.name") for e in _errors(crd_schema, doc))


def test_strict_schema_keeps_open_what_kubernetes_keeps_open(crd_schema):
    schema = crd_schema.strict_schema(
        {
            "type": "object",
            "properties": {
                "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
                "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {}},
                "map": {"type": "object", "additionalProperties": {"type": "string"}},
                "maybe": {"type": "string", "nullable": True},
                "port": {"x-kubernetes-int-or-string": True},
            },
        }
    )
    assert schema["additionalProperties"] is False
    assert schema["properties"]["closed"]["additionalProperties"] is False
    assert "additionalProperties" not in schema["properties"]["open"]
    assert schema["properties"]["map"]["additionalProperties"] == {"type": "string"}
    assert schema["properties"]["maybe"]["type"] == ["string", "null"]
    assert schema["properties"]["port"]["anyOf"] == [{"type": "integer"}, {"type": "string"}]
