"""Decoding trees: one parent-pointer representation, and the static structure derived from it.

Terms (used by `draft.py` and `verify.py`):
- The *root* is the bonus token: the last token the target emitted, not yet in the cache. It is row 0 of
  the verification input `[root] + nodes`; node `i` is row `i + 1`.
- A *node* is one drafted token. `Tree.parents[i]` is its parent's node index (-1 = a child of the root);
  nodes are numbered in BFS order (depth never decreases along the numbering, parents come first).
- A node's *rank* is the position of its token in the candidate list it was drawn from: the drafter's
  sorted top list at that depth (greedy), or the order of sampling without replacement (temperature > 0).
  Ranks are unique among siblings but need not be contiguous (`kmask2_8layer_tree_3` has `01:0,3-9`).
- A node's *depth* is 1 for children of the root; its position id is `context_len + depth`.

Spec notation (FALCON.md "Decoding tree and drafting"): per depth, entries `parent-path:child-ranks`,
e.g. `{1: "root:0-19", 2: "0:0-9 1:0-1", 3: "01:0,3-9"}`, where a parent path lists the ranks along the
way from the root, one digit per depth.

`build_tree` picks, for a node budget, the tree with the largest expected number of accepted tokens
from per-depth acceptance statistics, in the spirit of Sequoia (Chen et al. 2024) and EAGLE-2's
dynamic trees, so the tree size can be fitted to the measured cost of verification on the hardware.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

Path = tuple[int, ...]  # ranks from the root down to a node


@dataclass(frozen=True)
class Tree:
    """A decoding tree as parent pointers over nodes in BFS order."""

    parents: tuple[int, ...]
    """Parent node index of each node; -1 = child of the root. `parents[i] < i`."""
    ranks: tuple[int, ...]
    """Rank of each node's token in the candidate list it was drawn from; unique among siblings."""
    name: str = "tree"
    """Display / registry name."""
    depths: tuple[int, ...] = field(init=False, repr=False, compare=False)
    """1-based depth of each node (derived)."""
    draw_index: tuple[int, ...] = field(init=False, repr=False, compare=False)
    """Position of each node among its siblings in rank order (derived). With sampled candidates a
    node's token is this draw (0-based) without replacement from its distribution, not draw `rank`:
    verification needs a row's children to be its first m draws, also where ranks skip (`01:0,3-9`)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "parents", tuple(int(p) for p in self.parents))
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        if len(self.parents) != len(self.ranks):
            raise ValueError(f"Tree {self.name!r}: {len(self.parents)} parents but {len(self.ranks)} ranks")
        depths: list[int] = []
        seen: set[tuple[int, int]] = set()
        for i, (p, r) in enumerate(zip(self.parents, self.ranks, strict=True)):
            if not -1 <= p < i:
                raise ValueError(f"Tree {self.name!r}: node {i} has parent {p}; need -1 <= parent < {i}")
            if r < 0:
                raise ValueError(f"Tree {self.name!r}: node {i} has negative rank {r}")
            if (p, r) in seen:
                raise ValueError(f"Tree {self.name!r}: node {i} repeats rank {r} among the children of {p}")
            seen.add((p, r))
            d = 1 if p < 0 else depths[p] + 1
            if depths and d < depths[-1]:
                raise ValueError(
                    f"Tree {self.name!r}: node {i} (depth {d}) follows a node of depth {depths[-1]}; "
                    "nodes must be in BFS order"
                )
            depths.append(d)
        object.__setattr__(self, "depths", tuple(depths))
        draws = [0] * len(self.ranks)
        taken: dict[int, int] = {}  # parent -> children numbered so far
        for i in sorted(range(len(self.ranks)), key=lambda j: (self.parents[j], self.ranks[j])):
            draws[i] = taken.get(self.parents[i], 0)
            taken[self.parents[i]] = draws[i] + 1
        object.__setattr__(self, "draw_index", tuple(draws))

    @property
    def num_nodes(self) -> int:
        return len(self.parents)

    @property
    def max_depth(self) -> int:
        return max(self.depths, default=0)

    def path(self, i: int) -> Path:
        """Ranks along the way from the root to node `i`."""
        out: list[int] = []
        while i >= 0:
            out.append(self.ranks[i])
            i = self.parents[i]
        return tuple(reversed(out))

    @classmethod
    def from_paths(cls, name: str, paths: Iterable[Path]) -> Tree:
        """Tree from a set of rank paths; every prefix of a path must be in the set."""
        pset = {tuple(p) for p in paths}
        for p in pset:
            if not p:
                raise ValueError(f"Tree {name!r}: empty path (the root is implicit)")
            if len(p) > 1 and p[:-1] not in pset:
                raise ValueError(f"Tree {name!r}: path {_fmt(p)} has no parent {_fmt(p[:-1])}")
        index: dict[Path, int] = {}
        parents: list[int] = []
        ranks: list[int] = []
        for depth in range(1, max((len(p) for p in pset), default=0) + 1):
            level = sorted((index.get(p[:-1], -1), p[-1], p) for p in pset if len(p) == depth)
            for parent, rank, p in level:
                index[p] = len(parents)
                parents.append(parent)
                ranks.append(rank)
        return cls(parents=tuple(parents), ranks=tuple(ranks), name=name)

    @classmethod
    def from_spec(cls, name: str, spec: Mapping[int, str]) -> Tree:
        """Parse FALCON.md's notation, e.g. `{1: "root:0-19", 2: "0:0-9 1:0-1", 3: "01:0,3-9"}`."""
        paths: list[Path] = []
        for depth, line in sorted(spec.items()):
            for entry in line.split():
                parent_s, sep, ranks_s = entry.partition(":")
                if not sep:
                    raise ValueError(f"Tree {name!r}, depth {depth}: entry {entry!r} lacks 'path:ranks'")
                parent = _parse_parent(name, depth, parent_s)
                paths.extend((*parent, r) for r in _parse_ranks(name, depth, ranks_s))
        if len(paths) != len(set(paths)):
            raise ValueError(f"Tree {name!r}: a node is listed twice")
        return cls.from_paths(name, paths)

    @classmethod
    def chain(cls, depth: int) -> Tree:
        """A single chain of rank-0 nodes (`depth` = 0 gives no nodes: plain decoding)."""
        if depth < 0:
            raise ValueError(f"chain depth must be >= 0, got {depth}")
        return cls(parents=tuple(range(-1, depth - 1)), ranks=(0,) * depth, name=f"chain-{depth}")


def _fmt(p: Path) -> str:
    return "".join(str(r) for r in p) or "root"


def _parse_parent(name: str, depth: int, s: str) -> Path:
    if s == "root":
        parent: Path = ()
    elif s.isdigit():
        parent = tuple(int(c) for c in s)
    else:
        raise ValueError(f"Tree {name!r}, depth {depth}: parent path {s!r} is not 'root' or digits")
    if len(parent) != depth - 1:
        raise ValueError(
            f"Tree {name!r}, depth {depth}: parent path {s!r} has length {len(parent)}, need {depth - 1}"
        )
    return parent


def _parse_ranks(name: str, depth: int, s: str) -> list[int]:
    out: list[int] = []
    for item in s.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if m is None:
            raise ValueError(f"Tree {name!r}, depth {depth}: bad rank item {item!r} (want 'a' or 'a-b')")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"Tree {name!r}, depth {depth}: empty rank range {item!r}")
        out.extend(range(lo, hi + 1))
    return out


# The two published trees (FALCON.md). kmask2_8layer_tree_3's d7/d8 "plus the same six single chains
# extended": each of the chains through 0001, 0100, 0200, 0300, 1000, 2000 gets one more rank-0 node.
_SIX_CHAINS_D7 = "000100:0 010000:0 020000:0 030000:0 100000:0 200000:0"
_SIX_CHAINS_D8 = "0001000:0 0100000:0 0200000:0 0300000:0 1000000:0 2000000:0"
PUBLISHED_SPECS: dict[str, dict[int, str]] = {
    "kmask2_8layer_tree": {
        1: "root:0-19",
        2: "0:0-9 1:0-1 2:0-1 3:0",
        3: "00:0-9 01:0-1 02:0-1 03:0 10:0-1 20:0 30:0",
        4: "000:0-9 001:0-1 002:0 010:0-1 011:0 020:0 021:0 030:0 100:0-1 200:0 300:0",
        5: "0000:0-9 0001:0-1 0002:0 0010:0 0020:0 0100:0 0200:0 0300:0 1000:0 2000:0 3000:0",
        6: "00000:0-8 00001:0-1 00002:0 00010:0 00011:0 00020:0 00100:0 00200:0 01000:0 02000:0 "
        "03000:0 10000:0 20000:0 30000:0",
        7: "000000:0-8 000001:0-1 000002:0 000010:0 000100:0 001000:0 002000:0 010000:0 020000:0 "
        "030000:0 100000:0 200000:0",
        8: "0000000:0-7 0000001:0-1 0000002:0 0000010:0 0000011:0 0000020:0 0000100:0 0001000:0 "
        "0010000:0 0020000:0 0100000:0 0200000:0 0300000:0 1000000:0 2000000:0",
    },
    "kmask2_8layer_tree_3": {
        1: "root:0-19",
        2: "0:0-10 1:0-3 2:0-3",
        3: "00:0-6 01:0,3-9 02:0 03:0 10:0 20:0",
        4: "000:0-9 010:0 020:0 030:0 100:0 200:0",
        5: "0000:0-9 0001:0 0100:0 0200:0 0300:0 1000:0 2000:0",
        6: "00000:0-3 00010:0 01000:0 02000:0 03000:0 10000:0 20000:0",
        7: "000000:0-3 " + _SIX_CHAINS_D7,
        8: "0000000:0-2 " + _SIX_CHAINS_D8,
    },
}


def get_tree(name: str) -> Tree:
    """A published tree by name, or `chain-N`."""
    if name in PUBLISHED_SPECS:
        return Tree.from_spec(name, PUBLISHED_SPECS[name])
    m = re.fullmatch(r"chain-(\d+)", name)
    if m is not None:
        return Tree.chain(int(m.group(1)))
    known = ", ".join([*PUBLISHED_SPECS, "chain-N (N >= 0)"])
    raise ValueError(f"unknown tree {name!r}; known trees: {known}")


def _check_acceptance(acceptance: Sequence[Sequence[float]]) -> None:
    for d, row in enumerate(acceptance):
        for r, a in enumerate(row):
            if not 0.0 <= float(a) <= 1.0:  # also rejects NaN
                raise ValueError(f"acceptance[{d}][{r}] = {a} is not a probability in [0, 1]")


def _accept(acceptance: Sequence[Sequence[float]], depth: int, rank: int) -> float:
    """acceptance of the rank-`rank` candidate at 1-based `depth`; 0 beyond the statistics."""
    if depth > len(acceptance) or rank >= len(acceptance[depth - 1]):
        return 0.0
    return float(acceptance[depth - 1][rank])


def expected_accepted(tree: Tree, acceptance: Sequence[Sequence[float]]) -> float:
    """Expected accepted drafted tokens per step (bonus excluded) = sum of path probabilities.

    `acceptance[d][r]` is the probability that the rank-r candidate at depth d+1 is accepted given its
    parent was; nodes beyond the statistics count as never accepted.
    """
    _check_acceptance(acceptance)
    prob: list[float] = []
    for p, r, d in zip(tree.parents, tree.ranks, tree.depths, strict=True):
        prob.append((1.0 if p < 0 else prob[p]) * _accept(acceptance, d, r))
    return sum(prob)


def build_tree(acceptance: Sequence[Sequence[float]], budget: int, name: str = "fitted") -> Tree:
    """The `budget` nodes with the largest path probability, grown best-first from the root.

    A node enters only after its parent and (for rank r > 0) its rank r-1 sibling, so the candidate set
    is always a valid tree. When acceptance is non-increasing in rank at each depth (as top-k hit rates
    are), every node is worth no more than its parent and older sibling, and the best-first set
    maximises `expected_accepted` over all valid trees of that size.
    """
    _check_acceptance(acceptance)
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    heap: list[tuple[float, int, Path]] = []  # (-path prob, insertion order, path)
    order = 0

    def push(path: Path, prob: float) -> None:
        nonlocal order
        if len(path) <= len(acceptance) and path[-1] < len(acceptance[len(path) - 1]):
            heapq.heappush(heap, (-prob * _accept(acceptance, len(path), path[-1]), order, path))
            order += 1

    push((0,), 1.0)
    parent_prob: dict[Path, float] = {(): 1.0}
    chosen: list[Path] = []
    while heap and len(chosen) < budget:
        neg, _, path = heapq.heappop(heap)
        chosen.append(path)
        parent_prob[path] = -neg
        push((*path[:-1], path[-1] + 1), parent_prob[path[:-1]])  # next sibling
        push((*path, 0), -neg)  # first child
    return Tree.from_paths(name, chosen)


def block_anchors(tree: Tree, k: int) -> tuple[int, ...]:
    """Per node, the node index of its ancestor at depth `k * ((depth - 1) // k)`; -1 = the root.

    In SAR drafting a block of k drafted depths comes from one drafter pass anchored at a node whose
    depth is a multiple of k (the root for depths 1..k): that pass's k output distributions are the
    candidate lists of the node's depth, shared by every node under the same anchor at that depth.
    """
    if k < 1:
        raise ValueError(f"block size k must be >= 1, got {k}")
    out: list[int] = []
    for i, d in enumerate(tree.depths):
        a, ad = i, d
        target = k * ((d - 1) // k)
        while ad > target:
            a, ad = tree.parents[a], ad - 1
        out.append(a)
    return tuple(out)


@dataclass(frozen=True, eq=False)
class TreeBuffers:
    """Static tensors derived once from a `Tree`; rows index `[root] + nodes` (node i is row i + 1)."""

    tree: Tree
    depth: torch.Tensor
    """(N,) long, 1-based depth of each node."""
    mask: torch.Tensor
    """(N+1, N+1) bool, True = row may attend to column: its ancestors (root included) and itself."""
    position_offsets: torch.Tensor
    """(N+1,) long, position id offset from the context length: 0 for the root, depth for a node."""
    parent_index: torch.Tensor
    """(N,) long, row of each node's parent in `[root] + nodes`."""
    paths: torch.Tensor
    """(P, D+1) long, one row per leaf: rows from the root (0) down to the leaf, padded with -1."""
    children: tuple[tuple[int, ...], ...]
    """Per row of `[root] + nodes`, the rows of its children in rank order."""

    @property
    def num_nodes(self) -> int:
        return self.tree.num_nodes

    @property
    def max_depth(self) -> int:
        return self.tree.max_depth

    @classmethod
    def from_tree(cls, tree: Tree, device: torch.device | str = "cpu") -> TreeBuffers:
        n, max_d = tree.num_nodes, tree.max_depth
        parent_row = [p + 1 for p in tree.parents]
        mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)  # (N+1, N+1)
        mask[0, 0] = True
        for i, p in enumerate(parent_row):
            mask[i + 1] = mask[p]
            mask[i + 1, i + 1] = True
        kids: list[list[int]] = [[] for _ in range(n + 1)]
        for i, p in sorted(enumerate(parent_row), key=lambda ip: (ip[1], tree.ranks[ip[0]])):
            kids[p].append(i + 1)
        leaves = [row for row in range(1, n + 1) if not kids[row]] or [0]
        paths = torch.full((len(leaves), max_d + 1), -1, dtype=torch.long)  # (P, D+1)
        for j, leaf in enumerate(leaves):
            rows = [leaf]
            while rows[-1] != 0:
                rows.append(parent_row[rows[-1] - 1])
            paths[j, : len(rows)] = torch.tensor(rows[::-1])
        depth = torch.tensor(tree.depths, dtype=torch.long)  # (N,)
        return cls(
            tree=tree,
            depth=depth.to(device),
            mask=mask.to(device),
            position_offsets=torch.cat([torch.zeros(1, dtype=torch.long), depth]).to(device),  # (N+1,)
            parent_index=torch.tensor(parent_row, dtype=torch.long).to(device),  # (N,)
            paths=paths.to(device),
            children=tuple(tuple(k) for k in kids),
        )
