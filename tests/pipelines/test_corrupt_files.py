"""Damaged files on disk give a clear error that names the file: hidden-state cache shards (reader and the
training worker), the cache manifest, and drafter checkpoints (`load_drafter`, `falcon generate
--drafter`, `falcon serve --drafter`; the CLIs exit 2 with a one-line message, no traceback).

Every file here is real: shards and manifests written by `pipelines.hidden_cache`, a drafter saved by
`save_drafter`, then truncated, bit-flipped, replaced or deleted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from falcon_core.checkpoint import TargetIdentity, check_drafter_files, load_drafter, save_drafter
from falcon_core.drafter import Drafter, DrafterConfig
from falcon_core.target import TargetConfig
from pipelines.hidden_cache import (
    MANIFEST_FILE,
    CachedRecord,
    CacheMetadata,
    HiddenCacheReader,
    Manifest,
    ShardData,
    ShardEntry,
    shard_name,
    write_shard,
)

REPO = Path(__file__).resolve().parents[2]
H = 8
TARGET = TargetIdentity("tiny", hidden_size=H, vocab_size=100, tokenizer_hash="ab" * 32)


# ---------------------------------------------------------------------------------------------------
# Hidden-state cache


def _records(n: int, T: int = 6, seed: int = 0) -> list[CachedRecord]:
    g = torch.Generator().manual_seed(seed)
    return [
        CachedRecord(
            input_ids=torch.randint(0, 100, (T,), generator=g, dtype=torch.int32),  # (T,)
            loss_mask=torch.ones(T, dtype=torch.uint8),  # (T,)
            hidden=torch.randn(T, H, generator=g).to(torch.bfloat16),  # (T, H)
        )
        for _ in range(n)
    ]


def write_cache(folder: Path, shards: int = 2, records: int = 4) -> Manifest:
    url = str(folder)
    meta = CacheMetadata(TARGET, chat_template_hash="cd" * 32, max_seq_len=64, dtype="bf16")
    entries, first = [], 0
    for i in range(shards):
        shard = ShardData.from_records(_records(records, seed=i))
        w = write_shard(url, shard_name(i), shard)
        entries.append(
            ShardEntry(
                w.path,
                shard.num_records,
                shard.num_tokens,
                w.sha256,
                w.bytes,
                first,
                first + records,
                "0" * 64,
            )
        )
        first += records
    manifest = Manifest(meta, tuple(entries), {"records_cached": first})
    manifest.save(url)
    return manifest


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def flip(path: Path, where: float = 0.75) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x5A
    path.write_bytes(bytes(data))


DAMAGE = {"truncated": truncate, "flipped": flip, "deleted": Path.unlink}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_reader_names_a_damaged_shard_and_reports_the_checksum(tmp_path: Path, damage: str) -> None:
    write_cache(tmp_path)
    shard = tmp_path / shard_name(1)
    DAMAGE[damage](shard)
    reader = HiddenCacheReader(str(tmp_path))
    assert reader.read_shard(0).num_records == 4  # the intact shard still reads
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        list(reader.iter_records())
    message = str(info.value)
    assert str(shard) in message, message
    if damage == "deleted":
        assert "listed in the manifest but missing" in message
    else:
        assert "sha256" in message and "does not match the manifest" in message


def test_without_verification_a_truncated_shard_is_still_named(tmp_path: Path) -> None:
    write_cache(tmp_path)
    truncate(tmp_path / shard_name(0))
    with pytest.raises(ValueError, match="not a readable safetensors file") as info:
        HiddenCacheReader(str(tmp_path), verify=False).read_shard(0)
    assert str(tmp_path / shard_name(0)) in str(info.value)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "not valid JSON"),
        (b"\xff\xfe garbage", "not valid JSON"),
        (b"[1, 2]", "not a falcon-hidden-cache manifest"),
        (b'{"format": "falcon-hidden-cache", "version": 1}', "invalid metadata or shard list"),
    ],
    ids=["empty", "binary", "json-list", "no-sections"],
)
def test_a_damaged_manifest_is_named(tmp_path: Path, content: bytes, expected: str) -> None:
    write_cache(tmp_path)
    (tmp_path / MANIFEST_FILE).write_bytes(content)
    with pytest.raises(ValueError, match=expected) as info:
        HiddenCacheReader(str(tmp_path))
    assert str(tmp_path / MANIFEST_FILE) in str(info.value)


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "s3://other/shard.safetensors", ""])
def test_a_manifest_cannot_point_outside_its_folder(tmp_path: Path, path: str) -> None:
    manifest = write_cache(tmp_path, shards=1)
    body = json.loads(manifest.to_json())
    body["shards"][0]["path"] = path
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(body))
    with pytest.raises(ValueError, match="must be relative to the cache folder") as info:
        HiddenCacheReader(str(tmp_path))
    assert str(tmp_path / MANIFEST_FILE) in str(info.value)


def _train_job(cache: Path, tmp: Path) -> dict:
    from pipelines.config import DistillConfig

    cfg = DistillConfig().replace(
        {
            "train.batch_size": 1,
            "train.threads_per_worker": 1,
            "eval.heldout_records": 1,
            "ray.num_workers": 1,
            "ray.max_failures": 0,
            "ray.cpus_per_worker": 0.5,
            "data.cache_url": str(cache),
        }
    )
    return {
        "config": cfg.to_dict(),
        "target_folder": str(tmp / "no-target-needed"),  # the cache is read first and fails first
        "cache_url": str(cache),
        "identity": dataclasses.asdict(TARGET),
    }


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_the_training_worker_names_the_damaged_shard(tmp_path: Path, damage: str) -> None:
    """`pipelines.train.Worker` (what every Ray Train rank runs) reads its shards through the verifying
    reader: the first damaged one stops it with the shard's path and the checksum mismatch."""
    from pipelines.train import TrainJob, Worker

    cache = tmp_path / "cache"
    write_cache(cache)
    DAMAGE[damage](cache / shard_name(0))
    threads = torch.get_num_threads()
    try:
        with pytest.raises(ValueError) as info:
            Worker(TrainJob(**_train_job(cache, tmp_path)), rank=0, world=1)
    finally:
        torch.set_num_threads(threads)
    assert str(cache / shard_name(0)) in str(info.value)
    assert "sha256" in str(info.value)


@pytest.mark.slow
def test_a_ray_train_run_on_a_damaged_cache_fails_naming_the_shard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same through `run_training` on a local Ray (one worker, no retries): the run fails and the
    error the driver raises carries the shard's path."""
    import ray

    from pipelines.train import TrainJob, run_training

    cache = tmp_path / "cache"
    write_cache(cache)
    flip(cache / shard_name(0))
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # notice the failed worker at once
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        with pytest.raises(Exception) as info:  # Ray Train wraps the worker's error in its own type
            run_training(TrainJob(**_train_job(cache, tmp_path)), str(tmp_path / "runs"))
    finally:
        ray.shutdown()
    assert str(cache / shard_name(0)) in str(info.value), str(info.value)[-2000:]


# ---------------------------------------------------------------------------------------------------
# Drafter checkpoints

TINY = TargetConfig(
    model_type="llama", vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
    num_kv_heads=1, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=64,
)  # fmt: skip


def save_tiny_drafter(
    folder: Path, target: TargetConfig = TINY, identity: TargetIdentity | None = None
) -> Path:
    """A randomly initialised drafter for `target` (default: a 16-wide toy), saved as a real checkpoint."""
    torch.manual_seed(0)
    config = DrafterConfig.from_target(target, block_size=2)
    identity = identity or TargetIdentity("tiny-llama", target.hidden_size, target.vocab_size, "ab" * 32)
    return save_drafter(folder, Drafter(config), config, identity)


def _garbage_config(folder: Path) -> None:
    (folder / "config.json").write_bytes(b"\x00\xffnot json at all")


def _list_config(folder: Path) -> None:
    (folder / "config.json").write_text("[1, 2, 3]")


def _no_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def _no_config(folder: Path) -> None:
    (folder / "config.json").unlink()


DRAFTER_DAMAGE = {
    "truncated-weights": (lambda f: truncate(f / "model.safetensors"), "model.safetensors", "not a readable"),
    "garbage-config": (_garbage_config, "config.json", "not valid JSON"),
    "list-config": (_list_config, "config.json", "not a Falcon drafter checkpoint"),
    "missing-weights": (_no_weights, "", "has no model.safetensors"),
    "missing-config": (_no_config, "", "has no config.json"),
}


def damaged_drafter(tmp: Path, damage: str, **target: object) -> tuple[Path, str, str]:
    """A saved drafter with `damage` done; (folder, the path the error must name, message part)."""
    folder = save_tiny_drafter(tmp / "drafter", **target)  # type: ignore[arg-type]
    hurt, file, expected = DRAFTER_DAMAGE[damage]
    hurt(folder)
    return folder, str(folder / file) if file else str(folder), expected


@pytest.mark.parametrize("damage", list(DRAFTER_DAMAGE))
def test_load_drafter_names_the_damaged_file(tmp_path: Path, damage: str) -> None:
    folder, named, expected = damaged_drafter(tmp_path, damage)
    for load in (load_drafter, check_drafter_files):
        with pytest.raises((ValueError, FileNotFoundError), match=expected) as info:
            load(folder)
        assert named in str(info.value), str(info.value)


def test_an_intact_drafter_passes_the_check(tmp_path: Path) -> None:
    folder = save_tiny_drafter(tmp_path / "drafter")
    check_drafter_files(folder)
    assert load_drafter(folder).config.block_size == 2


def _falcon(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    cmd = [sys.executable, "-m", "falcon_core.cli", *argv]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _assert_clean_failure(proc: subprocess.CompletedProcess, named: str, expected: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert named in proc.stderr and expected in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) <= 3, proc.stderr


@pytest.mark.parametrize("damage", ["truncated-weights", "garbage-config", "missing-weights"])
def test_falcon_serve_refuses_a_damaged_drafter_before_starting_ray(tmp_path: Path, damage: str) -> None:
    folder, named, expected = damaged_drafter(tmp_path, damage)
    proc = _falcon("serve", "--drafter", str(folder), timeout=120)
    _assert_clean_failure(proc, named, expected)
    assert "Ray" not in proc.stdout + proc.stderr  # it never got as far as starting Ray


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated-weights", "list-config", "missing-config"])
def test_falcon_generate_refuses_a_damaged_drafter(
    tmp_path: Path, damage: str, smollm2_path: Path, smollm2_tokenizer
) -> None:
    """The real CLI with the default target and a drafter made for it (so the target check passes and
    the damage is what stops it); the drafter is read after the target loads (~5 s)."""
    from falcon_core.resolve import DEFAULT_MODEL

    target = TargetConfig.from_file(smollm2_path)
    identity = TargetIdentity.of(DEFAULT_MODEL, target, smollm2_tokenizer)
    folder, named, expected = damaged_drafter(tmp_path, damage, target=target, identity=identity)
    proc = _falcon("generate", "--prompt", "Hi", "--max-new-tokens", "1", "--drafter", str(folder))
    _assert_clean_failure(proc, named, expected)
