"""Ray Data stages of hidden-state caching, without Ray: the per-file read task on Parquet input."""

from __future__ import annotations

import json

from pipelines.stages import _read_file


def test_read_task_streams_parquet_records_and_counts_what_it_skips(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"q{i}"},
                                         {"role": "assistant", "content": f"a{i}"}]} for i in range(5)]  # fmt: skip
    rows[2]["messages"][1]["role"] = "wizard"
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "part-0.parquet")
    tables = list(_read_file(3, str(tmp_path / "part-0.parquet"), max_records=None, block_records=2))
    out = pa.concat_tables(tables).to_pylist()
    records = [r for r in out if r["kind"] == "record"]
    assert [r["id"] for r in records] == ["p0", "p1", "p3", "p4"]
    assert [r["index"] for r in records] == [0, 1, 2, 3] and {r["file"] for r in out} == {3}
    assert json.loads(records[2]["messages"]) == rows[3]["messages"]
    assert len(tables) == 3  # blocks of 2 records, then the last with the read_stats row
    stats = json.loads(out[-1]["read_stats"])
    assert out[-1]["kind"] == "read_stats" and stats["skipped"] == {"bad role": 1}
    assert stats["problems"] == ["part-0.parquet: row 2: bad role ('wizard')"]  # file, place, reason

    first_two = [r for t in _read_file(0, str(tmp_path / "part-0.parquet"), 2, 256) for r in t.to_pylist()]
    assert [r["id"] for r in first_two if r["kind"] == "record"] == ["p0", "p1"]  # --max-records
