"""Drafter: config, fusion, block-causal semantics, mask invariance of the context cache, cache use."""

import dataclasses

import pytest
import torch

from falcon_core.drafter import Drafter, DrafterConfig, PositionwiseLSTM
from falcon_core.masks import block_causal_mask, causal_mask, with_prefix
from falcon_core.target import TargetConfig, TargetModel

H = 32
TARGET = TargetConfig(
    model_type="qwen2", vocab_size=50, hidden_size=H, intermediate_size=64, num_layers=3, num_heads=4,
    num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=128,
    attention_bias=True,
)  # fmt: skip


def make_drafter(seed=0, **overrides):
    torch.manual_seed(seed)
    d = Drafter(DrafterConfig.from_target(TARGET, **overrides)).eval()
    for p in d.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return d


def inputs(T, seed=1, B=1):
    g = torch.Generator().manual_seed(seed)
    emb, feat = torch.randn(B, T, H, generator=g), torch.randn(B, T, H, generator=g)
    return emb, feat, torch.arange(T).expand(B, T)


def test_config_from_target_and_validation():
    c = DrafterConfig.from_target(TARGET, block_size=3, fusion="lstm")
    assert (c.hidden_size, c.num_kv_heads, c.head_dim, c.vocab_size) == (H, 2, 8, 50)
    assert (c.block_size, c.fusion, c.num_layers, c.attention_bias) == (3, "lstm", 1, True)
    assert DrafterConfig.from_dict(c.to_dict()) == c
    for bad, msg in [
        ({"block_size": 0}, "block_size"),
        ({"num_layers": 0}, "num_layers"),
        ({"fusion": "gru"}, "fusion"),
        ({"num_kv_heads": 3}, "multiple of num_kv_heads"),
        ({"hidden_size": -1}, "hidden_size must be positive"),
    ]:
        with pytest.raises(ValueError, match=msg):
            DrafterConfig.from_target(TARGET, **bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.block_size = 2


def test_drafter_owns_no_embedding_or_lm_head_and_first_layer_has_no_input_norm():
    d = make_drafter(num_layers=2)
    names = set(d.state_dict())
    assert not any(n.startswith(("embed", "lm_head")) for n in names)
    assert "layers.0.input_layernorm.weight" not in names and "layers.1.input_layernorm.weight" in names
    assert {n for n in names if n.startswith("fusion")} == {"fusion.weight", "fusion.bias"}


def test_lstm_fusion_equals_torch_lstm_run_per_position():
    """The gated map == nn.LSTM(2H, H, 2 layers) over a length-1 sequence per position, zero state."""
    torch.manual_seed(0)
    ours = PositionwiseLSTM(2 * H, H)
    ref = torch.nn.LSTM(2 * H, H, num_layers=2)
    with torch.no_grad():
        for layer, gates in enumerate(ours.gates):
            w, b = getattr(ref, f"weight_ih_l{layer}"), getattr(ref, f"bias_ih_l{layer}")
            b = b + getattr(ref, f"bias_hh_l{layer}")
            wi, _, wg, wo = w.chunk(4)  # torch's gate order: i, f, g, o
            bi, _, bg, bo = b.chunk(4)
            gates.weight.copy_(torch.cat((wi, wg, wo)))
            gates.bias.copy_(torch.cat((bi, bg, bo)))
    x = torch.randn(2, 5, 2 * H)
    expected, _ = ref(x.reshape(1, 10, 2 * H))  # seq len 1, batch = every position
    torch.testing.assert_close(ours(x), expected.reshape(2, 5, H), atol=1e-6, rtol=0)


@pytest.mark.parametrize("fusion", ["linear", "lstm"])
@pytest.mark.parametrize("K", [1, 2, 3])
def test_block_causal_semantics(fusion, K):
    """Position i's output ignores later blocks and depends on every position of its own block."""
    d = make_drafter(block_size=K, fusion=fusion)
    T = 7
    emb, feat, pos = inputs(T)
    base = d(emb, feat, pos)  # (1, T, H)
    blocks = ((torch.arange(T) + (-T) % K) // K).tolist()
    for j in range(T):
        emb2 = emb.clone()
        emb2[0, j] += 1.0
        out = d(emb2, feat, pos)
        changed = (out - base).abs().amax(-1)[0] > 1e-6  # (T,)
        for i in range(T):
            assert bool(changed[i]) == (blocks[j] <= blocks[i]), (i, j, blocks)
    assert blocks[-K:] == [blocks[-1]] * K and blocks[-K - 1] < blocks[-1]  # last block: the newest K


@pytest.mark.parametrize("K", [1, 2, 3])
def test_n1_context_kv_does_not_depend_on_the_mask(K):
    """With one layer, the K/V written for the new positions are a position-wise function of the
    inputs: the same under the block-causal mask, a causal one, any alignment, or a lone row each."""
    d = make_drafter(block_size=K)
    emb, feat, pos = inputs(9)
    caches = []
    for mask in (
        block_causal_mask(9, K),
        causal_mask(9),
        block_causal_mask(9, K, offset=0),
        torch.eye(9) > 0,
    ):
        cache = d.new_cache(16)
        d(emb, feat, pos, cache, 0, with_prefix(mask, 0))
        caches.append(cache)
    for c in caches[1:]:
        assert torch.equal(c.k[:, :, :, :9], caches[0].k[:, :, :, :9])
        assert torch.equal(c.v[:, :, :, :9], caches[0].v[:, :, :, :9])


def test_n2_context_kv_does_depend_on_the_mask():
    """Why N = 1 is the simple case: the second layer's K/V see the first layer's masked attention."""
    d = make_drafter(num_layers=2, block_size=2)
    emb, feat, pos = inputs(9)
    a, b = d.new_cache(16), d.new_cache(16)
    d(emb, feat, pos, a, 0, block_causal_mask(9, 2))
    d(emb, feat, pos, b, 0, causal_mask(9))
    assert torch.equal(a.k[0], b.k[0]) and not torch.allclose(a.k[1, :, :, :9], b.k[1, :, :, :9])


@pytest.mark.parametrize("fusion", ["linear", "lstm"])
def test_cached_passes_equal_one_uncached_pass(fusion):
    """Pass 1 over a context, then a block of K over the cache == one pass under the joint mask."""
    K = 2
    d = make_drafter(block_size=K, fusion=fusion, num_layers=2)
    emb, feat, pos = inputs(11)
    joint = block_causal_mask(11, K, offset=(-9) % K)  # context blocks right-aligned at 9, then a block of 2
    full = d(emb, feat, pos, mask=joint)
    cache = d.new_cache(16)
    first = d(emb[:, :9], feat[:, :9], pos[:, :9], cache, 0)
    cache.commit(torch.arange(9), 0)
    second = d(emb[:, 9:], feat[:, 9:], pos[:, 9:], cache, 9)  # default: own block + every cached row
    torch.testing.assert_close(torch.cat((first, second), 1), full, atol=1e-5, rtol=0)


def test_batched_forward_matches_single():
    d = make_drafter(block_size=2)
    emb, feat, pos = inputs(6, B=3)
    out = d(emb, feat, pos)
    torch.testing.assert_close(out[2:], d(emb[2:], feat[2:], pos[2:]), atol=1e-5, rtol=0)


def test_init_from_target_layer():
    torch.manual_seed(0)
    target = TargetModel(TARGET)
    d = Drafter(DrafterConfig.from_target(TARGET, num_layers=2))
    d.init_from_target_layer(target, 1)
    for j, src in ((0, 1), (1, 2)):
        for name, p in d.layers[j].state_dict().items():
            assert torch.equal(p, target.layers[src].state_dict()[name]), name
    # the copied attention computes what the target's does on the target's normed input
    x = torch.randn(1, 4, H)
    rope = d.rotary(torch.arange(4)[None])
    normed = target.layers[1].input_layernorm(x)
    ours = d.layers[0].self_attn(normed, rope, causal_mask(4))
    torch.testing.assert_close(ours, target.layers[1].self_attn(normed, rope, causal_mask(4)))
    with pytest.raises(ValueError, match=r"cannot copy layers 2\.\.3"):
        d.init_from_target_layer(target, 2)


def test_forward_contract_errors():
    d = make_drafter()
    emb, feat, pos = inputs(4)
    with pytest.raises(ValueError, match=r"must both be \(B, T, 32\)"):
        d(emb, feat[:, :3], pos)
    with pytest.raises(ValueError, match=r"is torch\.float32 but features"):
        d(emb, feat.double(), pos)
    with pytest.raises(ValueError, match="positions must be"):
        d(emb, feat, pos[:, :2])
    with pytest.raises(ValueError, match="do not fit the cache"):
        d(emb, feat, pos, d.new_cache(5), 3)
