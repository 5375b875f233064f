"""Trees: parsing, published trees, derived buffers, the fitted-tree builder and SAR block anchors."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
import torch

from falcon_core.tree import (
    PUBLISHED_SPECS,
    Tree,
    TreeBuffers,
    block_anchors,
    build_tree,
    expected_accepted,
    get_tree,
)

SMALL = Tree.from_spec("small", {1: "root:0-2", 2: "0:0-1 1:0", 3: "00:0-1 01:0 10:0", 4: "000:0"})


def _all_trees() -> list[Tree]:
    return [get_tree(n) for n in PUBLISHED_SPECS] + [Tree.chain(4), Tree.chain(0), SMALL]


def test_published_node_counts() -> None:
    t1, t3 = get_tree("kmask2_8layer_tree"), get_tree("kmask2_8layer_tree_3")
    assert (t1.num_nodes, t1.max_depth) == (165, 8)
    assert (t3.num_nodes, t3.max_depth) == (118, 8)
    assert [Counter(t1.depths)[d] for d in range(1, 9)] == [20, 15, 19, 23, 21, 23, 21, 23]
    assert [Counter(t3.depths)[d] for d in range(1, 9)] == [20, 19, 19, 15, 16, 10, 10, 9]


def test_tree_3_six_chains_extended() -> None:
    paths = {get_tree("kmask2_8layer_tree_3").path(i) for i in range(118)}
    for head in ["0001", "0100", "0200", "0300", "1000", "2000"]:
        chain = tuple(int(c) for c in head)
        for _ in range(5, 9):
            chain = (*chain, 0)
            assert chain in paths, chain
    # the rank-skipping entry 01:0,3-9
    assert sorted(p[2] for p in paths if len(p) == 3 and p[:2] == (0, 1)) == [0, 3, 4, 5, 6, 7, 8, 9]


def test_from_spec_order_and_paths() -> None:
    t = Tree.from_spec("t", {1: "root:0-1", 2: "1:0 0:0,2"})
    assert t.parents == (-1, -1, 0, 0, 1)
    assert t.ranks == (0, 1, 0, 2, 0)
    assert [t.path(i) for i in range(5)] == [(0,), (1,), (0, 0), (0, 2), (1, 0)]
    assert Tree.from_paths("t", [t.path(i) for i in range(5)]) == t


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({1: "root:0-1", 2: "2:0"}, "no parent"),
        ({1: "root:0-1", 2: "00:0"}, "length 2, need 1"),
        ({1: "root:0-1 root:1"}, "listed twice"),
        ({1: "root:3-1"}, "empty rank range"),
        ({1: "root:a"}, "bad rank item"),
        ({1: "root"}, "lacks 'path:ranks'"),
        ({1: "root:0", 2: "x:0"}, "not 'root' or digits"),
    ],
)
def test_from_spec_errors(spec: dict[int, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Tree.from_spec("bad", spec)


@pytest.mark.parametrize(
    ("parents", "ranks", "match"),
    [
        ((-1, 1), (0, 0), "need -1 <= parent < 1"),
        ((-1, -1), (0, 0), "repeats rank 0"),
        ((-1, 0, -1), (0, 0, 1), "BFS order"),
        ((-1,), (0, 1), "1 parents but 2 ranks"),
        ((-1,), (-1,), "negative rank"),
    ],
)
def test_tree_validation(parents: tuple[int, ...], ranks: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Tree(parents=parents, ranks=ranks)


def test_draw_index() -> None:
    t = Tree.from_spec("t", {1: "root:0,2-3", 2: "0:0,2 2:0"})
    assert t.ranks == (0, 2, 3, 0, 2, 0)
    assert t.draw_index == (0, 1, 2, 0, 1, 0)
    assert get_tree("kmask2_8layer_tree").draw_index == get_tree("kmask2_8layer_tree").ranks
    t3 = get_tree("kmask2_8layer_tree_3")
    assert [r for r, d in zip(t3.ranks, t3.draw_index, strict=True) if r != d] == [3, 4, 5, 6, 7, 8, 9]


def test_chain_and_registry() -> None:
    assert get_tree("chain-3") == Tree(parents=(-1, 0, 1), ranks=(0, 0, 0), name="chain-3")
    assert get_tree("chain-0").num_nodes == 0
    with pytest.raises(ValueError, match=r"kmask2_8layer_tree, kmask2_8layer_tree_3, chain-N"):
        get_tree("eagle")
    with pytest.raises(ValueError, match=">= 0"):
        Tree.chain(-1)


@pytest.mark.parametrize("tree", _all_trees(), ids=lambda t: t.name)
def test_buffer_invariants(tree: Tree) -> None:
    b = TreeBuffers.from_tree(tree)
    n = tree.num_nodes
    assert b.mask.shape == (n + 1, n + 1) and b.mask.dtype == torch.bool
    assert b.mask[0].tolist() == [True] + [False] * n
    for i in range(n):
        expect = b.mask[b.parent_index[i]].clone()
        expect[i + 1] = True
        assert torch.equal(b.mask[i + 1], expect), i
    assert torch.equal(b.depth, b.mask[1:].sum(-1) - 1)
    assert b.position_offsets.tolist() == [0, *tree.depths]
    assert b.parent_index.tolist() == [p + 1 for p in tree.parents]
    # paths: one per leaf, root first, each step a parent link, -1 padding only at the end
    has_child = {p + 1 for p in tree.parents}
    leaves = [r for r in range(1, n + 1) if r not in has_child] or [0]
    assert b.paths.shape == (len(leaves), tree.max_depth + 1)
    ends = []
    for row in b.paths.tolist():
        rows = [r for r in row if r >= 0]
        assert row == rows + [-1] * (len(row) - len(rows)) and rows[0] == 0
        for parent, child in itertools.pairwise(rows):
            assert b.parent_index[child - 1] == parent
        assert len(rows) - 1 == (b.depth[rows[-1] - 1] if len(rows) > 1 else 0)
        ends.append(rows[-1])
    assert ends == leaves
    # children in rank order
    for row, kids in enumerate(b.children):
        assert all(b.parent_index[c - 1] == row for c in kids)
        ranks = [tree.ranks[c - 1] for c in kids]
        assert ranks == sorted(ranks)
    assert sum(len(k) for k in b.children) == n


def test_expected_accepted_by_hand() -> None:
    acc = [[0.5, 0.2], [0.4]]
    t = Tree.from_spec("t", {1: "root:0-1", 2: "0:0 1:0"})
    assert expected_accepted(t, acc) == pytest.approx(0.5 + 0.2 + 0.5 * 0.4 + 0.2 * 0.4)
    assert expected_accepted(Tree.chain(3), acc) == pytest.approx(0.5 + 0.2)  # depth 3: no statistics
    with pytest.raises(ValueError, match=r"acceptance\[0\]\[1\]"):
        expected_accepted(t, [[0.5, float("nan")]])


def _closed_sets(max_depth: int, max_rank: int, size: int) -> set[frozenset[tuple[int, ...]]]:
    """Every valid tree (parent and rank-1 sibling present) of `size` nodes, as sets of paths."""
    out: set[frozenset[tuple[int, ...]]] = set()

    def grow(nodes: frozenset[tuple[int, ...]]) -> None:
        if nodes in out:
            return
        out.add(nodes)
        if len(nodes) == size:
            return
        frontier = {(0,)} | {(*p, 0) for p in nodes} | {(*p[:-1], p[-1] + 1) for p in nodes}
        for p in frontier - nodes:
            if len(p) <= max_depth and p[-1] < max_rank:
                grow(nodes | {p})

    grow(frozenset())
    return {s for s in out if len(s) == size}


@pytest.mark.parametrize("seed", range(5))
def test_build_tree_is_optimal(seed: int) -> None:
    rng = random.Random(seed)
    depth, ranks = 3, 3
    acc = []
    for _ in range(depth):  # non-increasing in rank, summing to <= 1
        row = sorted((rng.random() for _ in range(ranks)), reverse=True)
        total = sum(row) / rng.uniform(0.3, 1.0)
        acc.append([a / total for a in row])
    for budget in range(1, 8):
        best = max(
            expected_accepted(Tree.from_paths("b", s), acc) for s in _closed_sets(depth, ranks, budget)
        )
        built = build_tree(acc, budget)
        assert built.num_nodes == budget
        assert expected_accepted(built, acc) == pytest.approx(best, abs=1e-12)


def test_build_tree_small_budget_and_limits() -> None:
    acc = [[0.6, 0.2, 0.1], [0.5, 0.2], [0.3]]
    t = build_tree(acc, 4)  # 0.6 (0), 0.3 (00), 0.2 (1), 0.12 (01); 00 0 would be 0.09
    assert {t.path(i) for i in range(4)} == {(0,), (0, 0), (1,), (0, 1)}
    assert t.parents == (-1, -1, 0, 0)
    assert build_tree(acc, 0).num_nodes == 0
    assert build_tree(acc, 1000).num_nodes == 3 + 3 * 2 + 3 * 2 * 1  # every node the statistics cover
    with pytest.raises(ValueError, match="budget"):
        build_tree(acc, -1)


def test_block_anchors_by_hand() -> None:
    # SMALL: nodes 0,1,2 (d1) 3:00 4:01 5:10 (d2) 6:000 7:001 8:010 9:100 (d3) 10:0000 (d4)
    assert block_anchors(SMALL, 1) == tuple(SMALL.parents)
    assert block_anchors(SMALL, 2) == (-1, -1, -1, -1, -1, -1, 3, 3, 4, 5, 3)
    assert block_anchors(SMALL, 3) == (-1,) * 10 + (6,)
    with pytest.raises(ValueError, match="k must be >= 1"):
        block_anchors(SMALL, 0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_block_anchors_published(k: int) -> None:
    tree = get_tree("kmask2_8layer_tree")
    for i, a in enumerate(block_anchors(tree, k)):
        d = tree.depths[i]
        want = k * ((d - 1) // k)
        if a < 0:
            assert want == 0
        else:
            assert tree.depths[a] == want and tree.path(i)[:want] == tree.path(a)
