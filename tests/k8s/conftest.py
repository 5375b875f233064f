"""The k8s/ scripts, loaded by path (k8s/ is a folder of manifests and scripts, not a package)."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"


def load(name: str) -> ModuleType:
    """`k8s/<name>.py` as module `k8s_<name>` (its siblings import each other by their plain names)."""
    if str(K8S) not in sys.path:
        sys.path.insert(0, str(K8S))
    key = f"k8s_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, K8S / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.fixture(scope="session")
def crd_schema() -> ModuleType:
    return load("crd_schema")


@pytest.fixture(scope="session")
def kustomize() -> ModuleType:
    return load("kustomize_build")


@pytest.fixture(scope="session")
def render() -> ModuleType:
    return load("render")


@pytest.fixture(scope="session")
def validate() -> ModuleType:
    return load("validate")


@pytest.fixture(scope="session")
def built(kustomize: ModuleType) -> dict[str, list[dict[str, Any]]]:
    """Every target (base, overlays) built once: folder relative to the repo -> its resources."""
    folders = [K8S / "base", *sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))]
    return {str(f.relative_to(REPO)): kustomize.build(f) for f in folders}


@pytest.fixture
def resource(built: dict[str, list[dict[str, Any]]]):
    """`resource(kind, target="k8s/base")`: a fresh deep copy of one built resource, free to break."""

    def get(kind: str, target: str = "k8s/base") -> dict[str, Any]:
        (doc,) = [d for d in built[target] if d["kind"] == kind]
        return copy.deepcopy(doc)

    return get
