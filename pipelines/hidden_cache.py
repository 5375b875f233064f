"""The hidden-state cache format: safetensors shards of records, listed by a manifest (docs/DESIGN.md).

Terms used here:
- A *record* is one tokenized conversation: `input_ids (T,)`, `loss_mask (T,)` (1 = assistant token) and
  the target's last-layer hidden states after the final norm, `hidden (T, H)`; optionally the target's
  top-N next-token log-probabilities `topk_ids (T, N)` / `topk_logprobs (T, N)`.
- A *shard* (`shard-00000.safetensors`, ...) concatenates R records along the token axis, with
  `offsets (R+1,)` marking their boundaries. A shard appears whole: written under a temporary name and
  renamed on a local disk; on an object store one PUT publishes it whole.
- The *manifest* (`manifest.json`) holds the cache's metadata (target identity, tokenizer and chat
  template hashes, max length, dtype, layer, top-N, regeneration settings), one entry per shard (path,
  records, tokens, sha256, bytes, the input record range it covers and a digest of its inputs) and a
  summary. It is written after every shard it lists, so readers trust only the shards it names.

A cache folder is a local path or any fsspec URL (`s3://bucket/prefix` through s3fs, endpoint and keys
from the usual `AWS_*` environment variables, or `storage_options`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from falcon_core.checkpoint import TargetIdentity

FORMAT = "falcon-hidden-cache"
VERSION = 1
MANIFEST_FILE = "manifest.json"
LAYER = "last_after_norm"
CacheDtype = Literal["bf16", "fp16", "fp32"]
CACHE_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def shard_name(index: int) -> str:
    """File name of shard `index` inside a cache folder."""
    return f"shard-{index:05d}.safetensors"


def chat_template_hash(tokenizer: Any) -> str:
    """sha256 of the tokenizer's chat template text ("" hashed when it has none)."""
    return hashlib.sha256((getattr(tokenizer, "chat_template", None) or "").encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class CacheMetadata:
    """What every shard of a cache was made with; two caches mix only when these are equal."""

    target: TargetIdentity
    chat_template_hash: str
    max_seq_len: int
    dtype: CacheDtype = "bf16"
    layer: str = LAYER
    """Which hidden states: the last decoder layer after the final norm (the drafter's features)."""
    topk: int = 0
    """N of the cached top-N next-token log-probabilities (0: none cached)."""
    regenerate: dict[str, Any] | None = None
    """None, or the settings the assistant answers were regenerated with (max_new_tokens, temperature, seed)."""

    def __post_init__(self) -> None:
        if self.dtype not in CACHE_DTYPES:
            raise ValueError(f"dtype must be one of {list(CACHE_DTYPES)}, got {self.dtype!r}")
        if self.max_seq_len <= 0 or self.topk < 0:
            raise ValueError(f"max_seq_len must be > 0 and topk >= 0, got {self.max_seq_len}, {self.topk}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": dataclasses.asdict(self.target),
            "chat_template_hash": self.chat_template_hash,
            "max_seq_len": self.max_seq_len,
            "dtype": self.dtype,
            "layer": self.layer,
            "topk": self.topk,
            "regenerate": self.regenerate,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CacheMetadata:
        return cls(**{**d, "target": TargetIdentity(**d["target"])})

    def differences(self, other: CacheMetadata) -> list[str]:
        """Human-readable `field: mine != other` lines (empty when the two are equal)."""
        mine, theirs = _flatten(self.to_dict()), _flatten(other.to_dict())
        keys = sorted(set(mine) | set(theirs))
        return [f"{k}: {mine.get(k)!r} != {theirs.get(k)!r}" for k in keys if mine.get(k) != theirs.get(k)]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the manifest lists it."""

    path: str
    """Relative to the cache folder."""
    records: int
    tokens: int
    sha256: str
    """Of the shard file's bytes."""
    bytes: int
    first_record: int
    """Index (in input order, over every record read) of the first input record this shard covers."""
    end_record: int
    """One past the last input record it covers; records skipped in between are not in the shard."""
    source_sha256: str
    """Digest of the shard's planned inputs; a rerun reuses the shard only when its plan gives the same."""

    def __post_init__(self) -> None:
        parts = self.path.replace("\\", "/").split("/")
        if not self.path or parts[0] == "" or ".." in parts or ":" in self.path:
            raise ValueError(f"shard path {self.path!r} must be relative to the cache folder, without '..'")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardEntry:
        return cls(**d)


@dataclass(frozen=True)
class Manifest:
    metadata: CacheMetadata
    shards: tuple[ShardEntry, ...] = ()
    summary: dict[str, Any] = field(default_factory=dict)
    """Deterministic counts of the run that wrote it (records read / cached, skipped by reason, tokens,
    bytes); timings are not kept here, so reruns of the same input give the same manifest."""

    @property
    def records(self) -> int:
        return sum(s.records for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def to_json(self) -> str:
        body = {
            "format": FORMAT,
            "version": VERSION,
            "metadata": self.metadata.to_dict(),
            "shards": [dataclasses.asdict(s) for s in self.shards],
            "summary": self.summary,
        }
        return json.dumps(body, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = MANIFEST_FILE) -> Manifest:
        try:
            body = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} is not valid JSON: {e}") from e
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            found = body.get("format") if isinstance(body, dict) else type(body).__name__
            raise ValueError(f"{source} is not a {FORMAT} manifest (format {found!r})")
        if body.get("version") != VERSION:
            raise ValueError(f"{source} has version {body.get('version')}, this code reads {VERSION}")
        try:
            metadata = CacheMetadata.from_dict(body["metadata"])
            shards = tuple(ShardEntry.from_dict(s) for s in body["shards"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: invalid metadata or shard list: {e}") from e
        return cls(metadata, shards, body.get("summary") or {})

    @classmethod
    def load(cls, url: str, storage_options: dict[str, Any] | None = None) -> Manifest | None:
        """The manifest of cache folder `url`, or None when it has none."""
        fs, root = _filesystem(url, storage_options)
        path = f"{root}/{MANIFEST_FILE}"
        if not fs.exists(path):
            return None
        source = f"{url.rstrip('/')}/{MANIFEST_FILE}"
        try:
            text = fs.cat_file(path).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{source} is not valid JSON: {e}") from e
        return cls.from_json(text, source=source)

    def save(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        """Write `manifest.json` into cache folder `url` atomically."""
        fs, root = _filesystem(url, storage_options)
        _put_atomic(fs, f"{root}/{MANIFEST_FILE}", self.to_json().encode())


# ---------------------------------------------------------------------------------------------------
# Shards


@dataclass
class CachedRecord:
    """One record of a cache; T tokens."""

    input_ids: torch.Tensor
    """(T,) int32"""
    loss_mask: torch.Tensor
    """(T,) uint8, 1 on assistant tokens"""
    hidden: torch.Tensor
    """(T, H) in the cache dtype"""
    topk_ids: torch.Tensor | None = None
    """(T, N) int32 or None"""
    topk_logprobs: torch.Tensor | None = None
    """(T, N) float16 or None"""


@dataclass
class ShardData:
    """A shard's tensors: R records concatenated along the token axis (Ntok tokens in all)."""

    input_ids: torch.Tensor  # (Ntok,) int32
    loss_mask: torch.Tensor  # (Ntok,) uint8
    hidden: torch.Tensor  # (Ntok, H)
    offsets: torch.Tensor  # (R+1,) int64
    topk_ids: torch.Tensor | None = None  # (Ntok, N) int32
    topk_logprobs: torch.Tensor | None = None  # (Ntok, N) float16

    def __post_init__(self) -> None:
        n = self.input_ids.shape[0]
        checks = [
            (
                self.input_ids.dim() == 1 and self.input_ids.dtype == torch.int32,
                "input_ids must be (Ntok,) int32",
            ),
            (
                tuple(self.loss_mask.shape) == (n,) and self.loss_mask.dtype == torch.uint8,
                "loss_mask must be (Ntok,) uint8",
            ),
            (self.hidden.dim() == 2 and self.hidden.shape[0] == n, "hidden must be (Ntok, H)"),
            (self.offsets.dim() == 1 and self.offsets.dtype == torch.int64, "offsets must be (R+1,) int64"),
            (
                (self.topk_ids is None) == (self.topk_logprobs is None),
                "topk_ids and topk_logprobs go together",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"bad shard tensors: {message}")
        off = self.offsets
        if off.numel() < 1 or off[0] != 0 or off[-1] != n or bool((off[1:] < off[:-1]).any()):
            raise ValueError(
                f"bad shard tensors: offsets must rise from 0 to Ntok={n}, got {off.tolist()[:8]}..."
            )
        if self.topk_ids is not None:
            assert self.topk_logprobs is not None
            if self.topk_ids.shape[0] != n or self.topk_ids.shape != self.topk_logprobs.shape:
                raise ValueError("bad shard tensors: topk_ids / topk_logprobs must both be (Ntok, N)")

    @property
    def num_records(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    def record(self, i: int) -> CachedRecord:
        """Record `i` (views into the shard's tensors)."""
        if not 0 <= i < self.num_records:
            raise IndexError(f"record {i} out of range for a shard of {self.num_records}")
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        topk = self.topk_ids is not None and self.topk_logprobs is not None
        return CachedRecord(
            input_ids=self.input_ids[a:b],  # (T,)
            loss_mask=self.loss_mask[a:b],  # (T,)
            hidden=self.hidden[a:b],  # (T, H)
            topk_ids=self.topk_ids[a:b] if topk else None,  # (T, N)
            topk_logprobs=self.topk_logprobs[a:b] if topk else None,  # (T, N)
        )

    def records(self) -> Iterator[CachedRecord]:
        for i in range(self.num_records):
            yield self.record(i)

    @classmethod
    def from_records(cls, records: Sequence[CachedRecord]) -> ShardData:
        """Concatenate records (all with or all without top-N) into one shard."""
        if not records:
            raise ValueError("a shard needs at least one record")
        lengths = torch.tensor([0] + [r.input_ids.shape[0] for r in records], dtype=torch.int64)
        with_topk = [r.topk_ids is not None for r in records]
        if any(with_topk) != all(with_topk):
            raise ValueError("either every record has top-N log-probabilities or none has")
        return cls(
            input_ids=torch.cat([r.input_ids for r in records]).to(torch.int32),  # (Ntok,)
            loss_mask=torch.cat([r.loss_mask for r in records]).to(torch.uint8),  # (Ntok,)
            hidden=torch.cat([r.hidden for r in records]),  # (Ntok, H)
            offsets=torch.cumsum(lengths, 0),  # (R+1,)
            topk_ids=torch.cat([r.topk_ids for r in records]).to(torch.int32) if all(with_topk) else None,
            topk_logprobs=(
                torch.cat([r.topk_logprobs for r in records]).to(torch.float16) if all(with_topk) else None
            ),
        )

    def to_bytes(self) -> bytes:
        """The safetensors serialization (deterministic: same tensors, same bytes)."""
        tensors = {
            "input_ids": self.input_ids,
            "loss_mask": self.loss_mask,
            "hidden": self.hidden,
            "offsets": self.offsets,
        }
        if self.topk_ids is not None and self.topk_logprobs is not None:
            tensors["topk_ids"] = self.topk_ids
            tensors["topk_logprobs"] = self.topk_logprobs
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        # One metadata key: safetensors writes metadata from a hash map, so several keys come out in
        # a random order and the bytes (and sha256) would differ between runs.
        return save_safetensors(tensors, metadata={"format": f"{FORMAT}/{VERSION}"})

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "shard") -> ShardData:
        try:
            tensors = load_safetensors(data)
        except Exception as e:  # safetensors raises its own error type or a plain one on garbage
            raise ValueError(f"{source} is not a readable safetensors file: {e}") from e
        missing = sorted({"input_ids", "loss_mask", "hidden", "offsets"} - set(tensors))
        if missing:
            raise ValueError(f"{source} lacks tensors {missing}")
        try:
            return cls(**{k: tensors.get(k) for k in (f.name for f in dataclasses.fields(cls))})
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e


@dataclass(frozen=True)
class WrittenShard:
    path: str
    sha256: str
    bytes: int


def write_shard(
    url: str, name: str, shard: ShardData, storage_options: dict[str, Any] | None = None
) -> WrittenShard:
    """Serialize `shard` and publish it whole as `url/name`; returns its sha256 and size."""
    data = shard.to_bytes()
    fs, root = _filesystem(url, storage_options)
    _put_atomic(fs, f"{root}/{name}", data)
    return WrittenShard(name, hashlib.sha256(data).hexdigest(), len(data))


# ---------------------------------------------------------------------------------------------------
# Reading


class HiddenCacheReader:
    """Read a cache folder through its manifest; only the shards it lists are read.

    `expected_target`: refuse a cache made for another target (hidden size, vocab or tokenizer).
    `verify`: check every shard's sha256 against the manifest as it is read.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        expected_target: TargetIdentity | None = None,
        verify: bool = True,
    ) -> None:
        self.url = url.rstrip("/")
        self.storage_options = storage_options
        self.verify = verify
        manifest = Manifest.load(self.url, storage_options)
        if manifest is None:
            raise FileNotFoundError(f"{self.url} is not a hidden-state cache: it has no {MANIFEST_FILE}")
        self.manifest = manifest
        if expected_target is not None:
            try:
                manifest.metadata.target.check_compatible(expected_target)
            except ValueError as e:
                raise ValueError(f"cache {self.url}: {e}") from e
        self._fs, self._root = _filesystem(self.url, storage_options)

    @property
    def metadata(self) -> CacheMetadata:
        return self.manifest.metadata

    @property
    def shards(self) -> tuple[ShardEntry, ...]:
        return self.manifest.shards

    @property
    def num_records(self) -> int:
        return self.manifest.records

    @property
    def num_tokens(self) -> int:
        return self.manifest.tokens

    def __len__(self) -> int:
        """Number of shards."""
        return len(self.manifest.shards)

    def read_shard(self, i: int) -> ShardData:
        """Shard `i` of the manifest, checked against its entry and the cache metadata."""
        entry = self.manifest.shards[i]
        source = f"{self.url}/{entry.path}"
        try:
            data = self._fs.cat_file(f"{self._root}/{entry.path}")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{source} is listed in the manifest but missing") from e
        if self.verify:
            digest = hashlib.sha256(data).hexdigest()
            if digest != entry.sha256:
                raise ValueError(
                    f"{source}: sha256 {digest[:16]}... does not match the manifest's {entry.sha256[:16]}..."
                )
        shard = ShardData.from_bytes(data, source)
        meta = self.metadata
        problems = []
        if (shard.num_records, shard.num_tokens) != (entry.records, entry.tokens):
            problems.append(
                f"{shard.num_records} records / {shard.num_tokens} tokens, manifest says "
                f"{entry.records} / {entry.tokens}"
            )
        if shard.hidden.shape[1] != meta.target.hidden_size or shard.hidden.dtype != CACHE_DTYPES[meta.dtype]:
            problems.append(
                f"hidden {tuple(shard.hidden.shape)} {shard.hidden.dtype}, metadata says "
                f"H={meta.target.hidden_size} {meta.dtype}"
            )
        topk = 0 if shard.topk_ids is None else shard.topk_ids.shape[1]
        if topk != meta.topk:
            problems.append(f"top-{topk} log-probabilities, metadata says top-{meta.topk}")
        if problems:
            raise ValueError(f"{source} does not match the manifest: {'; '.join(problems)}")
        return shard

    def iter_records(self, shard_indices: Sequence[int] | None = None) -> Iterator[CachedRecord]:
        """Records of the given shards (default: all), shard by shard, in stored order."""
        for i in range(len(self)) if shard_indices is None else shard_indices:
            yield from self.read_shard(i).records()


# ---------------------------------------------------------------------------------------------------
# Storage


def _filesystem(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """(fsspec filesystem, root path without trailing slash) of a folder URL or local path."""
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(url, **(storage_options or {}))
    return fs, root.rstrip("/")


def is_local(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _put_atomic(fs: Any, path: str, data: bytes) -> None:
    """Publish `data` at `path` whole: temp file + rename locally; one PUT on an object store."""
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temps(url: str, storage_options: dict[str, Any] | None = None) -> int:
    """Delete temporary files a killed writer left in a local cache folder; returns how many."""
    fs, root = _filesystem(url, storage_options)
    if not is_local(fs) or not os.path.isdir(root):
        return 0
    stale = [n for n in os.listdir(root) if n.startswith(".") and ".tmp-" in n]
    for name in stale:
        os.remove(os.path.join(root, name))
    return len(stale)
