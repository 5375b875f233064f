"""Shard planning (pure): numbering in input order, cuts by tokens, reuse after appends; forward batching."""

from __future__ import annotations

import dataclasses

import pytest

from falcon_core.checkpoint import TargetIdentity
from pipelines.cache_plan import ReadCounts, RecordInfo, plan_shards
from pipelines.hidden_cache import CacheMetadata, Manifest, ShardEntry
from pipelines.stages import length_batches

TARGET = TargetIdentity("tiny", hidden_size=8, vocab_size=100, tokenizer_hash="ab" * 32)


def _records(spec: list[tuple[int, int, str]]) -> list[RecordInfo]:
    """(file, tokens, skip) per record, numbered within each file in list order."""
    seen: dict[int, int] = {}
    out = []
    for file, tokens, skip in spec:
        index = seen.get(file, 0)
        seen[file] = index + 1
        out.append(RecordInfo(file, index, tokens, f"d{file}.{index}", skip))
    return out


def _entries(plan) -> Manifest:
    meta = CacheMetadata(TARGET, "x", 64)
    shards = tuple(
        ShardEntry(s.path, s.records, s.tokens, "sha", 1, s.first_record, s.end_record, s.source_sha256)
        for s in plan.shards
    )
    return Manifest(meta, shards)


def test_cuts_by_tokens_in_input_order_and_counts_skips():
    records = _records([(0, 5, ""), (0, 5, "too bad"), (0, 6, ""), (1, 3, ""), (1, 20, ""), (1, 1, "")])
    counts = [ReadCounts(1, {"malformed JSON": 2}, {}, ("b.jsonl: line 3: malformed JSON",)), ReadCounts(0)]
    plan = plan_shards(reversed(records), counts, num_files=2, shard_tokens=10)  # any arrival order
    assert plan.file_offsets == (0, 3)
    assert [(s.first_record, s.end_record, s.records, s.tokens) for s in plan.shards] == [
        (0, 3, 2, 11),  # record 1 is skipped but inside the range
        (3, 5, 2, 23),
        (5, 6, 1, 1),  # the tail
    ]
    assert plan.skipped == {"malformed JSON": 2, "too bad": 1}
    assert plan.records_read == 6 + 2
    assert plan.problems == ("b.jsonl: line 3: malformed JSON",)
    assert [s.path for s in plan.shards] == [f"shard-0000{i}.safetensors" for i in range(3)]


def test_max_records_takes_the_first_in_input_order():
    records = _records([(0, 4, ""), (0, 4, ""), (1, 4, ""), (1, 4, "")])
    plan = plan_shards(records, [], num_files=2, shard_tokens=100, max_records=3)
    assert (plan.num_records, plan.records, plan.tokens) == (3, 3, 12)


def test_appended_input_changes_only_the_tail_shard():
    first = _records([(0, 6, "")] * 5)
    more = [*first, *_records([(1, 6, "")] * 3)]
    before = plan_shards(first, [], num_files=1, shard_tokens=10)
    after = plan_shards(more, [], num_files=2, shard_tokens=10)
    assert len(before.shards) == 3 and len(after.shards) == 4
    assert before.shards[:2] == after.shards[:2]
    assert before.shards[2] != after.shards[2]  # the unfilled tail grows
    kept = after.reusable(_entries(before))
    assert [e.path for e in kept] == [s.path for s in before.shards[:2]]
    # a changed record changes its shard's digest only
    changed = [dataclasses.replace(first[0], digest="other"), *first[1:]]
    again = plan_shards(changed, [], num_files=1, shard_tokens=10)
    assert [e.path for e in again.reusable(_entries(before))] == [s.path for s in before.shards[1:]]
    assert before.reusable(None) == []


def test_plan_rejects_gaps_and_bad_sizes():
    records = _records([(0, 4, ""), (0, 4, "")])
    with pytest.raises(ValueError, match="not contiguous"):
        plan_shards(records[1:], [], num_files=1, shard_tokens=10)
    with pytest.raises(ValueError, match="shard_tokens"):
        plan_shards(records, [], num_files=1, shard_tokens=0)


def test_length_batches():
    lengths = [5, 9, 9, 2, 7, 1]
    batches = length_batches(lengths, batch_size=2, batch_tokens=100)
    assert batches == [[1, 2], [4, 0], [3, 5]]
    # the token budget bounds batch x longest
    assert length_batches(lengths, batch_size=8, batch_tokens=18) == [[1, 2], [4, 0], [3, 5]]
    assert length_batches(lengths, batch_size=8, batch_tokens=9) == [[1], [2], [4], [0], [3, 5]]
    assert sorted(i for b in length_batches(lengths, 3, 20) for i in b) == list(range(6))
    assert length_batches([], 4, 10) == []
