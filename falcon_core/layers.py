"""Llama-family building blocks shared by the target model and the drafter (gpt-fast style).

`RMSNorm`, `RotaryEmbedding` (a precomputed cos/sin table indexed by explicit positions), `Attention`
(grouped-query, optional q/k/v bias, writes into a preallocated `KVCache`), `MLP` (SwiGLU) and
`DecoderLayer`. Parameter names match Hugging Face's Llama / Mistral / Qwen2 modules, so a HF state dict
loads without renaming inside a layer.

The forward contract (see docs/DESIGN.md, "Cache and forward contract"): a forward over `T` new
positions with a cache writes their K/V at rows `[cache_pos, cache_pos + T)` and attends over rows
`[0, S)`, `S = cache_pos + T`, under an explicit bool mask `(T, S)` or `(B, T, S)` (True = may attend).
Without a cache it attends over the `T` new positions only, mask `(T, T)` or `(B, T, T)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from falcon_core.kv_cache import KVCache


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as in HF's `rope_scaling` / `rope_parameters` (default, linear, llama3)."""

    kind: Literal["default", "linear", "llama3"] = "default"
    """`default`: plain RoPE; `linear`: positions divided by `factor`; `llama3`: Llama 3.1 band scaling."""
    factor: float = 1.0
    low_freq_factor: float = 1.0
    """llama3 only."""
    high_freq_factor: float = 4.0
    """llama3 only."""
    original_max_position_embeddings: int = 8192
    """llama3 only: the pre-training context length."""

    def __post_init__(self) -> None:
        if self.kind not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported RoPE scaling {self.kind!r}; supported: default, linear, llama3")
        if self.factor <= 0:
            raise ValueError(f"RoPE scaling factor must be > 0, got {self.factor}")
        if self.kind == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("llama3 RoPE scaling needs high_freq_factor > low_freq_factor")

    @classmethod
    def from_hf(cls, params: dict | None, max_position_embeddings: int) -> RopeScaling | None:
        """From HF's `rope_scaling` or `rope_parameters` dict (None or type `default` -> None)."""
        if not params:
            return None
        kind = params.get("rope_type", params.get("type", "default"))
        if kind == "default":
            return None
        if kind == "linear":
            return cls(kind="linear", factor=float(params["factor"]))
        if kind == "llama3":
            return cls(
                kind="llama3",
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(
                    params.get("original_max_position_embeddings", max_position_embeddings)
                ),
            )
        raise ValueError(f"unsupported RoPE scaling {kind!r}; supported: default, linear, llama3")


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies `(hd/2,)` fp32, bit-identical to transformers' rope init functions."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim  # (hd/2,)
    inv_freq = 1.0 / (theta**exponents)  # (hd/2,)
    if scaling is None or scaling.kind == "default":
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq  # (hd/2,)
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)  # (hd/2,)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled  # (hd/2,)
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)  # (hd/2,)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables `(P, hd/2)` precomputed once for positions `[0, P)`, gathered by explicit positions."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling | None) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.scaling = scaling
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        if self.cos.device.type != "meta":  # under `with torch.device("meta")` the caller builds it later
            self.build_table()

    def build_table(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """(Re)compute the tables on `device` in `dtype` (after construction on the meta device, say)."""
        if device is None:
            device = "cpu" if self.cos.device.type == "meta" else self.cos.device
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling)  # (hd/2,)
        t = torch.arange(self.max_positions, dtype=torch.float32)  # (P,)
        freqs = torch.outer(t, inv_freq)  # (P, hd/2)
        self.cos = freqs.cos().to(device=device, dtype=dtype or torch.float32)  # (P, hd/2)
        self.sin = freqs.sin().to(device=device, dtype=dtype or torch.float32)  # (P, hd/2)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) long -> cos, sin each (B, T, hd/2)."""
        return self.cos[positions], self.sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hd) by cos/sin (B, T, hd/2): HF's rotate_half convention (split halves)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (B, nh, T, hd/2) each
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd/2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (B, nh, T, hd)


class RMSNorm(nn.Module):
    """RMS norm computed in fp32 and scaled in the input dtype, as HF's LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()  # (..., H)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., H)
        return self.weight * h.to(x.dtype)  # (..., H)


class Attention(nn.Module):
    """Grouped-query attention writing into a preallocated KV cache; SDPA with an explicit bool mask."""

    def __init__(
        self,
        layer_index: int,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        qkv_bias: bool = False,
        out_bias: bool = False,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.layer_index = layer_index
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=out_bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        cache: KVCache | None = None,
        cache_pos: int = 0,
    ) -> torch.Tensor:
        """x (B, T, H), rope cos/sin (B, T, hd/2), mask (T, S) or (B, T, S) bool -> (B, T, H)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q = apply_rotary(q, *rope)  # (B, nh, T, hd)
        k = apply_rotary(k, *rope)  # (B, nkv, T, hd)
        if cache is not None:
            end = cache_pos + T
            cache.k[self.layer_index, :, :, cache_pos:end] = k
            cache.v[self.layer_index, :, :, cache_pos:end] = v
            k = cache.k[self.layer_index, :, :, :end]  # (B, nkv, S, hd)
            v = cache.v[self.layer_index, :, :, :end]  # (B, nkv, S, hd)
        attn_mask = mask[:, None] if mask.dim() == 3 else mask  # (B, 1, T, S) or (T, S)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, enable_gqa=self.num_heads != self.num_kv_heads
        )  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y)  # (B, T, H)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, H)


@dataclass(frozen=True)
class LayerSpec:
    """Shapes and options of one decoder layer (shared by `TargetConfig` and `DrafterConfig`)."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False


class DecoderLayer(nn.Module):
    """Pre-norm Llama block: x + attn(norm(x)), then x + mlp(norm(x)).

    `input_norm=False` drops the attention's input norm (the drafter's first layer, as in EAGLE: its
    input is the fusion output, not a residual stream).
    """

    def __init__(self, spec: LayerSpec, layer_index: int, input_norm: bool = True) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps) if input_norm else nn.Identity()
        self.self_attn = Attention(
            layer_index,
            spec.hidden_size,
            spec.num_heads,
            spec.num_kv_heads,
            spec.head_dim,
            qkv_bias=spec.qkv_bias,
            out_bias=spec.out_bias,
        )
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        cache: KVCache | None = None,
        cache_pos: int = 0,
    ) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H)."""
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, cache_pos)  # (B, T, H)
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, T, H)


def check_forward_args(
    name: str,
    x_shape: torch.Size,
    positions: torch.Tensor,
    cache: KVCache | None,
    cache_pos: int,
    mask: torch.Tensor | None,
) -> None:
    """Shape/dtype contract of a forward over T new positions; raises ValueError with an actionable message.

    Position values are not checked (that would sync with the device); a position past the RoPE table
    fails in the table lookup.
    """
    B, T = x_shape[0], x_shape[1]
    if T == 0:
        raise ValueError(f"{name}: no new positions (T == 0)")
    if positions.shape != (B, T) or positions.dtype != torch.long:
        raise ValueError(
            f"{name}: positions must be a long tensor of shape (B, T) = {(B, T)}, "
            f"got {tuple(positions.shape)} {positions.dtype}"
        )
    if cache is None:
        if cache_pos != 0:
            raise ValueError(f"{name}: cache_pos={cache_pos} given without a cache")
        rows = T
    else:
        rows = cache_pos + T
        if cache_pos < 0 or rows > cache.max_rows:
            raise ValueError(
                f"{name}: rows [{cache_pos}, {rows}) do not fit the cache ({cache.max_rows} rows); "
                "allocate a larger cache or shorten the input"
            )
        if cache.batch != B:
            raise ValueError(f"{name}: cache was allocated for batch {cache.batch}, input has batch {B}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"{name}: mask must be a bool tensor (True = may attend), got {mask.dtype}")
        if mask.shape not in ((T, rows), (B, T, rows)):
            raise ValueError(
                f"{name}: mask must have shape (T, S) = {(T, rows)} or (B, T, S) = {(B, T, rows)}, "
                f"got {tuple(mask.shape)}"
            )
