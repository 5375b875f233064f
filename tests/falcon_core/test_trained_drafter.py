"""Speculative greedy == plain greedy (fp32) with *trained* drafters, k = 1, 2, 3, on both published trees,
a chain and a fitted tree (the oracle and random drafters of the same matrix are in test_generate.py).

The drafters are distilled here, in process, with the project's own objective (`pipelines.csgd.csgd_loss`:
CSGD for k >= 2, the EAGLE-style pass for k = 1) on the tiny target's own greedy continuations
(self-distillation), for 150 Adam steps, and decode prefixes of those continuations: there they beat
a random drafter by a wide margin (asserted: tau ~2 on a chain of 4 against ~1), so accepted paths
are long and varied, which is what the check needs (generalisation is not what is tested here).
"""

from __future__ import annotations

import pytest
import torch

from falcon_core.drafter import Drafter, DrafterConfig
from falcon_core.generate import Engine
from falcon_core.target import TargetModel
from pipelines.config import ObjectiveSection
from pipelines.csgd import Batch, TokenHead, csgd_loss
from tests.falcon_core.test_generate import (
    TREES,
    decode,
    drafter_for,
    make_tree,
    speculative_equals_plain,
    tiny_target,
)

STEPS = 150
PROMPT_LEN, NEW = 6, 58


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> TargetModel:
    return tiny_target(tmp_path_factory.mktemp("trained"), vocab=512, seed=0)


def continuations(target: TargetModel, count: int, seed: int) -> list[list[int]]:
    """Random prompts followed by the target's plain greedy continuation."""
    g = torch.Generator().manual_seed(seed)
    plain = Engine(target, None)
    out = []
    for _ in range(count):
        ids = torch.randint(0, target.config.vocab_size, (PROMPT_LEN,), generator=g).tolist()
        out.append(ids + decode(plain, ids, NEW, speculative=False)[0])
    return out


@pytest.fixture(scope="module")
def data(target) -> Batch:
    seqs = torch.tensor(continuations(target, 16, seed=100))  # (B, T)
    B, T = seqs.shape
    with torch.no_grad():
        hidden = target(seqs, torch.arange(T).expand(B, T)).hidden  # (B, T, H)
    loss_mask = torch.arange(T).expand(B, T) >= PROMPT_LEN  # (B, T): the generated part
    return Batch(seqs, hidden, loss_mask, torch.full((B,), T))


@pytest.fixture(scope="module")
def trained(target, data) -> dict[int, Drafter]:
    head = TokenHead.build(target.lm_head.weight)
    embed = target.embed.weight.detach()
    drafters = {}
    for k in (1, 2, 3):
        torch.manual_seed(k)
        drafter = Drafter(DrafterConfig.from_target(target.config, block_size=k))
        cfg = ObjectiveSection(csgd=k > 1, noise=0.0)
        opt = torch.optim.Adam(drafter.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(k)
        for step in range(STEPS):
            rows = torch.randint(0, data.input_ids.shape[0], (8,), generator=g)
            batch = Batch(data.input_ids[rows], data.hidden[rows], data.loss_mask[rows], data.lengths[rows])
            out = csgd_loss(drafter, embed, head, batch, cfg, k, 0.45 * (1 - step / STEPS), g)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        drafters[k] = drafter.eval().requires_grad_(False)
    return drafters


@pytest.fixture(scope="module")
def prompts(data) -> list[list[int]]:
    """Prefixes of training sequences (prompt only, and prompt plus some of its continuation)."""
    return [data.input_ids[i, :n].tolist() for i, n in ((0, 6), (5, 12), (9, 30))]


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("tree", TREES)
def test_trained_drafter_is_lossless(target, trained, prompts, k, tree):
    runs = speculative_equals_plain(target, trained[k], make_tree(tree), prompts, 40)
    assert all(stats.speculative_steps > 0 for stats in runs)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_the_drafters_are_trained(target, trained, prompts, k):
    """Trained beats random by a wide margin (the chain of depth 4)."""
    taus = {}
    for name, drafter in (("trained", trained[k]), ("random", drafter_for(target, k, seed=k))):
        engine = Engine(target, None, drafter, make_tree("chain-4"))
        forwards = tokens = 0
        for ids in prompts:
            _, stats = decode(engine, ids, 40)
            forwards, tokens = forwards + stats.target_forwards, tokens + stats.decode_tokens
        taus[name] = tokens / forwards
    assert taus["trained"] > 1.5 and taus["trained"] > taus["random"] + 0.5, taus
