"""SAR drafting (`falcon_core.draft.SARDrafter`) against a direct reading of FALCON.md, in fp32.

The reference drafts a tree one root-to-anchor path at a time with *uncached* drafter forwards: the
context pairs `(f_i, t_{i+1})` at positions `0..n-1`, then, for a block anchored at a node of depth
`(p-1)K`, the path tokens at depths `(p-2)K+1..(p-1)K` paired with the output features of the block
they were drawn from, at positions `n + depth - 1`; one block-causal mask over the whole sequence
(blocks right-aligned, so the context's last block ends at the bonus token and each tree block sees
the context, its ancestor blocks and itself). A node's token is rank `ranks[i]` of its row's logits.
The engine's drafter (cache, scratch rows, batched tree passes, ancestor masks) must pick the same
tokens for every node, for k = 1, 2, 3, both published trees and a chain.
"""

from __future__ import annotations

import pytest
import torch

from falcon_core.draft import DraftPlan, SARDrafter
from falcon_core.drafter import Drafter, DrafterConfig
from falcon_core.masks import block_causal_mask
from falcon_core.sampling import SamplingParams
from falcon_core.target import TargetModel
from falcon_core.tree import Tree, get_tree
from tests.falcon_core.test_generate import tiny_target


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> TargetModel:
    return tiny_target(tmp_path_factory.mktemp("draft"), vocab=512, seed=2)


def context(target: TargetModel, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """features (n, H) of a random prompt t_0..t_{n-1}, and tokens (n+1,) with the bonus token t_n."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, target.config.vocab_size, (n,), generator=g)
    with torch.no_grad():
        out = target(ids[None], torch.arange(n)[None])
    bonus = out.logits[0, -1].argmax()
    return out.hidden[0], torch.cat((ids, bonus[None]))


def ancestor_at(tree: Tree, i: int, depth: int) -> int:
    """The ancestor of node i (or i itself) at `depth`; -1 for depth 0 (the root)."""
    while i >= 0 and tree.depths[i] > depth:
        i = tree.parents[i]
    return i


@torch.no_grad()
def reference_tokens(drafter: Drafter, target: TargetModel, tree: Tree, k: int, features, tokens, n) -> list:
    seqs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    outs: dict[int, torch.Tensor] = {}

    def run(anchor: int, emb, feats, pos) -> None:
        L = emb.shape[0]
        out = drafter(emb[None], feats[None], pos[None], None, 0, block_causal_mask(L, k))[0]  # (L, H)
        seqs[anchor], outs[anchor] = (emb, feats, pos), out[L - k :]  # rows: depths of the next block

    run(-1, target.embed(tokens[1 : n + 1]), features[:n], torch.arange(n))
    node_tokens: list[int] = []
    for i in range(tree.num_nodes):
        d = tree.depths[i]
        anchor = ancestor_at(tree, i, (d - 1) // k * k)
        if anchor not in outs:  # the block anchored at `anchor`: its path block appended to its parent's
            up = ancestor_at(tree, anchor, tree.depths[anchor] - k)  # the block the path came from
            emb, feats, pos = seqs[up]
            path = [anchor]
            while len(path) < k:
                path.append(tree.parents[path[-1]])
            path.reverse()  # depths (p-2)K+1 .. (p-1)K
            new_emb = target.embed(torch.tensor([node_tokens[j] for j in path]))  # (K, H)
            new_feats = outs[up][[(tree.depths[j] - 1) % k for j in path]]  # (K, H)
            new_pos = torch.tensor([n + tree.depths[j] - 1 for j in path])
            run(anchor, torch.cat((emb, new_emb)), torch.cat((feats, new_feats)), torch.cat((pos, new_pos)))
        logits = target.lm_head(outs[anchor][(d - 1) % k])  # (V,)
        node_tokens.append(int(logits.topk(tree.ranks[i] + 1).indices[-1]))
    return node_tokens


def make_drafter(target: TargetModel, k: int, layers: int, fusion: str) -> Drafter:
    torch.manual_seed(10 * k + layers)
    cfg = DrafterConfig.from_target(target.config, block_size=k, num_layers=layers, fusion=fusion)
    drafter = Drafter(cfg).eval()
    with torch.no_grad():  # spread the logits, so that ranks are not near-ties
        for p in drafter.parameters():
            p.mul_(3.0)
    return drafter


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("tree_name", ["kmask2_8layer_tree", "kmask2_8layer_tree_3", "chain-5"])
@pytest.mark.parametrize(("layers", "fusion"), [(1, "linear"), (2, "lstm")])
def test_first_step_equals_uncached_reference(target, k, tree_name, layers, fusion):
    tree = get_tree(tree_name)
    drafter = make_drafter(target, k, layers, fusion)
    features, tokens = context(target, 37, seed=k)
    sar = SARDrafter(drafter, target, DraftPlan.build(tree, k), 64)
    with torch.no_grad():
        got = sar.propose(features, tokens, 37, SamplingParams())
    assert got is not None and got.passes == 1 + len(DraftPlan.build(tree, k).tree_passes)
    assert got.tokens.tolist() == reference_tokens(drafter, target, tree, k, features, tokens, 37)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_later_steps_reuse_the_context_cache(target, k):
    """One drafter layer: the cached context K/V do not depend on block alignment, so after committing
    more context the cached drafter still equals the uncached reference over the whole context."""
    tree = get_tree("kmask2_8layer_tree")
    drafter = make_drafter(target, k, 1, "linear")
    features, tokens = context(target, 60, seed=7)
    sar = SARDrafter(drafter, target, DraftPlan.build(tree, k), 80)
    with torch.no_grad():
        for n in (30, 31, 35, 42, 60):  # steps accepting 1, 4, 7 and 18 tokens
            tok_n = tokens[: n + 1].clone()
            got = sar.propose(features[:n], tok_n, n, SamplingParams())
            assert got.tokens.tolist() == reference_tokens(drafter, target, tree, k, features, tok_n, n), n


def test_no_draft_before_a_full_block(target):
    drafter = make_drafter(target, 3, 1, "linear")
    features, tokens = context(target, 5, seed=1)
    sar = SARDrafter(drafter, target, DraftPlan.build(get_tree("chain-3"), 3), 16)
    assert sar.propose(features[:2], tokens[:3], 2, SamplingParams()) is None
    assert sar.propose(features[:3], tokens[:4], 3, SamplingParams()) is not None
