"""Draft vocabularies (`DrafterConfig.draft_vocab_size`): drafts come only from the subset, the subset
head picks what the full head restricted to the subset would, greedy decoding stays equal to plain
greedy, sampling keeps the target's distribution (q is zero outside the subset), and checkpoints
round-trip and refuse bad ids."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from falcon_core.checkpoint import TargetIdentity, load_drafter, save_drafter
from falcon_core.draft import DraftPlan, SARDrafter
from falcon_core.drafter import Drafter, DrafterConfig
from falcon_core.sampling import SamplingParams
from falcon_core.tree import get_tree
from tests.falcon_core.test_generate import make_tree, speculative_equals_plain, tiny_target
from tests.falcon_core.test_generate_sampling import V, chi_square_p, draw, exact_joint, world  # noqa: F401

SUBSET = 64


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return tiny_target(tmp_path_factory.mktemp("tiny-dv"))


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 512, (L,), generator=g).tolist() for L in (3, 29)]


def subset_drafter(target, k: int, n: int = SUBSET, seed: int = 0) -> Drafter:
    torch.manual_seed(seed)
    drafter = Drafter(DrafterConfig.from_target(target.config, block_size=k, draft_vocab_size=n)).eval()
    drafter.set_draft_vocab(torch.randperm(target.config.vocab_size)[:n])
    return drafter


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("tree", ["chain-4", "kmask2_8layer_tree", "fitted"])
def test_greedy_with_a_draft_vocabulary_equals_plain_greedy(target, prompts, k, tree):
    runs = speculative_equals_plain(target, subset_drafter(target, k, seed=k), make_tree(tree), prompts, 32)
    assert all(stats.speculative_steps > 0 for stats in runs)


class RestrictedFullHead(SARDrafter):
    """Reference for greedy drafting: the whole lm_head, then -inf outside the draft vocabulary."""

    def _choose(self, out, first_row, nodes, node_tokens, probs_rows, params, generator) -> None:
        inside = torch.isin(torch.arange(self.vocab_size), self.drafter.draft_vocab)  # (V,)
        logits = self.target.lm_head(out).float().masked_fill(~inside, float("-inf"))  # (R, V)
        top = logits.topk(self.plan.max_rank + 1, dim=-1).indices  # (R, m)
        node_tokens[nodes] = top[self.plan.node_row[nodes] - first_row, self.plan.node_rank[nodes]]


@pytest.mark.parametrize("greedy", [True, False])
def test_drafts_come_from_the_subset_and_match_the_restricted_full_head(target, greedy):
    drafter = subset_drafter(target, 2)
    ids = drafter.draft_vocab
    plan = DraftPlan.build(get_tree("kmask2_8layer_tree"), 2)
    prompt = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = target(prompt[None], torch.arange(20)[None]).hidden[0]  # (20, H)
        tokens = torch.cat((prompt, torch.tensor([5])))  # t_0..t_20
        params = SamplingParams() if greedy else SamplingParams(temperature=0.8, top_p=0.9)
        sub = SARDrafter(drafter, target, plan, 64).propose(features, tokens, 20, params, torch.Generator())
    assert sub is not None and torch.isin(sub.tokens, ids).all()
    if greedy:  # the same drafter reading the whole head, with tokens outside the subset masked away
        with torch.no_grad():
            ref = RestrictedFullHead(drafter, target, plan, 64).propose(features, tokens, 20, params)
        assert torch.equal(sub.tokens, ref.tokens)
    else:  # q is a distribution over the whole vocabulary, zero outside the subset
        q = sub.draft_probs
        assert q.shape[-1] == 512
        assert torch.allclose(q.sum(-1), torch.ones(q.shape[0]))
        outside = ~torch.isin(torch.arange(512), ids)
        assert float(q[:, outside].abs().sum()) == 0.0


@pytest.mark.slow
def test_sampling_with_a_draft_vocabulary_matches_the_target_distribution(world):  # noqa: F811
    """The subset leaves out two of the six tokens, so the target often samples outside it."""
    target, _ = world
    torch.manual_seed(4)
    drafter = Drafter(DrafterConfig.from_target(target.config, block_size=2, draft_vocab_size=4)).eval()
    drafter.set_draft_vocab(torch.tensor([0, 2, 3, 5]))
    assert V == 6
    p = chi_square_p(draw(target, drafter, samples=10_000), exact_joint(target))
    assert p > 0.01, p


def test_checkpoint_round_trip_and_bad_ids(target, tmp_path):
    drafter = subset_drafter(target, 2)
    identity = TargetIdentity("tiny", target.config.hidden_size, target.config.vocab_size, "0" * 64)
    path = save_drafter(tmp_path / "d", drafter, drafter.config, identity)
    assert json.loads((path / "config.json").read_text())["drafter"]["draft_vocab_size"] == SUBSET
    loaded = load_drafter(path, dtype="bf16")
    assert loaded.drafter.draft_vocab.dtype == torch.long
    assert torch.equal(loaded.drafter.draft_vocab, drafter.draft_vocab.sort().values)

    state = load_file(str(path / "model.safetensors"))
    state["draft_vocab"][1] = state["draft_vocab"][0]  # a duplicate id
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.safetensors: draft vocabulary ids must be distinct"):
        load_drafter(path)
    state["draft_vocab"][1] = 10_000  # outside the vocabulary
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"must be in \[0, 512\)"):
        load_drafter(path)
    state["draft_vocab"] = state["draft_vocab"].float()
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="integer token ids"):
        load_drafter(path)


def test_config_and_setter_errors(target):
    with pytest.raises(ValueError, match="draft_vocab_size must be in"):
        DrafterConfig.from_target(target.config, draft_vocab_size=513)
    plain = Drafter(DrafterConfig.from_target(target.config))
    with pytest.raises(ValueError, match="whole vocabulary"):
        plain.set_draft_vocab(torch.arange(4))
    d = Drafter(dataclasses.replace(plain.config, draft_vocab_size=4))
    with pytest.raises(ValueError, match="must hold 4 ids"):
        d.set_draft_vocab(torch.arange(5))
