"""Held-out evaluation: the simulated second drafting pass and the acceptance table on a tiny drafter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from falcon_core.drafter import Drafter, DrafterConfig
from falcon_core.masks import block_causal_mask
from pipelines.csgd import Batch, align, block_layout
from pipelines.evaluate import heldout_agreement, second_pass
from pipelines.hidden_cache import CachedRecord

H, V = 16, 40


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_drafter(K: int) -> Drafter:
    torch.manual_seed(0)
    cfg = DrafterConfig(hidden_size=H, intermediate_size=32, num_heads=2, num_kv_heads=1, head_dim=8,
                        vocab_size=V, max_position_embeddings=256, block_size=K)  # fmt: skip
    return Drafter(cfg).eval()


def records(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for T in lengths:
        mask = torch.ones(T, dtype=torch.uint8)
        mask[:3] = 0
        ids = torch.randint(0, V, (T,), generator=g, dtype=torch.int32)
        out.append(CachedRecord(ids, mask, torch.randn(T, H, generator=g)))
    return out


@pytest.mark.parametrize("K", [2, 3])
def test_second_pass_equals_one_forward_per_anchor_block(K):
    drafter = tiny_drafter(K)
    embed = torch.randn(V, H, generator=torch.Generator().manual_seed(1))
    a = align(Batch.collate(records([23, 17])), K)
    B, Tp = a.valid.shape
    mask, _ = block_layout(B, Tp, K, None)
    emb = F.embedding(a.next_tokens, embed)
    with torch.no_grad():
        pred = drafter(emb, a.features, a.positions, mask=mask)
        out2 = second_pass(drafter, embed, a, pred, K)
        for b in range(Tp // K - 1):
            n = (b + 1) * K  # the copy block covers positions n .. n+K-1
            feats = torch.cat((a.features[:, :n], pred[:, n - K : n]), 1)  # clean context, then f-hat
            seq = drafter(
                emb[:, : n + K], feats, a.positions[:, : n + K], mask=block_causal_mask(n + K, K, offset=0)
            )
            assert torch.allclose(seq[:, n:], out2[:, n : n + K], atol=1e-5), b


class Oracle(torch.nn.Module):
    """Returns f_{i+K} for every row it is given (the clean rows and their second-pass copies alike)."""

    def __init__(self, targets):
        super().__init__()
        self.targets = targets

    def forward(self, token_embeds, features, positions, mask=None):
        reps = token_embeds.shape[1] // self.targets.shape[1]
        return self.targets.repeat(1, reps, 1)


def test_a_perfect_drafter_agrees_everywhere_and_a_wrong_one_nowhere():
    K = 2
    lm_head = torch.randn(V, H, generator=torch.Generator().manual_seed(2))
    embed = torch.randn(V, H, generator=torch.Generator().manual_seed(3))
    recs = records([21, 21], seed=4)
    a = align(Batch.collate(recs), K)
    res = heldout_agreement(Oracle(a.target_features), embed, lm_head, recs, K, batch_size=2, ranks=3)
    assert res.top1 == [1.0, 1.0] and int(res.total.sum()) == int(a.valid.sum())
    assert [row[0] for row in res.acceptance] == [1.0] * 2 * K
    assert all(c > 0 for c in res.acceptance_counts)
    direction = torch.randn(H, generator=torch.Generator().manual_seed(5))
    constant = Oracle(torch.zeros_like(a.target_features) + direction)  # one token everywhere
    guess = int(F.linear(direction, lm_head).argmax())
    res = heldout_agreement(constant, embed, lm_head, recs, K, batch_size=2, ranks=1)
    hits = (F.linear(a.target_features, lm_head).argmax(-1) == guess) & a.valid
    assert int(res.correct.sum()) == int(hits.sum()) < int(a.valid.sum())
