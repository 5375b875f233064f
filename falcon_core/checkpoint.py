"""Drafter checkpoint format: a folder with `config.json` and `model.safetensors`.

`config.json` holds the format name and version, the `DrafterConfig`, the identity of the target the
drafter was trained for (`TargetIdentity`: name, hidden size, vocab size, tokenizer hash) and an
optional free-form card (training data, steps, metrics). `model.safetensors` holds only the drafter's
own weights: the target's `embed` and `lm_head` are shared and never copied. Saving is atomic (a
temporary sibling folder renamed into place). Loading checks the identity against the target's and
fails with a message naming both when they differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from falcon_core.drafter import Drafter, DrafterConfig, check_draft_vocab
from falcon_core.target import DTYPES, TargetConfig

FORMAT = "falcon-drafter"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 over the vocabulary, merges and added/special tokens, from a HF fast tokenizer or its folder.

    Both sources go through the `tokenizer.json` structure, so a tokenizer and the folder it was saved
    to hash the same.
    """
    if isinstance(tokenizer, str | os.PathLike):
        path = Path(tokenizer)
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path} (only fast tokenizers are supported)")
        spec = json.loads(path.read_text())
    elif hasattr(tokenizer, "backend_tokenizer"):
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
    else:
        raise TypeError(
            f"expected a HF fast tokenizer or a folder with tokenizer.json, got {type(tokenizer)}"
        )
    model = spec.get("model") or {}
    vocab = model.get("vocab") or {}
    vocab_items = sorted(vocab.items(), key=lambda kv: kv[1]) if isinstance(vocab, dict) else vocab
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    added = sorted(
        (t["id"], t["content"], bool(t.get("special", False))) for t in spec.get("added_tokens") or []
    )
    canonical = json.dumps(
        {"type": model.get("type"), "vocab": vocab_items, "merges": merges, "added": added},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class TargetIdentity:
    """What a drafter is bound to: the target's name, hidden size, vocab size and tokenizer hash."""

    name: str
    hidden_size: int
    vocab_size: int
    tokenizer_hash: str

    @classmethod
    def of(cls, name: str, config: TargetConfig, tokenizer: Any) -> TargetIdentity:
        """From a target's config and its tokenizer (object or folder)."""
        return cls(name, config.hidden_size, config.vocab_size, tokenizer_hash(tokenizer))

    def describe(self) -> str:
        return (
            f"{self.name} (hidden {self.hidden_size}, vocab {self.vocab_size}, "
            f"tokenizer {self.tokenizer_hash[:12]}...)"
        )

    def check_compatible(self, target: TargetIdentity) -> None:
        """Raise ValueError when this (the drafter's) target differs from `target` in shape or tokenizer.

        A different name alone only warns: the same weights are often reached under different names.
        """
        fields = ("hidden_size", "vocab_size", "tokenizer_hash")
        if any(getattr(self, f) != getattr(target, f) for f in fields):
            raise ValueError(
                f"drafter was trained for {self.describe()} but the target is {target.describe()}; "
                "use a drafter trained for this target"
            )
        if self.name != target.name:
            warnings.warn(
                f"drafter was trained for {self.name!r}, target is named {target.name!r} "
                "(same hidden size, vocab and tokenizer)",
                stacklevel=3,
            )


@dataclass
class DrafterCheckpoint:
    """A loaded drafter with its config, its target's identity and its card."""

    drafter: Drafter
    config: DrafterConfig
    identity: TargetIdentity
    card: dict[str, Any] | None


def save_drafter(
    path: str | Path,
    drafter: Drafter,
    config: DrafterConfig,
    identity: TargetIdentity,
    card: dict[str, Any] | None = None,
) -> Path:
    """Write `config.json` + `model.safetensors` to folder `path` atomically (replacing it if present)."""
    path = Path(path)
    if drafter.config != config:
        raise ValueError("config does not match drafter.config")
    if identity.hidden_size != config.hidden_size or identity.vocab_size != config.vocab_size:
        raise ValueError(
            f"drafter config (hidden {config.hidden_size}, vocab {config.vocab_size}) "
            f"does not fit target {identity.describe()}"
        )
    state = {k: v.detach().contiguous().cpu() for k, v in drafter.state_dict().items()}
    shared = [k for k in state if k.startswith(("embed", "lm_head"))]
    if shared:
        raise ValueError(f"drafter state holds target weights {shared}; they must not be saved")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "drafter": config.to_dict(),
        "target": dataclasses.asdict(identity),
        "card": card,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_drafter_config(path: str | Path) -> tuple[DrafterConfig, TargetIdentity, dict[str, Any] | None]:
    """Parse and validate a checkpoint's `config.json`."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"drafter checkpoint {path} has no {CONFIG_FILE}")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(
            f"{file} is not a Falcon drafter checkpoint (a JSON {type(meta).__name__}, not an object)"
        )
    if meta.get("format") != FORMAT:
        raise ValueError(f"{file} is not a Falcon drafter checkpoint (format {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{file} has format_version {meta.get('format_version')}, this code reads {FORMAT_VERSION}"
        )
    try:
        config = DrafterConfig.from_dict(meta["drafter"])
        identity = TargetIdentity(**meta["target"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{file}: invalid drafter or target section: {e}") from e
    return config, identity, meta.get("card")


def stored_dtype(path: str | Path) -> str:
    """The dtype name (fp32 / bf16 / fp16) of a checkpoint folder's floating tensors, so a rewrite (a new
    card, a draft vocabulary) keeps it; integer tensors such as `draft_vocab` are skipped."""
    names = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}
    weights = Path(path) / WEIGHTS_FILE
    with safe_open(str(weights), framework="pt") as f:
        found = {f.get_slice(key).get_dtype() for key in f.keys()}  # noqa: SIM118 (not iterable)
    floating = found & set(names)
    if len(floating) != 1:
        raise ValueError(
            f"{weights} stores floating dtypes {sorted(floating)}; expected one of {list(names)}"
        )
    return names[floating.pop()]


def check_drafter_files(path: str | Path) -> None:
    """Fail fast, without building the drafter, when folder `path` is not a readable checkpoint: a missing
    or invalid `config.json`, a missing `model.safetensors`, or one whose header is damaged or does not
    cover the file (truncated). The error names the file. (Flipped bytes inside tensor data are not
    detectable here; the format keeps no checksum.)"""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"drafter checkpoint folder {path} does not exist")
    read_drafter_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"drafter checkpoint {path} has no {WEIGHTS_FILE}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights} is not a readable safetensors file: {e}") from e


def load_drafter(
    path: str | Path,
    expected_identity: TargetIdentity | None = None,
    dtype: str = "fp32",
    device: str | torch.device = "cpu",
) -> DrafterCheckpoint:
    """Load a drafter checkpoint; with `expected_identity`, refuse one trained for another target."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"drafter checkpoint folder {path} does not exist")
    config, identity, card = read_drafter_config(path)
    if expected_identity is not None:
        identity.check_compatible(expected_identity)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"drafter checkpoint {path} has no {WEIGHTS_FILE}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights} is not a readable safetensors file: {e}") from e
    drafter = Drafter(config)
    expected = drafter.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match its config: missing tensors {missing}, unexpected {unexpected}"
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if wrong:
        raise ValueError(f"{weights} has tensors of the wrong shape: {wrong}")
    if config.draft_vocab_size:
        ids = state["draft_vocab"]
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{weights}: draft_vocab must hold integer token ids, got {ids.dtype}")
        try:
            check_draft_vocab(ids, config.draft_vocab_size, config.vocab_size)
        except ValueError as e:
            raise ValueError(f"{weights}: {e}") from e
    drafter.load_state_dict(state, strict=True)
    return DrafterCheckpoint(drafter.to(device=device, dtype=DTYPES[dtype]), config, identity, card)
