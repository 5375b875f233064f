"""Falcon's semi-autoregressive drafter (SAR head over the target's features; FALCON.md "Drafter").

Terms. At position i the drafter reads `concat(embed(t_{i+1}), f_i)` (2H wide: the target's embedding
of the next token, then the target's feature `f_i`, the last hidden state after the final norm), fuses
it to H, runs N Llama decoder layers under the block-causal mask (blocks of K = `block_size`, right-
aligned) and outputs the predicted features `(B, T, H)`; logits are the target's `lm_head(out)`. The
target's `embed` and `lm_head` are shared and frozen: the drafter owns neither.

Fusion: `linear` (one Linear 2H -> H with bias, EAGLE-1) or `lstm` (the paper's two-layer LSTM,
run position-wise as in the reference code: a length-1 sequence per position with zero initial state,
so the forget gate and recurrent weights drop out and each layer is `c = sig(i) * tanh(g)`,
`h = sig(o) * tanh(c)`; no recurrence across positions).

The first decoder layer has no input norm and there is no final norm, as in EAGLE-1 and Falcon's
reference `cnets.py` (its `Model.forward` returns the last layer's output un-normed).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from falcon_core.kv_cache import KVCache
from falcon_core.layers import DecoderLayer, LayerSpec, RopeScaling, RotaryEmbedding, check_forward_args
from falcon_core.masks import block_causal_mask, with_prefix

if TYPE_CHECKING:
    from falcon_core.target import TargetConfig, TargetModel


@dataclass(frozen=True)
class DrafterConfig:
    """Drafter architecture. Shapes follow the target (`from_target`), except what is overridden."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    """The target's vocabulary (logits come from the target's lm_head)."""
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    num_layers: int = 1
    """N decoder layers. With N = 1 the K/V of context positions do not depend on the mask."""
    block_size: int = 2
    """K: tokens emitted per drafter pass; K = 1 is an EAGLE-style autoregressive drafter."""
    fusion: Literal["linear", "lstm"] = "linear"
    attention_bias: bool = False
    """Bias on q/k/v, as the target (Qwen2), so a target layer can initialise the drafter's."""
    draft_vocab_size: int = 0
    """0: drafts come from the whole vocabulary. n > 0: from the n token ids of the `draft_vocab` buffer
    (frequency-ranked, as FR-Spec and EAGLE-3 do), so each drafter pass reads n rows of the target's
    lm_head instead of V. Verification still uses the whole vocabulary: output is unchanged."""

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "vocab_size",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"DrafterConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.fusion not in ("linear", "lstm"):
            raise ValueError(f"fusion must be 'linear' or 'lstm', got {self.fusion!r}")
        if self.max_position_embeddings < 1:
            raise ValueError(f"max_position_embeddings must be >= 1, got {self.max_position_embeddings}")
        if not 0 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(
                f"draft_vocab_size must be in [0, vocab_size={self.vocab_size}], got {self.draft_vocab_size}"
            )

    @classmethod
    def from_target(cls, target: TargetConfig, **overrides: Any) -> DrafterConfig:
        """The target's layer shapes, norm eps and RoPE; `overrides` replace any field."""
        base = cls(
            hidden_size=target.hidden_size,
            intermediate_size=target.intermediate_size,
            num_heads=target.num_heads,
            num_kv_heads=target.num_kv_heads,
            head_dim=target.head_dim,
            vocab_size=target.vocab_size,
            rms_norm_eps=target.rms_norm_eps,
            rope_theta=target.rope_theta,
            rope_scaling=target.rope_scaling,
            max_position_embeddings=target.max_position_embeddings,
            attention_bias=target.attention_bias,
        )
        return dataclasses.replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DrafterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DrafterConfig fields {unknown}")
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    @property
    def layer_spec(self) -> LayerSpec:
        return LayerSpec(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            qkv_bias=self.attention_bias,
        )


def check_draft_vocab(ids: torch.Tensor, n: int, vocab_size: int) -> None:
    """Raise ValueError unless ids (n,) are n distinct token ids in [0, vocab_size)."""
    if ids.dim() != 1 or ids.numel() != n:
        raise ValueError(f"draft vocabulary must hold {n} ids, got shape {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"draft vocabulary ids must be in [0, {vocab_size}), got [{int(ids.min())}, {int(ids.max())}]"
        )
    if torch.unique(ids).numel() != n:
        raise ValueError("draft vocabulary ids must be distinct")


class PositionwiseLSTM(nn.Module):
    """A stacked LSTM applied to each position alone (length-1 sequence, zero state): gates i, g, o."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 2) -> None:
        super().__init__()
        sizes = [input_size] + [hidden_size] * (num_layers - 1)
        self.gates = nn.ModuleList(nn.Linear(n, 3 * hidden_size) for n in sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, in) -> (B, T, H)."""
        for gates in self.gates:
            i, g, o = gates(x).chunk(3, dim=-1)  # (B, T, H) each
            c = torch.sigmoid(i) * torch.tanh(g)  # (B, T, H)
            x = torch.sigmoid(o) * torch.tanh(c)  # (B, T, H)
        return x


class Drafter(nn.Module):
    """Fusion 2H -> H, then N decoder layers (the first without input norm); no embed, no lm_head."""

    def __init__(self, config: DrafterConfig) -> None:
        super().__init__()
        self.config = config
        H = config.hidden_size
        self.fusion = (
            nn.Linear(2 * H, H, bias=True) if config.fusion == "linear" else PositionwiseLSTM(2 * H, H)
        )
        self.layers = nn.ModuleList(
            DecoderLayer(config.layer_spec, i, input_norm=i > 0) for i in range(config.num_layers)
        )
        self.rotary = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        if config.draft_vocab_size:
            # (n,) long, ascending token ids; saved with the weights. Filled by `set_draft_vocab`.
            self.register_buffer("draft_vocab", torch.arange(config.draft_vocab_size))

    def set_draft_vocab(self, ids: torch.Tensor) -> None:
        """Fill the `draft_vocab` buffer with ids (n,): distinct token ids in [0, V), n = draft_vocab_size."""
        n, V = self.config.draft_vocab_size, self.config.vocab_size
        if not n:
            raise ValueError("this drafter has draft_vocab_size = 0: it drafts from the whole vocabulary")
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        check_draft_vocab(ids, n, V)
        self.draft_vocab.copy_(ids.sort().values.to(self.draft_vocab.device))

    def new_cache(self, max_rows: int, batch: int = 1) -> KVCache:
        """A zeroed cache for `max_rows` rows in the drafter's dtype and device."""
        p = self.layers[0].post_attention_layernorm.weight
        c = self.config
        return KVCache(
            c.num_layers, batch, c.num_kv_heads, max_rows, c.head_dim, dtype=p.dtype, device=p.device
        )

    def forward(
        self,
        token_embeds: torch.Tensor,
        features: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        cache_pos: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """token_embeds (B, T, H) = embed(t_{i+1}), features (B, T, H) = f_i -> predicted features (B, T, H).

        mask (T, S) / (B, T, S) bool; default: block-causal over the T new positions (right-aligned),
        seeing every cached row.
        """
        H = self.config.hidden_size
        if token_embeds.dim() != 3 or token_embeds.shape[-1] != H or features.shape != token_embeds.shape:
            raise ValueError(
                f"token_embeds and features must both be (B, T, {H}), "
                f"got {tuple(token_embeds.shape)} and {tuple(features.shape)}"
            )
        if features.dtype != token_embeds.dtype:
            raise ValueError(f"token_embeds is {token_embeds.dtype} but features is {features.dtype}")
        check_forward_args("Drafter", token_embeds.shape, positions, cache, cache_pos, mask)
        if mask is None:
            T = token_embeds.shape[1]
            mask = block_causal_mask(T, self.config.block_size, device=token_embeds.device)  # (T, T)
            mask = with_prefix(mask, cache_pos) if cache is not None else mask  # (T, S)
        rope = self.rotary(positions)  # (B, T, hd/2) x 2
        x = self.fusion(torch.cat((token_embeds, features), dim=-1))  # (B, T, H)
        for layer in self.layers:
            x = layer(x, rope, mask, cache, cache_pos)  # (B, T, H)
        return x

    @torch.no_grad()
    def init_from_target_layer(self, target: TargetModel, layer_index: int) -> None:
        """Copy target layer `layer_index + j` into drafter layer j (the first layer's input norm, which
        the drafter lacks, is skipped)."""
        last = layer_index + self.config.num_layers - 1
        if layer_index < 0 or last >= len(target.layers):
            raise ValueError(
                f"target has {len(target.layers)} layers; cannot copy layers {layer_index}..{last} into the drafter"
            )
        for j, layer in enumerate(self.layers):
            src = target.layers[layer_index + j].state_dict()
            if j == 0:
                src = {k: v for k, v in src.items() if not k.startswith("input_layernorm.")}
            own = layer.state_dict()
            bad = [k for k in own if k not in src or src[k].shape != own[k].shape]
            if bad:
                raise ValueError(f"target layer {layer_index + j} does not fit drafter layer {j}: {bad}")
            layer.load_state_dict({k: v.to(own[k].dtype) for k, v in src.items()}, strict=True)
