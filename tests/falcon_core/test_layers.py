"""Layers vs transformers' reference implementations, and the cache contract of one decoder layer."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

from falcon_core.kv_cache import KVCache
from falcon_core.layers import DecoderLayer, LayerSpec, RMSNorm, RopeScaling, RotaryEmbedding, rope_inv_freq
from falcon_core.masks import causal_mask, with_prefix

ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}


@pytest.mark.parametrize("kind", list(ROPES))
def test_rope_tables_equal_transformers(kind):
    params = ROPES[kind]
    cfg = LlamaConfig(
        hidden_size=128,
        num_attention_heads=4,
        max_position_embeddings=512,
        rope_theta=500000.0,
        rope_scaling=params,
    )
    ours = RotaryEmbedding(32, 512, 500000.0, RopeScaling.from_hf(params, 512))
    hf = LlamaRotaryEmbedding(cfg)
    positions = torch.tensor([[0, 1, 7, 63, 64, 200, 511]])  # (1, 7)
    x = torch.zeros(1, 7, 32)
    hf_cos, hf_sin = hf(x, positions)  # (1, 7, 32) each, halves duplicated
    cos, sin = ours(positions)  # (1, 7, 16)
    assert torch.equal(torch.cat((cos, cos), -1), hf_cos)
    assert torch.equal(torch.cat((sin, sin), -1), hf_sin)
    if kind != "default":
        hf_inv, _ = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")
        assert torch.equal(rope_inv_freq(32, 500000.0, RopeScaling.from_hf(params, 512)), hf_inv)


def test_rope_scaling_rejects_unsupported_kinds():
    with pytest.raises(ValueError, match="unsupported RoPE scaling 'yarn'"):
        RopeScaling.from_hf({"rope_type": "yarn", "factor": 2.0}, 512)
    assert RopeScaling.from_hf({"rope_type": "default", "rope_theta": 1e4}, 512) is None


def test_rmsnorm_equals_transformers_in_bf16():
    torch.manual_seed(0)
    ours, hf = RMSNorm(64, 1e-5), LlamaRMSNorm(64, 1e-5)
    w = torch.randn(64)
    ours.weight.data.copy_(w)
    hf.weight.data.copy_(w)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    assert torch.equal(ours.to(torch.bfloat16)(x), hf.to(torch.bfloat16)(x))


def _layer(num_kv_heads=2, qkv_bias=False, input_norm=True):
    torch.manual_seed(0)
    spec = LayerSpec(
        64, 96, num_heads=4, num_kv_heads=num_kv_heads, head_dim=16, rms_norm_eps=1e-6, qkv_bias=qkv_bias
    )
    layer = DecoderLayer(spec, layer_index=1, input_norm=input_norm)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return layer, RotaryEmbedding(16, 256, 10000.0, None)


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_gqa_equals_repeated_kv_heads(num_kv_heads):
    """Grouped-query attention == multi-head attention with each K/V head repeated for its group."""
    layer, rope = _layer(num_kv_heads=num_kv_heads, qkv_bias=True)
    full, _ = _layer(num_kv_heads=4, qkv_bias=True)
    sd = layer.state_dict()
    rep = 4 // num_kv_heads
    for name in ("k_proj", "v_proj"):
        w = sd[f"self_attn.{name}.weight"].view(num_kv_heads, 16, 64)
        b = sd[f"self_attn.{name}.bias"].view(num_kv_heads, 16)
        sd[f"self_attn.{name}.weight"] = w.repeat_interleave(rep, 0).reshape(64, 64)
        sd[f"self_attn.{name}.bias"] = b.repeat_interleave(rep, 0).reshape(64)
    full.load_state_dict(sd)
    x = torch.randn(2, 9, 64)
    pos = torch.arange(9).expand(2, 9)
    mask = causal_mask(9)
    torch.testing.assert_close(layer(x, rope(pos), mask), full(x, rope(pos), mask), atol=1e-5, rtol=0)


def test_layer_with_cache_writes_rows_and_matches_uncached():
    layer, rope = _layer()
    x = torch.randn(1, 12, 64)
    pos = torch.arange(12)[None]
    ref = layer(x, rope(pos), causal_mask(12))  # (1, 12, 64)
    cache = KVCache(num_layers=2, batch=1, num_kv_heads=2, max_rows=16, head_dim=16)
    first = layer(x[:, :7], rope(pos[:, :7]), causal_mask(7), cache, 0)
    second = layer(x[:, 7:], rope(pos[:, 7:]), causal_mask(5, 7), cache, 7)
    torch.testing.assert_close(torch.cat((first, second), 1), ref, atol=1e-5, rtol=0)
    assert cache.length == 0  # a forward never commits
    assert cache.k[0].abs().sum() == 0  # layer_index 1 writes only its own slice
    assert cache.k[1, :, :, :12].abs().sum() > 0 and cache.k[1, :, :, 12:].abs().sum() == 0


def test_first_layer_without_input_norm():
    layer, _ = _layer(input_norm=False)
    assert isinstance(layer.input_layernorm, torch.nn.Identity)
    assert not any(k.startswith("input_layernorm") for k in layer.state_dict())


def test_mask_hides_keys():
    """A key that the mask hides does not change the output; one it shows does."""
    layer, rope = _layer()
    x = torch.randn(1, 6, 64)
    pos = torch.arange(6)[None]
    mask = with_prefix(torch.ones(2, 2, dtype=torch.bool), 4)  # (2, 6)
    mask[:, 1] = False
    cache = KVCache(2, 1, 2, 8, 16)
    layer(x[:, :4], rope(pos[:, :4]), causal_mask(4), cache, 0)
    out = layer(x[:, 4:], rope(pos[:, 4:]), mask, cache, 4)
    cache.k[1, :, :, 1] += 5.0
    assert torch.equal(layer(x[:, 4:], rope(pos[:, 4:]), mask, cache, 4), out)
    cache.k[1, :, :, 2] += 5.0
    assert not torch.allclose(layer(x[:, 4:], rope(pos[:, 4:]), mask, cache, 4), out)
