"""Configuration of a distillation run: typed frozen dataclasses, loaded from YAML, overridable per field.

`DistillConfig` nests one section per concern (target, data, drafter, objective, train, ray, eval,
output). Values are layered, later wins: the dataclass defaults, a profile (`--profile tiny|cpu|gpu`,
the YAML files in `pipelines/configs/`), a `--config FILE.yaml`, then command-line overrides, one
option per field named by its dotted path (`--train.lr 3e-4`, `--objective.csgd false`). Unknown keys
and ill-typed values are refused with the dotted path of the field in the message.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

PROFILE_DIR = Path(__file__).resolve().parent / "configs"
PROFILES = ("tiny", "cpu", "gpu")


@dataclass(frozen=True)
class TargetSection:
    model: str = "smollm2-135m-instruct"
    """Model spec (alias, local HF folder, .gguf, hub id) resolved by `falcon_core.resolve`."""


@dataclass(frozen=True)
class DataSection:
    source: str = "sharegpt"
    """"sharegpt" (the packaged ShareGPT file) or a file/folder URL (JSON, JSONL, Parquet; local or s3://)."""
    max_records: int | None = 2000
    """Conversations read from the source (None: all)."""
    max_seq_len: int = 1024
    """Rendered conversations are truncated to this many tokens when cached."""
    regenerate: bool = False
    """Replace the assistant answers with the target's own (self-distillation) before caching."""
    regenerate_max_new_tokens: int = 256
    regenerate_batch_size: int = 32
    """Conversations regenerated together (batched greedy decoding; 1: one at a time)."""
    regenerate_max_answers: int | None = None
    """Keep conversations up to their N-th regenerated answer (None: every turn that fits)."""
    topk: int = 32
    """Cache the target's top-N next-token log-probabilities (0: recompute the LM head while training)."""
    cache_url: str | None = None
    """Where the hidden-state cache lives (local or s3://); None: `$FALCON_HOME/cache/<name>`."""
    cache_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    shard_tokens: int = 65536
    """Tokens per cache shard."""
    cache_actors: int = 1
    """Target actors of the caching job (each holds a copy of the target)."""
    cache_cpus_per_actor: float = 0.5
    cache_batch_size: int = 8
    cache_threads_per_actor: int | None = None
    """torch threads per caching actor on CPU (None: the cluster's CPUs / actors)."""

    def __post_init__(self) -> None:
        _positive(
            self,
            "max_seq_len",
            "regenerate_max_new_tokens",
            "regenerate_batch_size",
            "shard_tokens",
            "cache_actors",
        )
        _positive(self, "cache_cpus_per_actor", "cache_batch_size")
        if self.regenerate_max_answers is not None and self.regenerate_max_answers <= 0:
            raise ValueError(
                f"data.regenerate_max_answers must be positive or null, got {self.regenerate_max_answers}"
            )
        if self.max_records is not None and self.max_records <= 0:
            raise ValueError(f"data.max_records must be positive or null, got {self.max_records}")
        if self.topk < 0:
            raise ValueError(f"data.topk must be >= 0, got {self.topk}")


@dataclass(frozen=True)
class DrafterSection:
    block_size: int = 2
    """K: tokens per drafter pass (1 = EAGLE-style autoregressive drafter)."""
    num_layers: int = 1
    fusion: Literal["linear", "lstm"] = "linear"
    init_from_layer: int | None = None
    """Copy target layer i (negative counts from the end) into the drafter's layers; null: random init."""

    def __post_init__(self) -> None:
        _positive(self, "block_size", "num_layers")


@dataclass(frozen=True)
class ObjectiveSection:
    """The distillation loss (FALCON.md "CSGD training"); `csgd: false` is the plain EAGLE-style pass."""

    csgd: bool = True
    lambda_schedule: Literal["reference", "paper"] = "reference"
    """reference: lambda linear from 0.45 at the first epoch to 0.1 at the last; paper: 0.4 (E - e) / E."""
    feature_weight: float = 1.0
    """Weight of SmoothL1(pred, f_{i+k})."""
    token_weight: float = 0.1
    """Weight of the token loss 0.9 * L_soft + 0.1 * L_hard."""
    soft_weight: float = 0.9
    hard_weight: float = 0.1
    temperature: float = 0.95
    """Temperature of the soft (KL-style) loss."""
    noise: float = 0.2
    """Uniform input-feature noise of width `noise * noise_ref_len / T` (EAGLE: +-0.1 at T = 512)."""
    noise_ref_len: int = 512
    vocab_subset: int = 0
    """Train the token loss over the N most frequent (loss-masked) tokens of the training data (0: full
    vocabulary). The target distribution is restricted to the same tokens; inference keeps the full head."""

    def __post_init__(self) -> None:
        _positive(self, "temperature", "noise_ref_len")
        for name in ("feature_weight", "token_weight", "soft_weight", "hard_weight", "noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"objective.{name} must be >= 0, got {getattr(self, name)}")
        if self.vocab_subset < 0:
            raise ValueError(f"objective.vocab_subset must be >= 0, got {self.vocab_subset}")


@dataclass(frozen=True)
class TrainSection:
    epochs: int = 4
    max_steps: int | None = None
    """Stop after this many optimizer steps in all (None: `epochs` full epochs)."""
    batch_size: int = 8
    """Records per worker per step (padded to the longest)."""
    max_len: int = 1024
    """Records are truncated to this many tokens for training."""
    bucket_batches: int = 8
    """Length bucketing: each epoch's order is cut in chunks of this many batches, sorted by length
    inside a chunk (less padding); 1 disables it."""
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 50
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 0.5
    grad_clip_mode: Literal["value", "norm"] = "value"
    """value: clip each gradient element (the paper's 0.5); norm: clip the global norm (DeepSpeed)."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """bf16: autocast the forward (weights and optimizer stay fp32)."""
    seed: int = 0
    checkpoint_every: int = 0
    """Checkpoint every N steps (0: only at the end of each epoch)."""
    keep_checkpoints: int = 2
    log_every: int = 10
    deepspeed: bool = False
    zero_stage: Literal[1, 2, 3] = 2
    threads_per_worker: int = 0
    """torch intra-op threads per worker (0: the worker's CPU count)."""

    def __post_init__(self) -> None:
        _positive(
            self, "epochs", "batch_size", "max_len", "bucket_batches", "lr", "keep_checkpoints", "log_every"
        )
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"train.max_steps must be positive or null, got {self.max_steps}")
        if self.warmup_steps < 0 or self.checkpoint_every < 0 or self.threads_per_worker < 0:
            raise ValueError("train.warmup_steps, checkpoint_every and threads_per_worker must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ValueError(f"train.grad_clip must be >= 0, got {self.grad_clip}")
        if self.deepspeed and self.grad_clip_mode == "value" and self.grad_clip > 0:
            raise ValueError(
                "DeepSpeed clips the gradient norm only: set train.grad_clip_mode to 'norm' "
                "(or train.grad_clip to 0) with train.deepspeed"
            )


@dataclass(frozen=True)
class RaySection:
    num_workers: int = 2
    """Ray Train workers (data-parallel ranks)."""
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    address: str | None = None
    """Cluster to join; None: $RAY_ADDRESS when set, else a local Ray on 127.0.0.1."""
    local_num_cpus: int | None = None
    """CPUs of the local Ray started when there is no cluster (None: all)."""
    storage_path: str | None = None
    """Checkpoints go to `storage_path/<name>` (local or s3://); None: `$FALCON_HOME/ray_results`."""
    max_failures: int = 2
    """Ray Train `FailureConfig.max_failures`: when a worker dies or raises, the worker group is restarted
    from the latest registered checkpoint up to this many times before the run fails (-1: without
    limit, 0: fail at once). A resumed run ends with the same weights as an uninterrupted one."""

    def __post_init__(self) -> None:
        _positive(self, "num_workers", "cpus_per_worker")
        if self.max_failures < -1:
            raise ValueError(f"ray.max_failures must be >= -1, got {self.max_failures}")


@dataclass(frozen=True)
class EvalSection:
    heldout_records: int = 16
    """The last N records of the cache are held out of training for validation."""
    prompts: str = "mtbench"
    """Held-out prompts decoded for tau: "mtbench" (first turns) or a JSONL file of {"prompt"} / {"messages"}."""
    tau_prompts: int = 8
    tau_max_new_tokens: int = 64
    tau_each_epoch: bool = True
    """Decode the prompts at every epoch's validation (else only in the final evaluation)."""
    tree: str = "chain-4"
    """Decoding tree for tau: a published name, chain-N, or "auto" (fitted to the measured acceptance
    table in the final evaluation; chain-4 at the per-epoch validations)."""
    dtype: Literal["fp32", "bf16"] = "bf16"
    acceptance_ranks: int = 10
    """Ranks per depth of the per-depth, per-rank acceptance written to the model card (for --tree auto)."""
    threads: int = 0
    """torch threads of the final evaluation in the driver (0: torch's default). On a shared CPU, 1 thread
    avoids oversubscription (measured here: 2 threads were up to 10x slower than 1 under load)."""

    def __post_init__(self) -> None:
        _positive(self, "tau_max_new_tokens", "acceptance_ranks")
        if self.heldout_records < 0 or self.tau_prompts < 0 or self.threads < 0:
            raise ValueError("eval.heldout_records, eval.tau_prompts and eval.threads must be >= 0")


@dataclass(frozen=True)
class OutputSection:
    dir: str | None = None
    """Where the exported drafter goes; None: `$FALCON_HOME/drafters/<name>`."""


@dataclass(frozen=True)
class DistillConfig:
    """One distillation job: cache -> train -> evaluate -> export."""

    name: str = "smollm2-135m-falcon-k2"
    """Run name: names the cache folder, the Ray Train run (its checkpoints) and the output."""
    target: TargetSection = field(default_factory=TargetSection)
    data: DataSection = field(default_factory=DataSection)
    drafter: DrafterSection = field(default_factory=DrafterSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    train: TrainSection = field(default_factory=TrainSection)
    ray: RaySection = field(default_factory=RaySection)
    eval: EvalSection = field(default_factory=EvalSection)
    output: OutputSection = field(default_factory=OutputSection)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty string without '/', got {self.name!r}")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DistillConfig:
        return _build(cls, d, "")

    def replace(self, overrides: Mapping[str, Any]) -> DistillConfig:
        """A copy with dotted-path overrides applied (`{"train.lr": 1e-3}`)."""
        d = self.to_dict()
        for path, value in overrides.items():
            _set_path(d, path, value)
        return DistillConfig.from_dict(d)


def _positive(obj: Any, *names: str) -> None:
    section = type(obj).__name__.removesuffix("Section").lower()
    for name in names:
        if getattr(obj, name) <= 0:
            raise ValueError(f"{section}.{name} must be positive, got {getattr(obj, name)}")


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_to_plain(v) for v in x]
    return x


def _set_path(d: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = d
    for p in parents:
        if not isinstance(node.get(p), dict):
            raise ValueError(f"unknown config section {path!r}")
        node = node[p]
    node[leaf] = value


# ---------------------------------------------------------------------------------------------------
# Typed construction from plain dicts (YAML) and from command-line strings


def _build(cls: type, d: Mapping[str, Any] | None, prefix: str) -> Any:
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise ValueError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown config keys {[prefix + u for u in unknown]}; known: {sorted(names)}")
    kwargs = {}
    for key, value in d.items():
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"config section {prefix.rstrip('.') or '<root>'}: {e}") from e


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """`value` checked (and widened int -> float, list -> tuple) against annotation `tp`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path + ".")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"{path} must be one of {list(choices)}, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ValueError(f"{path} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{path} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{path} must be a string, got {value!r}")
        return value
    raise TypeError(f"{path}: unsupported annotation {tp!r}")


def field_paths(cls: type = DistillConfig, prefix: str = "") -> dict[str, Any]:
    """Dotted path -> annotation of every leaf field."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(field_paths(tp, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = tp
    return out


def parse_value(text: str) -> Any:
    """A command-line value as YAML scalar or list (`3e-4`, `true`, `null`, `[0.9, 0.95]`)."""
    return yaml.safe_load(text)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections")
    return data


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, --profile, --no-csgd and one `--section.field VALUE` option per config field."""
    parser.add_argument("--config", help="YAML file of config sections (applied over the profile)")
    parser.add_argument(
        "--profile", choices=PROFILES, help="base settings from pipelines/configs/<profile>.yaml"
    )
    parser.add_argument(
        "--no-csgd",
        action="store_true",
        help="plain EAGLE-style objective (one clean pass), for the ablation",
    )
    group = parser.add_argument_group("config fields (YAML syntax values: 3e-4, true, null, [0.9, 0.95])")
    for path, tp in field_paths().items():
        group.add_argument(f"--{path}", dest=f"field:{path}", metavar=_metavar(tp), default=None)


def _metavar(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "{" + ",".join(str(c) for c in typing.get_args(tp)) + "}"
    return "VALUE"


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """Defaults <- profile <- --config file <- --section.field overrides (<- --no-csgd)."""
    layered: dict[str, Any] = {}
    if args.profile:
        layered = _merge(layered, load_yaml(PROFILE_DIR / f"{args.profile}.yaml"))
    if args.config:
        layered = _merge(layered, load_yaml(args.config))
    config = DistillConfig.from_dict(layered)
    overrides = {
        key.removeprefix("field:"): parse_value(value)
        for key, value in vars(args).items()
        if key.startswith("field:") and value is not None
    }
    if args.no_csgd:
        overrides["objective.csgd"] = False
    return config.replace(overrides) if overrides else config


def parse_config(argv: Sequence[str] | None = None) -> DistillConfig:
    """Parse a full command line of config options into a `DistillConfig`."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))
