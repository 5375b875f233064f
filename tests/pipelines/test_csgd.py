"""CSGD objective on a tiny drafter: alignment, masks, lambda, glance choices, coupled replacement, loss."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from falcon_core.drafter import Drafter, DrafterConfig
from falcon_core.masks import block_causal_mask
from pipelines.config import ObjectiveSection
from pipelines.csgd import (
    Batch,
    TokenHead,
    align,
    block_layout,
    choose_glances,
    csgd_loss,
    frequent_tokens,
    glance_lambda,
    target_distribution,
    token_counts,
)
from pipelines.hidden_cache import CachedRecord

H, V = 16, 40


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is several times faster than two on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_drafter(K: int = 2, seed: int = 0) -> Drafter:
    torch.manual_seed(seed)
    cfg = DrafterConfig(
        hidden_size=H, intermediate_size=32, num_heads=2, num_kv_heads=1, head_dim=8, vocab_size=V,
        max_position_embeddings=256, block_size=K,
    )  # fmt: skip
    return Drafter(cfg)


def records(lengths, topk=0, seed=0, mask_from=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for T in lengths:
        mask = torch.zeros(T, dtype=torch.uint8)
        mask[mask_from:] = 1
        lp = torch.randn(T, V, generator=g).log_softmax(-1)  # (T, V)
        top = lp.topk(topk, -1) if topk else None
        out.append(
            CachedRecord(
                input_ids=torch.randint(0, V, (T,), generator=g, dtype=torch.int32),
                loss_mask=mask,
                hidden=torch.randn(T, H, generator=g),
                topk_ids=top.indices.int() if topk else None,
                topk_logprobs=top.values.half() if topk else None,
            )
        )
    return out


def head_and_embed(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)


def test_collate_pads_and_align_shifts_by_k():
    recs = records([9, 6])
    batch = Batch.collate(recs)
    assert batch.input_ids.shape == (2, 9) and batch.lengths.tolist() == [9, 6]
    assert batch.hidden[1, 6:].abs().sum() == 0 and not batch.loss_mask[1, 6:].any()
    for K in (1, 2, 3):
        a = align(batch, K)
        Tp = 9 - K - 1
        assert a.valid.shape == (2, Tp)
        for b, r in enumerate(recs):
            T = r.input_ids.shape[0]
            for i in range(Tp):
                expect = i + K + 1 < T and bool(r.loss_mask[i + K + 1])
                assert bool(a.valid[b, i]) == expect, (K, b, i)
                if expect:
                    assert a.next_tokens[b, i] == r.input_ids[i + 1]
                    assert a.glance_tokens[b, i] == r.input_ids[i + K + 1]
                    assert torch.equal(a.features[b, i], r.hidden[i].float())
                    assert torch.equal(a.target_features[b, i], r.hidden[i + K].float())
    with pytest.raises(ValueError, match="too short"):
        align(Batch.collate(records([3])), 2)


def test_block_layout_matches_block_causal_mask_with_each_offset():
    g = torch.Generator().manual_seed(0)
    for K in (1, 2, 3):
        mask, pos = block_layout(16, 7, K, g)
        for b in range(16):
            offset = int(pos[b, 0])  # position 0 sits at block position `offset`
            assert torch.equal(mask[b], block_causal_mask(7, K, offset=offset)), (K, b)
        if K > 1:
            assert set(pos[:, 0].tolist()) == set(range(K))  # every alignment is drawn
    mask, pos = block_layout(2, 5, 2, None)
    assert torch.equal(mask[0], block_causal_mask(5, 2, offset=0)) and pos[0].tolist() == [0, 1, 0, 1, 0]


def test_lambda_schedules():
    assert glance_lambda("reference", 0, 20) == pytest.approx(0.45)
    assert glance_lambda("reference", 19, 20) == pytest.approx(0.1)
    assert glance_lambda("reference", 0, 1) == pytest.approx(0.45)
    vals = [glance_lambda("reference", e, 5) for e in range(5)]
    assert all(a > b for a, b in itertools.pairwise(vals))
    assert glance_lambda("paper", 0, 10) == pytest.approx(0.4)
    assert glance_lambda("paper", 5, 10) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        glance_lambda("paper", 10, 10)


def test_choose_glances_counts_and_places():
    g = torch.Generator().manual_seed(1)
    B, Tp = 64, 40
    valid = torch.rand(B, Tp, generator=g) > 0.2
    wrong = torch.rand(B, Tp, generator=g) > 0.3
    for K in (2, 3, 4):
        _, block_pos = block_layout(B, Tp, K, g)
        for lam in (0.1, 0.45, 1.0):
            chosen = choose_glances(valid, wrong, block_pos, lam, K, g)
            assert not (chosen & ~valid).any()
            d = (valid & wrong).sum(1)
            cand = (valid & (block_pos == 0)).sum(1)
            n = torch.floor(lam * d.double()).long()
            if K == 2:
                assert chosen.sum(1).tolist() == torch.minimum(n, cand).tolist()
                assert not (chosen & (block_pos != 0)).any()
            else:
                starts = chosen & (block_pos == 0)
                assert starts.sum(1).tolist() == torch.minimum(n // K, cand).tolist()
                # every chosen position belongs to a run that starts at its block's start, length <= K-1
                assert not (chosen & (block_pos == K - 1)).any()
                for b in range(B):
                    for i in range(Tp):
                        if chosen[b, i] and block_pos[b, i] > 0:
                            assert chosen[b, i - 1]


class Spy(torch.nn.Module):
    """Wraps a drafter and records the inputs of every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, token_embeds, features, positions, mask=None):
        self.calls.append((token_embeds.detach().clone(), features.detach().clone(), mask.clone()))
        return self.inner(token_embeds, features, positions, mask=mask)


def test_coupled_replacement_puts_the_ground_truth_at_chosen_block_starts():
    embed, lm_head = head_and_embed()
    recs = records([30, 24, 18])
    batch = Batch.collate(recs)
    cfg = ObjectiveSection(noise=0.0)
    K = 2
    spy = Spy(tiny_drafter(K))  # untrained: nearly every token is wrong, so lambda * d > 0
    out = csgd_loss(
        spy, embed, TokenHead.build(lm_head), batch, cfg, K, 1.0, torch.Generator().manual_seed(0)
    )
    assert len(spy.calls) == 2 and out.replaced > 0 and out.hamming > 0
    (emb0, feat0, mask0), (emb1, feat1, mask1) = spy.calls
    assert torch.equal(mask0, mask1)
    a = align(batch, K)
    changed = (feat1 != feat0).any(-1)  # (B, T')
    assert int(changed.sum()) == out.replaced
    b, i = torch.nonzero(changed, as_tuple=True)
    assert torch.equal(feat1[b, i], a.target_features[b, i])  # f_{p+K}
    assert torch.equal(emb1[b, i], F.embedding(a.glance_tokens[b, i], embed))  # embed(t_{p+K+1})
    assert torch.equal(emb1[~changed], emb0[~changed])
    assert a.valid[b, i].all()
    # chosen positions start their block: the position before does not see them
    keep = i > 0
    assert not mask0[b[keep], i[keep] - 1, i[keep]].any()
    # no CSGD: one pass on the clean inputs
    spy.calls.clear()
    csgd_loss(spy, embed, TokenHead.build(lm_head), batch, dataclasses.replace(cfg, csgd=False), K, 1.0,
              torch.Generator().manual_seed(0))  # fmt: skip
    assert len(spy.calls) == 1 and torch.equal(spy.calls[0][1], feat0)


class Oracle(torch.nn.Module):
    """Predicts f_{i+K} exactly (reads it from a table), so the Hamming count is 0."""

    def __init__(self, targets):
        super().__init__()
        self.targets = targets
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, token_embeds, features, positions, mask=None):
        return self.targets + 0 * self.w


def test_hamming_zero_for_a_perfect_drafter_and_no_replacement():
    embed, lm_head = head_and_embed()
    batch = Batch.collate(records([20, 20]))
    a = align(batch, 2)
    out = csgd_loss(Oracle(a.target_features), embed, TokenHead.build(lm_head), batch,
                    ObjectiveSection(noise=0.0), 2, 1.0, torch.Generator().manual_seed(0))  # fmt: skip
    assert out.hamming == 0 and out.replaced == 0
    assert out.feature_loss == 0.0 and torch.equal(out.correct, out.total)
    # the soft loss of a perfect prediction is 0 at temperature 1 (p log p/p)
    out1 = csgd_loss(Oracle(a.target_features), embed, TokenHead.build(lm_head), batch,
                     ObjectiveSection(noise=0.0, temperature=1.0), 2, 1.0, torch.Generator())  # fmt: skip
    assert abs(out1.soft_loss) < 1e-5


def naive_loss(pred, logits_fn, batch, K, cfg, labels):
    """Per-position loop of FALCON.md's formula over the full vocabulary (target from lm_head(f_{i+K}))."""
    feat = soft = hard = 0.0
    n = 0
    B, T = batch.input_ids.shape
    for b in range(B):
        L = int(batch.lengths[b])
        for i in range(T - K - 1):
            if not (i + K + 1 < L and batch.loss_mask[b, i + K + 1]):
                continue
            n += 1
            tgt = batch.hidden[b, i + K]
            feat += F.smooth_l1_loss(pred[b, i], tgt).item()
            z_t, z_q = logits_fn(tgt), logits_fn(pred[b, i])
            p = z_t.softmax(-1)
            soft += (
                (p * (F.log_softmax(z_t / cfg.temperature, -1) - F.log_softmax(z_q / cfg.temperature, -1)))
                .sum()
                .item()
            )
            hard += -F.log_softmax(z_q, -1)[labels[b, i]].item()
    return feat / n, soft / n, hard / n


def test_loss_equals_the_formula_position_by_position():
    embed, lm_head = head_and_embed()
    batch = Batch.collate(records([14, 11, 9], seed=5))
    K = 2
    cfg = ObjectiveSection(csgd=False, noise=0.0)
    drafter = tiny_drafter(K)
    preds = []

    def model(te, f, pos, mask=None):
        preds.append(drafter(te, f, pos, mask=mask))
        return preds[-1]

    torch.manual_seed(0)
    out = csgd_loss(
        model, embed, TokenHead.build(lm_head), batch, cfg, K, 0.0, torch.Generator().manual_seed(7)
    )
    # replay the generator to recover the sampled hard labels: offsets, then uniform noise (none), labels
    g = torch.Generator().manual_seed(7)
    block_layout(3, batch.input_ids.shape[1] - K - 1, K, g)
    a = align(batch, K)
    dist = target_distribution(a, batch, TokenHead.build(lm_head), K, cfg.temperature)
    from pipelines.csgd import sample_labels

    labels = sample_labels(dist, g)
    f, s, h = naive_loss(preds[0].detach(), lambda x: F.linear(x, lm_head), batch, K, cfg, labels)
    assert out.feature_loss == pytest.approx(f, rel=1e-5)
    assert out.soft_loss == pytest.approx(s, rel=1e-4, abs=1e-6)
    assert out.hard_loss == pytest.approx(h, rel=1e-5)
    expect = cfg.feature_weight * f + cfg.token_weight * (cfg.soft_weight * s + cfg.hard_weight * h)
    assert float(out.loss.detach()) == pytest.approx(expect, rel=1e-4)


def test_cached_topk_with_the_whole_vocabulary_equals_the_dense_target():
    embed, lm_head = head_and_embed()
    recs = records([12, 10], seed=2)
    # make the cached log-probs the exact lm_head(f) distribution over all V tokens
    for r in recs:
        lp = F.log_softmax(F.linear(r.hidden, lm_head), -1)
        top = lp.topk(V, -1)
        r.topk_ids, r.topk_logprobs = top.indices.int(), top.values  # fp32 so the two agree closely
    dense, cached = Batch.collate(recs), Batch.collate(recs)
    dense.topk_ids = dense.topk_logprobs = None
    head = TokenHead.build(lm_head)
    a = align(cached, 2)
    d1 = target_distribution(a, dense, head, 2, 0.95)
    d2 = target_distribution(a, cached, head, 2, 0.95)
    p2 = torch.full_like(d1.logp, float("-inf")).scatter(-1, d2.rows, d2.logp)
    v = a.valid
    assert torch.allclose(d1.logp[v], p2[v], atol=1e-5)
    assert torch.equal(d1.token[v], d2.token[v])
    drafter = tiny_drafter(2)
    cfg = ObjectiveSection(csgd=False, noise=0.0)
    o1 = csgd_loss(drafter, embed, head, dense, cfg, 2, 0.0, torch.Generator().manual_seed(1))
    o2 = csgd_loss(drafter, embed, head, cached, cfg, 2, 0.0, torch.Generator().manual_seed(1))
    assert o1.feature_loss == pytest.approx(o2.feature_loss)
    assert o1.soft_loss == pytest.approx(o2.soft_loss, rel=1e-4)


def test_vocabulary_subset_restricts_and_renormalises_the_target():
    embed, lm_head = head_and_embed()
    recs = records([16, 12], topk=8, seed=4)
    ids = frequent_tokens(token_counts(recs, V), 10, always=[V - 1])
    assert ids.numel() == 10 and (V - 1) in ids.tolist()
    head = TokenHead.build(lm_head, ids)
    assert head.size == 10 and torch.equal(head.weight, lm_head[ids])
    batch = Batch.collate(recs)
    a = align(batch, 2)
    dist = target_distribution(a, batch, head, 2, 0.95)
    inside = torch.isin(batch.topk_ids[:, 2 : 2 + a.valid.shape[1]], ids)
    assert torch.equal(dist.has_support, inside.any(-1))
    probs = dist.logp.exp().sum(-1)
    assert torch.allclose(probs[dist.has_support], torch.ones(()), atol=1e-5)
    top1_in = inside[..., 0]
    assert (dist.token[~top1_in] == -1).all() and (dist.token[top1_in] >= 0).all()
    out = csgd_loss(
        tiny_drafter(2), embed, head, batch, ObjectiveSection(), 2, 0.45, torch.Generator().manual_seed(0)
    )
    assert math.isfinite(float(out.loss.detach()))
    with pytest.raises(ValueError, match="distinct"):
        TokenHead.build(lm_head, torch.tensor([1, 1]))


def test_valid_positions_never_see_padding():
    drafter = tiny_drafter(2).eval()
    embed, _ = head_and_embed()
    recs = records([25, 13], seed=6)
    padded = align(Batch.collate(recs), 2)
    alone = align(Batch.collate(recs[1:]), 2)
    mask_p, _ = block_layout(2, padded.valid.shape[1], 2, None)
    mask_a, _ = block_layout(1, alone.valid.shape[1], 2, None)
    with torch.no_grad():
        out_p = drafter(
            F.embedding(padded.next_tokens, embed), padded.features, padded.positions, mask=mask_p
        )
        out_a = drafter(F.embedding(alone.next_tokens, embed), alone.features, alone.positions, mask=mask_a)
    v = alone.valid[0]
    n = alone.valid.shape[1]
    assert torch.allclose(out_p[1, :n][v], out_a[0][v], atol=1e-5)
    assert torch.equal(padded.valid[1, :n], v) and not padded.valid[1, n:].any()


@pytest.mark.parametrize("use_csgd", [True, False])
def test_a_tiny_drafter_learns(use_csgd):
    """A few AdamW steps on fixed synthetic data reduce the loss and raise top-1 (both objectives)."""
    embed, lm_head = head_and_embed()
    batch = Batch.collate(records([40, 36, 30, 28], topk=8, seed=9))
    drafter = tiny_drafter(2)
    opt = torch.optim.AdamW(drafter.parameters(), lr=3e-3)
    cfg = ObjectiveSection(csgd=use_csgd, noise=0.0)
    head = TokenHead.build(lm_head)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(60):
        out = csgd_loss(drafter, embed, head, batch, cfg, 2, 0.45, g)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_value_(drafter.parameters(), 0.5)
        opt.step()
        first = (
            first if first is not None else (float(out.loss.detach()), out.correct.sum() / out.total.sum())
        )
    clean = csgd_loss(drafter, embed, head, batch, dataclasses.replace(cfg, csgd=False), 2, 0.0, g)
    assert float(clean.loss.detach()) < 0.7 * first[0]
    assert clean.correct.sum() / clean.total.sum() > first[1]
