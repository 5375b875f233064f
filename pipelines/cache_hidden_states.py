"""`falcon cache`: cache the target's hidden states over a sharded corpus with Ray Data.

    python pipelines/cache_hidden_states.py --model SPEC --input PATH|GLOB|DIR|s3://...|sharegpt
        --output DIR|s3://... [--max-seq-len 2048] [--max-records N] [--shard-tokens N] [--dtype bf16]
        [--topk N] [--regenerate [--temperature T --seed S --regen-max-new-tokens N]]
        [--num-actors N] [--batch-size N] [--gpus-per-actor G]

or, from Python (the distillation driver): `cache_hidden_states(CacheConfig(...)) -> CacheSummary`.

Steps (one helper each):
1. Resolve the model and the input files, and check `--output` before any work: it must be writable,
   and a cache already there must have been made for the same target, tokenizer and settings.
2. Ray Data reads every record and renders it (`pipelines/stages.py`); the result stays in the object
   store while the shards are planned from it (`pipelines/cache_plan.py`).
3. Shards the manifest already lists and the plan would write identically are kept; the others are
   written by an actor pool (`ShardStage`, one model per actor), the manifest updated after each.
4. The manifest is finalized with a deterministic summary; a `CacheSummary` (with timings) is returned.

Faults. A shard's bytes depend only on its planned records, and a shard appears whole (temp name then
rename) before the manifest lists it, so writing a shard twice is harmless. A killed shard actor is
restarted and its unfinished shards retried (Ray Data's actor pools default to `max_restarts=-1`,
`max_task_retries=-1`; passing them through `map_batches` is deprecated), and the temp files a killed
writer left are removed at the end. A killed driver leaves a manifest listing only finished shards: a
rerun keeps those and writes the rest (tests/pipelines/test_pipeline_faults.py).

The format is `pipelines/hidden_cache.py`'s (docs/DESIGN.md, "Hidden-state cache format"). Ray is
imported lazily: Ray reads `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` when first imported, and `main` sets
it (with `RAY_USAGE_STATS_ENABLED=0`) first unless already set.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from falcon_core.resolve import DEFAULT_MODEL
from pipelines.cache_plan import CachePlan, PlannedShard, ReadCounts, RecordInfo, plan_shards
from pipelines.hidden_cache import (
    CACHE_DTYPES,
    MANIFEST_FILE,
    CacheDtype,
    CacheMetadata,
    Manifest,
    ShardEntry,
    chat_template_hash,
    is_local,
    remove_stale_temps,
)

INPUT_SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet", ".pq", ".gz", ".bz2", ".xz", ".zst")


class CacheOutputError(ValueError):
    """`--output` cannot be used: unwritable, not a cache, or a cache made with other settings."""


@dataclass(frozen=True)
class CacheConfig:
    input: str
    """A file, glob, folder (its .json / .jsonl / .parquet files), `s3://` URL of either, or `sharegpt`."""
    output: str
    """Cache folder, local or `s3://bucket/prefix`."""
    model: str = DEFAULT_MODEL
    max_seq_len: int = 2048
    """Records are truncated to this many tokens."""
    max_records: int | None = None
    """Cache only the first N records (input order)."""
    shard_tokens: int = 1 << 18
    """A shard closes once it holds at least this many tokens."""
    dtype: CacheDtype = "bf16"
    """Dtype of the target's forward and of the cached hidden states."""
    topk: int = 0
    """Also cache the target's top-N next-token log-probabilities (0: off)."""
    regenerate: bool = False
    """Replace the assistant answers by the target's own before caching."""
    regen_max_new_tokens: int = 256
    regen_temperature: float = 0.0
    """0: greedy; else sampled with `regen_seed`."""
    regen_seed: int = 0
    regen_batch_size: int = 1
    """Greedy regeneration: conversations decoded together per batch (see `stages.Regenerator`)."""
    regen_max_answers: int | None = None
    """Keep conversations up to their N-th regenerated answer (None: all turns)."""
    num_actors: int = 1
    """Target actors (each loads the model once)."""
    batch_size: int = 8
    """Records per target forward."""
    batch_tokens: int = 16384
    """Padded tokens (batch x longest record) per target forward."""
    cpus_per_actor: float = 0.5
    """Ray CPU resource per actor (fractional: whole CPUs per actor deadlock small nodes)."""
    threads_per_actor: int | None = None
    """torch threads per target actor on CPU; default: the cluster's CPUs / num_actors."""
    gpus_per_actor: float | None = None
    """Default: 1 when the cluster has GPUs, else 0 (CPU)."""
    render_actors: int = 1
    ray_address: str | None = None
    """Default: $RAY_ADDRESS, else a local Ray started (and stopped) here."""
    storage_options: dict[str, Any] | None = None
    """fsspec options for `s3://` input and output (default: the AWS_* environment)."""
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in CACHE_DTYPES:
            raise ValueError(f"dtype must be one of {list(CACHE_DTYPES)}, got {self.dtype!r}")
        positive = (
            "max_seq_len",
            "shard_tokens",
            "num_actors",
            "batch_size",
            "batch_tokens",
            "render_actors",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_records is not None and self.max_records <= 0:
            raise ValueError(f"max_records must be positive, got {self.max_records}")
        if self.topk < 0 or self.cpus_per_actor <= 0:
            raise ValueError(
                f"topk must be >= 0 and cpus_per_actor > 0, got {self.topk}, {self.cpus_per_actor}"
            )
        if self.batch_tokens < self.max_seq_len:
            raise ValueError(
                f"batch_tokens ({self.batch_tokens}) must be >= max_seq_len ({self.max_seq_len})"
            )


@dataclass(frozen=True)
class CacheSummary:
    output: str
    records_read: int
    """Records parsed plus records skipped while reading."""
    records_cached: int
    skipped: dict[str, int]
    """Reason -> records not cached."""
    tokens_cached: int
    bytes_cached: int
    shards: int
    shards_written: int
    """Shards written by this run (the others were already in the cache)."""
    tokens_written: int
    bytes_written: int
    seconds: float
    """Wall time of the whole call."""
    shard_seconds: float
    """Wall time of the shard phase (target forward, writes), where tokens_written were made."""
    work_seconds: float = 0.0
    """Summed over the shards written, the actor time each took (gather its records, forward, serialize,
    sha256, write): the steady-state cost, without Ray start, actor start and model load."""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_written / self.shard_seconds if self.shard_seconds > 0 else 0.0

    def format(self) -> str:
        skipped = ", ".join(f"{n} x {reason}" for reason, n in self.skipped.items()) or "none"
        return "\n".join(
            [
                f"cache {self.output}",
                f"  records read {self.records_read}, cached {self.records_cached}, skipped: {skipped}",
                f"  tokens cached {self.tokens_cached}, {self.bytes_cached / 1e6:.1f} MB in {self.shards} shards",
                f"  this run: {self.shards_written} shards written ({self.shards - self.shards_written} kept), "
                f"{self.tokens_written} tokens, {self.bytes_written / 1e6:.1f} MB, "
                f"{self.tokens_per_second:.0f} tokens/s over {self.shard_seconds:.1f} s; total {self.seconds:.1f} s",
            ]
        )


# ---------------------------------------------------------------------------------------------------
# The driver


def cache_hidden_states(config: CacheConfig) -> CacheSummary:
    """Cache the target's hidden states of `config.input` into `config.output` (see module doc)."""
    import ray

    start = time.perf_counter()
    log = _log if config.progress else _quiet
    # 1. model, inputs, output
    folder, metadata = _metadata(config)
    urls = resolve_inputs(config.input, config.storage_options)
    existing = check_output(config.output, metadata, config.storage_options)
    metadata = existing.metadata if existing is not None else metadata
    remove_stale_temps(config.output, config.storage_options)
    log(f"{len(urls)} input file(s); output {config.output}" + (" (resuming)" if existing else ""))

    started_ray = _start_ray(config.ray_address)
    try:
        # 2. read, render, plan
        blocks, plan, pieces = _read_and_plan(config, folder, urls)
        # 3. keep what is done, write the rest
        reused = plan.reusable(existing)
        manifest = Manifest(metadata, tuple(sorted(reused, key=lambda e: e.path)), {"complete": False})
        manifest.save(config.output, config.storage_options)
        done = {e.path for e in reused}
        todo = [s for s in plan.shards if s.path not in done]
        log(
            f"plan: {plan.records} records, {plan.tokens} tokens in {len(plan.shards)} shards; "
            f"{len(reused)} already cached, {len(todo)} to write"
        )
        shard_start = time.perf_counter()
        written, work_seconds = (
            _write_shards(config, folder, todo, pieces, blocks, manifest, log) if todo else ([], 0.0)
        )
        shard_seconds = time.perf_counter() - shard_start
        remove_stale_temps(config.output, config.storage_options)  # left by writers killed and retried
    finally:
        if started_ray:
            ray.shutdown()

    # 4. final manifest
    entries = tuple(sorted([*reused, *written], key=lambda e: e.path))
    summary = {
        "complete": True,
        "records_read": plan.records_read,
        "records_cached": sum(e.records for e in entries),
        "skipped": plan.skipped,
        "fixed": plan.fixed,
        "problems": list(plan.problems),
        "tokens": sum(e.tokens for e in entries),
        "bytes": sum(e.bytes for e in entries),
        "shards": len(entries),
    }
    Manifest(metadata, entries, summary).save(config.output, config.storage_options)
    result = CacheSummary(
        output=config.output,
        records_read=plan.records_read,
        records_cached=summary["records_cached"],
        skipped=plan.skipped,
        tokens_cached=summary["tokens"],
        bytes_cached=summary["bytes"],
        shards=len(entries),
        shards_written=len(written),
        tokens_written=sum(e.tokens for e in written),
        bytes_written=sum(e.bytes for e in written),
        seconds=time.perf_counter() - start,
        shard_seconds=shard_seconds,
        work_seconds=work_seconds,
    )
    log(result.format())
    return result


def _metadata(config: CacheConfig) -> tuple[Path, CacheMetadata]:
    """The resolved model folder and the metadata this run's cache must carry."""
    from transformers import AutoTokenizer

    from falcon_core.checkpoint import TargetIdentity
    from falcon_core.resolve import resolve_model
    from falcon_core.target import TargetConfig

    folder = resolve_model(config.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    identity = TargetIdentity.of(config.model, TargetConfig.from_file(folder), tokenizer)
    regenerate = _regenerate_settings(config)
    return folder, CacheMetadata(
        target=identity,
        chat_template_hash=chat_template_hash(tokenizer),
        max_seq_len=config.max_seq_len,
        dtype=config.dtype,
        topk=config.topk,
        regenerate=dataclasses.asdict(regenerate) if regenerate is not None else None,
    )


def _regenerate_settings(config: CacheConfig) -> Any:
    from pipelines.stages import RegenerateSettings

    if not config.regenerate:
        return None
    return RegenerateSettings(
        config.regen_max_new_tokens,
        config.regen_temperature,
        config.regen_seed,
        config.regen_batch_size,
        config.regen_max_answers,
    )


def resolve_inputs(spec: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The input files of a path, glob, folder or URL, sorted (their order numbers the records)."""
    from fsspec.core import url_to_fs

    from falcon_core.data import sharegpt_path

    if spec == "sharegpt":
        return [str(sharegpt_path())]
    fs, path = url_to_fs(spec, **(storage_options or {}))
    if any(c in path for c in "*?["):
        found = [p for p in fs.glob(path) if fs.isfile(p)]
    elif fs.isdir(path):
        found = [p for p in fs.find(path) if p.lower().endswith(INPUT_SUFFIXES)]
    elif fs.isfile(path):
        found = [path]
    else:
        raise FileNotFoundError(f"--input {spec}: no such file or folder")
    if not found:
        raise FileNotFoundError(
            f"--input {spec}: matches no input files ({', '.join(INPUT_SUFFIXES[:4])}, ...)"
        )
    return sorted(p if is_local(fs) else fs.unstrip_protocol(p) for p in found)


def check_output(
    url: str, metadata: CacheMetadata, storage_options: dict[str, Any] | None = None
) -> Manifest | None:
    """Fail now if `url` cannot take this cache; return the manifest of a compatible cache already there."""
    from fsspec.core import url_to_fs

    try:
        fs, root = url_to_fs(url, **(storage_options or {}))
        root = root.rstrip("/")
        existing = Manifest.load(url, storage_options)
    except ValueError as e:
        raise CacheOutputError(f"--output {url} holds an unreadable manifest: {e}") from e
    except OSError as e:
        raise CacheOutputError(f"--output {url} cannot be read: {e}") from e
    if existing is not None:
        # A different name alone is allowed (the same weights reached by another spec), as for drafters.
        diffs = [d for d in existing.metadata.differences(metadata) if not d.startswith("target.name:")]
        if diffs:
            raise CacheOutputError(
                f"--output {url} holds a cache made with other settings ({'; '.join(diffs)}; "
                f"existing != this run). Use another --output, or delete that cache."
            )
    else:
        foreign = [n for n in _names(fs, root, url) if not _cache_file(n)]
        if foreign:
            raise CacheOutputError(
                f"--output {url} is not empty and holds no cache ({', '.join(sorted(foreign)[:5])}, ...); "
                "use an empty or new folder"
            )
    probe = f"{root}/.falcon-write-probe-{os.getpid()}"
    try:
        if is_local(fs):
            fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as e:  # any failure to write means the run could not finish
        raise CacheOutputError(f"--output {url} is not writable: {type(e).__name__}: {e}") from e
    return existing


def _names(fs: Any, root: str, url: str) -> list[str]:
    """Names in folder `root` (none when it does not exist yet)."""
    try:
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return []
    except OSError as e:  # e.g. a path below a file
        raise CacheOutputError(f"--output {url} is not writable: {type(e).__name__}: {e}") from e


def _cache_file(name: str) -> bool:
    return (
        name == MANIFEST_FILE
        or (name.startswith("shard-") and name.endswith(".safetensors"))
        or (name.startswith(".") and (".tmp-" in name or name.startswith(".falcon-write-probe")))
    )


def _start_ray(address: str | None) -> bool:
    """Connect to Ray unless connected; True when a local Ray was started here (to stop at the end)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, include_dashboard=False, log_to_driver=True)
    return address == "local"


def _read_and_plan(
    config: CacheConfig, folder: Path, urls: list[str]
) -> tuple[list[Any], CachePlan, dict[int, list[list[Any]]]]:
    """Read and render every record (kept in the object store), plan the shards.

    Returns the rendered blocks' object refs, the plan, and for each planned shard its pieces: the
    `[block, [row, ...], [record, ...]]` lists where `ShardStage` finds its records.
    """
    import ray

    from pipelines.stages import ConversationDatasource, RenderStage, block_facts

    ds = ray.data.read_datasource(ConversationDatasource(urls, config.max_records))
    ds = ds.map_batches(
        RenderStage,
        fn_constructor_args=(str(folder), config.max_seq_len),
        batch_format="pyarrow",
        batch_size=128,
        compute=ray.data.ActorPoolStrategy(size=config.render_actors),
        num_cpus=config.cpus_per_actor,
    )
    if not config.regenerate:
        ds = ds.drop_columns(["messages"])
    blocks = ds.materialize().to_arrow_refs()
    facts = ray.get([ray.remote(num_cpus=0.1)(block_facts).remote(b) for b in blocks])

    records, counts, where = [], [], {}
    for b, rows in enumerate(facts):
        for r, row in enumerate(rows):
            if row["kind"] == "read_stats":
                stats = json.loads(row["read_stats"])
                counts.append(
                    ReadCounts(row["file"], stats["skipped"], stats["fixed"], tuple(stats["problems"]))
                )
                continue
            records.append(RecordInfo(row["file"], row["index"], row["tokens"], row["digest"], row["skip"]))
            where[(row["file"], row["index"])] = (b, r)
    plan = plan_shards(records, counts, len(urls), config.shard_tokens, config.max_records)

    firsts = [s.first_record for s in plan.shards]
    grouped: dict[int, dict[int, list[list[int]]]] = defaultdict(lambda: defaultdict(lambda: [[], []]))
    for rec in records:
        g = plan.file_offsets[rec.file] + rec.index
        k = bisect.bisect_right(firsts, g) - 1
        if rec.skip or k < 0 or g >= plan.shards[k].end_record:
            continue
        b, r = where[(rec.file, rec.index)]
        grouped[k][b][0].append(r)
        grouped[k][b][1].append(g)
    pieces = {
        k: [[b, rows, numbers] for b, (rows, numbers) in sorted(by_block.items())]
        for k, by_block in grouped.items()
    }
    return blocks, plan, pieces


def _write_shards(
    config: CacheConfig,
    folder: Path,
    todo: list[PlannedShard],
    pieces: dict[int, list[list[Any]]],
    blocks: list[Any],
    manifest: Manifest,
    log: Callable[[str], None],
) -> tuple[list[ShardEntry], float]:
    """Run the target actor pool over the shards in `todo`; save the manifest after each shard.

    Returns the written shards' entries and the actor seconds they took in all (`CacheSummary.work_seconds`).
    """
    import ray

    from pipelines.stages import ShardSettings, ShardStage

    resources = actor_resources(config, ray.cluster_resources())
    settings = ShardSettings(
        model_path=str(folder),
        output=config.output,
        dtype=config.dtype,
        max_seq_len=config.max_seq_len,
        topk=config.topk,
        batch_size=config.batch_size,
        batch_tokens=config.batch_tokens,
        threads=resources.threads,
        device=resources.device,
        regenerate=_regenerate_settings(config),
        storage_options=config.storage_options,
    )
    rows = [{"shard": s.index, "pieces": json.dumps(pieces[s.index])} for s in todo]
    out = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        ShardStage,
        fn_constructor_args=(settings, blocks),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=config.num_actors),
        num_cpus=config.cpus_per_actor,
        num_gpus=resources.num_gpus,
    )
    planned = {s.index: s for s in todo}
    progress = _Progress(len(todo), sum(s.records for s in todo), sum(s.tokens for s in todo), log)
    entries = {e.path: e for e in manifest.shards}
    written, work_seconds = [], 0.0
    for row in out.iter_rows():
        p = planned[int(row["shard"])]
        entry = ShardEntry(
            path=str(row["path"]),
            records=int(row["records"]),
            tokens=int(row["tokens"]),
            sha256=str(row["sha256"]),
            bytes=int(row["bytes"]),
            first_record=p.first_record,
            end_record=p.end_record,
            source_sha256=p.source_sha256,
        )
        written.append(entry)
        entries[entry.path] = entry
        manifest = dataclasses.replace(manifest, shards=tuple(entries[k] for k in sorted(entries)))
        manifest.save(config.output, config.storage_options)
        progress.update(entry.records, entry.tokens, int(row["generated_tokens"]))
        work_seconds += float(row["seconds"])
    return written, work_seconds


@dataclass(frozen=True)
class ActorResources:
    """What each target actor of the shard stage asks Ray for, and how it runs the target."""

    num_gpus: float
    """`map_batches(num_gpus=...)`: one GPU per actor when the cluster has GPUs, else 0."""
    threads: int
    """torch CPU threads per actor (unused on a GPU)."""
    device: str
    """"cuda" when the actor holds a GPU, else "cpu"."""


def actor_resources(config: CacheConfig, cluster: Mapping[str, float]) -> ActorResources:
    """Per-actor resources from the config and `ray.cluster_resources()`: `gpus_per_actor` when set,
    else 1 GPU per actor where the cluster has one; CPU threads `threads_per_actor`, else the cluster's
    CPUs shared among the actors."""
    if config.gpus_per_actor is not None:
        gpus = config.gpus_per_actor
    else:
        gpus = 1.0 if cluster.get("GPU", 0) >= 1 else 0.0
    threads = config.threads_per_actor or max(1, int(cluster.get("CPU", 1)) // config.num_actors)
    return ActorResources(num_gpus=gpus, threads=threads, device="cuda" if gpus > 0 else "cpu")


class _Progress:
    """Records and tokens per second and an ETA, logged after each shard."""

    def __init__(self, shards: int, records: int, tokens: int, log: Callable[[str], None]) -> None:
        self.total = (shards, records, tokens)
        self.done = [0, 0, 0]
        self.generated = 0
        self.start = time.perf_counter()
        self.log = log

    def update(self, records: int, tokens: int, generated: int) -> None:
        self.done = [self.done[0] + 1, self.done[1] + records, self.done[2] + tokens]
        self.generated += generated
        elapsed = time.perf_counter() - self.start
        rate = self.done[2] / elapsed if elapsed > 0 else 0.0
        left = max(self.total[2] - self.done[2], 0) / rate if rate > 0 else float("inf")
        regen = f", {self.generated / elapsed:.1f} generated tok/s" if self.generated else ""
        self.log(
            f"shard {self.done[0]}/{self.total[0]}: records {self.done[1]}/{self.total[1]} "
            f"({self.done[1] / elapsed:.1f}/s), tokens {self.done[2]}/{self.total[2]} ({rate:.0f}/s{regen}), "
            f"ETA {_duration(left)}"
        )


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s"


def _log(message: str) -> None:
    print(f"[cache] {message}", file=sys.stderr, flush=True)


def _quiet(message: str) -> None:
    del message


# ---------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    d = CacheConfig(input="", output="")
    p = argparse.ArgumentParser(
        prog="falcon cache", description="Cache the target's hidden states over a corpus (Ray Data)."
    )
    p.add_argument("--model", default=d.model, help="alias, HF folder, .gguf file or hub id")
    p.add_argument("--input", required=True, help="file, glob, folder, s3:// URL, or 'sharegpt'")
    p.add_argument("--output", required=True, help="cache folder, local or s3://bucket/prefix")
    p.add_argument("--max-seq-len", type=int, default=d.max_seq_len)
    p.add_argument("--max-records", type=int, default=None)
    p.add_argument("--shard-tokens", type=int, default=d.shard_tokens)
    p.add_argument("--dtype", choices=list(CACHE_DTYPES), default=d.dtype)
    p.add_argument("--topk", type=int, default=d.topk, help="cache top-N log-probabilities (0: off)")
    p.add_argument("--regenerate", action="store_true", help="replace answers by the target's own")
    p.add_argument("--regen-max-new-tokens", type=int, default=d.regen_max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.regen_temperature, help="regeneration; 0 = greedy")
    p.add_argument("--seed", type=int, default=d.regen_seed, help="regeneration sampling seed")
    p.add_argument(
        "--regen-batch-size", type=int, default=d.regen_batch_size, help="greedy: batched decoding"
    )
    p.add_argument("--regen-max-answers", type=int, default=None, help="keep up to the N-th answer")
    p.add_argument("--num-actors", type=int, default=d.num_actors)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--batch-tokens", type=int, default=d.batch_tokens)
    p.add_argument("--cpus-per-actor", type=float, default=d.cpus_per_actor)
    p.add_argument("--threads-per-actor", type=int, default=None)
    p.add_argument(
        "--gpus-per-actor", type=float, default=None, help="default: 1 when the cluster has GPUs, else 0"
    )
    p.add_argument("--render-actors", type=int, default=d.render_actors)
    p.add_argument("--ray-address", default=None)
    p.add_argument("--quiet", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> CacheConfig:
    return CacheConfig(
        input=args.input,
        output=args.output,
        model=args.model,
        max_seq_len=args.max_seq_len,
        max_records=args.max_records,
        shard_tokens=args.shard_tokens,
        dtype=args.dtype,
        topk=args.topk,
        regenerate=args.regenerate,
        regen_max_new_tokens=args.regen_max_new_tokens,
        regen_temperature=args.temperature,
        regen_seed=args.seed,
        regen_batch_size=args.regen_batch_size,
        regen_max_answers=args.regen_max_answers,
        num_actors=args.num_actors,
        batch_size=args.batch_size,
        batch_tokens=max(args.batch_tokens, args.max_seq_len),
        cpus_per_actor=args.cpus_per_actor,
        threads_per_actor=args.threads_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        render_actors=args.render_actors,
        ray_address=args.ray_address,
        progress=not args.quiet,
    )


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args = build_parser().parse_args(argv)
    try:
        summary = cache_hidden_states(config_from_args(args))
    except (CacheOutputError, FileNotFoundError, ValueError) as e:
        print(f"falcon cache: error: {e}", file=sys.stderr)
        return 2
    if args.quiet:
        print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
