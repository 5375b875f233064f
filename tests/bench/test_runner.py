"""The benchmark runner on a tiny random fp32 model: output structure, interleaving order, equality
accounting against plain greedy, skip reasons, and the report files (JSON, Markdown, PNG plots)."""

from __future__ import annotations

import json

import pytest

from bench.methods import EngineMethod, HFMethod, Models, Skipped, build_methods
from bench.report import write_report
from bench.runner import PromptSet, RunConfig, Runner, encode, equality, method_order, summarize
from falcon_core.data import Message, PromptItem

METHODS = ["vanilla", "hf", "hf-pld", "eagle", "falcon"]
MAX_NEW = 12
PROMPTS = PromptSet(
    "tiny",
    (
        PromptItem("a", messages=(Message(role="user", content="Name three rivers in Europe."),)),
        PromptItem("b", prompt="The quick brown fox jumps over the lazy dog. The quick brown fox"),
        PromptItem("c", messages=(Message(role="user", content="Count to ten."),)),
    ),
)


@pytest.fixture(scope="module")
def models(tiny_folder) -> Models:
    return Models(tiny_folder, dtype="fp32", name="tiny-llama")


@pytest.fixture(scope="module")
def results(models, drafter_dirs) -> dict:
    methods = build_methods(METHODS, models, drafter_dirs, trees=["chain-3"], hf_cache="auto")
    methods.append(Skipped("absent", "no drafter checkpoint at /nowhere"))
    return Runner(methods, models.plain_engine, RunConfig(MAX_NEW, warm_up_tokens=4)).run([PROMPTS])


def test_method_order_rotates_per_prompt():
    names = ["a", "b", "c"]
    assert [method_order(names, i) for i in range(4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]
    assert method_order([], 3) == []


def test_results_structure(results):
    assert set(results) >= {"environment", "config", "methods", "benchmarks", "order"}
    env = results["environment"]
    assert len(env["load_average_start"]) == 3 and isinstance(env["timings_meaningful"], bool)
    assert env["dtype"] == "float32"
    assert results["methods"]["absent"] == {
        "status": "skipped",
        "reason": "no drafter checkpoint at /nowhere",
    }
    assert results["methods"]["falcon"]["k"] == 2 and results["methods"]["eagle"]["k"] == 1
    assert results["methods"]["falcon"]["tree"] == "chain-3"
    assert results["methods"]["hf"]["cache"] in ("dynamic", "static")  # chosen at warm-up
    assert set(results["methods"]["hf"]["cache_choice"]["warm_up_seconds"]) == {"dynamic", "static"}
    bench = results["benchmarks"]["tiny"]
    assert [r["id"] for r in bench["prompts"]] == ["a", "b", "c"]
    for row in bench["prompts"]:
        assert set(row["results"]) == set(METHODS)
        for name, rec in row["results"].items():
            assert 0 < rec["tokens"] <= MAX_NEW and rec["seconds"] > 0
            assert rec["tokens"] == len(rec["token_ids"])
            if name in ("eagle", "falcon"):
                assert rec["tree_nodes"] == 3 and len(rec["acceptance_per_depth"]) == 3
                assert rec["tau"] >= 1.0
    s = bench["summary"]
    assert s["vanilla"]["tau"] == 1.0 and "tau" not in s["hf"]
    assert s["falcon"]["tokens"] == sum(r["results"]["falcon"]["tokens"] for r in bench["prompts"])


def test_interleaving_order(results):
    order = [(o["prompt"], o["method"]) for o in results["order"]]
    want = [(p.id, m) for i, p in enumerate(PROMPTS.items) for m in method_order(METHODS, i)]
    assert order == want


def test_every_output_equals_plain_greedy_in_fp32(results):
    for row in results["benchmarks"]["tiny"]["prompts"]:
        plain = row["results"]["vanilla"]["token_ids"]
        for name, rec in row["results"].items():
            assert rec["equal"]["exact"], (name, rec["equal"])
            assert rec["token_ids"] == plain
    for s in results["benchmarks"]["tiny"]["summary"].values():
        assert s["equal"] == {"exact": 3, "near_tie": 0, "not_ok": 0, "checked": 3}


def test_speedup_denominator_is_the_fastest_plain_decoder(results):
    bench = results["benchmarks"]["tiny"]
    s = bench["summary"]
    fastest = max(("vanilla", "hf"), key=lambda n: s[n]["tokens_per_second"])
    assert bench["baseline"]["method"] == fastest
    assert s[fastest]["speedup"] == pytest.approx(1.0)
    for v in s.values():
        assert v["speedup"] == pytest.approx(v["tokens_per_second"] / s[fastest]["tokens_per_second"])


def test_equality_accounting(models):
    engine = models.plain_engine
    ids = encode(models.tokenizer, PROMPTS.items[0])
    plain = engine.generate(input_ids=ids, max_new_tokens=8).token_ids
    assert len(plain) == 8
    assert equality(engine, ids, plain, plain).exact
    changed = [*plain[:3], (plain[3] + 1) % 1000, *plain[4:]]
    c = equality(engine, ids, plain, changed)
    assert not c.exact and c.first_divergence == 3 and c.plain_token == plain[3]
    assert c.other_gap > c.tolerance and c.near_tie is False and not c.ok  # random tokens are no near-tie
    early = equality(engine, ids, plain, plain[:5])  # stopped at EOS after 5 tokens
    assert early.first_divergence == 5 and early.other_token in engine.eos_ids
    assert early.plain_token == plain[5] and early.other_gap is not None and early.other_gap >= 0
    summary = summarize(
        [
            {
                "results": {
                    "m": {"tokens": 4, "seconds": 1.0, "equal": {"exact": True, "near_tie": None, "ok": True}}
                }
            },
            {
                "results": {
                    "m": {
                        "tokens": 4,
                        "seconds": 1.0,
                        "equal": {"exact": False, "near_tie": True, "ok": True},
                    }
                }
            },
            {
                "results": {
                    "m": {
                        "tokens": 4,
                        "seconds": 1.0,
                        "equal": {"exact": False, "near_tie": False, "ok": False},
                    }
                }
            },
        ],
        [type("M", (), {"name": "m", "plain": True, "tree_nodes": 0})()],
    )
    assert summary["summary"]["m"]["equal"] == {"exact": 1, "near_tie": 1, "not_ok": 1, "checked": 3}
    assert summary["baseline"] == {"method": "m", "tokens_per_second": 4.0}


def test_skip_reasons(models, drafter_dirs, tmp_path):
    swapped = {"eagle": drafter_dirs["falcon"], "falcon": tmp_path / "missing"}
    eagle, falcon = build_methods(["eagle", "falcon"], models, swapped)
    assert isinstance(eagle, Skipped) and "block size 2" in eagle.reason and "k = 1" in eagle.reason
    assert isinstance(falcon, Skipped) and "no drafter checkpoint" in falcon.reason
    two = build_methods(["falcon"], models, drafter_dirs, trees=["chain-2", "chain-4"])
    assert [m.name for m in two] == ["falcon@chain-2", "falcon@chain-4"]
    assert all(isinstance(m, EngineMethod) for m in two) and [m.tree_nodes for m in two] == [2, 4]
    with pytest.raises(ValueError, match="unknown methods"):
        build_methods(["medusa"], models)
    with pytest.raises(RuntimeError, match="warm_up"):
        HFMethod("hf", models.hf_model, (0,), cache="auto").generate([1, 2], 2)


def test_multi_turn_uses_plain_answers(models):
    item = PromptItem("q", messages=(Message(role="user", content="Hi."),), turns=("Hi.", "And again?"))
    methods = build_methods(["vanilla"], models)
    res = Runner(methods, models.plain_engine, RunConfig(6, multi_turn=True, warm_up_tokens=2)).run(
        [PromptSet("mt", (item,))]
    )
    rows = res["benchmarks"]["mt"]["prompts"]
    assert [r["id"] for r in rows] == ["q/turn1", "q/turn2"] and [r["turn"] for r in rows] == [1, 2]
    answer = models.tokenizer.decode(rows[0]["results"]["vanilla"]["token_ids"], skip_special_tokens=True)
    want = encode(models.tokenizer, item, [answer], 1)
    assert rows[1]["prompt_tokens"] == len(want) > rows[0]["prompt_tokens"]


def test_report_files(results, tmp_path):
    fit = {
        "k": 2,
        "budgets": [{"nodes": n, "tokens_per_second": 10.0 + n} for n in (1, 2, 4)],
        "best": {"nodes": 4, "tokens_per_second": 14.0},
    }
    paths = write_report(results, tmp_path, fit)
    assert [p.name for p in paths] == [
        "bench.json",
        "bench.md",
        "speedup.png",
        "acceptance.png",
        "tokens_per_tree.png",
    ]
    for p in paths[2:]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert json.loads(paths[0].read_text())["order"] == results["order"]
    md = paths[1].read_text()
    assert "| falcon |" in md and "| hf-pld |" in md and "absent: no drafter checkpoint" in md
    assert "3/3 exact" in md
