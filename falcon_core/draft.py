"""Semi-autoregressive (SAR) drafting over a decoding tree (Falcon, Gao et al. AAAI 2025, arXiv 2412.12639).

Terms (FALCON.md, "Decoding tree and drafting"):
- The drafter reads pairs `(f_i, t_{i+1})`: the target's feature at position i and the token one step
  ahead. Position i predicts `f_{i+K}`, so a block of K positions whose last pair is `(f_{n-1}, t_n)`
  predicts the features (hence the tokens) at tree depths 1..K after the bonus token `t_n`.
- Pass 1 runs over the new context positions; its final block is right-aligned on the newest position
  (positions `n-K .. n-1`, recomputed when already cached so that the block sees the bonus token). Its K
  output rows give the candidate lists of depths 1..K.
- Tree pass p >= 2 expands every node at depth `(p-1)K` that has children (its *anchor*): a block of the
  K path tokens at depths `(p-2)K+1 .. (p-1)K` paired with the K output features of the block those
  tokens came from, at positions `n + depth - 1`. A block sees the committed context, its ancestor
  blocks and itself. Tree-pass K/V is scratch (rows past the committed context), never committed.
- Distribution rows: every block output row is one candidate distribution. Row `j` (< K) is pass 1's
  row j; a tree-pass block whose scratch rows start at `r` owns rows `K + r .. K + r + K - 1`. A node's
  token is rank `ranks[i]` of its distribution row (greedy: top-m; sampling: drawn without replacement
  with the Gumbel-top-m trick, in rank order), and its children all come from one row.

K = 1 is an EAGLE-style autoregressive drafter through the same code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from falcon_core.drafter import Drafter
from falcon_core.kv_cache import KVCache
from falcon_core.masks import block_causal_mask, with_prefix
from falcon_core.sampling import SamplingParams, logits_to_probs
from falcon_core.target import TargetModel
from falcon_core.tree import Tree, block_anchors


@dataclass(frozen=True)
class TreePass:
    """One tree pass (p >= 2): Bp blocks of K positions, all run in one drafter forward."""

    token_nodes: torch.Tensor
    """(Bp*K,) long: the tree node whose token each block position reads."""
    feature_rows: torch.Tensor
    """(Bp*K,) long: the distribution/output row whose predicted feature each block position reads."""
    position_offsets: torch.Tensor
    """(Bp*K,) long: position minus n (= depth of the token node - 1)."""
    scratch_start: int
    """First scratch row (relative to n) of this pass; its rows are `[scratch_start, scratch_start + Bp*K)`."""
    scratch_mask: torch.Tensor
    """(Bp*K, scratch_start + Bp*K) bool: which scratch rows each position sees (ancestors + own block)."""


@dataclass(frozen=True)
class DraftPlan:
    """Static structure of SAR drafting for one tree and block size K, computed once (STYLE rule 6)."""

    tree: Tree
    k: int
    node_row: torch.Tensor
    """(N,) long: distribution row each node's token is drawn from."""
    node_rank: torch.Tensor
    """(N,) long: rank of each node's token in that row."""
    child_row: torch.Tensor
    """(1+N,) long: distribution row of the children of [root] + nodes (-1: no children)."""
    node_parent: torch.Tensor
    """(N,) long: parent of each node (-1: the root)."""
    node_sibling: torch.Tensor
    """(N,) long: position of each node among its parent's children in rank order (the draw it takes
    when children are sampled without replacement: listed ranks get consecutive draws, verify.py)."""
    pass_nodes: tuple[torch.Tensor, ...]
    """Per pass (1-based p at index p-1): (n_p,) long, the nodes whose tokens the pass decides."""
    tree_passes: tuple[TreePass, ...]
    """Passes 2.. in order."""
    num_rows: int
    """M: distribution rows per step (K + all scratch rows)."""
    scratch_rows: int
    """Drafter cache rows needed past the committed context."""
    max_rank: int

    @classmethod
    def build(cls, tree: Tree, k: int, device: torch.device | str = "cpu") -> DraftPlan:
        if k < 1:
            raise ValueError(f"block size k must be >= 1, got {k}")
        parents, ranks = tree.parents, tree.ranks
        n_nodes = len(parents)
        depth = []
        for p in parents:
            depth.append(1 if p < 0 else depth[p] + 1)
        anchors = block_anchors(tree, k)
        has_children = [False] * n_nodes
        for p in parents:
            if p >= 0:
                has_children[p] = True
        max_depth = max(depth, default=0)
        num_passes = -(-max_depth // k)
        # Anchors of tree passes, pass by pass, and the scratch rows of their blocks.
        block_start: dict[int, int] = {}
        passes: list[TreePass] = []
        scratch = 0
        for p in range(2, num_passes + 1):
            blocks = [i for i in range(n_nodes) if depth[i] == (p - 1) * k and has_children[i]]
            start = scratch
            token_nodes, offsets = [], []
            for b, a in enumerate(blocks):
                block_start[a] = start + b * k
                path = [a]
                while len(path) < k:
                    path.append(parents[path[-1]])
                path.reverse()  # depths (p-2)k+1 .. (p-1)k
                token_nodes += path
                offsets += [depth[i] - 1 for i in path]
            # Feature rows: the row each path token was drawn from (filled once node rows are known).
            passes.append((blocks, start, token_nodes, offsets))
            scratch = start + len(blocks) * k

        def row_of(i: int) -> int:
            j = (depth[i] - 1) % k
            a = anchors[i]
            return j if a < 0 else k + block_start[a] + j

        node_row = [row_of(i) for i in range(n_nodes)]
        sibling = [
            sum(1 for j, q in enumerate(parents) if q == p and ranks[j] < ranks[i])
            for i, p in enumerate(parents)
        ]
        child_row = [-1] * (1 + n_nodes)
        for i, p in enumerate(parents):
            child_row[p + 1] = node_row[i]
        tree_passes = []
        for blocks, start, token_nodes, offsets in passes:
            n_rows = len(blocks) * k
            mask = torch.zeros(n_rows, start + n_rows, dtype=torch.bool)  # (Bp*K, scratch so far)
            for b, a in enumerate(blocks):
                rows = slice(b * k, (b + 1) * k)
                mask[rows, start + b * k : start + (b + 1) * k] = True  # own block
                anc = anchors[a]
                while anc >= 0:  # ancestor blocks
                    s = block_start[anc]
                    mask[rows, s : s + k] = True
                    anc = anchors[anc]
            tree_passes.append(
                TreePass(
                    token_nodes=torch.tensor(token_nodes, dtype=torch.long, device=device),
                    feature_rows=torch.tensor(
                        [node_row[i] for i in token_nodes], dtype=torch.long, device=device
                    ),
                    position_offsets=torch.tensor(offsets, dtype=torch.long, device=device),
                    scratch_start=start,
                    scratch_mask=mask.to(device),
                )
            )
        pass_nodes = tuple(
            torch.tensor(
                [i for i in range(n_nodes) if (p - 1) * k < depth[i] <= p * k],
                dtype=torch.long,
                device=device,
            )
            for p in range(1, num_passes + 1)
        )
        return cls(
            tree=tree,
            k=k,
            node_row=torch.tensor(node_row, dtype=torch.long, device=device),
            node_rank=torch.tensor(ranks, dtype=torch.long, device=device),
            child_row=torch.tensor(child_row, dtype=torch.long, device=device),
            node_parent=torch.tensor(parents, dtype=torch.long, device=device),
            node_sibling=torch.tensor(sibling, dtype=torch.long, device=device),
            pass_nodes=pass_nodes,
            tree_passes=tuple(tree_passes),
            num_rows=k + scratch,
            scratch_rows=scratch,
            max_rank=max(ranks, default=0),
        )


@dataclass
class DraftResult:
    """Drafted tokens of one step."""

    tokens: torch.Tensor
    """(N,) long: the token of every tree node."""
    draft_probs: torch.Tensor | None
    """(M, V) float32 candidate distributions (sampling only; None when greedy)."""
    child_row: torch.Tensor
    """(1+N,) long: distribution row of each [root]+node row's children (-1: none)."""
    passes: int
    seconds: float


class SARDrafter:
    """Runs a `Drafter` over the context and a tree for one generation (owns the drafter's KV cache).

    The caller (generation loop) hands over the target features of newly committed positions with
    `propose`; rows `[0, n)` of the drafter cache then hold the committed context.
    """

    def __init__(self, drafter: Drafter, target: TargetModel, plan: DraftPlan, max_context: int) -> None:
        self.drafter = drafter
        self.target = target
        self.plan = plan
        self.k = plan.k
        self.cache: KVCache = drafter.new_cache(max_context + plan.scratch_rows)
        self.max_context = max_context
        self.vocab_size = target.lm_head.weight.shape[0]
        self.head_ids: torch.Tensor | None = None
        """(n,) long: the drafter's draft vocabulary (row j of `head` is token head_ids[j]); None: all."""
        self.head = target.lm_head.weight  # (V or n, H)
        if drafter.config.draft_vocab_size:
            self.head_ids = drafter.draft_vocab.to(self.head.device)
            self.head = self.head[self.head_ids].contiguous()  # (n, H): read once per pass, not V rows
        if self.head.shape[0] < plan.max_rank + 1:
            raise ValueError(
                f"tree {plan.tree.name!r} drafts {plan.max_rank + 1} candidates per node but the drafter "
                f"chooses from {self.head.shape[0]} tokens"
            )

    def propose(
        self,
        features: torch.Tensor,
        tokens: torch.Tensor,
        n: int,
        params: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> DraftResult | None:
        """Draft the tree after context length n; None when n < K (no full block yet).

        features (n, H): target features of positions [0, n) (only rows from the drafter's committed
        length on are read, plus the last K); tokens (n+1,) long: t_0..t_n, t_n = bonus token.
        """
        k, plan = self.k, self.plan
        if n < k:
            return None
        t0 = time.perf_counter()
        device = features.device
        start = min(self.cache.length, n - k)
        T = n - start
        emb = self.target.embed(tokens[start + 1 : n + 1])  # (T, H)
        feats = features[start:n]  # (T, H)
        pos = torch.arange(start, n, device=device)  # (T,)
        mask = with_prefix(block_causal_mask(T, k, device=device), start)  # (T, n)
        out = self.drafter(emb[None], feats[None], pos[None], self.cache, start, mask)[0]  # (T, H)
        self.cache.length = n
        outs = out.new_empty(plan.num_rows, out.shape[-1])  # (M, H)
        outs[:k] = out[T - k :]
        node_tokens = torch.empty(len(plan.tree.parents), dtype=torch.long, device=device)  # (N,)
        probs_rows: list[torch.Tensor] = []
        self._choose(outs[:k], 0, plan.pass_nodes[0], node_tokens, probs_rows, params, generator)
        for p, tp in enumerate(plan.tree_passes, start=2):
            emb = self.target.embed(node_tokens[tp.token_nodes])  # (Bp*K, H)
            feats = outs[tp.feature_rows]  # (Bp*K, H)
            pos = n + tp.position_offsets  # (Bp*K,)
            cache_pos = n + tp.scratch_start
            mask = with_prefix(tp.scratch_mask, n)  # (Bp*K, n + scratch)
            out = self.drafter(emb[None], feats[None], pos[None], self.cache, cache_pos, mask)[0]
            first = k + tp.scratch_start
            outs[first : first + out.shape[0]] = out  # (Bp*K, H)
            self._choose(out, first, plan.pass_nodes[p - 1], node_tokens, probs_rows, params, generator)
        draft_probs = None if params.greedy else torch.cat(probs_rows)  # (M, V)
        return DraftResult(
            tokens=node_tokens,
            draft_probs=draft_probs,
            child_row=plan.child_row,
            passes=1 + len(plan.tree_passes),
            seconds=time.perf_counter() - t0,
        )

    def _choose(
        self,
        out: torch.Tensor,
        first_row: int,
        nodes: torch.Tensor,
        node_tokens: torch.Tensor,
        probs_rows: list[torch.Tensor],
        params: SamplingParams,
        generator: torch.Generator | None,
    ) -> None:
        """Pick the tokens of `nodes` from the distributions of output rows `first_row + [0, R)`."""
        logits = torch.nn.functional.linear(out, self.head).float()  # (R, V'), V' = V or n
        ids = self.head_ids
        rows = self.plan.node_row[nodes] - first_row  # (n_p,)
        ranks = self.plan.node_rank[nodes]  # (n_p,)
        m = self.plan.max_rank + 1
        if params.greedy:
            top = logits.topk(m, dim=-1).indices  # (R, m)
            node_tokens[nodes] = top[rows, ranks] if ids is None else ids[top[rows, ranks]]
            return
        probs = logits_to_probs(logits, params)  # (R, V')
        if ids is None:
            probs_rows.append(probs)
        else:  # q over the whole vocabulary, zero outside the draft vocabulary (still lossless)
            full = probs.new_zeros(probs.shape[0], self.vocab_size)  # (R, V)
            probs_rows.append(full.index_copy_(1, ids, probs))
        # Siblings share a parent and a row; each parent draws its children without replacement
        # (Gumbel-top-m), independently of every other parent; the j-th child in rank order takes draw j.
        parents = self.plan.node_parent[nodes]  # (n_p,)
        uniq, parent_slot = torch.unique(parents, return_inverse=True)  # (U,), (n_p,)
        parent_rows = torch.zeros(uniq.shape[0], dtype=torch.long, device=nodes.device)  # (U,)
        parent_rows[parent_slot] = rows
        u = torch.rand(uniq.shape[0], probs.shape[-1], generator=generator, device=probs.device)  # (U, V)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))  # (U, V)
        keys = probs[parent_rows].log() + gumbel  # (U, V)
        order = keys.topk(m, dim=-1).indices  # (U, m)
        picked = order[parent_slot, self.plan.node_sibling[nodes]]  # (n_p,)
        node_tokens[nodes] = picked if ids is None else ids[picked]
