"""Coupled Sequential Glancing Distillation (CSGD), the training objective of Falcon's SAR drafter.

Falcon: Gao, Xie, Xiang, Ji, AAAI 2025, arXiv 2412.12639; FALCON.md "CSGD training" is the spec, the
authors' `train/glance.py` settles what the paper leaves open.

Terms, on one record of T tokens `t_0..t_{T-1}` with target features `f_0..f_{T-1}` and block size K:
- *Alignment.* Drafter position i reads `(f_i, t_{i+1})` at RoPE position i and is trained to predict the
  feature `f_{i+K}`, hence the token after it, `t_{i+K+1}`. Position i is *valid* when `t_{i+K+1}` exists
  and is loss-masked (an assistant token); only valid positions enter the loss and the counts.
- *Target distribution* at i: the target's next-token distribution at position i+K, i.e.
  `softmax(lm_head(f_{i+K}))`, or the cached top-N log-probabilities of that position, restricted to the
  training head's vocabulary (all of it, or a frequency-ranked subset) and renormalised there. The
  *target token* is its argmax (the cached top-1, which is over the full vocabulary, when cached).
- *Block alignment.* The block-causal mask groups positions in blocks of K; each record gets a random
  offset in [0, K) so that every alignment is trained (inference right-aligns the last block).
- *Hamming count* d: valid positions where the drafter's argmax (clean no-grad pass) differs from the
  target token. *lambda*: "reference" goes linearly from 0.45 (first epoch) to 0.1 (last epoch);
  "paper" is `0.4 (E - e) / E`. N = floor(lambda d) positions are replaced, per record.
- *Candidates*: valid positions that start a block (every K-th position, aligned with the blocks so the
  glance reaches the block's later positions; the reference code takes every K-th loss-masked position
  with blocks fixed at 0). K > 2 draws N // K starts and extends each into a run of 1..K-1 positions of
  its block (the reference code's rule). N larger than the candidates takes them all (the reference
  code skipped such batches).
- *Coupled replacement* at a chosen p: the input feature becomes `f_{p+K}` and the input token
  `t_{p+K+1}` (the target's ground truth for p), so the rest of p's block glances at the truth.
- *Loss* (graded pass, every valid position):
  `L = w_f SmoothL1(pred_i, f_{i+K}) + w_t (0.9 L_soft + 0.1 L_hard)`, with
  `L_soft = sum_v p_v (log p^T_v - log q^T_v)` (p the target distribution, p^T, q^T the target's and the
  drafter's at temperature 0.95: the reference's KL-style term) and `L_hard` the cross-entropy against
  a token sampled from p. SmoothL1 is averaged over H; every term is averaged over valid positions.
- *Input noise*: uniform noise of width `noise * 512 / T` on the input features (EAGLE; +-0.1 at T = 512
  with the default 0.2), never on targets or replaced features.
With `csgd=False` the same loss is taken on one clean (noised) pass: the EAGLE-style objective.

All randomness (offsets, noise, choices, sampled labels) comes from the caller's `torch.Generator`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from falcon_core.drafter import check_draft_vocab
from pipelines.config import ObjectiveSection
from pipelines.hidden_cache import CachedRecord

LAMBDA_REFERENCE = (0.45, 0.1)
LAMBDA_PAPER = 0.4

DrafterFn = Callable[..., torch.Tensor]
"""`Drafter.forward`-compatible: (token_embeds, features, positions, mask=...) -> (B, T, H)."""


# ---------------------------------------------------------------------------------------------------
# Batches and the training head


@dataclass
class Batch:
    """B records padded on the right to T tokens."""

    input_ids: torch.Tensor  # (B, T) long, 0 past each record's end
    hidden: torch.Tensor  # (B, T, H) float32, 0 past each record's end
    loss_mask: torch.Tensor  # (B, T) bool
    lengths: torch.Tensor  # (B,) long
    topk_ids: torch.Tensor | None = None  # (B, T, N) long
    topk_logprobs: torch.Tensor | None = None  # (B, T, N) float32

    @classmethod
    def collate(cls, records: Sequence[CachedRecord], max_len: int | None = None) -> Batch:
        """Pad `records` (each truncated to `max_len` tokens) into one batch."""
        if not records:
            raise ValueError("a batch needs at least one record")
        lens = [
            r.input_ids.shape[0] if max_len is None else min(max_len, r.input_ids.shape[0]) for r in records
        ]
        B, T, H = len(records), max(lens), records[0].hidden.shape[1]
        topk = records[0].topk_ids is not None
        ids = torch.zeros(B, T, dtype=torch.long)  # (B, T)
        hidden = torch.zeros(B, T, H)  # (B, T, H)
        mask = torch.zeros(B, T, dtype=torch.bool)  # (B, T)
        N = records[0].topk_ids.shape[1] if topk else 0
        tk_ids = torch.zeros(B, T, N, dtype=torch.long) if topk else None  # (B, T, N)
        tk_lp = torch.zeros(B, T, N) if topk else None  # (B, T, N)
        for b, (r, n) in enumerate(zip(records, lens, strict=True)):
            ids[b, :n] = r.input_ids[:n].long()
            hidden[b, :n] = r.hidden[:n].float()
            mask[b, :n] = r.loss_mask[:n].bool()
            if topk:
                if r.topk_ids is None or r.topk_logprobs is None:
                    raise ValueError("either every record of a batch has top-N log-probabilities or none has")
                tk_ids[b, :n] = r.topk_ids[:n].long()
                tk_lp[b, :n] = r.topk_logprobs[:n].float()
        return cls(ids, hidden, mask, torch.tensor(lens), tk_ids, tk_lp)

    def to(self, device: torch.device | str) -> Batch:
        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device, non_blocking=True)

        return Batch(*(move(getattr(self, f.name)) for f in dataclasses.fields(self)))  # type: ignore[arg-type]


@dataclass(frozen=True)
class TokenHead:
    """The training head: the target's lm_head rows of a vocabulary (all tokens, or a subset)."""

    weight: torch.Tensor  # (V', H) frozen rows of lm_head
    ids: torch.Tensor  # (V',) long: row -> token id
    index_of: torch.Tensor  # (V,) long: token id -> row, -1 when outside

    @classmethod
    def build(cls, lm_head_weight: torch.Tensor, ids: torch.Tensor | None = None) -> TokenHead:
        """Rows `ids` of `lm_head_weight (V, H)`; None keeps the full vocabulary."""
        V = lm_head_weight.shape[0]
        ids = torch.arange(V) if ids is None else ids.long().cpu()  # (V',)
        if ids.numel() == 0:
            raise ValueError("vocabulary subset must hold at least one id")
        check_draft_vocab(ids, ids.numel(), V)
        index_of = torch.full((V,), -1, dtype=torch.long)  # (V,)
        index_of[ids] = torch.arange(ids.numel())
        weight = lm_head_weight.detach()[ids.to(lm_head_weight.device)]  # (V', H)
        return cls(weight, ids, index_of.to(lm_head_weight.device))

    @property
    def size(self) -> int:
        return self.weight.shape[0]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., H) -> (..., V')."""
        return F.linear(x, self.weight)


def token_counts(records: Sequence[CachedRecord], vocab_size: int) -> torch.Tensor:
    """(V,) long: occurrences of each token among the loss-masked tokens of `records`."""
    counts = torch.zeros(vocab_size, dtype=torch.long)  # (V,)
    for r in records:
        counts += torch.bincount(r.input_ids[r.loss_mask.bool()].long(), minlength=vocab_size)
    return counts


def frequent_tokens(counts: torch.Tensor, n: int, always: Sequence[int] = ()) -> torch.Tensor:
    """The ids of the n largest `counts (V,)` (ties: lower id first), `always` included (e.g. EOS), sorted.
    Ids never seen fill the tail in id order, so the result always has min(n, V) ids."""
    counts = counts.clone()
    must = torch.tensor(sorted(set(always)), dtype=torch.long)
    counts[must] = counts.max() + 1
    order = torch.sort(-counts, stable=True).indices  # (V,) most frequent first
    return order[: min(n, counts.numel())].sort().values  # (n,)


def training_vocabulary(counts: torch.Tensor, n: int, eos_ids: Sequence[int]) -> torch.Tensor:
    """The vocabulary `objective.vocab_subset = n` trains over (and the drafter then drafts from): the n
    most frequent of `counts (V,)`, the target's EOS ids (those inside the vocabulary) always in; sorted."""
    V = counts.numel()
    return frequent_tokens(counts, n, always=[i for i in eos_ids if 0 <= i < V])


# ---------------------------------------------------------------------------------------------------
# Alignment, masks, target distributions


@dataclass
class Aligned:
    """A batch in drafter coordinates: position i reads (f_i, t_{i+1}) and targets f_{i+K}; T' positions."""

    next_tokens: torch.Tensor  # (B, T') long: t_{i+1}
    features: torch.Tensor  # (B, T', H): f_i
    target_features: torch.Tensor  # (B, T', H): f_{i+K}
    glance_tokens: torch.Tensor  # (B, T') long: t_{i+K+1}
    valid: torch.Tensor  # (B, T') bool
    positions: torch.Tensor  # (B, T') long
    lengths: torch.Tensor  # (B,) long: record lengths (tokens)


def align(batch: Batch, K: int) -> Aligned:
    """Shift a batch into drafter coordinates (module doc). T' = T - K - 1 (later positions never count)."""
    B, T = batch.input_ids.shape
    Tp = T - K - 1
    if Tp < 1:
        raise ValueError(f"records of {T} tokens are too short for block size {K} (need at least {K + 2})")
    ids = batch.input_ids
    idx = torch.arange(Tp)  # (T',)
    valid = (idx[None] + K + 1 < batch.lengths[:, None]) & batch.loss_mask[:, K + 1 :]  # (B, T')
    return Aligned(
        next_tokens=ids[:, 1 : Tp + 1],  # (B, T')
        features=batch.hidden[:, :Tp],  # (B, T', H)
        target_features=batch.hidden[:, K : K + Tp],  # (B, T', H)
        glance_tokens=ids[:, K + 1 :],  # (B, T')
        valid=valid,
        positions=idx[None].expand(B, Tp).contiguous(),  # (B, T')
        lengths=batch.lengths,
    )


def block_layout(
    B: int, T: int, K: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random block offsets per record: (mask (B, T, T) bool block-causal, block position (B, T) long).

    With `generator=None` every record is left-aligned (offset 0), for deterministic evaluation.
    """
    if generator is None:
        offsets = torch.zeros(B, dtype=torch.long)  # (B,)
    else:
        offsets = torch.randint(0, K, (B,), generator=generator)  # (B,)
    pos = torch.arange(T)[None] + offsets[:, None]  # (B, T)
    block = pos // K  # (B, T)
    mask = block[:, None, :] <= block[:, :, None]  # (B, T, T)
    return mask, pos % K


@dataclass
class TargetDist:
    """The target's distribution at each position, over the training head's rows."""

    logp: torch.Tensor  # (B, T', M) renormalised log-probs over the support (-inf outside)
    logp_t: torch.Tensor  # (B, T', M) the same at temperature T
    rows: torch.Tensor | None  # (B, T', M) long head rows of a sparse support; None: dense over V'
    has_support: torch.Tensor  # (B, T') bool: some probability lies inside the head
    token: torch.Tensor  # (B, T') long head row of the target's argmax, -1 when outside the head


def target_distribution(
    aligned: Aligned, batch: Batch, head: TokenHead, K: int, temperature: float
) -> TargetDist:
    """From the cached top-N at i+K when the batch has them, else from `head(f_{i+K})`."""
    Tp = aligned.valid.shape[1]
    if batch.topk_ids is None or batch.topk_logprobs is None:
        with torch.no_grad():
            z = head.logits(aligned.target_features).float()  # (B, T', V')
        return TargetDist(
            logp=F.log_softmax(z, -1),  # (B, T', V')
            logp_t=F.log_softmax(z / temperature, -1),  # (B, T', V')
            rows=None,
            has_support=torch.ones_like(aligned.valid),
            token=z.argmax(-1),  # (B, T')
        )
    ids = batch.topk_ids[:, K : K + Tp].to(head.index_of.device)  # (B, T', N)
    lp = batch.topk_logprobs[:, K : K + Tp].float()  # (B, T', N)
    rows = head.index_of[ids]  # (B, T', N)
    inside = rows >= 0  # (B, T', N)
    has = inside.any(-1)  # (B, T')
    neg = torch.tensor(float("-inf"))
    lp_in = torch.where(inside, lp, neg)  # (B, T', N)
    safe = torch.where(has[..., None], lp_in, 0.0)  # rows without support: uniform, masked later
    return TargetDist(
        logp=safe - safe.logsumexp(-1, keepdim=True),  # (B, T', N)
        logp_t=safe / temperature - (safe / temperature).logsumexp(-1, keepdim=True),  # (B, T', N)
        rows=rows.clamp_min(0),  # (B, T', N)
        has_support=has,
        token=rows[..., 0],  # (B, T') the cached top-1 (full-vocabulary argmax), -1 if outside
    )


def sample_labels(dist: TargetDist, generator: torch.Generator | None) -> torch.Tensor:
    """One head row per position drawn from the target distribution: (B, T') long."""
    p = dist.logp.exp()  # (B, T', M)
    flat = p.reshape(-1, p.shape[-1])  # (B*T', M)
    draw = torch.multinomial(flat, 1, generator=generator).view(p.shape[:-1])  # (B, T')
    if dist.rows is None:
        return draw
    return dist.rows.gather(-1, draw[..., None])[..., 0]  # (B, T')


# ---------------------------------------------------------------------------------------------------
# CSGD: lambda, choices, replacement


def glance_lambda(schedule: str, epoch: int, epochs: int) -> float:
    """lambda at 0-based `epoch` of `epochs` (module doc)."""
    if not 0 <= epoch < epochs:
        raise ValueError(f"epoch {epoch} outside [0, {epochs})")
    if schedule == "paper":
        return LAMBDA_PAPER * (epochs - epoch) / epochs
    if schedule == "reference":
        start, end = LAMBDA_REFERENCE
        return start if epochs == 1 else start + (end - start) * epoch / (epochs - 1)
    raise ValueError(f"unknown lambda schedule {schedule!r}")


def choose_glances(
    valid: torch.Tensor,
    wrong: torch.Tensor,
    block_pos: torch.Tensor,
    lam: float,
    K: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Positions to replace, (B, T') bool: per record floor(lam * d) of the block-start candidates
    (N // K starts, each a run of 1..K-1 positions, when K > 2); d = (valid & wrong).sum()."""
    B, Tp = valid.shape
    d = (valid & wrong).sum(1)  # (B,)
    n = torch.floor(lam * d.double()).long()  # (B,)
    if K > 2:
        n = n // K
    cand = valid & (block_pos == 0)  # (B, T')
    score = torch.rand(B, Tp, generator=generator)  # (B, T')
    score = torch.where(cand, score, -1.0)
    order = score.argsort(dim=1, descending=True)  # (B, T')
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(Tp).expand(B, Tp).contiguous())  # (B, T')
    starts = cand & (rank < n[:, None])  # (B, T')
    if K <= 2:
        return starts
    extra = torch.randint(0, K - 1, (B, Tp), generator=generator)  # (B, T') extra run length 0..K-2
    chosen = starts.clone()
    alive = starts.clone()  # (B, T') indexed by run start: the run still extends at offset j
    for j in range(1, min(K - 1, Tp)):
        valid_at = torch.zeros_like(valid)
        valid_at[:, :-j] = valid[:, j:]  # valid_at[p] = valid[p + j]
        alive &= (extra >= j) & valid_at  # a run stops at its first invalid position
        chosen[:, j:] |= alive[:, :-j]
    return chosen


# ---------------------------------------------------------------------------------------------------
# The loss


@dataclass
class LossOutput:
    loss: torch.Tensor
    """Scalar with grad."""
    feature_loss: float
    soft_loss: float
    hard_loss: float
    correct: torch.Tensor
    """(K,) long: valid positions per block position whose drafter argmax equals the target token."""
    total: torch.Tensor
    """(K,) long: valid positions per block position."""
    hamming: int
    """d summed over the batch (clean pass; 0 without CSGD)."""
    replaced: int


def add_noise(
    features: torch.Tensor, lengths: torch.Tensor, cfg: ObjectiveSection, generator
) -> torch.Tensor:
    """features (B, T', H) + uniform noise of width `noise * ref_len / length` per record."""
    if cfg.noise == 0:
        return features
    width = cfg.noise * cfg.noise_ref_len / lengths.clamp_min(1).float()  # (B,)
    u = torch.rand(features.shape, generator=generator)  # (B, T', H)
    return features + (u - 0.5) * width[:, None, None]


def csgd_loss(
    model: DrafterFn,
    embed_weight: torch.Tensor,
    head: TokenHead,
    batch: Batch,
    cfg: ObjectiveSection,
    K: int,
    lam: float,
    generator: torch.Generator,
) -> LossOutput:
    """One batch of CSGD (or, with `cfg.csgd` False, the plain EAGLE-style objective); steps in the module doc."""
    a = align(batch, K)
    B, Tp = a.valid.shape
    mask, block_pos = block_layout(B, Tp, K, generator)  # (B, T', T'), (B, T')
    features = add_noise(a.features, a.lengths, cfg, generator)  # (B, T', H)
    tokens = a.next_tokens  # (B, T')
    dist = target_distribution(a, batch, head, K, cfg.temperature)
    hamming = replaced = 0
    if cfg.csgd:
        # 1. clean no-grad pass and the Hamming count
        with torch.no_grad():
            pred = model(F.embedding(tokens, embed_weight), features, a.positions, mask=mask)  # (B, T', H)
            wrong = head.logits(pred).argmax(-1) != dist.token  # (B, T')
        # 2-3. choose N = lambda * d block starts and replace feature and token together
        chosen = choose_glances(a.valid, wrong, block_pos, lam, K, generator)  # (B, T')
        hamming, replaced = int((a.valid & wrong).sum()), int(chosen.sum())
        features = torch.where(chosen[..., None], a.target_features, features)  # (B, T', H)
        tokens = torch.where(chosen, a.glance_tokens, tokens)  # (B, T')
    # 4. graded pass
    pred = model(F.embedding(tokens, embed_weight), features, a.positions, mask=mask).float()  # (B, T', H)
    logits = head.logits(pred).float()  # (B, T', V')
    loss, parts = _distill_loss(pred, logits, a, dist, cfg, generator)
    with torch.no_grad():
        right = (logits.argmax(-1) == dist.token) & a.valid  # (B, T')
        correct = torch.zeros(K, dtype=torch.long).index_add_(
            0, block_pos[right], torch.ones_like(block_pos[right])
        )
        total = torch.zeros(K, dtype=torch.long).index_add_(
            0, block_pos[a.valid], torch.ones_like(block_pos[a.valid])
        )
    return LossOutput(loss, *parts, correct, total, hamming, replaced)


def _distill_loss(
    pred: torch.Tensor,
    logits: torch.Tensor,
    a: Aligned,
    dist: TargetDist,
    cfg: ObjectiveSection,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """w_f SmoothL1 + w_t (w_soft L_soft + w_hard L_hard) over valid positions; returns (loss, parts)."""
    valid = a.valid.float()  # (B, T')
    tok_valid = (a.valid & dist.has_support).float()  # (B, T')
    n, n_tok = valid.sum() + 1e-5, tok_valid.sum() + 1e-5
    feat = F.smooth_l1_loss(pred, a.target_features, reduction="none").mean(-1)  # (B, T')
    feature_loss = (feat * valid).sum() / n
    logq = F.log_softmax(logits, -1)  # (B, T', V')
    logq_t = F.log_softmax(logits / cfg.temperature, -1)  # (B, T', V')
    if dist.rows is not None:
        logq_t_s = logq_t.gather(-1, dist.rows)  # (B, T', N)
        terms = torch.where(
            dist.logp.isfinite(), dist.logp.exp() * (dist.logp_t - logq_t_s), 0.0
        )  # (B, T', N)
    else:
        terms = dist.logp.exp() * (dist.logp_t - logq_t)  # (B, T', V')
    soft = (terms.sum(-1) * tok_valid).sum() / n_tok
    with torch.no_grad():
        labels = sample_labels(dist, generator)  # (B, T')
    hard = -(logq.gather(-1, labels[..., None])[..., 0] * tok_valid).sum() / n_tok
    token_loss = cfg.soft_weight * soft + cfg.hard_weight * hard
    loss = cfg.feature_weight * feature_loss + cfg.token_weight * token_loss
    return loss, (float(feature_loss.detach()), float(soft.detach()), float(hard.detach()))
