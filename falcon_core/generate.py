"""Generation with Falcon speculative decoding, and plain decoding on the same target.

One decode loop (`Engine._decode`) serves both: each iteration is one target forward that yields the
tokens it produced. A speculative step drafts a tree (`draft.SARDrafter`), verifies `[bonus] + tree` in
one target forward under the tree mask (`verify`), commits the accepted path's K/V rows and hands the
accepted positions' target features to the drafter. A plain step runs the bonus token alone. Plain steps
are also used when speculation is off, when the context is too short for a full drafter block, and near
the context limit where the tree would not fit.

Lossless: greedy verification accepts a drafted token only when it equals the target's argmax, so in
fp32 the output equals plain greedy decoding token for token; sampling uses recursive rejection sampling
(`verify.verify_sampling`), so the output distribution is the target's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from falcon_core import chat
from falcon_core.checkpoint import TargetIdentity, load_drafter
from falcon_core.draft import DraftPlan, SARDrafter
from falcon_core.drafter import Drafter
from falcon_core.masks import with_prefix
from falcon_core.metrics import GenerationStats
from falcon_core.resolve import DEFAULT_MODEL, resolve_model
from falcon_core.sampling import SamplingParams, logits_to_probs, sample
from falcon_core.stopping import FinishReason, TextAssembler
from falcon_core.target import TargetModel, load_target
from falcon_core.tree import Tree, TreeBuffers, build_tree, get_tree
from falcon_core.verify import verify_greedy, verify_sampling

DEFAULT_TREE = "auto"
AUTO_TREE_BUDGET = 24
"""Node budget of `--tree auto` when no measured cost model is given (fitted per machine by bench/)."""
FALLBACK_TREE = "chain-4"


@dataclass
class GenerationResult:
    """A finished request."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    stats: GenerationStats


@dataclass
class StreamChunk:
    """One streamed piece: new text and tokens; `finish_reason` and `stats` are set on the last chunk."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    stats: GenerationStats | None = field(default=None, repr=False)


def select_tree(name: str, card: dict[str, Any] | None, budget: int = AUTO_TREE_BUDGET) -> Tree:
    """A named tree, or for "auto" the best tree for `budget` nodes from the drafter card's per-depth,
    per-rank acceptance (`card["acceptance"]`, a list of lists); a chain when the card has none."""
    if name != "auto":
        return get_tree(name)
    acceptance = (card or {}).get("acceptance")
    if acceptance:
        return build_tree(acceptance, (card or {}).get("tree_budget", budget), name="auto")
    return get_tree(FALLBACK_TREE)


class Engine:
    """A target model, its tokenizer and an optional SAR drafter: `generate` and `stream`.

    One request runs at a time per engine (a lock serialises callers); a serving replica that wants
    concurrency runs several engines or queues requests.
    """

    def __init__(
        self,
        target: TargetModel,
        tokenizer: Any,
        drafter: Drafter | None = None,
        tree: Tree | None = None,
        name: str = "model",
    ) -> None:
        self.target = target
        self.tokenizer = tokenizer
        self.drafter = drafter
        self.name = name
        self.device = target.embed.weight.device
        self.max_context = target.config.max_position_embeddings
        self.tree = tree if tree is not None else get_tree(FALLBACK_TREE)
        self.buffers = TreeBuffers.from_tree(self.tree, self.device)
        self.plan = DraftPlan.build(self.tree, drafter.config.block_size, self.device) if drafter else None
        eos = target.config.eos_token_ids or ()
        tok_eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = tuple(sorted(set(eos) | ({tok_eos} if tok_eos is not None else set())))
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        model: str = DEFAULT_MODEL,
        drafter: str | Path | None = None,
        dtype: str = "bf16",
        device: str = "cpu",
        tree: str = DEFAULT_TREE,
    ) -> Engine:
        """Resolve `model` (alias, folder, .gguf, hub id), load it, and load `drafter` checked against it."""
        from transformers import AutoTokenizer

        folder = resolve_model(model)
        target = load_target(folder, dtype=dtype, device=device)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        draft_model, card = None, None
        if drafter is not None and str(drafter) != "none":
            identity = TargetIdentity.of(str(model), target.config, tokenizer)
            ckpt = load_drafter(drafter, expected_identity=identity, dtype=dtype, device=device)
            draft_model, card = ckpt.drafter.eval(), ckpt.card
        chosen = select_tree(tree, card) if draft_model is not None else None
        return cls(target, tokenizer, draft_model, chosen, name=str(model))

    # ----------------------------------------------------------------------------------------------
    # Public API

    def encode(
        self,
        prompt: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        input_ids: Sequence[int] | None = None,
    ) -> list[int]:
        """Exactly one of: raw `prompt` text, chat `messages` (chat template applied), or `input_ids`."""
        given = [x is not None for x in (prompt, messages, input_ids)]
        if sum(given) != 1:
            raise ValueError("give exactly one of prompt, messages or input_ids")
        if messages is not None:
            ids = chat.prompt_ids(self.tokenizer, list(messages))
        elif prompt is not None:
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = [int(t) for t in input_ids]
        if not ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        vocab = self.target.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids out of the vocabulary [0, {vocab}): {bad[:5]}")
        if len(ids) >= self.max_context:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; the model's context limit is {self.max_context} "
                "(prompt plus at least one new token)"
            )
        return ids

    def generate(self, **kwargs: Any) -> GenerationResult:
        """Arguments as `stream`; returns the whole result."""
        text, ids, last = [], [], None
        for chunk in self.stream(**kwargs):
            text.append(chunk.text)
            ids.extend(chunk.token_ids)
            last = chunk
        assert last is not None and last.finish_reason is not None and last.stats is not None
        return GenerationResult("".join(text), ids, last.finish_reason, last.stats.prompt_tokens, last.stats)

    def stream(
        self,
        prompt: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        input_ids: Sequence[int] | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
        speculative: bool = True,
    ) -> Iterator[StreamChunk]:
        """Yield text chunks as they are decided; the last chunk carries `finish_reason` and `stats`."""
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        ids = self.encode(prompt, messages, input_ids)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        return self._stream(ids, max_new_tokens, params, stops, speculative)

    # ----------------------------------------------------------------------------------------------
    # The loop

    def _stream(
        self, ids: list[int], max_new: int, params: SamplingParams, stops: list[str], speculative: bool
    ) -> Iterator[StreamChunk]:
        with self._lock:
            stats = GenerationStats(prompt_tokens=len(ids))
            start = time.perf_counter()
            assembler = TextAssembler(self.tokenizer, self.eos_ids, stops, max_new)
            steps = self._decode(ids, max_new, params, speculative and self.drafter is not None, stats)
            try:
                for new in steps:
                    upd = assembler.add(new)
                    if upd.finish_reason is None and len(ids) + len(assembler.ids) >= self.max_context:
                        upd_end = assembler.finish("context")
                        upd.text += upd_end.text
                        upd.finish_reason = "context"
                    if upd.finish_reason is not None:
                        stats.new_tokens = len(assembler.ids)
                        stats.total_seconds = time.perf_counter() - start
                        yield StreamChunk(upd.text, upd.token_ids, upd.finish_reason, stats)
                        return
                    if upd.text or upd.token_ids:
                        yield StreamChunk(upd.text, upd.token_ids)
                upd = assembler.finish("context")  # the loop ran out of room
                stats.new_tokens = len(assembler.ids)
                stats.total_seconds = time.perf_counter() - start
                yield StreamChunk(upd.text, upd.token_ids, upd.finish_reason, stats)
            finally:
                steps.close()

    @torch.inference_mode()
    def _decode(
        self,
        ids: list[int],
        max_new: int,
        params: SamplingParams,
        speculative: bool,
        stats: GenerationStats,
        on_plain_logits: Callable[[torch.Tensor], None] | None = None,
    ) -> Iterator[list[int]]:
        """Yield the tokens of each target forward: the prefill's first token, then one list per step.

        `on_plain_logits`, if given, sees the (V,) logits each plain step chooses from (lossless.py
        uses it to measure near-ties)."""
        device, target = self.device, self.target
        gen = None
        if not params.greedy:
            gen = torch.Generator(device=device)
            gen.manual_seed(params.seed if params.seed is not None else int(torch.seed() % (2**63)))
        P = len(ids)
        tree_rows = len(self.tree.parents) + 1 if speculative else 1
        rows = min(self.max_context, P + max_new + tree_rows + 1)
        cache = target.new_cache(rows)
        tokens = torch.empty(rows + 1, dtype=torch.long, device=device)  # (rows+1,) t_0 .. t_n
        tokens[:P] = torch.tensor(ids, dtype=torch.long, device=device)
        features = target.embed.weight.new_empty(rows, target.config.hidden_size)  # (rows, H)
        sar = self._make_proposer(rows) if speculative else None

        t0 = time.perf_counter()
        pos = torch.arange(P, device=device)[None]  # (1, P)
        last = torch.tensor([P - 1], device=device)
        out = target(tokens[:P][None], pos, cache, 0, logits_index=last)
        cache.length = P
        features[:P] = out.hidden[0]  # (P, H)
        n = P
        if on_plain_logits is not None:
            on_plain_logits(out.logits[0, -1])
        tokens[n] = self._choose(out.logits[0, -1], params, gen)
        stats.prefill_seconds = time.perf_counter() - t0
        yield [int(tokens[n])]

        max_depth = int(self.buffers.depth.max()) if speculative else 0
        while n + 1 < rows:
            fits = n + tree_rows <= rows and n + max_depth < self.max_context
            draft = sar.propose(features[:n], tokens[: n + 1], n, params, gen) if (sar and fits) else None
            t1 = time.perf_counter()
            if draft is None:
                out = target(tokens[n : n + 1][None], torch.tensor([[n]], device=device), cache, n)
                cache.length = n + 1
                features[n] = out.hidden[0, 0]
                n += 1
                if on_plain_logits is not None:
                    on_plain_logits(out.logits[0, 0])
                tokens[n] = self._choose(out.logits[0, 0], params, gen)
                stats.record_plain_step(time.perf_counter() - t1)
                yield [int(tokens[n])]
                continue
            A, new = self._verify_step(draft, n, cache, tokens, features, params, gen)
            n += A
            stats.record_step(max_depth, A - 1, draft.passes, draft.seconds, time.perf_counter() - t1)
            yield new

    def _make_proposer(self, rows: int) -> SARDrafter:
        """The per-request drafting state (tests substitute oracle proposers here)."""
        assert self.drafter is not None and self.plan is not None
        return SARDrafter(self.drafter, self.target, self.plan, rows)

    def _verify_step(
        self,
        draft: Any,
        n: int,
        cache: Any,
        tokens: torch.Tensor,
        features: torch.Tensor,
        params: SamplingParams,
        gen: torch.Generator | None,
    ) -> tuple[int, list[int]]:
        """Verify `[bonus] + draft.tokens`, commit the accepted path; returns (rows committed, new tokens)."""
        b = self.buffers
        ids = torch.cat((tokens[n : n + 1], draft.tokens))  # (1+N,)
        pos = n + b.position_offsets  # (1+N,)
        mask = with_prefix(b.mask, n)  # (1+N, n+1+N)
        out = self.target(ids[None], pos[None], cache, n, mask)
        logits = out.logits[0]  # (1+N, V)
        if params.greedy:
            res = verify_greedy(b, draft.tokens, logits)
        else:
            q = logits_to_probs(logits.float(), params)  # (1+N, V)
            res = verify_sampling(b, draft.tokens, q, draft.draft_probs, draft.child_row, gen)
        acc = res.accepted  # (A,) indices into [root] + nodes, starting with 0
        A = acc.shape[0]
        cache.commit(n + acc, n)
        features[n : n + A] = out.hidden[0, acc]  # (A, H)
        tokens[n + 1 : n + A] = draft.tokens[acc[1:] - 1]
        tokens[n + A] = res.next_token
        return A, tokens[n + 1 : n + A + 1].tolist()

    @staticmethod
    def _choose(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
        """logits (V,) -> the next token (argmax when greedy)."""
        if params.greedy:
            return int(logits.argmax())
        return int(sample(logits_to_probs(logits.float(), params), gen))
