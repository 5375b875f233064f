"""The hidden-state cache format: shard and manifest round trips (local and moto S3), checks on read."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from falcon_core.checkpoint import TargetIdentity
from pipelines.hidden_cache import (
    MANIFEST_FILE,
    CachedRecord,
    CacheMetadata,
    HiddenCacheReader,
    Manifest,
    ShardData,
    ShardEntry,
    remove_stale_temps,
    shard_name,
    write_shard,
)

H = 8
TARGET = TargetIdentity("tiny", hidden_size=H, vocab_size=100, tokenizer_hash="ab" * 32)


def _records(lengths: list[int], topk: int = 0, seed: int = 0) -> list[CachedRecord]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for T in lengths:
        out.append(
            CachedRecord(
                input_ids=torch.randint(0, 100, (T,), generator=g, dtype=torch.int32),  # (T,)
                loss_mask=(torch.rand(T, generator=g) > 0.5).to(torch.uint8),  # (T,)
                hidden=torch.randn(T, H, generator=g).to(torch.bfloat16),  # (T, H)
                topk_ids=torch.randint(0, 100, (T, topk), generator=g, dtype=torch.int32) if topk else None,
                topk_logprobs=-torch.rand(T, topk, generator=g).to(torch.float16) if topk else None,
            )
        )
    return out


def _write_cache(url: str, shards: list[list[CachedRecord]], topk: int = 0, storage_options=None) -> Manifest:
    meta = CacheMetadata(TARGET, chat_template_hash="cd" * 32, max_seq_len=64, dtype="bf16", topk=topk)
    entries = []
    first = 0
    for i, records in enumerate(shards):
        shard = ShardData.from_records(records)
        written = write_shard(url, shard_name(i), shard, storage_options)
        entries.append(
            ShardEntry(
                path=written.path,
                records=shard.num_records,
                tokens=shard.num_tokens,
                sha256=written.sha256,
                bytes=written.bytes,
                first_record=first,
                end_record=first + len(records),
                source_sha256="00" * 32,
            )
        )
        first += len(records)
    manifest = Manifest(meta, tuple(entries), {"records_cached": first})
    manifest.save(url, storage_options)
    return manifest


def _assert_same(a: CachedRecord, b: CachedRecord) -> None:
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.loss_mask, b.loss_mask)
    assert torch.equal(a.hidden, b.hidden)
    assert (a.topk_ids is None) == (b.topk_ids is None)
    if a.topk_ids is not None:
        assert torch.equal(a.topk_ids, b.topk_ids)
        assert torch.equal(a.topk_logprobs, b.topk_logprobs)


@pytest.mark.parametrize("topk", [0, 3])
def test_local_round_trip(tmp_path, topk):
    shards = [_records([5, 1, 7], topk, seed=1), _records([4], topk, seed=2)]
    manifest = _write_cache(str(tmp_path / "cache"), shards, topk=topk)
    reader = HiddenCacheReader(str(tmp_path / "cache"), expected_target=TARGET)
    assert reader.metadata == manifest.metadata
    assert (len(reader), reader.num_records, reader.num_tokens) == (2, 4, 17)
    got = list(reader.iter_records())
    for a, b in zip(got, [r for s in shards for r in s], strict=True):
        _assert_same(a, b)
    shard = reader.read_shard(0)
    assert shard.offsets.tolist() == [0, 5, 6, 13]
    assert shard.hidden.dtype == torch.bfloat16 and shard.input_ids.dtype == torch.int32
    assert not [n for n in os.listdir(tmp_path / "cache") if ".tmp-" in n]


def test_serialization_is_deterministic():
    records = _records([3, 9], topk=2, seed=5)
    assert len({ShardData.from_records(records).to_bytes() for _ in range(20)}) == 1


def test_s3_round_trip(s3_endpoint):
    import boto3

    boto3.client("s3").create_bucket(Bucket="format-test")
    shards = [_records([6, 2], seed=3)]
    _write_cache("s3://format-test/cache", shards)
    reader = HiddenCacheReader("s3://format-test/cache")
    _assert_same(next(reader.iter_records()), shards[0][0])
    assert reader.num_tokens == 8


def test_manifest_json_round_trip(tmp_path):
    manifest = _write_cache(str(tmp_path), [_records([2])])
    text = manifest.to_json()
    assert Manifest.from_json(text) == manifest
    body = json.loads(text)
    assert body["format"] == "falcon-hidden-cache" and body["version"] == 1
    assert body["metadata"]["layer"] == "last_after_norm"
    assert set(body["shards"][0]) >= {"path", "records", "tokens", "sha256"}


def test_manifest_errors(tmp_path):
    with pytest.raises(ValueError, match="not valid JSON"):
        Manifest.from_json("{")
    with pytest.raises(ValueError, match="not a falcon-hidden-cache manifest"):
        Manifest.from_json(json.dumps({"format": "other"}))
    body = json.loads(_write_cache(str(tmp_path), [_records([2])]).to_json())
    with pytest.raises(ValueError, match="version 2"):
        Manifest.from_json(json.dumps({**body, "version": 2}))
    with pytest.raises(ValueError, match="invalid metadata"):
        Manifest.from_json(json.dumps({**body, "metadata": {"dtype": "bf16"}}))
    assert Manifest.load(str(tmp_path / "nowhere")) is None
    with pytest.raises(FileNotFoundError, match=r"no manifest\.json"):
        HiddenCacheReader(str(tmp_path / "nowhere"))


def test_metadata_differences():
    a = CacheMetadata(TARGET, "x", 64)
    b = dataclasses.replace(a, max_seq_len=128, target=dataclasses.replace(TARGET, tokenizer_hash="ef" * 32))
    diff = a.differences(b)
    assert len(diff) == 2
    assert any(d.startswith("max_seq_len: 64 != 128") for d in diff)
    assert any(d.startswith("target.tokenizer_hash") for d in diff)
    assert a.differences(a) == []
    with pytest.raises(ValueError, match="dtype"):
        CacheMetadata(TARGET, "x", 64, dtype="int8")


def test_reader_refuses_other_target(tmp_path):
    _write_cache(str(tmp_path), [_records([2])])
    other = dataclasses.replace(TARGET, vocab_size=200)
    with pytest.raises(ValueError, match="vocab 100"):
        HiddenCacheReader(str(tmp_path), expected_target=other)


def test_reader_detects_corruption_and_mismatch(tmp_path):
    manifest = _write_cache(str(tmp_path), [_records([4, 4])])
    path = tmp_path / shard_name(0)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        HiddenCacheReader(str(tmp_path)).read_shard(0)
    # a manifest whose counts disagree with the (intact) shard
    shard = ShardData.from_records(_records([4, 4]))
    written = write_shard(str(tmp_path), shard_name(0), shard)
    wrong = dataclasses.replace(manifest.shards[0], records=3, sha256=written.sha256)
    dataclasses.replace(manifest, shards=(wrong,)).save(str(tmp_path))
    with pytest.raises(ValueError, match="does not match the manifest"):
        HiddenCacheReader(str(tmp_path)).read_shard(0)
    (tmp_path / shard_name(0)).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        HiddenCacheReader(str(tmp_path), verify=False).read_shard(0)


def test_shard_tensor_checks():
    good = ShardData.from_records(_records([3]))
    with pytest.raises(ValueError, match="offsets"):
        dataclasses.replace(good, offsets=torch.tensor([0, 2], dtype=torch.int64))
    with pytest.raises(ValueError, match="int32"):
        dataclasses.replace(good, input_ids=good.input_ids.long())
    with pytest.raises(ValueError, match="go together"):
        dataclasses.replace(good, topk_ids=torch.zeros(3, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="top-N"):
        ShardData.from_records(_records([2]) + _records([2], topk=2))
    with pytest.raises(IndexError):
        good.record(1)


def test_stale_temps_removed(tmp_path):
    _write_cache(str(tmp_path), [_records([2])])
    (tmp_path / ".shard-00001.safetensors.tmp-123-abc").write_bytes(b"partial")
    assert remove_stale_temps(str(tmp_path)) == 1
    assert sorted(os.listdir(tmp_path)) == [MANIFEST_FILE, shard_name(0)]
