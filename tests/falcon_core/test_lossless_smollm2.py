"""Lossless on the real SmolLM2-135M-Instruct: speculative greedy == plain greedy in fp32 over 12
MT-Bench prompts x 128 new tokens; in bf16 every divergence is a near-tie (falcon_core/lossless.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from falcon_core.chat import prompt_ids
from falcon_core.checkpoint import load_drafter
from falcon_core.data import read_mtbench
from falcon_core.drafter import Drafter, DrafterConfig
from falcon_core.generate import Engine, select_tree
from falcon_core.generate_cli import default_drafter
from falcon_core.lossless import check_against_plain
from falcon_core.metrics import GenerationStats
from falcon_core.resolve import DEFAULT_MODEL
from falcon_core.sampling import SamplingParams
from falcon_core.target import load_target
from falcon_core.tree import get_tree

MAX_NEW = 128
FP32_PROMPTS = 12
"""fp32 decoding is slow here (~13 s per 128 tokens): 12 prompts keep the suite within its budget; the
benchmark (`falcon bench`) checks every MT-Bench and GSM8K prompt it runs against plain greedy too."""


def greedy(engine: Engine, ids: list[int], speculative: bool) -> tuple[list[int], GenerationStats]:
    stats = GenerationStats()
    out: list[int] = []
    for new in engine._decode(ids, MAX_NEW, SamplingParams(), speculative, stats):
        out += new
        if len(out) >= MAX_NEW:
            break
    return out[:MAX_NEW], stats


def make_engine(path, dtype: str) -> Engine:
    """The committed default drafter when there is one, else a random k = 2 drafter."""
    target = load_target(path, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(path)
    trained = default_drafter(DEFAULT_MODEL)
    if trained is not None:
        ckpt = load_drafter(trained, dtype=dtype)
        return Engine(target, tok, ckpt.drafter.eval(), select_tree("auto", ckpt.card))
    torch.manual_seed(0)
    drafter = Drafter(DrafterConfig.from_target(target.config, block_size=2)).to(target.embed.weight.dtype)
    return Engine(target, tok, drafter.eval(), get_tree("chain-4"))


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer) -> list[list[int]]:
    qs = read_mtbench()[:20]
    return [prompt_ids(smollm2_tokenizer, [{"role": "user", "content": q.turns[0]}]) for q in qs]


@pytest.mark.slow
def test_fp32_speculative_equals_plain_on_mtbench(smollm2_path, prompts):
    engine = make_engine(smollm2_path, "fp32")
    taus = []
    for ids in prompts[:FP32_PROMPTS]:
        plain, _ = greedy(engine, ids, speculative=False)
        spec, stats = greedy(engine, ids, speculative=True)
        assert spec == plain
        assert stats.speculative_steps > 0
        taus.append(stats.tau)
    print(f"tau per prompt: {[round(t, 2) for t in taus]}")


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
