"""The subset of `kustomize build` that `k8s/` uses, so overlays can be checked without kustomize.

Supported, with kustomize's meaning (`kubectl kustomize` / `kubectl apply -k` give the same result):

- `resources:` YAML files (one or more documents) inside the kustomization's folder, and folders
  holding a `kustomization.yaml` (bases; they may lie outside, like `../../base`), built
  recursively. A base folder that contains a kustomization already being built (`../..` from an
  overlay inside its base) is refused, as kustomize refuses it ("cycle detected"): that is why the
  base lives in `k8s/base/` beside `k8s/overlays/`;
- `patches:` with `path:` (a file inside the folder) or inline `patch:`, holding a JSON 6902 patch
  (a list of `add` / `remove` / `replace` / `test` operations) and a `target:` selecting resources by
  `group`, `version`, `kind` and `name` (exact match).

Custom resources have no strategic-merge keys in kustomize (a strategic-merge patch would replace
whole lists such as `workerGroupSpecs`), which is why the overlays use JSON 6902 patches only. Any
other kustomization key, patch form or operation is refused rather than approximated, and so is a
patch whose target matches no resource (kustomize would apply it to nothing; here it is a typo).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION = "kustomization.yaml"
SUPPORTED_KEYS = frozenset({"apiVersion", "kind", "resources", "patches"})
TARGET_KEYS = frozenset({"group", "version", "kind", "name"})


class KustomizeError(ValueError):
    """A kustomization or patch this subset cannot build (or kustomize itself would refuse)."""


def build(folder: str | Path, _visited: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """The resources `kustomize build folder` emits, in order."""
    folder = Path(folder).resolve()
    visited = (*_visited, folder)
    kfile = folder / KUSTOMIZATION
    if not kfile.is_file():
        raise KustomizeError(f"{folder} has no {KUSTOMIZATION}")
    spec = yaml.safe_load(kfile.read_text()) or {}
    unknown = sorted(set(spec) - SUPPORTED_KEYS)
    if unknown:
        raise KustomizeError(f"{kfile}: unsupported keys {unknown} (supported: {sorted(SUPPORTED_KEYS)})")
    if spec.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{kfile}: kind must be Kustomization")
    docs: list[dict[str, Any]] = []
    for entry in spec.get("resources") or []:
        docs.extend(_load_resource(folder, entry, visited))
    _check_unique(docs, kfile)
    for i, patch in enumerate(spec.get("patches") or []):
        _apply_patch(folder, patch, docs, f"{kfile} patches[{i}]")
    return docs


def _inside(folder: Path, rel: str, what: str) -> Path:
    path = (folder / rel).resolve()
    if not path.is_relative_to(folder):
        raise KustomizeError(f"{what} {rel!r} lies outside {folder} (kustomize's load restrictor refuses it)")
    return path


def _load_resource(folder: Path, entry: str, visited: tuple[Path, ...]) -> list[dict[str, Any]]:
    candidate = (folder / entry).resolve()
    if candidate.is_dir():
        inside = [v for v in visited if v.is_relative_to(candidate)]
        if inside:
            raise KustomizeError(
                f"{folder / KUSTOMIZATION}: resource {entry!r}: cycle detected: {candidate} contains "
                f"{inside[0]}, which is being built (kustomize refuses a base that contains its overlay)"
            )
        return build(candidate, visited)
    path = _inside(folder, entry, "resource file")
    if not path.is_file():
        raise KustomizeError(f"{folder / KUSTOMIZATION}: resource {entry!r} does not exist")
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "metadata" not in d:
            raise KustomizeError(f"{path}: every document must be a resource with kind and metadata")
    return docs


def _resource_id(doc: dict[str, Any]) -> tuple[str, str, str, str]:
    meta = doc.get("metadata") or {}
    return doc.get("apiVersion", ""), doc["kind"], meta.get("namespace", ""), meta.get("name", "")


def _check_unique(docs: list[dict[str, Any]], where: Path) -> None:
    seen = set()
    for doc in docs:
        rid = _resource_id(doc)
        if rid in seen:
            raise KustomizeError(f"{where}: resource {rid} appears twice")
        seen.add(rid)


def _matches(doc: dict[str, Any], target: dict[str, str]) -> bool:
    group, _, version = doc.get("apiVersion", "").rpartition("/")
    actual = {
        "group": group,
        "version": version,
        "kind": doc.get("kind"),
        "name": doc["metadata"].get("name"),
    }
    return all(actual[k] == v for k, v in target.items())


def _apply_patch(folder: Path, patch: dict[str, Any], docs: list[dict[str, Any]], where: str) -> None:
    if not isinstance(patch, dict) or ("path" in patch) == ("patch" in patch):
        raise KustomizeError(f"{where}: a patch needs exactly one of path: or patch:")
    unknown = sorted(set(patch) - {"path", "patch", "target"})
    if unknown:
        raise KustomizeError(f"{where}: unsupported patch keys {unknown}")
    target = patch.get("target")
    if not isinstance(target, dict) or not target or set(target) - TARGET_KEYS:
        raise KustomizeError(f"{where}: target must select by {sorted(TARGET_KEYS)}, got {target!r}")
    text = _inside(folder, patch["path"], "patch").read_text() if "path" in patch else patch["patch"]
    ops = yaml.safe_load(text)
    if not isinstance(ops, list):
        raise KustomizeError(f"{where}: only JSON 6902 patches (a list of operations) are supported")
    hits = [i for i, d in enumerate(docs) if _matches(d, target)]
    if not hits:
        raise KustomizeError(f"{where}: target {target} matches no resource")
    for i in hits:
        try:
            docs[i] = apply_json_patch(docs[i], ops)
        except KustomizeError as err:
            raise KustomizeError(f"{where} on {target}: {err}") from err


def _pointer(path: str) -> list[str]:
    if not isinstance(path, str) or not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _index(container: list[Any], token: str, path: str, *, insert: bool = False) -> int:
    if insert and token == "-":
        return len(container)
    if not token.isdigit() or (len(token) > 1 and token[0] == "0"):
        raise KustomizeError(f"{path}: {token!r} is not a list index")
    i = int(token)
    if i > len(container) or (i == len(container) and not insert):
        raise KustomizeError(f"{path}: index {i} is out of range (length {len(container)})")
    return i


def _parent(doc: Any, tokens: list[str], path: str) -> Any:
    node = doc
    for token in tokens[:-1]:
        if isinstance(node, dict):
            if token not in node:
                raise KustomizeError(f"{path}: {token!r} does not exist")
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, path)]
        else:
            raise KustomizeError(f"{path}: cannot descend into a {type(node).__name__}")
    return node


def apply_json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 `add`, `remove`, `replace`, `test` applied to a copy of `doc`."""
    doc = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or op.get("op") not in ("add", "remove", "replace", "test"):
            raise KustomizeError(f"unsupported JSON patch operation {op!r}")
        path = op.get("path")
        tokens = _pointer(path)
        parent, last = _parent(doc, tokens, path), tokens[-1]
        kind = op["op"]
        if kind in ("add", "replace", "test") and "value" not in op:
            raise KustomizeError(f"{path}: '{kind}' needs a value")
        if isinstance(parent, dict):
            if kind != "add" and last not in parent:
                raise KustomizeError(f"{path}: {last!r} does not exist ({kind})")
            if kind == "remove":
                del parent[last]
            elif kind == "test":
                if parent[last] != op["value"]:
                    raise KustomizeError(f"{path}: test failed ({parent[last]!r} != {op['value']!r})")
            else:
                parent[last] = copy.deepcopy(op["value"])
        elif isinstance(parent, list):
            i = _index(parent, last, path, insert=kind == "add")
            if kind == "add":
                parent.insert(i, copy.deepcopy(op["value"]))
            elif kind == "remove":
                del parent[i]
            elif kind == "replace":
                parent[i] = copy.deepcopy(op["value"])
            elif parent[i] != op["value"]:
                raise KustomizeError(f"{path}: test failed ({parent[i]!r} != {op['value']!r})")
        else:
            raise KustomizeError(f"{path}: parent is a {type(parent).__name__}, not an object or list")
    return doc
