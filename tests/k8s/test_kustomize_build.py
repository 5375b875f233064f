"""The kustomize subset: the base and overlays build as kustomize would, and every misuse is an error."""

from __future__ import annotations

import copy
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
BASE_DIR = K8S / "base"

SERVICE_WORKER = ("spec", "rayClusterConfig", "workerGroupSpecs", 0, "template", "spec")
JOB_WORKER = ("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec")


def _at(doc, *path):
    for key in path:
        doc = doc[key]
    return doc


def test_base_is_the_two_manifests_unchanged(built):
    files = [
        yaml.safe_load((BASE_DIR / name).read_text()) for name in ("rayjob-distill.yaml", "rayservice.yaml")
    ]
    assert built["k8s/base"] == files


def test_gpu_overlay_adds_gpu_node_scheduling_to_the_worker_pods_only(built):
    base = {d["kind"]: d for d in built["k8s/base"]}
    for doc in copy.deepcopy(built["k8s/overlays/gpu"]):  # the fixture is shared: edit a copy
        worker = _at(doc, *(SERVICE_WORKER if doc["kind"] == "RayService" else JOB_WORKER))
        assert worker["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
        assert worker["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        del worker["tolerations"], worker["nodeSelector"]
        assert doc == base[doc["kind"]]


def test_cpu_dev_overlay_has_no_gpu_anywhere(built):
    docs = built["k8s/overlays/cpu-dev"]
    text = yaml.safe_dump(docs)
    assert "nvidia.com/gpu" not in text and "-gpu" not in text
    service = next(d for d in docs if d["kind"] == "RayService")
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert {m["device"] for m in serve["applications"][0]["args"]["models"]} == {"cpu"}
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert "--profile tiny" in job["spec"]["entrypoint"]


KUBECTL = shutil.which("kubectl")


def _kubectl_kustomize(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [KUBECTL, "kustomize", str(folder)], capture_output=True, text=True, timeout=120, check=False
    )


def _by_id(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_the_subset_builds_what_kubectl_kustomize_builds(kustomize, built):
    """The real kustomize (`kubectl kustomize`, what `kubectl apply -k` runs) builds every target, and
    builds the same resources as `kustomize_build` (kustomize may order keys and documents its way)."""
    for target in built:  # the targets; built afresh here, since other tests may edit the shared ones
        docs = kustomize.build(REPO / target)
        result = _kubectl_kustomize(REPO / target)
        assert result.returncode == 0, f"{target}: {result.stderr}"
        real = [d for d in yaml.safe_load_all(result.stdout) if d is not None]
        assert _by_id(real) == _by_id(docs), target
        assert len(real) == len(docs)


def _nested_overlay(tmp_path: Path) -> Path:
    """A base folder holding its own overlay (`base/overlays/x`, resources `../..`)."""
    (tmp_path / "job.yaml").write_text("apiVersion: ray.io/v1\nkind: RayJob\nmetadata: {name: x}\n")
    (tmp_path / "kustomization.yaml").write_text("resources: [job.yaml]\n")
    overlay = tmp_path / "overlays" / "x"
    overlay.mkdir(parents=True)
    (overlay / "kustomization.yaml").write_text("resources: [../..]\n")
    return overlay


def test_an_overlay_inside_its_base_is_a_cycle(kustomize, tmp_path):
    overlay = _nested_overlay(tmp_path)
    with pytest.raises(kustomize.KustomizeError, match="cycle detected"):
        kustomize.build(overlay)
    if KUBECTL is not None:  # kustomize itself refuses it the same way
        result = _kubectl_kustomize(overlay)
        assert result.returncode != 0 and "cycle detected" in result.stderr, result.stderr


def _kustomization(tmp_path: Path, body: str, files: dict[str, str] | None = None) -> Path:
    (tmp_path / "kustomization.yaml").write_text(textwrap.dedent(body))
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    return tmp_path


BASE = """\
resources:
  - {base}
patches:
  - path: patch.yaml
    target: {{kind: RayJob, name: falcon-distill}}
"""


@pytest.mark.parametrize(
    ("patch", "error"),
    [
        ("- {op: replace, path: /spec/entrypointt, value: x}", "'entrypointt' does not exist"),
        ("- {op: remove, path: /spec/rayClusterSpec/workerGroupSpecs/3}", "index 3 is out of range"),
        ("- {op: test, path: /spec/shutdownAfterJobFinishes, value: false}", "test failed"),
        ("- {op: move, from: /a, path: /b}", "unsupported JSON patch operation"),
        ("- {op: add, path: spec/x, value: 1}", "must start with '/'"),
        ("- {op: replace, path: /spec/entrypoint}", "needs a value"),
        ("spec: {entrypoint: x}", "only JSON 6902 patches"),
    ],
)
def test_bad_patches_fail(kustomize, tmp_path, patch, error):
    folder = _kustomization(tmp_path, BASE.format(base=BASE_DIR), {"patch.yaml": patch})
    with pytest.raises(kustomize.KustomizeError, match=error):
        kustomize.build(folder)


def test_a_patch_whose_target_matches_nothing_fails(kustomize, tmp_path):
    body = BASE.format(base=BASE_DIR).replace("falcon-distill", "falcon-distil")
    folder = _kustomization(
        tmp_path, body, {"patch.yaml": "- {op: replace, path: /spec/entrypoint, value: x}"}
    )
    with pytest.raises(kustomize.KustomizeError, match="matches no resource"):
        kustomize.build(folder)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (
            "resources: [{base}]\nimages: [{{name: falcon-spec, newTag: x}}]\n",
            r"unsupported keys \['images'\]",
        ),
        ("resources: [{base}, {base}]\n", "appears twice"),
        ("resources: [../outside.yaml]\n", "outside"),
        ("resources: [missing.yaml]\n", "does not exist"),
        ("resources: [{base}]\npatches: [{{path: p.yaml}}]\n", "target must select"),
    ],
)
def test_bad_kustomizations_fail(kustomize, tmp_path, body, error):
    (tmp_path / "outside.yaml").write_text("kind: RayJob\nmetadata: {name: x}\n")
    folder = tmp_path / "k"
    folder.mkdir()
    _kustomization(folder, body.format(base=BASE_DIR), {"p.yaml": "[]"})
    with pytest.raises(kustomize.KustomizeError, match=error):
        kustomize.build(folder)


def test_json_patch_operations(kustomize):
    doc = {"a": {"b": [1, 2, 3], "c/d": {"~e": 1}}}
    out = kustomize.apply_json_patch(
        doc,
        [
            {"op": "add", "path": "/a/b/-", "value": 4},
            {"op": "add", "path": "/a/b/0", "value": 0},
            {"op": "remove", "path": "/a/b/1"},
            {"op": "replace", "path": "/a/c~1d/~0e", "value": 2},
            {"op": "add", "path": "/a/new", "value": {"x": [1]}},
            {"op": "test", "path": "/a/b", "value": [0, 2, 3, 4]},
        ],
    )
    assert out == {"a": {"b": [0, 2, 3, 4], "c/d": {"~e": 2}, "new": {"x": [1]}}}
    assert doc == {"a": {"b": [1, 2, 3], "c/d": {"~e": 1}}}  # the input is not changed
    with pytest.raises(kustomize.KustomizeError, match="not a list index"):
        kustomize.apply_json_patch(doc, [{"op": "replace", "path": "/a/b/01", "value": 0}])
