"""Tree verification: greedy on hand-made cases and against a per-path reference; rejection sampling
checked statistically against the exact target distribution, with broken rules shown to fail."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from falcon_core import verify
from falcon_core.tree import Tree, TreeBuffers, block_anchors, get_tree
from falcon_core.verify import VerifyResult, verify_greedy, verify_sampling

# nodes: 0,1,2 (d1) 3:00 4:01 5:10 (d2) 6:000 7:001 8:010 9:100 (d3); rows are node + 1
SMALL = Tree.from_spec("small", {1: "root:0-2", 2: "0:0-1 1:0", 3: "00:0-1 01:0 10:0"})


def _logits_with_argmax(argmax: list[int], vocab: int = 10) -> torch.Tensor:
    logits = torch.zeros(len(argmax), vocab)  # (1+N, V)
    logits[torch.arange(len(argmax)), torch.tensor(argmax)] = 5.0
    return logits


# ---------------------------------------------------------------- VerifyResult


def test_make_dummy_and_shape_check() -> None:
    r = VerifyResult.make_dummy(num_accepted=2, next_token=7)
    assert r.accepted.tolist() == [0, 1, 2] and r.next_token == 7 and r.num_accepted == 2
    with pytest.raises(ValueError, match=r"need \(2,\)"):
        VerifyResult(accepted=torch.arange(3), next_token=0, num_accepted=1)


# ---------------------------------------------------------------- greedy


def test_greedy_all_wrong_gives_only_bonus() -> None:
    b = TreeBuffers.from_tree(SMALL)
    tokens = torch.full((10,), 9)
    res = verify_greedy(b, tokens, _logits_with_argmax([3] * 11))
    assert res.accepted.tolist() == [0] and res.num_accepted == 0 and res.next_token == 3


def test_greedy_picks_longest_path() -> None:
    b = TreeBuffers.from_tree(SMALL)
    # root argmax 2: node 1 (rank 1) matches; its child node 5 (10) must match row 2's argmax 4,
    # then node 9 (100) must match row 6's argmax 6. Node 0 (rank 0) is wrong, so 00.. never counts.
    tokens = torch.tensor([1, 2, 3, 0, 0, 4, 5, 5, 5, 6])
    argmax = [2, 0, 4, 0, 0, 0, 6, 0, 0, 0, 8]
    res = verify_greedy(b, tokens, _logits_with_argmax(argmax))
    assert res.accepted.tolist() == [0, 2, 6, 10] and res.num_accepted == 3 and res.next_token == 8


def test_greedy_ties_take_first_path_and_partial_paths() -> None:
    b = TreeBuffers.from_tree(SMALL)
    # nodes 0 and 1 carry the same token (a duplicate sibling): both depth-1 paths accept 1; the first
    # (through node 0) wins. Its children 3, 4 are wrong.
    tokens = torch.tensor([5, 5, 1, 9, 9, 9, 9, 9, 9, 9])
    res = verify_greedy(b, tokens, _logits_with_argmax([5, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0]))
    assert res.accepted.tolist() == [0, 1] and res.next_token == 2


def test_greedy_chain_all_right_and_empty_tree() -> None:
    b = TreeBuffers.from_tree(Tree.chain(3))
    res = verify_greedy(b, torch.tensor([4, 5, 6]), _logits_with_argmax([4, 5, 6, 7]))
    assert res.accepted.tolist() == [0, 1, 2, 3] and res.next_token == 7
    empty = TreeBuffers.from_tree(Tree.chain(0))
    res = verify_greedy(empty, torch.zeros(0, dtype=torch.long), _logits_with_argmax([3]))
    assert res.accepted.tolist() == [0] and res.next_token == 3


def _greedy_reference(tree: Tree, tokens: list[int], argmax: list[int]) -> tuple[list[int], int]:
    """Per-path Python loop: longest accepted prefix over leaves in order, first on ties."""
    b = TreeBuffers.from_tree(tree)
    best: list[int] = [0]
    for row in b.paths.tolist():
        acc = [0]
        for r in row[1:]:
            if r < 0 or tokens[r - 1] != argmax[acc[-1]]:
                break
            acc.append(r)
        if len(acc) > len(best):
            best = acc
    return best, argmax[best[-1]]


@pytest.mark.parametrize("name", ["kmask2_8layer_tree", "kmask2_8layer_tree_3", "chain-5"])
def test_greedy_matches_reference(name: str) -> None:
    tree = get_tree(name)
    b = TreeBuffers.from_tree(tree)
    g = torch.Generator().manual_seed(0)
    n, vocab = tree.num_nodes, 4  # a tiny vocabulary makes long accepted paths common
    for _ in range(200):
        logits = torch.randn(n + 1, vocab, generator=g)  # (1+N, V)
        tokens = torch.randint(0, vocab, (n,), generator=g)  # (N,)
        res = verify_greedy(b, tokens, logits)
        want, bonus = _greedy_reference(tree, tokens.tolist(), logits.argmax(-1).tolist())
        assert res.accepted.tolist() == want and res.next_token == bonus


def test_shape_errors() -> None:
    b = TreeBuffers.from_tree(SMALL)
    with pytest.raises(ValueError, match=r"tokens must be a \(10,\) long"):
        verify_greedy(b, torch.zeros(9, dtype=torch.long), torch.zeros(11, 4))
    with pytest.raises(ValueError, match=r"target_logits must have shape \(11, V\)"):
        verify_greedy(b, torch.zeros(10, dtype=torch.long), torch.zeros(10, 4))
    probs = torch.full((11, 4), 0.25)
    with pytest.raises(ValueError, match=r"draft_probs must have shape \(M, 4\)"):
        verify_sampling(b, torch.zeros(10, dtype=torch.long), probs, None)
    with pytest.raises(ValueError, match=r"dist_of_row\[0\] = 5 is outside \[0, 2\)"):
        verify_sampling(b, torch.zeros(10, dtype=torch.long), probs, probs[:2], torch.full((11,), 5))
    with pytest.raises(ValueError, match="candidates must be"):
        verify_sampling(b, torch.zeros(10, dtype=torch.long), probs, probs, candidates="top")  # type: ignore[arg-type]


def test_sampling_with_point_mass_target_equals_greedy() -> None:
    """Temperature 0 through the sampling rule: one-hot targets give the greedy path and bonus."""
    tree = get_tree("kmask2_8layer_tree_3")
    b = TreeBuffers.from_tree(tree)
    g = torch.Generator().manual_seed(0)
    n, vocab = tree.num_nodes, 30
    for _ in range(30):
        tokens = torch.empty(n, dtype=torch.long)  # (N,) distinct among siblings, as drafting gives
        logits = torch.randn(n + 1, vocab, generator=g)  # (1+N, V)
        for row, kids in enumerate(b.children):
            if kids:
                tokens[[c - 1 for c in kids]] = torch.randperm(vocab, generator=g)[: len(kids)]
                if torch.rand(1, generator=g) < 0.7:  # make the target agree with some child often
                    pick = kids[int(torch.randint(len(kids), (1,), generator=g))]
                    logits[row, tokens[pick - 1]] += 10.0
        onehot = torch.nn.functional.one_hot(logits.argmax(-1), vocab).float()  # (1+N, V)
        draft = torch.softmax(torch.randn(n + 1, vocab, generator=g), -1)  # (1+N, V)
        greedy = verify_greedy(b, tokens, logits)
        for mode in ("sampled", "deterministic"):
            res = verify_sampling(b, tokens, onehot, draft, generator=g, candidates=mode)
            assert res.accepted.tolist() == greedy.accepted.tolist()
            assert res.next_token == greedy.next_token


def test_residual_and_without_edge_cases() -> None:
    q = torch.tensor([0.2, 0.3, 0.5])
    assert torch.equal(verify._residual(q, q.clone()), q)  # no mass left: q kept, no NaN
    torch.testing.assert_close(verify._residual(q, torch.tensor([0.4, 0.4, 0.2])), torch.tensor([0, 0, 1.0]))
    point = torch.tensor([0.0, 1.0, 0.0])
    assert verify._without(point, 1).tolist() == [0, 0, 0]  # all mass used: zeros, no NaN
    torch.testing.assert_close(verify._without(q, 2), torch.tensor([0.4, 0.6, 0.0]))


def _two_children_of_root() -> TreeBuffers:
    return TreeBuffers.from_tree(Tree.from_spec("two", {1: "root:0-1"}))


def test_sampling_never_emits_a_token_the_target_excludes() -> None:
    b = _two_children_of_root()
    q = torch.tensor([[0.0, 0.5, 0.5, 0.0]] + [[0.25] * 4] * 2)  # (3, V) root row excludes token 0
    d = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 3)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        res = verify_sampling(b, torch.tensor([0, 3]), q, d, generator=g)
        assert res.accepted.tolist() == [0] and res.next_token in (1, 2)


def test_sampling_duplicate_sibling_is_skipped() -> None:
    b = _two_children_of_root()
    q = torch.tensor([[0.0, 0.5, 0.5, 0.0]] + [[0.25] * 4] * 2)
    d = torch.tensor([[0.0, 0.5, 0.5, 0.0]] * 3)  # q == d at the root
    g = torch.Generator().manual_seed(0)
    for _ in range(50):  # q == d: the first candidate is always accepted, duplicates never matter
        res = verify_sampling(b, torch.tensor([2, 2]), q, d, generator=g)
        assert res.accepted.tolist() == [0, 1]
    d_miss = torch.tensor([[0.1, 0.0, 0.9, 0.0]] * 3)
    seen = set()
    for _ in range(300):
        res = verify_sampling(b, torch.tensor([2, 2]), q, d_miss, generator=g)
        assert res.accepted.tolist() in ([0], [0, 1])  # the duplicate (row 2) is never accepted
        seen.add(res.num_accepted)
    assert seen == {0, 1}


def test_sampling_empty_tree_samples_the_target() -> None:
    b = TreeBuffers.from_tree(Tree.chain(0))
    q = torch.tensor([[0.0, 0.0, 1.0]])
    res = verify_sampling(b, torch.zeros(0, dtype=torch.long), q, None, candidates="deterministic")
    assert res.accepted.tolist() == [0] and res.next_token == 2


# ---------------------------------------------------------------- statistical test

VOCAB = 6
BLOCK = 2  # k = 2: depths 1-2 come from the root's block, depth 3 from the depth-2 node's block
TRIALS = 20_000
RECORD = 3  # emitted tokens compared with the target's exact joint distribution


@dataclass(frozen=True)
class World:
    """Fixed random target and drafter; distributions indexed by base-VOCAB prefix code."""

    target: list[torch.Tensor]
    """target[L]: (V**L, V) the target's next-token distribution after a prefix of L tokens."""
    drafter: dict[tuple[int, int], torch.Tensor]
    """(anchor prefix length L, offset j in 1..k) -> (V**L, V): the block anchored after L tokens, its
    j-th output. It does not see the tokens drafted inside its own block (SAR)."""


def _random_dists(rows: int, g: torch.Generator, scale: float) -> torch.Tensor:
    return torch.softmax(scale * torch.randn(rows, VOCAB, generator=g, dtype=torch.float64), -1).float()


def _make_world(depth: int) -> World:
    g = torch.Generator().manual_seed(1234)
    target = [_random_dists(VOCAB**n, g, 1.5) for n in range(max(depth, RECORD) + 1)]
    drafter = {
        (n, j): _random_dists(VOCAB**n, g, 1.5) for n in range(0, depth, BLOCK) for j in range(1, BLOCK + 1)
    }
    return World(target=target, drafter=drafter)


def _draft(tree: Tree, world: World, trials: int, sampled: bool, g: torch.Generator, by_rank: bool = False):
    """SAR drafting for `trials` independent steps at once.

    Each (anchor, depth) block output gives one candidate list: a sequence of draws without replacement
    (Gumbel top-k) when sampled, the sorted list otherwise. Every parent under that output takes its
    children from the same list: its first m draws in rank order (`Tree.draw_index`, sampled) or the
    listed ranks (top). `by_rank` takes sampled draw number `rank` instead (wrong where ranks skip).
    Returns tokens (T, N), target_probs (T, 1+N, V), draft_probs (T, M, V), dist_of_row (1+N,).
    """
    n = tree.num_nodes
    anchors = block_anchors(tree, BLOCK)
    codes = torch.zeros(trials, n + 1, dtype=torch.long)  # (T, 1+N) base-V code of each row's prefix
    tokens = torch.empty(trials, n, dtype=torch.long)  # (T, N)
    lists: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}
    dists: list[torch.Tensor] = []
    dist_of_row = [-1] * (n + 1)
    for i in range(n):
        depth, parent_row = tree.depths[i], tree.parents[i] + 1
        key = (anchors[i], depth)
        if key not in lists:
            a_len = tree.depths[anchors[i]] if anchors[i] >= 0 else 0
            dist = world.drafter[(a_len, depth - a_len)][codes[:, anchors[i] + 1]]  # (T, V)
            if sampled:
                u = torch.rand(trials, VOCAB, generator=g).clamp_min(1e-12)  # (T, V)
                order = (dist.log() - (-u.log()).log()).argsort(-1, descending=True)  # (T, V)
            else:
                order = torch.sort(dist, stable=True, dim=-1, descending=True).indices  # (T, V)
            lists[key] = (len(dists), order)
            dists.append(dist)
        gid, order = lists[key]
        dist_of_row[parent_row] = gid
        pick = tree.draw_index[i] if sampled and not by_rank else tree.ranks[i]
        tokens[:, i] = order[:, pick]
        codes[:, i + 1] = codes[:, parent_row] * VOCAB + tokens[:, i]
    row_depth = [0, *tree.depths]
    target_probs = torch.stack([world.target[row_depth[r]][codes[:, r]] for r in range(n + 1)], 1)
    return tokens, target_probs, torch.stack(dists, 1), torch.tensor(dist_of_row)


def _emit(
    tree: Tree, world: World, sampled: bool, candidates: str, seed: int, by_rank: bool = False
) -> torch.Tensor:
    """(TRIALS, RECORD) first tokens emitted per step, topped up with plain target sampling."""
    g = torch.Generator().manual_seed(seed)
    buffers = TreeBuffers.from_tree(tree)
    tokens, target_probs, draft_probs, dist_of_row = _draft(tree, world, TRIALS, sampled, g, by_rank)
    out = torch.full((TRIALS, RECORD), -1, dtype=torch.long)  # (T, RECORD)
    for t in range(TRIALS):
        res = verify_sampling(
            buffers, tokens[t], target_probs[t], draft_probs[t], dist_of_row, g, candidates=candidates
        )
        seq = [*tokens[t][res.accepted[1:] - 1].tolist(), res.next_token][:RECORD]
        out[t, : len(seq)] = torch.tensor(seq)
    code = torch.zeros(TRIALS, dtype=torch.long)  # (T,)
    for j in range(RECORD):
        missing = out[:, j] < 0  # (T,)
        probs = world.target[j][code[missing]]  # (m, V)
        out[missing, j] = torch.multinomial(probs, 1, generator=g).squeeze(-1)
        code = code * VOCAB + out[:, j]
    return out


def _chi_square_p(samples: torch.Tensor, world: World) -> float:
    """p-value of Pearson's chi-square test of emitted sequences against the exact target joint."""
    joint = world.target[0][0].double()  # (V,)
    for j in range(1, RECORD):
        joint = (joint[:, None] * world.target[j].double()).reshape(-1)  # (V**(j+1),)
    code = torch.zeros(samples.shape[0], dtype=torch.long)
    for j in range(RECORD):
        code = code * VOCAB + samples[:, j]
    observed = torch.bincount(code, minlength=VOCAB**RECORD).double()  # (V**RECORD,)
    expected = joint * samples.shape[0]
    small = expected < 5  # pool sparse cells into one
    obs = torch.cat([observed[~small], observed[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    stat = (((obs - exp) ** 2) / exp)[keep].sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2.0))


SAR_TREE = Tree.from_spec("sar", {1: "root:0-2", 2: "0:0-2 1:0-1 2:0", 3: "00:0-1 01:0 10:0"})


def _p_value(candidates: str, sampled: bool) -> float:
    world = _make_world(SAR_TREE.max_depth)
    return _chi_square_p(_emit(SAR_TREE, world, sampled, candidates, seed=7), world)


def test_chi_square_helper_accepts_plain_target_sampling() -> None:
    world = _make_world(RECORD)
    g = torch.Generator().manual_seed(3)
    out = torch.empty(TRIALS, RECORD, dtype=torch.long)
    code = torch.zeros(TRIALS, dtype=torch.long)
    for j in range(RECORD):
        out[:, j] = torch.multinomial(world.target[j][code], 1, generator=g).squeeze(-1)
        code = code * VOCAB + out[:, j]
    assert _chi_square_p(out, world) > 0.01
    # and a sampler off by a little is caught: drop token 0 at the first position
    biased = out.clone()
    biased[biased[:, 0] == 0, 0] = 1
    assert _chi_square_p(biased, world) < 1e-6


def test_sampling_is_lossless_sampled_candidates() -> None:
    p = _p_value("sampled", sampled=True)
    assert p > 0.01, p


def test_sampling_is_lossless_deterministic_candidates() -> None:
    p = _p_value("deterministic", sampled=False)
    assert p > 0.01, p


def test_broken_rule_no_residual_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify, "_residual", lambda q, d: q)
    p = _p_value("sampled", sampled=True)
    assert p < 0.01, p


def test_broken_rule_with_replacement_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify, "_without", lambda d, x: d)
    p = _p_value("sampled", sampled=True)
    assert p < 0.01, p


def test_top_candidates_with_draft_as_given_fails() -> None:
    """Top-m candidates verified as if sampled from d: the reason `candidates="deterministic"` exists."""
    p = _p_value("sampled", sampled=False)
    assert p < 0.01, p


SKIP_TREE = Tree.from_spec("skip", {1: "root:0,2-3", 2: "0:0,2 2:0", 3: "00:0-1"})


@pytest.mark.parametrize("by_rank", [False, True], ids=["draw_index", "draw_equals_rank"])
def test_rank_skipping_tree_needs_consecutive_draws(by_rank: bool) -> None:
    """A tree whose ranks skip (as `01:0,3-9`): sampled children must be the first m draws."""
    world = _make_world(SKIP_TREE.max_depth)
    p = _chi_square_p(_emit(SKIP_TREE, world, True, "sampled", seed=7, by_rank=by_rank), world)
    assert (p < 0.01) if by_rank else (p > 0.01), p


def test_chi_square_p_is_a_probability() -> None:
    assert math.isclose(float(torch.special.gammaincc(torch.tensor(1.0), torch.tensor(0.0))), 1.0)
