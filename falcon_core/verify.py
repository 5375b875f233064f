"""Verification of a drafted tree against one target forward: greedy and lossless rejection sampling.

The target scores `[root] + nodes` in one forward (rows index that list; the root, row 0, is the
previous bonus token). Terms, defined once here:
- An *accepted* token is a drafted node on the chosen root-to-node path whose token the target keeps.
  `VerifyResult.accepted` lists the rows of that path starting with the root (0), so its length is
  `1 + num_accepted`.
- A *rejected* token is a drafted candidate that the rule turns down; in sampling, each rejection turns
  the target distribution at that row into the residual it still owes.
- The *bonus* token (`next_token`) is the one token the target emits after the last accepted node:
  its argmax there (greedy) or a sample from the final residual (sampling). It becomes the next root.

Greedy (EAGLE, Li et al. 2024): node i *matches* when its token equals the target's argmax at its parent
row; a path's accepted length is `cumprod(matches).sum()` along it; the longest path wins (the first in
leaf order on ties). The output equals plain greedy decoding token for token.

Sampling: multi-candidate recursive rejection sampling (SpecInfer, Miao et al. 2024; EAGLE), in the form
for candidates drawn *without replacement* (Jeon et al. 2024, "Recursive Speculative Decoding"; Yang et
al. 2024, "Multi-Candidate Speculative Decoding"). At row p with target distribution q and proposal d
(the drafter distribution p's children were drawn from, in rank order), for each child x in rank order:
accept x with probability min(1, q(x) / d(x)) and move to it; otherwise q <- norm(max(q - d, 0)) and
d <- norm(d with x zeroed). When every child is rejected (or p has none), the bonus token ~ q. Each step
emits exactly the current q, so by induction the emitted tokens follow the target distribution.

SAR drafting (FALCON.md) shares one proposal among siblings: with k = 2 the depth-2 candidates of every
depth-1 node come from the root block's second output. That is still a valid proposal: it does not
depend on the acceptance coins, so the candidates of the node we stand at are, given how we got there,
a draw without replacement from d. `dist_of_row` says which drafter distribution each row's children
were drawn from. Contract for `candidates="sampled"`: a row's children, in rank order, are the first m
consecutive draws without replacement from d (siblings may share one sequence of draws, each taking its
first m). A tree that skips ranks (`01:0,3-9`) must still give its listed ranks consecutive draws: a
candidate whose earlier draws were dropped is not distributed as d minus its listed older siblings.

`candidates="deterministic"` is for children chosen without sampling (e.g. the top-m of the drafter
list): each candidate is then a point mass, so x is accepted with probability q(x) and on rejection
q <- norm(q with x zeroed). Keeping d as given with deterministic candidates is NOT lossless (the
tests show it).

Edge cases: a sampled candidate with d(x) = 0 could not have been drawn from d (a duplicate of an earlier
sibling, or a contract slip); it is skipped, which is exact because dropping a zero-mass candidate
changes neither d nor the later draws. When the residual has (numerically) no mass left (q == d up to
rounding, so the rejection itself was a rounding event), q is kept unchanged; the error is bounded by
the rounding.

The private helpers `_residual` and `_without` are the rule's two updates; tests replace them with broken
versions to show that the statistical test catches a wrong rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from falcon_core.sampling import sample
from falcon_core.tree import TreeBuffers

_RESIDUAL_EPS = 1e-6  # residual mass below this is float32 rounding noise (q == d); see the docstring


@dataclass(frozen=True, eq=False)
class VerifyResult:
    """Outcome of verifying one drafted tree."""

    accepted: torch.Tensor
    """(A,) long rows of `[root] + nodes` on the accepted path, starting with the root 0 (A >= 1)."""
    next_token: int
    """The bonus token emitted after the last accepted node."""
    num_accepted: int
    """Accepted drafted tokens, A - 1."""

    def __post_init__(self) -> None:
        if self.accepted.dim() != 1 or self.accepted.numel() != self.num_accepted + 1:
            raise ValueError(
                f"accepted has shape {tuple(self.accepted.shape)}, need ({self.num_accepted + 1},)"
            )

    @classmethod
    def make_dummy(
        cls, num_accepted: int = 0, next_token: int = 0, device: torch.device | str = "cpu"
    ) -> VerifyResult:
        """A result accepting rows 0..num_accepted (a chain), for tests."""
        return cls(
            accepted=torch.arange(num_accepted + 1, device=device),  # (A,)
            next_token=next_token,
            num_accepted=num_accepted,
        )


def _check_rows(name: str, x: torch.Tensor, buffers: TreeBuffers, extra: int) -> None:
    n = buffers.num_nodes
    if x.dim() != 2 or x.shape[0] != n + extra:
        want = f"({n + extra}, V)" if extra else f"({n}, V)"
        raise ValueError(f"{name} must have shape {want} for a tree of {n} nodes, got {tuple(x.shape)}")


def _check_tokens(tokens: torch.Tensor, buffers: TreeBuffers) -> None:
    if tokens.shape != (buffers.num_nodes,) or tokens.dtype != torch.long:
        raise ValueError(
            f"tokens must be a ({buffers.num_nodes},) long tensor, got {tuple(tokens.shape)} {tokens.dtype}"
        )


def verify_greedy(buffers: TreeBuffers, tokens: torch.Tensor, target_logits: torch.Tensor) -> VerifyResult:
    """Longest path whose tokens equal the target's argmax at their parents, plus the bonus argmax.

    tokens (N,) long drafted token per node; target_logits (1+N, V) over `[root] + nodes`.
    One host sync.
    """
    _check_tokens(tokens, buffers)
    _check_rows("target_logits", target_logits, buffers, extra=1)
    pred = target_logits.argmax(dim=-1)  # (1+N,)
    matches = tokens == pred[buffers.parent_index]  # (N,)
    row_ok = torch.cat([matches.new_ones(1), matches])  # (1+N,) the root always stands
    paths = buffers.paths  # (P, D+1)
    ok = row_ok[paths.clamp(min=0)] & (paths >= 0)  # (P, D+1)
    length = ok.long().cumprod(dim=-1).sum(dim=-1)  # (P,) rows accepted per path, root included
    best = length.argmax()  # () first longest path
    n_rows = length[best]  # ()
    bonus = pred[paths[best, n_rows - 1]]  # ()
    best_i, n_rows_i, bonus_i = torch.stack([best, n_rows, bonus]).tolist()  # the one host sync
    return VerifyResult(accepted=paths[best_i, :n_rows_i], next_token=bonus_i, num_accepted=n_rows_i - 1)


def _residual(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """(V,) norm(max(q - d, 0)); q unchanged when no mass is left (rounding, see module docstring)."""
    r = (q - d).clamp_min(0.0)  # (V,)
    mass = r.sum()  # ()
    return torch.where(mass > _RESIDUAL_EPS, r / mass.clamp_min(_RESIDUAL_EPS), q)  # (V,)


def _without(d: torch.Tensor, x: int) -> torch.Tensor:
    """(V,) d with token x removed and renormalised (all zeros stay zeros): sampling without replacement."""
    d = d.clone()  # (V,)
    d[x] = 0.0
    return d / d.sum().clamp_min(torch.finfo(d.dtype).tiny)  # (V,)


def _point_mass(x: int, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like).index_fill_(0, torch.tensor([x], device=like.device), 1.0)  # (V,)


def _visit(
    q: torch.Tensor,
    d: torch.Tensor | None,
    children: tuple[int, ...],
    tokens: list[int],
    coins: list[float],
) -> tuple[int | None, torch.Tensor]:
    """Try a row's children in rank order: (accepted child row or None, q after the rejections).

    d is None for deterministic candidates (each one a point mass).
    """
    for child in children:
        x = tokens[child - 1]
        d_x = _point_mass(x, q) if d is None else d  # (V,)
        px, dx = q[x].item(), d_x[x].item()
        if dx <= 0.0:  # cannot have been drawn from d: skipping it is exact
            continue
        if coins[child - 1] * dx < px:  # accept with probability min(1, q(x) / d(x))
            return child, q
        q = _residual(q, d_x)  # (V,)
        if d is not None:
            d = _without(d, x)  # (V,)
    return None, q


def verify_sampling(
    buffers: TreeBuffers,
    tokens: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    dist_of_row: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    candidates: Literal["sampled", "deterministic"] = "sampled",
) -> VerifyResult:
    """Multi-candidate recursive rejection sampling over the tree (lossless; see the module docstring).

    tokens (N,) long; target_probs (1+N, V) the processed target distribution at each row;
    draft_probs (M, V) the drafter distributions children were drawn from (unused and may be None when
    `candidates="deterministic"`); dist_of_row (1+N,) long, row -> index into draft_probs (entries of
    rows without children are ignored); None means draft_probs has one row per row (M = 1+N).
    """
    _check_tokens(tokens, buffers)
    _check_rows("target_probs", target_probs, buffers, extra=1)
    if candidates not in ("sampled", "deterministic"):
        raise ValueError(f"candidates must be 'sampled' or 'deterministic', got {candidates!r}")
    sampled = candidates == "sampled"
    n = buffers.num_nodes
    dist: list[int] = list(range(n + 1))
    if sampled:
        if draft_probs is None or draft_probs.dim() != 2 or draft_probs.shape[1] != target_probs.shape[1]:
            got = None if draft_probs is None else tuple(draft_probs.shape)
            raise ValueError(f"draft_probs must have shape (M, {target_probs.shape[1]}), got {got}")
        if dist_of_row is None:
            _check_rows("draft_probs (without dist_of_row)", draft_probs, buffers, extra=1)
        elif dist_of_row.shape != (n + 1,):
            raise ValueError(f"dist_of_row must have shape ({n + 1},), got {tuple(dist_of_row.shape)}")
        else:
            dist = dist_of_row.tolist()
        for row, kids in enumerate(buffers.children):
            if kids and not 0 <= dist[row] < draft_probs.shape[0]:
                raise ValueError(f"dist_of_row[{row}] = {dist[row]} is outside [0, {draft_probs.shape[0]})")
    toks = tokens.tolist()
    coins = torch.rand(n, generator=generator, device=target_probs.device).tolist()  # one coin per node
    rows = [0]
    while True:
        row = rows[-1]
        d = draft_probs[dist[row]].float() if sampled and buffers.children[row] else None  # (V,)
        child, q = _visit(target_probs[row].float(), d, buffers.children[row], toks, coins)
        if child is None:
            break
        rows.append(child)
    bonus = int(sample(q, generator).item())
    return VerifyResult(
        accepted=torch.tensor(rows, dtype=torch.long, device=tokens.device),  # (A,)
        next_token=bonus,
        num_accepted=len(rows) - 1,
    )
