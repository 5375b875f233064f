"""The benchmark loop: every prompt through every method, interleaved, checked against plain greedy.

Protocol (issue 8): batch 1, T = 0, all methods in one process on one machine. Methods are interleaved
per prompt (prompt i runs every method before prompt i+1 starts), and the order rotates by one method
per prompt, so drift in machine speed and cache warmth hits every method alike. Each method first
decodes a warm-up prompt that is not recorded. Each output is compared with plain greedy decoding by our
own decoder through `falcon_core.lossless.check_against_plain` (fp32: exact; bf16 / fp16: each
divergence is checked to be a near-tie). The speed-up denominator is the fastest plain greedy decoder
measured on that benchmark (ours or transformers'), by total tokens over total seconds.

Multi-turn (`multi_turn=True`, MT-Bench): turn j's prompt holds the earlier user turns and, as the
assistant's replies, plain greedy's answers, so every method sees the same prompt.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from bench.methods import Method, MethodOutput, Skipped
from falcon_core import chat
from falcon_core.data import PromptItem
from falcon_core.generate import Engine
from falcon_core.lossless import NEAR_TIE, LosslessCheck, check_against_plain, plain_logits_at
from falcon_core.metrics import GenerationStats, aggregate

BUSY_LOAD = 3.0
"""Load average above which timings are flagged as not meaningful."""


@dataclass(frozen=True)
class PromptSet:
    """A named benchmark: its prompts."""

    name: str
    items: tuple[PromptItem, ...]


@dataclass(frozen=True)
class RunConfig:
    max_new_tokens: int = 256
    multi_turn: bool = False
    """MT-Bench items: every user turn (later turns after plain greedy's earlier answers)."""
    warm_up_tokens: int = 32
    check: bool = True
    """Compare every output with plain greedy (outside the timed calls)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.warm_up_tokens < 1:
            raise ValueError("max_new_tokens and warm_up_tokens must be positive")


@dataclass(frozen=True)
class Turn:
    """One timed prompt: an item's turn, as token ids."""

    id: str
    turn: int
    ids: list[int]


def method_order(names: Sequence[str], prompt_index: int) -> list[str]:
    """The methods in the order prompt `prompt_index` runs them: rotated by one per prompt."""
    r = prompt_index % len(names) if names else 0
    return [*names[r:], *names[:r]]


def encode(tokenizer: Any, item: PromptItem, earlier: Sequence[str] = (), turn: int = 0) -> list[int]:
    """Token ids of an item's turn `turn` (chat template), after `earlier` assistant answers."""
    if item.prompt is not None:
        return list(tokenizer(item.prompt, add_special_tokens=False)["input_ids"])
    messages: list[dict[str, str]] = [dict(m) for m in item.messages or ()]
    if turn:
        turns = item.turns
        messages = [dict(m) for m in (item.messages or ())[:-1]]  # a system message, if any
        for j in range(turn):
            messages += [{"role": "user", "content": turns[j]}, {"role": "assistant", "content": earlier[j]}]
        messages.append({"role": "user", "content": turns[turn]})
    return chat.prompt_ids(tokenizer, messages)


def _record(out: MethodOutput, tree_nodes: int) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "tokens": len(out.token_ids),
        "seconds": out.seconds,
        "tokens_per_second": len(out.token_ids) / out.seconds if out.seconds > 0 else 0.0,
        "tree_nodes": tree_nodes,
        "token_ids": out.token_ids,
    }
    if out.stats is not None:
        s = out.stats
        rec.update(
            tau=s.tau,
            acceptance_per_depth=s.acceptance_per_depth,
            accepted_per_depth=s.accepted_per_depth,
            drafts_per_depth=s.drafts_per_depth,
            target_forwards=s.target_forwards,
            decode_tokens=s.decode_tokens,
            speculative_steps=s.speculative_steps,
            drafter_seconds=s.drafter_seconds,
            verify_seconds=s.verify_seconds,
        )
    return rec


class Runner:
    """Runs `methods` over prompt sets; `reference` is our plain decoder (for equality checks)."""

    def __init__(
        self,
        methods: Sequence[Method | Skipped],
        reference: Engine,
        config: RunConfig,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.methods = [m for m in methods if not isinstance(m, Skipped)]
        self.skipped = [m for m in methods if isinstance(m, Skipped)]
        names = [m.name for m in methods]
        if len(set(names)) != len(names):
            raise ValueError(f"method names repeat: {names}")
        self.by_name = {m.name: m for m in self.methods}
        self.reference = reference
        self.config = config
        self.log = log or (lambda _msg: None)
        self.order: list[dict[str, Any]] = []

    def run(self, sets: Sequence[PromptSet]) -> dict[str, Any]:
        load_start = os.getloadavg()
        started = datetime.datetime.now(datetime.timezone.utc)
        self._warm_up(sets)
        benchmarks = {s.name: self._run_set(s) for s in sets}
        return {
            "what": "falcon bench: greedy decoding speed and acceptance against baselines (batch 1, T = 0)",
            "environment": environment(load_start, os.getloadavg(), self.reference),
            "started": started.isoformat(timespec="seconds"),
            "config": asdict(self.config),
            "methods": {m.name: {"status": "ok", "plain": m.plain, **m.describe()} for m in self.methods}
            | {s.name: {"status": "skipped", "reason": s.reason} for s in self.skipped},
            "benchmarks": benchmarks,
            "order": self.order,
        }

    def _warm_up(self, sets: Sequence[PromptSet]) -> None:
        first = next((s.items[0] for s in sets if s.items), None)
        if first is None:
            raise ValueError("no prompts to run")
        ids = encode(self.reference.tokenizer, first)
        for m in self.methods:
            self.log(f"warm-up {m.name}")
            m.warm_up(ids, min(self.config.warm_up_tokens, self.config.max_new_tokens))

    def _run_set(self, pset: PromptSet) -> dict[str, Any]:
        rows: list[dict[str, Any]] = []
        for item in pset.items:
            n_turns = len(item.turns) if (self.config.multi_turn and item.turns) else 1
            earlier: list[str] = []
            for j in range(n_turns):
                ids = encode(self.reference.tokenizer, item, earlier, j)
                turn = Turn(item.id if n_turns == 1 else f"{item.id}/turn{j + 1}", j, ids)
                row, plain_ids = self._run_prompt(pset.name, len(rows), turn)
                rows.append(row)
                earlier.append(self.reference.tokenizer.decode(plain_ids, skip_special_tokens=True))
        return {"prompts": rows, **summarize(rows, self.methods)}

    def _run_prompt(self, bench: str, index: int, turn: Turn) -> tuple[dict[str, Any], list[int]]:
        outs: dict[str, dict[str, Any]] = {}
        for name in method_order([m.name for m in self.methods], index):
            m = self.by_name[name]
            self.order.append({"benchmark": bench, "prompt": turn.id, "method": name})
            out = m.generate(turn.ids, self.config.max_new_tokens)
            outs[name] = _record(out, m.tree_nodes)
            self.log(f"{bench} {turn.id} {name}: {len(out.token_ids)} tokens in {out.seconds:.2f} s")
        plain_ids = self._plain(turn, outs)
        if self.config.check:
            for rec in outs.values():
                rec["equal"] = equality(self.reference, turn.ids, plain_ids, rec["token_ids"]).to_dict()
        row = {"id": turn.id, "turn": turn.turn + 1, "prompt_tokens": len(turn.ids), "results": outs}
        return row, plain_ids

    def _plain(self, turn: Turn, outs: dict[str, dict[str, Any]]) -> list[int]:
        """Plain greedy's tokens: the timed output of our plain decoder when it ran, else an untimed run."""
        for name, m in self.by_name.items():
            if getattr(m, "engine", None) is self.reference:
                return outs[name]["token_ids"]
        res = self.reference.generate(input_ids=turn.ids, max_new_tokens=self.config.max_new_tokens)
        return res.token_ids


def equality(
    engine: Engine, prompt_ids: Sequence[int], plain_ids: Sequence[int], other_ids: Sequence[int]
) -> LosslessCheck:
    """`check_against_plain`, and where one output stops early (EOS, which token ids exclude), the gap
    between EOS and the other's token in the plain decoder's logits at that position."""
    check = check_against_plain(engine, prompt_ids, plain_ids, other_ids)
    j = check.compared
    if check.exact or check.first_divergence != j or not engine.eos_ids:
        return check
    logits = plain_logits_at(engine, prompt_ids, j)  # (V,)
    eos_ids = torch.tensor(engine.eos_ids, device=logits.device)
    eos = int(eos_ids[logits[eos_ids].argmax()])
    plain_tok = int(plain_ids[j]) if len(plain_ids) > j else eos
    other_tok = int(other_ids[j]) if len(other_ids) > j else eos
    top = logits.topk(2).values
    tol = NEAR_TIE.get(engine.target.embed.weight.dtype, 1e-4)
    other_gap = float(top[0] - logits[other_tok])
    return replace(
        check,
        plain_token=plain_tok,
        other_token=other_tok,
        top2_gap=float(top[0] - top[1]),
        other_gap=other_gap,
        tolerance=tol,
        near_tie=other_gap <= tol,
    )


def summarize(rows: Sequence[dict[str, Any]], methods: Sequence[Method]) -> dict[str, Any]:
    """Per-method totals of one benchmark, and speed-ups over its fastest plain greedy decoder."""
    summary: dict[str, dict[str, Any]] = {}
    for m in methods:
        recs = [r["results"][m.name] for r in rows if m.name in r["results"]]
        tokens = sum(r["tokens"] for r in recs)
        seconds = sum(r["seconds"] for r in recs)
        s: dict[str, Any] = {
            "prompts": len(recs),
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
            "tree_nodes": m.tree_nodes,
            "plain": m.plain,
        }
        if recs and "tau" in recs[0]:
            total = aggregate(_stats(r) for r in recs)
            s.update(tau=total.tau, acceptance_per_depth=total.acceptance_per_depth)
        checks = [r["equal"] for r in recs if "equal" in r]
        if checks:
            s["equal"] = {
                "exact": sum(c["exact"] for c in checks),
                "near_tie": sum(bool(not c["exact"] and c["near_tie"]) for c in checks),
                "not_ok": sum(not c["ok"] for c in checks),
                "checked": len(checks),
            }
        summary[m.name] = s
    plain = {n: s["tokens_per_second"] for n, s in summary.items() if s["plain"] and s["tokens"]}
    baseline = max(plain, key=plain.__getitem__) if plain else None
    for s in summary.values():
        s["speedup"] = s["tokens_per_second"] / plain[baseline] if baseline else None
    return {
        "summary": summary,
        "baseline": {"method": baseline, "tokens_per_second": plain[baseline]} if baseline else None,
    }


def _stats(rec: dict[str, Any]) -> GenerationStats:
    return GenerationStats(
        decode_tokens=rec["decode_tokens"],
        target_forwards=rec["target_forwards"],
        speculative_steps=rec["speculative_steps"],
        drafts_per_depth=list(rec["drafts_per_depth"]),
        accepted_per_depth=list(rec["accepted_per_depth"]),
    )


def environment(load_start: tuple[float, ...], load_end: tuple[float, ...], engine: Engine) -> dict[str, Any]:
    import transformers

    busy = max(load_start[0], load_end[0]) > BUSY_LOAD
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": engine.name,
        "dtype": str(engine.target.embed.weight.dtype).removeprefix("torch."),
        "device": str(engine.device),
        "load_average_start": list(load_start),
        "load_average_end": list(load_end),
        "timings_meaningful": not busy,
        "note": f"1-minute load average above {BUSY_LOAD}: other work shared the CPU" if busy else "",
    }
