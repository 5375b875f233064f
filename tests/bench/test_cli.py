"""`falcon bench` end to end: prompt files in all three shapes on a tiny fp32 model, and one cheap run on
the real SmolLM2-135M-Instruct in bf16 (every divergence from plain greedy must be a near-tie)."""

from __future__ import annotations

import json

import pytest

from bench.cli import load_prompt_sets
from falcon_core.cli import main as falcon_main


def test_prompt_shortcuts():
    mt, gsm = load_prompt_sets(["mtbench", "gsm8k"], num_prompts=3)
    assert (mt.name, len(mt.items), gsm.name, len(gsm.items)) == ("mtbench", 3, "gsm8k", 3)
    assert len(mt.items[0].turns) == 2 and mt.items[0].messages[0]["content"] == mt.items[0].turns[0]
    assert gsm.items[0].messages[0]["role"] == "user" and gsm.items[0].id == "gsm8k-0"
    with pytest.raises(FileNotFoundError, match="not mtbench, gsm8k"):
        load_prompt_sets(["nowhere.jsonl"])


def test_falcon_bench_on_tiny_model(tiny_folder, drafter_dirs, tmp_path):
    prompts = tmp_path / "mixed.jsonl"
    lines = [
        {"question_id": 1, "turns": ["Say hi.", "Say bye."]},
        {"id": "raw", "prompt": "Once upon a time"},
        {
            "id": "chat",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
        },
    ]
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    args = ["bench", "--prompts", str(prompts), "--model", str(tiny_folder), "--dtype", "fp32", "--quiet"]
    args += ["--methods", "vanilla,hf,falcon,eagle", "--max-new-tokens", "6", "--warm-up-tokens", "2"]
    args += ["--falcon-drafter", str(drafter_dirs["falcon"]), "--eagle-drafter", str(tmp_path / "none")]
    args += ["--hf-cache", "dynamic", "--out", str(out), "--multi-turn", "--tree", "chain-2"]
    assert falcon_main(args) == 0
    res = json.loads((out / "bench.json").read_text())
    bench = res["benchmarks"]["mixed"]
    assert [r["id"] for r in bench["prompts"]] == ["1/turn1", "1/turn2", "raw", "chat"]
    assert (
        res["methods"]["eagle"]["status"] == "skipped"
        and "no drafter checkpoint" in res["methods"]["eagle"]["reason"]
    )
    assert res["methods"]["hf"]["cache"] == "dynamic" and "cache_choice" not in res["methods"]["hf"]
    assert all(s["equal"]["exact"] == 4 for s in bench["summary"].values())
    assert sorted(p.name for p in out.iterdir()) == [
        "acceptance.png", "bench.json", "bench.md", "speedup.png", "tokens_per_tree.png",
    ]  # fmt: skip


def test_falcon_bench_on_smollm2_bf16(tmp_path):
    out = tmp_path / "out"
    args = ["bench", "--prompts", "mtbench", "--num-prompts", "1", "--max-new-tokens", "8", "--quiet"]
    args += ["--methods", "vanilla,hf,hf-pld", "--warm-up-tokens", "2", "--threads", "1", "--out", str(out)]
    assert falcon_main(args) == 0
    res = json.loads((out / "bench.json").read_text())
    assert (
        res["environment"]["dtype"] == "bfloat16" and res["environment"]["model"] == "smollm2-135m-instruct"
    )
    s = res["benchmarks"]["mtbench"]["summary"]
    assert set(s) == {"vanilla", "hf", "hf-pld"} and res["benchmarks"]["mtbench"]["baseline"]["method"] in s
    for v in s.values():
        assert v["tokens"] == 8 and v["equal"]["not_ok"] == 0
    for m in ("eagle", "falcon"):
        assert m not in res["methods"]  # not asked for
