"""The manifests live in k8s/base/ (kustomize refuses overlays inside their base folder); the paths users
and the docs name at the top of k8s/ lead to the same files."""

from __future__ import annotations

from pathlib import Path

import pytest

K8S = Path(__file__).resolve().parents[2] / "k8s"


@pytest.mark.parametrize("name", ["rayjob-distill.yaml", "rayservice.yaml"])
def test_top_level_names_are_the_base_manifests(name):
    top = K8S / name
    assert top.is_file(), f"{top} is missing"
    assert top.samefile(K8S / "base" / name)
    assert not (K8S / "kustomization.yaml").exists()  # k8s/ itself must not be a kustomize base
