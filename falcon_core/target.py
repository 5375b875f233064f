"""The target LLM: a native Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) over a preallocated cache.

`TargetConfig` is read from a HF `config.json`; `load_target` reads HF safetensors weights (single file
or sharded index) with HF parameter names. `TargetModel.forward` follows the cache and forward contract
of docs/DESIGN.md: explicit positions, an explicit bool mask, K/V written at rows
`[cache_pos, cache_pos + T)`. It returns the last hidden states after the final norm (the drafter's
features `f_i`) and logits only for the rows asked for: the LM head is most of the cost of a forward
on a small model, so hidden-state caching asks for none.

Why native rather than transformers' modules: docs/target_model_choice.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from torch import nn

from falcon_core.kv_cache import KVCache
from falcon_core.layers import (
    DecoderLayer,
    LayerSpec,
    RMSNorm,
    RopeScaling,
    RotaryEmbedding,
    check_forward_args,
)
from falcon_core.masks import causal_mask

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TargetConfig:
    """Architecture of a Llama-family target, as read from a HF `config.json`."""

    model_type: Literal["llama", "mistral", "qwen2"]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """Bias on q/k/v (always on for Qwen2; Llama's `attention_bias` also puts one on o_proj)."""
    attention_out_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    """Mistral / Qwen2 sliding window; forwards longer than it are refused (inside it, attention is full)."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

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
            out_bias=self.attention_out_bias,
            mlp_bias=self.mlp_bias,
        )

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> TargetConfig:
        """From a parsed HF `config.json` (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r} (architectures {cfg.get('architectures')}); "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}; Llama-family SwiGLU needs 'silu'")
        rope_params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope_params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial rotary embeddings are not supported")
        max_pos = int(cfg.get("max_position_embeddings", 2048))
        theta = float(rope_params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        num_heads = int(cfg["num_attention_heads"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        if model_type == "qwen2":
            qkv_bias, out_bias = True, False
            sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
        else:
            qkv_bias = out_bias = bool(cfg.get("attention_bias", False))
            sliding = cfg.get("sliding_window") if model_type == "mistral" else None
        return cls(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=max_pos,
            rope_scaling=RopeScaling.from_hf(rope_params, max_pos),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            attention_out_bias=out_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> TargetConfig:
        """From a `config.json` file or the model folder holding it."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_hf(json.loads(path.read_text()))


@dataclass
class TargetOutput:
    """Result of one target forward."""

    logits: torch.Tensor
    """(B, R, V) for the R rows of `logits_index` (R = T when it is None; R = 0 when it is empty)."""
    hidden: torch.Tensor
    """(B, T, H) last layer after the final norm: the drafter's features."""


class TargetModel(nn.Module):
    """Llama-family decoder with explicit positions, masks and a preallocated KV cache."""

    def __init__(self, config: TargetConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config.layer_spec, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rotary = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )

    def new_cache(self, max_rows: int, batch: int = 1) -> KVCache:
        """A zeroed cache for `max_rows` rows in this model's dtype and device."""
        p = self.embed.weight
        c = self.config
        return KVCache(
            c.num_layers, batch, c.num_kv_heads, max_rows, c.head_dim, dtype=p.dtype, device=p.device
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        cache_pos: int = 0,
        mask: torch.Tensor | None = None,
        logits_index: torch.Tensor | None = None,
    ) -> TargetOutput:
        """input_ids (B, T), positions (B, T); mask (T, S) / (B, T, S) bool, default causal.

        With a cache, S = cache_pos + T and the new K/V go to rows [cache_pos, S); without one, S = T.
        `logits_index` (R,) long selects the rows (of T) that get logits; None = all.
        """
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(
                f"input_ids must be a (B, T) long tensor, got {tuple(input_ids.shape)} {input_ids.dtype}"
            )
        check_forward_args("TargetModel", input_ids.shape, positions, cache, cache_pos, mask)
        T = input_ids.shape[1]
        window = self.config.sliding_window
        if window is not None and cache_pos + T > window:
            raise ValueError(f"{cache_pos + T} key rows exceed the sliding window ({window}), not supported")
        if mask is None:
            mask = causal_mask(T, cache_pos, device=input_ids.device)  # (T, S)
        rope = self.rotary(positions)  # (B, T, hd/2) x 2
        x = self.embed(input_ids)  # (B, T, H)
        for layer in self.layers:
            x = layer(x, rope, mask, cache, cache_pos)  # (B, T, H)
        hidden = self.norm(x)  # (B, T, H)
        rows = hidden if logits_index is None else hidden[:, logits_index]  # (B, R, H)
        return TargetOutput(logits=self.lm_head(rows), hidden=hidden)  # logits (B, R, V)


def hf_to_native_name(name: str) -> str | None:
    """HF parameter name -> TargetModel's (None for names that carry no weights, e.g. rotary inv_freq)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name == "model.embed_tokens.weight":
        return "embed.weight"
    if name == "model.norm.weight":
        return "norm.weight"
    if name.startswith("model.layers."):
        return name[len("model.") :]
    return name  # lm_head.weight and anything unexpected (reported by the caller)


def safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files of a HF model folder (sharded via model.safetensors.index.json or single)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if pickles:
        raise ValueError(
            f"{folder} holds only pickle checkpoints ({', '.join(sorted(pickles))}), which are not loaded "
            "(they can run code). Convert them to safetensors first."
        )
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder}")


def load_target(
    path: str | Path,
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32",
    device: str | torch.device = "cpu",
) -> TargetModel:
    """Load a HF Llama-family folder (config.json + safetensors) into a `TargetModel` in eval mode."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    config = TargetConfig.from_file(folder)
    torch_dtype = DTYPES[dtype]
    state: dict[str, torch.Tensor] = {}
    for file in safetensors_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                native = hf_to_native_name(name)
                if native is not None:
                    state[native] = f.get_tensor(name).to(device=device, dtype=torch_dtype)
    if config.tie_word_embeddings:
        head = state.pop("lm_head.weight", None)
        if head is not None and "embed.weight" in state and not torch.equal(head, state["embed.weight"]):
            raise ValueError(
                f"{folder}: tie_word_embeddings is set but lm_head.weight differs from the embedding"
            )
    with torch.device("meta"):
        model = TargetModel(config)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{folder}: weights do not match {config.model_type}: missing {missing}, unexpected {unexpected}"
        )
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{folder}: weight shapes do not match config.json: {e}") from e
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.rotary.build_table(device=device, dtype=torch_dtype)
    return model.eval().requires_grad_(False)
