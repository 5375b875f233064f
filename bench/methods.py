"""Decoding methods under benchmark, one small class per method behind one protocol (`Method`).

Every method decodes greedily (T = 0) at batch 1 from the same prompt token ids and returns the new
token ids (EOS excluded) with the wall time of the whole call (prefill included):
- `vanilla`: our plain decoder, `Engine(target, tokenizer, drafter=None)`;
- `hf`: transformers `generate` greedy on the same weights; its static cache is timed against the
  dynamic one at warm-up and the faster is kept (`cache="auto"`; the choice is in `describe()`);
- `hf-pld`: transformers prompt-lookup decoding (`prompt_lookup_num_tokens=10`), dynamic cache;
- `eagle`: our `Engine` with a k = 1 (EAGLE-style) drafter; `falcon`: our `Engine` with a k = 2 drafter.
`vanilla` and `hf` are the plain greedy decoders: the speed-up denominator is the faster of them.
A method that cannot run (no drafter checkpoint, wrong block size) is a `Skipped` with its reason.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from falcon_core.checkpoint import TargetIdentity, load_drafter
from falcon_core.generate import Engine, select_tree
from falcon_core.generate_cli import REPO_MODELS
from falcon_core.metrics import GenerationStats
from falcon_core.target import DTYPES, TargetModel, load_target

METHODS = ("vanilla", "hf", "hf-pld", "eagle", "falcon")
PLAIN_METHODS = ("vanilla", "hf")
"""The plain greedy decoders; the fastest measured one is the speed-up denominator."""
DRAFTER_K = {"eagle": 1, "falcon": 2}
DEFAULT_DRAFTERS = {
    "eagle": REPO_MODELS / "smollm2-135m-eagle-k1",
    "falcon": REPO_MODELS / "smollm2-135m-falcon-k2",
}
PLD_TOKENS = 10
HFCache = Literal["auto", "dynamic", "static"]


@dataclass
class MethodOutput:
    """One decoded prompt."""

    token_ids: list[int]
    """New tokens, EOS excluded."""
    seconds: float
    """Wall time of the whole call, prefill included."""
    stats: GenerationStats | None = None
    """Our engine's counters (tau, acceptance per depth); None for transformers methods."""


class Method(Protocol):
    """A greedy decoder under benchmark."""

    name: str
    plain: bool
    """True for a plain greedy decoder (a speed-up denominator candidate)."""
    tree_nodes: int
    """Drafted tokens verified per step (0 for plain decoders and prompt lookup)."""

    def describe(self) -> dict[str, Any]: ...

    def warm_up(self, prompt_ids: Sequence[int], max_new_tokens: int) -> None: ...

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> MethodOutput: ...


@dataclass(frozen=True)
class Skipped:
    """A requested method that cannot run here, and why."""

    name: str
    reason: str


class Models:
    """The target as our `TargetModel`, its tokenizer and the transformers model, each loaded once."""

    def __init__(self, folder: str | Path, dtype: str = "bf16", device: str = "cpu", name: str = "") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        self.folder = Path(folder)
        self.dtype = dtype
        self.device = device
        self.name = name or self.folder.name

    @cached_property
    def target(self) -> TargetModel:
        return load_target(self.folder, dtype=self.dtype, device=self.device)

    @cached_property
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.folder)

    @cached_property
    def hf_model(self) -> Any:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.folder, dtype=DTYPES[self.dtype])
        return model.to(self.device).eval()

    @cached_property
    def plain_engine(self) -> Engine:
        """Our plain decoder: the reference for equality checks (lossless.check_against_plain)."""
        return Engine(self.target, self.tokenizer, None, name=self.name)

    @property
    def identity(self) -> TargetIdentity:
        return TargetIdentity.of(self.name, self.target.config, self.tokenizer)


def _elapsed(t0: float) -> float:
    return time.perf_counter() - t0


@dataclass
class EngineMethod:
    """Our `Engine`: plain (no drafter) or speculative (a drafter and a tree)."""

    name: str
    engine: Engine
    drafter_path: Path | None = None
    card: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def plain(self) -> bool:
        return self.engine.drafter is None

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"implementation": "falcon_core.generate.Engine"}
        if self.engine.drafter is not None:
            tree = self.engine.tree
            d.update(
                drafter=str(self.drafter_path),
                k=self.engine.drafter.config.block_size,
                drafter_layers=self.engine.drafter.config.num_layers,
                tree=tree.name,
                tree_nodes=tree.num_nodes,
                tree_depth=tree.max_depth,
                tree_budget=(self.card or {}).get("tree_budget"),
            )
        return d

    @property
    def tree_nodes(self) -> int:
        return self.engine.tree.num_nodes if self.engine.drafter is not None else 0

    def warm_up(self, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
        self.generate(prompt_ids, max_new_tokens)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> MethodOutput:
        t0 = time.perf_counter()
        res = self.engine.generate(input_ids=list(prompt_ids), max_new_tokens=max_new_tokens)
        return MethodOutput(res.token_ids, _elapsed(t0), res.stats)


class HFMethod:
    """transformers `generate`, greedy; `pld_tokens` > 0 turns on prompt-lookup decoding."""

    def __init__(
        self, name: str, model: Any, eos_ids: Sequence[int], cache: HFCache = "auto", pld_tokens: int = 0
    ) -> None:
        if pld_tokens and cache == "static":
            raise ValueError("prompt-lookup decoding runs with the dynamic cache only")
        self.name = name
        self.model = model
        self.eos_ids = tuple(eos_ids)
        self.pld_tokens = pld_tokens
        self.cache: HFCache = "dynamic" if pld_tokens else cache
        self.warm_up_seconds: dict[str, float] = {}

    @property
    def plain(self) -> bool:
        return self.pld_tokens == 0

    @property
    def tree_nodes(self) -> int:
        return 0

    def describe(self) -> dict[str, Any]:
        import transformers

        d: dict[str, Any] = {
            "implementation": f"transformers {transformers.__version__} generate",
            "cache": self.cache,
        }
        if self.pld_tokens:
            d["prompt_lookup_num_tokens"] = self.pld_tokens
        if self.warm_up_seconds:
            d["cache_choice"] = {
                "warm_up_seconds": self.warm_up_seconds,
                "chosen": self.cache,
                "rule": "the faster cache on the warm-up prompt (second of two calls each)",
            }
        return d

    def _config(self, max_new_tokens: int, cache: str) -> Any:
        from transformers import GenerationConfig

        pad = self.eos_ids[0] if self.eos_ids else 0
        kw: dict[str, Any] = {"prompt_lookup_num_tokens": self.pld_tokens} if self.pld_tokens else {}
        if cache == "static":
            kw["cache_implementation"] = "static"
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=list(self.eos_ids) or None,
            pad_token_id=pad,
            **kw,
        )

    @torch.inference_mode()
    def _run(self, prompt_ids: Sequence[int], max_new_tokens: int, cache: str) -> MethodOutput:
        device = self.model.device
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)  # (1, P)
        config = self._config(max_new_tokens, cache)
        t0 = time.perf_counter()
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        seconds = _elapsed(t0)
        new = out[0, ids.shape[1] :].tolist()
        cut = next((i for i, t in enumerate(new) if t in self.eos_ids), len(new))
        return MethodOutput(new[:cut], seconds)

    def warm_up(self, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
        if self.cache != "auto":
            self._run(prompt_ids, max_new_tokens, self.cache)
            return
        for cache in ("dynamic", "static"):
            self._run(prompt_ids, max_new_tokens, cache)  # first call: allocation, lazy init
            self.warm_up_seconds[cache] = self._run(prompt_ids, max_new_tokens, cache).seconds
        self.cache = min(self.warm_up_seconds, key=self.warm_up_seconds.__getitem__)  # type: ignore[assignment]

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> MethodOutput:
        if self.cache == "auto":
            raise RuntimeError(f"{self.name}: warm_up picks the cache; call it first")
        return self._run(prompt_ids, max_new_tokens, self.cache)


def load_engine_method(
    name: str, models: Models, drafter: str | Path | None, tree: str, label: str | None = None
) -> EngineMethod | Skipped:
    """`eagle` / `falcon` as an `EngineMethod` (reported as `label`, default `name`), or `Skipped` when
    its drafter is missing or unfit."""
    k = DRAFTER_K[name]
    label = label or name
    path = Path(drafter) if drafter is not None else DEFAULT_DRAFTERS[name]
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        return Skipped(label, f"no drafter checkpoint at {path} (config.json + model.safetensors)")
    try:
        ckpt = load_drafter(path, expected_identity=models.identity, dtype=models.dtype, device=models.device)
    except (ValueError, FileNotFoundError) as e:
        return Skipped(label, f"drafter at {path} cannot be used: {e}")
    if ckpt.config.block_size != k:
        return Skipped(
            label, f"drafter at {path} has block size {ckpt.config.block_size}; {name} needs k = {k}"
        )
    chosen = select_tree(tree, ckpt.card)
    engine = Engine(models.target, models.tokenizer, ckpt.drafter.eval(), chosen, name=models.name)
    return EngineMethod(label, engine, path, ckpt.card)


def build_methods(
    names: Sequence[str],
    models: Models,
    drafters: dict[str, str | Path | None] | None = None,
    trees: Sequence[str] = ("auto",),
    hf_cache: HFCache = "auto",
) -> list[Method | Skipped]:
    """Methods by name, in order; each speculative method once per tree (named `falcon@tree` when
    more than one tree is asked for)."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    out: list[Method | Skipped] = []
    for name in names:
        if name == "vanilla":
            out.append(EngineMethod("vanilla", models.plain_engine))
        elif name == "hf":
            out.append(HFMethod("hf", models.hf_model, models.plain_engine.eos_ids, cache=hf_cache))
        elif name == "hf-pld":
            eos = models.plain_engine.eos_ids
            out.append(HFMethod("hf-pld", models.hf_model, eos, cache="dynamic", pld_tokens=PLD_TOKENS))
        else:
            for tree in trees:
                label = f"{name}@{tree}" if len(trees) > 1 else name
                out.append(load_engine_method(name, models, (drafters or {}).get(name), tree, label))
    return out
