"""Generate the RayService's `serveConfigV2` from `deploy/serve_config.yaml`, once per cluster variant.

    python k8s/render.py           # rewrite the generated blocks in place
    python k8s/render.py --check   # exit 1 when a committed block differs from what would be generated

`deploy/serve_config.yaml` is the one Serve config of the project (it runs locally with `falcon serve`).
A cluster needs a few different values, and only those are changed here (`Variant`):

- `http_options.host: 0.0.0.0`: the proxy must listen on the pod's address, not on loopback, for the
  Kubernetes Service (KubeRay's `<name>-serve-svc`) and the worker readiness probe to reach it;
- `proxy_location: EveryNode`: a proxy on every pod that runs replicas, which is what KubeRay's worker
  readiness probe (`localhost:8000/-/healthz`) and its serve Service expect;
- per model: `device`, `num_gpus` and `num_cpus` (the engine deployment's `ray_actor_options`),
  `torch_threads` and the autoscaling bounds, which must agree with the worker group's pods.

Everything else (models, drafters, limits, autoscaling targets) is taken as it is, so a change to
`deploy/serve_config.yaml` reaches the manifests by re-running this script; `tests/k8s` fails until
it is. Each generated document is checked with `deploy.cli.load_config` (Serve's own
`ServeDeploySchema`, then `deploy.config.ServerConfig` for the `args`) before it is written.

A generated block is the literal block scalar (`key: |`) following the one line `<key>: |` of the
target file; the rest of the file is hand-written and kept as it is.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

K8S = Path(__file__).resolve().parent
REPO = K8S.parent
SERVE_CONFIG = REPO / "deploy" / "serve_config.yaml"
ROUTER_IMPORT_PATH = "deploy.router:build_app"


@dataclass(frozen=True)
class Variant:
    """One cluster flavour of the Serve config and the file whose block holds it."""

    name: str
    target: Path
    """File holding the generated block."""
    key: str
    """The key whose literal block (`key: |`) is generated: `serveConfigV2`, or `value` in a patch."""
    model: Mapping[str, Any] = field(default_factory=dict)
    """Fields set on every model of the Falcon application (`autoscaling` is merged, not replaced)."""
    host: str = "0.0.0.0"
    proxy_location: str = "EveryNode"


VARIANTS = (
    Variant(
        name="gpu",
        target=K8S / "base" / "rayservice.yaml",
        key="serveConfigV2",
        model={
            "device": "cuda",
            "num_gpus": 1,
            "num_cpus": 4,
            "torch_threads": 4,
            "autoscaling": {"min_replicas": 1, "max_replicas": 4},
        },
    ),
    Variant(
        name="cpu-dev",
        target=K8S / "overlays" / "cpu-dev" / "serve-config-patch.yaml",
        key="value",
        model={
            "device": "cpu",
            "num_gpus": 0,
            "num_cpus": 1,
            "torch_threads": 1,
            "autoscaling": {"min_replicas": 1, "max_replicas": 2},
        },
    ),
)


def cluster_serve_config(source: Mapping[str, Any], variant: Variant) -> dict[str, Any]:
    """`source` (a Serve config) with the variant's cluster values; validated like `falcon serve` does."""
    from deploy.cli import load_config

    config = copy.deepcopy(dict(source))
    config["proxy_location"] = variant.proxy_location
    config["http_options"] = {**(config.get("http_options") or {}), "host": variant.host}
    apps = [a for a in config.get("applications") or [] if a.get("import_path") == ROUTER_IMPORT_PATH]
    if not apps:
        raise ValueError(f"the serve config has no application with import_path {ROUTER_IMPORT_PATH}")
    for app in apps:
        for model in app.get("args", {}).get("models") or []:
            for key, value in variant.model.items():
                if key == "autoscaling":
                    model["autoscaling"] = {**(model.get("autoscaling") or {}), **value}
                else:
                    model[key] = value
    load_config(config)
    return config


def render_block(config: Mapping[str, Any]) -> str:
    """The YAML text of a Serve config, as it goes into the block (no indentation yet)."""
    return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False, width=110)


def splice(text: str, key: str, body: str) -> str:
    """`text` with the literal block after its one `key: |` line replaced by `body`, indented 2 deeper."""
    lines = text.splitlines(keepends=True)
    pattern = re.compile(rf"^(\s*)(?:- )?{re.escape(key)}: \|\s*$")
    hits = [i for i, line in enumerate(lines) if pattern.match(line)]
    if len(hits) != 1:
        raise ValueError(f"expected exactly one '{key}: |' line, found {len(hits)}")
    start = hits[0]
    line = lines[start]
    key_col = len(line) - len(line.lstrip()) + (2 if line.lstrip().startswith("- ") else 0)
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > key_col):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # trailing blank lines stay outside the block
        end -= 1
    pad = " " * (key_col + 2)
    block = "".join(pad + row + "\n" if row else "\n" for row in body.rstrip("\n").split("\n"))
    return "".join(lines[: start + 1]) + block + "".join(lines[end:])


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def rendered(variant: Variant, source: Mapping[str, Any] | None = None) -> str:
    """The full text the variant's target file should have."""
    if source is None:
        source = yaml.safe_load(SERVE_CONFIG.read_text())
    body = render_block(cluster_serve_config(source, variant))
    return splice(variant.target.read_text(), variant.key, body)


def stale(variants: Sequence[Variant] = VARIANTS) -> list[Variant]:
    """Variants whose committed file differs from what would be generated now."""
    return [v for v in variants if v.target.read_text() != rendered(v)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        old = stale()
        for v in old:
            print(f"{v.target.relative_to(REPO)}: stale (variant {v.name}); run python k8s/render.py")
        return 1 if old else 0
    for v in VARIANTS:
        text = rendered(v)
        if v.target.read_text() != text:
            v.target.write_text(text)
            print(f"{v.target.relative_to(REPO)}: updated (variant {v.name})")
        else:
            print(f"{v.target.relative_to(REPO)}: up to date (variant {v.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
