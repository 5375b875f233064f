"""serveConfigV2 is generated from deploy/serve_config.yaml: committed == generated, and only the
cluster values differ from the source."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def source() -> dict:
    return yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())


def test_committed_blocks_equal_the_generated_ones(render):
    stale = render.stale()
    assert stale == [], f"stale: {[v.target for v in stale]}; run python k8s/render.py"


def test_check_command_passes_on_the_committed_tree():
    result = subprocess.run(
        [sys.executable, "k8s/render.py", "--check"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ids avoid the bare word "gpu", which tests/conftest.py takes for the gpu marker
@pytest.mark.parametrize("variant_name", ["gpu", "cpu-dev"], ids=["variant-gpu", "variant-cpu-dev"])
def test_only_the_cluster_values_differ_from_the_source(render, source, variant_name):
    variant = next(v for v in render.VARIANTS if v.name == variant_name)
    out = render.cluster_serve_config(source, variant)
    assert out["http_options"] == {**source["http_options"], "host": "0.0.0.0"}
    assert out["proxy_location"] == "EveryNode"
    for src_model, model in zip(
        source["applications"][0]["args"]["models"], out["applications"][0]["args"]["models"], strict=True
    ):
        for key, value in model.items():
            if key == "autoscaling":
                assert value == {**src_model["autoscaling"], **variant.model["autoscaling"]}
            elif key in variant.model:
                assert value == variant.model[key]
            else:
                assert value == src_model[key], key
    assert source["http_options"]["host"] == "127.0.0.1"  # the source itself is left alone


def test_a_change_to_the_source_reaches_the_manifest(render, source):
    changed = copy.deepcopy(source)
    changed["applications"][0]["args"]["models"][0]["drafter"] = "models/another-drafter"
    gpu = next(v for v in render.VARIANTS if v.name == "gpu")
    text = render.rendered(gpu, changed)
    assert text != gpu.target.read_text()
    doc = yaml.safe_load(text)
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    assert serve["applications"][0]["args"]["models"][0]["drafter"] == "models/another-drafter"
    # everything outside the block is kept
    assert text.splitlines()[:18] == gpu.target.read_text().splitlines()[:18]


def test_an_invalid_cluster_value_is_refused(render, source):
    bad = render.Variant(
        name="bad",
        target=REPO / "k8s" / "base" / "rayservice.yaml",
        key="serveConfigV2",
        model={"device": "gpu"},
    )
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        render.cluster_serve_config(source, bad)
    typo = render.Variant(name="typo", target=bad.target, key="serveConfigV2", model={"num_gpu": 1})
    with pytest.raises(ValueError, match="unknown keys"):
        render.cluster_serve_config(source, typo)


def test_splice_replaces_exactly_the_block(render):
    text = "a: 1\nspec:\n  serveConfigV2: |\n    old: 1\n\n    more: 2\n  other: 3\nz: 4\n"
    out = render.splice(text, "serveConfigV2", "new: 1\nlist:\n- x\n")
    assert out == "a: 1\nspec:\n  serveConfigV2: |\n    new: 1\n    list:\n    - x\n  other: 3\nz: 4\n"
    assert yaml.safe_load(out)["spec"] == {"serveConfigV2": "new: 1\nlist:\n- x\n", "other": 3}
    with pytest.raises(ValueError, match="found 0"):
        render.splice("a: 1\n", "serveConfigV2", "x")
    with pytest.raises(ValueError, match="found 2"):
        render.splice("a:\n  v: |\n    x\nb:\n  v: |\n    y\n", "v", "x")
