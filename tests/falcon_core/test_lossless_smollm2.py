"""Lossless on the real SmolLM2-135M-Instruct: speculative greedy == plain greedy in fp32 over 20
MT-Bench prompts x 128 new tokens (the committed trained k = 2 drafter with its fitted tree); in bf16
every divergence is a near-tie (falcon_core/lossless.py)."""

from __future__ import annotations

import time

import pytest
from transformers import AutoTokenizer

from falcon_core.chat import prompt_ids
from falcon_core.checkpoint import load_drafter
from falcon_core.data import read_mtbench
from falcon_core.generate import Engine, select_tree
from falcon_core.generate_cli import default_drafter
from falcon_core.lossless import check_against_plain
from falcon_core.metrics import GenerationStats
from falcon_core.resolve import DEFAULT_MODEL
from falcon_core.sampling import SamplingParams
from falcon_core.target import load_target

MAX_NEW = 128
FP32_PROMPTS = 20
"""Issue 3 asks for at least 20 MT-Bench prompts x 128 new tokens in fp32. One plain and one speculative
pass per prompt (the plain pass is the reference; nothing cheaper is equivalent): the slowest test of
the suite (503 s at load average 1-4 on the 2 shared cores, 1821 s at 5-15). Marked slow; CI runs it."""


def greedy(engine: Engine, ids: list[int], speculative: bool) -> tuple[list[int], GenerationStats]:
    stats = GenerationStats()
    out: list[int] = []
    for new in engine._decode(ids, MAX_NEW, SamplingParams(), speculative, stats):
        out += new
        if len(out) >= MAX_NEW:
            break
    return out[:MAX_NEW], stats


def make_engine(path, dtype: str) -> Engine:
    """The committed trained default drafter (k = 2) with the tree fitted to it (`--tree auto`)."""
    target = load_target(path, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(path)
    trained = default_drafter(DEFAULT_MODEL)
    assert trained is not None, "the trained default drafter (models/) is committed and must be here"
    ckpt = load_drafter(trained, dtype=dtype)
    tree = select_tree("auto", ckpt.card)
    assert ckpt.card.get("acceptance") and tree.name == "auto", "the card holds the fitted tree's statistics"
    return Engine(target, tok, ckpt.drafter.eval(), tree)


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer) -> list[list[int]]:
    qs = read_mtbench()[:FP32_PROMPTS]
    assert len(qs) == FP32_PROMPTS
    return [prompt_ids(smollm2_tokenizer, [{"role": "user", "content": q.turns[0]}]) for q in qs]


@pytest.mark.slow
def test_fp32_speculative_equals_plain_on_mtbench(smollm2_path, prompts):
    engine = make_engine(smollm2_path, "fp32")
    assert engine.drafter.config.block_size == 2
    taus, start = [], time.perf_counter()
    for i, ids in enumerate(prompts):
        plain, _ = greedy(engine, ids, speculative=False)
        spec, stats = greedy(engine, ids, speculative=True)
        assert len(plain) == MAX_NEW
        assert spec == plain, f"MT-Bench prompt {i}: speculative greedy differs from plain greedy"
        assert stats.speculative_steps > 0
        taus.append(stats.tau)
    seconds = time.perf_counter() - start
    print(
        f"fp32 {len(prompts)} prompts x {MAX_NEW} tokens in {seconds:.0f} s; tau {[round(t, 2) for t in taus]}"
    )


@pytest.mark.slow
def test_bf16_divergences_are_near_ties(smollm2_path, prompts):
    engine = make_engine(smollm2_path, "bf16")
    checks = []
    for ids in prompts[:6]:
        plain, _ = greedy(engine, ids, speculative=False)
        spec, _ = greedy(engine, ids, speculative=True)
        checks.append(check_against_plain(engine, ids, plain, spec))
    bad = [c for c in checks if not c.ok]
    assert not bad, bad
    print(f"bf16 exact {sum(c.exact for c in checks)}/{len(checks)}; gaps {[c.top2_gap for c in checks]}")
