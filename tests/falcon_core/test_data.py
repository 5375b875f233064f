"""Data sources: packaged ShareGPT / MT-Bench / GSM8K, generic JSONL / Parquet / JSON, local and S3."""

from __future__ import annotations

import gzip
import io
import json
import re
from itertools import pairwise

import pytest

from falcon_core.data import (
    Conversation,
    DataNotFoundError,
    ReadStats,
    _iter_json_array,
    _packaged,
    read_gsm8k,
    read_mtbench,
    read_records,
    read_sharegpt,
    to_conversation,
)


def sharegpt_record(i: int, turns: int = 2) -> dict:
    roles = ["human", "gpt"]
    return {
        "id": f"r{i}",
        "conversations": [
            {"from": roles[t % 2], "value": f"message {t} of record {i}"} for t in range(turns)
        ],
    }


def assert_well_formed(conversation: Conversation) -> None:
    messages = conversation.messages
    body = messages[1:] if messages[0]["role"] == "system" else messages
    assert body[0]["role"] == "user"
    assert all(a["role"] != b["role"] for a, b in pairwise(body))
    assert all(m["content"].strip() for m in messages)


def test_packaged_sharegpt_is_read_whole_despite_its_truncated_tail():
    conversations, stats = read_sharegpt()
    assert stats.parsed == len(conversations) > 17_000
    assert stats.skipped["truncated tail"] == 1
    # every complete record of the file is either parsed or counted under a reason
    assert stats.parsed + stats.total_skipped == 17_671 + 1
    assert stats.fixed["dropped leading assistant message"] > 1000
    assert set(stats.skipped) <= {
        "truncated tail",
        "empty",
        "empty message",
        "no user message",
        "not alternating",
    }
    assert any("truncated tail" in p for p in stats.problems) or stats.total_skipped > stats.max_problems
    for conversation in conversations[:2000]:
        assert_well_formed(conversation)
    assert conversations[0].id == "QWJhYvA_0"


def test_sharegpt_max_records_stops_early():
    conversations, stats = read_sharegpt(max_records=7)
    assert len(conversations) == 7 == stats.parsed
    assert "truncated tail" not in stats.skipped


def test_truncated_sharegpt_file_keeps_complete_records(tmp_path):
    text = json.dumps([sharegpt_record(i) for i in range(3)], indent=2)
    cut = text.rindex("message 1 of record 2") + 5  # inside the last record's last string
    path = tmp_path / "cut.json"
    path.write_text(text[:cut])
    conversations, stats = read_sharegpt(path)
    assert [c.id for c in conversations] == ["r0", "r1"]
    assert stats.parsed == 2 and dict(stats.skipped) == {"truncated tail": 1}
    assert stats.problems[0].startswith("record 2 at char")


def test_json_array_cut_between_records(tmp_path):
    text = json.dumps([sharegpt_record(i, turns=4) for i in range(50)], indent=1)
    path = tmp_path / "cut.json"
    path.write_text(text[: text.index('{\n  "id": "r40"')])  # cut right before record 40
    conversations, stats = read_records(path)
    assert len(conversations) == 40
    assert dict(stats.skipped) == {"truncated tail": 1}
    assert "never closed" in stats.problems[0]


@pytest.mark.parametrize("chunk_chars", [1, 7, 64, 1 << 20])
def test_streamed_array_matches_json_loads_for_any_chunk_size(chunk_chars):
    records = [sharegpt_record(i, turns=1 + i % 5) for i in range(30)]
    text = " \n" + json.dumps(records, indent=2) + "\n"
    stats = ReadStats(source="memory")
    decoded = [record for _, record in _iter_json_array(io.StringIO(text), stats, chunk_chars)]
    assert decoded == records and stats.total_skipped == 0


def test_malformed_record_inside_a_json_array_is_counted(tmp_path):
    text = json.dumps([sharegpt_record(i) for i in range(4)])
    broken = text.replace('"id": "r2"', '"id": r2', 1)
    path = tmp_path / "broken.json"
    path.write_text(broken)
    conversations, stats = read_records(path)
    assert [c.id for c in conversations] == ["r0", "r1"]
    assert dict(stats.skipped) == {"malformed JSON": 1}
    assert "record 2" in stats.problems[0] and "rest of the file was not read" in stats.problems[0]


def test_malformed_jsonl_lines_are_counted_with_line_numbers(tmp_path):
    lines = [
        json.dumps(sharegpt_record(0)),
        '{"id": "bad", "conversations": [',
        json.dumps(
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
        ),
        "",
        json.dumps({"conversations": [{"from": "narrator", "value": "once upon a time"}]}),
        json.dumps({"prompt": "2+2?", "response": "4"}),
        json.dumps({"conversations": []}),
        "[1, 2]",
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    conversations, stats = read_records(path)
    assert stats.parsed == len(conversations) == 3
    assert dict(stats.skipped) == {"malformed JSON": 1, "bad role": 1, "empty": 1, "not an object": 1}
    assert stats.problems[0].startswith("line 2: malformed JSON")
    assert any(p.startswith("line 5: bad role ('narrator')") for p in stats.problems)
    assert conversations[1].id == "data.jsonl:1"
    assert conversations[2].as_dicts() == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    assert "line 2" in stats.summary()


def test_normalisation_rules():
    fixed = __import__("collections").Counter()
    conversation = to_conversation(
        {
            "conversations": [
                {"from": "system", "value": "be brief"},
                {"from": "gpt", "value": "(continued) ...and that is all."},
                {"from": "human", "value": "Thanks. One more?"},
                {"from": "chatgpt", "value": "Sure."},
            ]
        },
        "x:0",
        fixed,
    )
    assert [m["role"] for m in conversation.messages] == ["system", "user", "assistant"]
    assert fixed["dropped leading assistant message"] == 1
    bad = {
        "not alternating": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}],
        "empty message": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "  "}],
        "bad role": [{"from": "human", "value": "a"}, {"from": "system", "value": "late system"}],
        "no user message": [{"from": "gpt", "value": "only the model speaks"}],
    }
    for reason, messages in bad.items():
        with pytest.raises(Exception, match=reason):
            to_conversation({"conversations": messages}, "x:1")


def test_gzipped_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    gz = tmp_path / "data.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        for i in range(5):
            f.write(json.dumps(sharegpt_record(i)) + "\n")
    assert read_records(gz).stats.parsed == 5

    rows = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(3)]
    rows.append({"id": "p3", "messages": [{"role": "user", "content": ""}]})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    conversations, stats = read_records(tmp_path / "data.parquet")
    assert [c.id for c in conversations] == ["p0", "p1", "p2"]
    assert dict(stats.skipped) == {"empty message": 1} and stats.problems == ["row 3: empty message"]


def test_unknown_suffix_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_records(tmp_path / "data.csv")
    for reader, name in [
        (read_records, "absent.jsonl"),
        (read_records, "absent.parquet"),
        (read_sharegpt, "absent.json"),
        (read_gsm8k, "absent.jsonl"),
        (read_mtbench, "absent.jsonl"),
    ]:
        with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / name))):
            reader(tmp_path / name)


def test_a_packaged_data_set_that_is_not_installed_says_how_to_install_it():
    with pytest.raises(DataNotFoundError, match=r"falcon_no_such_package.*bash scripts/setup\.sh"):
        _packaged("falcon_no_such_package", "data/x.json")
    assert issubclass(DataNotFoundError, FileNotFoundError)


def test_s3_jsonl_json_and_parquet_through_moto(s3_endpoint, tmp_path):
    import boto3
    import pyarrow as pa
    import pyarrow.parquet as pq

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="falcon-data")
    jsonl = "\n".join(json.dumps(sharegpt_record(i)) for i in range(4)) + "\n{oops\n"
    s3.put_object(Bucket="falcon-data", Key="chats/a.jsonl", Body=jsonl.encode())
    array = json.dumps([sharegpt_record(i) for i in range(6)])
    s3.put_object(Bucket="falcon-data", Key="chats/b.json", Body=array[:-40].encode())
    pq.write_table(pa.Table.from_pylist([sharegpt_record(i) for i in range(3)]), tmp_path / "c.parquet")
    s3.upload_file(str(tmp_path / "c.parquet"), "falcon-data", "chats/c.parquet")

    conversations, stats = read_records("s3://falcon-data/chats/a.jsonl")
    assert len(conversations) == 4 and dict(stats.skipped) == {"malformed JSON": 1}
    assert stats.problems == [
        "line 5: malformed JSON (Expecting property name enclosed in double quotes at column 2)"
    ]
    conversations, stats = read_records("s3://falcon-data/chats/b.json")
    assert len(conversations) == 5 and dict(stats.skipped) == {"truncated tail": 1}
    conversations, stats = read_records("s3://falcon-data/chats/c.parquet")
    assert [c.id for c in conversations] == ["r0", "r1", "r2"] and stats.total_skipped == 0
    with pytest.raises(FileNotFoundError, match=r"falcon-data/chats/absent\.jsonl"):
        read_records("s3://falcon-data/chats/absent.jsonl")


def test_mtbench_questions():
    questions = read_mtbench()
    assert len(questions) == 80
    assert all(len(q.turns) == 2 and all(t.strip() for t in q.turns) for q in questions)
    assert {q.category for q in questions} >= {"writing", "math", "coding", "reasoning"}
    assert questions[0].id == "81"


def test_gsm8k_vendored_test_split():
    problems = read_gsm8k()
    assert len(problems) == 1319
    assert problems[0].turns[0].startswith("Janet")
    assert all(p.reference and "####" in p.reference for p in problems)
    assert len({p.id for p in problems}) == 1319


def test_malformed_benchmark_file_is_an_error(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "no answer"}\n')
    with pytest.raises(ValueError, match="line 2: missing field"):
        read_gsm8k(path)
