"""No pickle anywhere a file or a request could reach: an AST walk over the project's code, and the
loaders refusing pickle checkpoints without opening them.

Unpickling runs code chosen by whoever wrote the file, so the project reads weights, caches and
checkpoints only as safetensors / JSON, and `torch.load` (training state) only with `weights_only=True`.
The walk fails on: `import pickle` / `cPickle` / `_pickle` / `cloudpickle` / `dill` / `shelve` /
`joblib` (and `from` imports of them, `ray.cloudpickle` included), `torch.load` without a literal
`weights_only=True`, `np.load` / `numpy.load` with `allow_pickle` not literally False, `pd.read_pickle`,
and `trust_remote_code=True`.
"""

from __future__ import annotations

import ast
import pickle  # only to write the hostile test file below; the project's own code never imports it
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("falcon_core", "pipelines", "deploy", "bench")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "shelve", "joblib"}


def _dotted(node: ast.AST) -> str:
    """`a.b.c` for a Name/Attribute chain, "" otherwise."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def pickle_uses(source: str, filename: str = "<source>") -> list[str]:
    """`file:line: what` for every pickle use the rules above forbid."""
    tree = ast.parse(source, filename=filename)
    found = []
    torch_load_names = {"torch.load"}
    numpy_load_names = {"np.load", "numpy.load"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "numpy"):
            for alias in node.names:
                if alias.name == "load":
                    (torch_load_names if node.module == "torch" else numpy_load_names).add(
                        alias.asname or "load"
                    )
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if set(alias.name.split(".")) & PICKLE_MODULES:
                    found.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = {a.name for a in node.names}
            if set(module.split(".")) & PICKLE_MODULES or names & PICKLE_MODULES:
                found.append(f"{where}: from {module} import {', '.join(sorted(names))}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in torch_load_names and not _is_const(_keyword(node, "weights_only"), True):
                found.append(f"{where}: {name}(...) without weights_only=True")
            if name in numpy_load_names:
                allow = _keyword(node, "allow_pickle")
                if allow is not None and not _is_const(allow, False):
                    found.append(f"{where}: {name}(..., allow_pickle=...)")
            if name.endswith("read_pickle"):
                found.append(f"{where}: {name}(...)")
            remote = _keyword(node, "trust_remote_code")
            if remote is not None and not _is_const(remote, False):
                found.append(f"{where}: {name}(..., trust_remote_code=...)")
    return found


def _project_files() -> list[Path]:
    files = [p for top in SCANNED for p in sorted((REPO / top).rglob("*.py"))]
    return [p for p in files if ".venv" not in p.parts and "__pycache__" not in p.parts]


def test_the_walk_covers_the_project() -> None:
    files = _project_files()
    tops = {p.relative_to(REPO).parts[0] for p in files}
    assert tops == set(SCANNED), tops
    assert len(files) >= 30
    assert REPO / "pipelines" / "train.py" in files  # holds the one torch.load


def test_no_pickle_in_project_code() -> None:
    found = []
    for path in _project_files():
        found += pickle_uses(path.read_text(), str(path.relative_to(REPO)))
    assert not found, "pickle use in project code:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("source", "flagged"),
    [
        ("import pickle", True),
        ("import pickle as p", True),
        ("from pickle import loads", True),
        ("import cloudpickle", True),
        ("from ray import cloudpickle", True),
        ("import ray.cloudpickle as cp", True),
        ("import dill", True),
        ("import joblib", True),
        ("torch.load(f)", True),
        ("torch.load(f, weights_only=False)", True),
        ("torch.load(f, weights_only=flag)", True),
        ("from torch import load\nload(f)", True),
        ("from torch import load as tl\ntl(f)", True),
        ("np.load(f, allow_pickle=True)", True),
        ("numpy.load(f, allow_pickle=flag)", True),
        ("pd.read_pickle(f)", True),
        ("AutoModel.from_pretrained(p, trust_remote_code=True)", True),
        ("torch.load(f, map_location='cpu', weights_only=True)", False),
        ("np.load(f)", False),
        ("np.load(f, allow_pickle=False)", False),
        ("json.load(f)", False),
        ("yaml.safe_load(f)", False),
        ("safetensors.torch.load_file(f)", False),
        ("AutoTokenizer.from_pretrained(p, trust_remote_code=False)", False),
    ],
)
def test_the_walk_flags_what_it_should(source: str, flagged: bool) -> None:
    assert bool(pickle_uses(source)) is flagged, pickle_uses(source)


class _Hostile:
    """Unpickling this runs `open(sentinel, "w")`: proof that a loader unpickled the file."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple:
        return (open, (str(self.sentinel), "w"))


def _pickle_only_folder(folder: Path, sentinel: Path, name: str) -> Path:
    """A model-looking folder whose only weights are a hostile pickle `name`."""
    folder.mkdir()
    (folder / "config.json").write_text(
        '{"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8, '
        '"intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, '
        '"num_key_value_heads": 2, "vocab_size": 32, "max_position_embeddings": 64}'
    )
    (folder / name).write_bytes(pickle.dumps(_Hostile(sentinel)))
    return folder


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_target_loader_refuses_pickle_only_folders_without_opening_them(tmp_path: Path, name: str) -> None:
    from falcon_core.target import load_target

    sentinel = tmp_path / "unpickled"
    pickle.loads(pickle.dumps(_Hostile(sentinel)))
    assert sentinel.exists(), "the hostile pickle must be live for this test to mean anything"
    sentinel.unlink()
    folder = _pickle_only_folder(tmp_path / "model", sentinel, name)
    with pytest.raises(ValueError, match=r"only pickle checkpoints") as info:
        load_target(folder)
    assert name in str(info.value) and "safetensors" in str(info.value)
    assert not sentinel.exists(), "load_target unpickled the file"


def test_drafter_loader_never_reads_a_pickle(tmp_path: Path) -> None:
    """A valid drafter config.json whose weights come only as a pickle: refused, the pickle never opened."""
    from falcon_core.checkpoint import TargetIdentity, load_drafter, save_drafter
    from falcon_core.drafter import Drafter, DrafterConfig
    from falcon_core.target import TargetConfig

    target = TargetConfig(
        model_type="llama", vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
        num_kv_heads=1, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=64,
    )  # fmt: skip
    config = DrafterConfig.from_target(target, block_size=2)
    folder = save_drafter(
        tmp_path / "drafter", Drafter(config), config, TargetIdentity("t", 16, 40, "ab" * 32)
    )
    (folder / "model.safetensors").unlink()
    sentinel = tmp_path / "unpickled"
    for name in ("model.pt", "pytorch_model.bin"):
        (folder / name).write_bytes(pickle.dumps(_Hostile(sentinel)))
    with pytest.raises(FileNotFoundError, match=r"has no model\.safetensors"):
        load_drafter(folder)
    assert not sentinel.exists()
