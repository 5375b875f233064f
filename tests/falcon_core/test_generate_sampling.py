"""Speculative sampling through the whole engine reproduces the target's distribution.

A small-vocabulary target (V = 6) and a random SAR drafter (k = 2) over a multi-branch tree: the joint
distribution of the first three generated tokens (the first from the prefill, the next two from
speculative steps) is compared with the exact target joint by Pearson's chi-square test; the same test
with a deliberately broken acceptance rule must fail (test the test).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import falcon_core.verify as verify
from falcon_core.drafter import Drafter, DrafterConfig
from falcon_core.generate import Engine
from falcon_core.metrics import GenerationStats
from falcon_core.sampling import SamplingParams, logits_to_probs
from falcon_core.target import TargetModel, load_target
from falcon_core.tree import Tree

V = 6
RECORD = 3
SAMPLES = 20_000
PROMPT = [1, 4, 2, 5]
PARAMS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
TREE = Tree.from_spec("multi", {1: "root:0-2", 2: "0:0-1 1:0", 3: "00:0-1 01:0", 4: "000:0"})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny forwards: a second thread only adds synchronisation (8.6 ms a sample with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[TargetModel, Drafter]:
    torch.manual_seed(3)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        eos_token_id=None,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # target distributions far from uniform
    path = tmp_path_factory.mktemp("smallvocab") / "target"
    model.save_pretrained(path)
    target = load_target(path, dtype="fp32")
    torch.manual_seed(4)
    drafter = Drafter(DrafterConfig.from_target(target.config, block_size=2)).eval()
    return target, drafter


def exact_joint(target: TargetModel) -> torch.Tensor:
    """(V**RECORD,) exact probability of each sequence of the first RECORD tokens."""
    params = SamplingParams(**PARAMS)
    joint = torch.ones(1, dtype=torch.float64)
    seqs = [list(PROMPT)]
    for _ in range(RECORD):
        ids = torch.tensor(seqs)  # (S, P+j)
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        with torch.no_grad():
            logits = target(ids, pos).logits[:, -1]  # (S, V)
        probs = logits_to_probs(logits, params).double()  # (S, V)
        joint = (joint[:, None] * probs).reshape(-1)
        seqs = [[*s, t] for s in seqs for t in range(V)]
    return joint


def draw(target: TargetModel, drafter: Drafter, samples: int = SAMPLES) -> torch.Tensor:
    engine = Engine(target, None, drafter, TREE)
    codes = torch.empty(samples, dtype=torch.long)
    for i in range(samples):
        out: list[int] = []
        stats = GenerationStats()
        steps = engine._decode(PROMPT, RECORD, SamplingParams(**PARAMS, seed=i), True, stats)
        for new in steps:
            out += new
            if len(out) >= RECORD:
                break
        steps.close()
        code = 0
        for t in out[:RECORD]:
            code = code * V + t
        codes[i] = code
        assert stats.speculative_steps >= 1
    return codes


def chi_square_p(codes: torch.Tensor, joint: torch.Tensor) -> float:
    observed = torch.bincount(codes, minlength=joint.shape[0]).double()
    expected = joint * codes.shape[0]
    small = expected < 5  # pool sparse cells
    obs = torch.cat([observed[~small], observed[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    stat = (((obs - exp) ** 2) / exp)[keep].sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2.0))


@pytest.mark.slow
def test_engine_sampling_matches_target_distribution(world):
    target, drafter = world
    p = chi_square_p(draw(target, drafter), exact_joint(target))
    assert p > 0.01, p


@pytest.mark.slow
def test_broken_acceptance_rule_is_caught(world, monkeypatch):
    target, drafter = world
    monkeypatch.setattr(verify, "_residual", lambda q, d: q)  # forget to subtract the proposal
    p = chi_square_p(draw(target, drafter, samples=5_000), exact_joint(target))  # fails well before 20k
    assert p < 0.01, p
