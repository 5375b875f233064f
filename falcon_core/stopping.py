"""Incremental detokenization with stop conditions (EOS tokens, stop strings, a token budget).

`TextAssembler` receives the tokens of each decode step and hands back the text that is safe to show:
text is held back while it ends in an incomplete UTF-8 sequence (the tokenizer's U+FFFD) or in a prefix
of a stop string. A stop string ends generation and is not part of the output (as in OpenAI's API); the
token ids are cut at the first token whose text completes it. An EOS token ends generation and is not
part of the output either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

FinishReason = Literal["stop", "length", "context"]


@dataclass
class AssemblerUpdate:
    """What one step adds: the new visible text and token ids, and a finish reason once done."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None


class TextAssembler:
    """Accumulates generated token ids; applies EOS, stop strings and max_new_tokens."""

    def __init__(
        self,
        tokenizer: Any,
        eos_ids: Sequence[int],
        stop: Sequence[str] = (),
        max_new_tokens: int = 128,
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.stop = tuple(s for s in stop if s)
        self.max_new_tokens = max_new_tokens
        self.ids: list[int] = []
        self.text = ""
        self.shown = 0
        self.finish_reason: FinishReason | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, new_ids: Sequence[int]) -> AssemblerUpdate:
        """Add one step's tokens; returns the delta that became visible."""
        if self.finish_reason is not None:
            raise RuntimeError("generation already finished")
        before = len(self.ids)
        for t in new_ids:
            if t in self.eos_ids:
                self.finish_reason = "stop"
                break
            self.ids.append(int(t))
            if len(self.ids) >= self.max_new_tokens:
                self.finish_reason = "length"
                break
        self.text = self._decode(self.ids)
        if self.stop:
            self._apply_stop(before)
        return self._delta(before)

    def finish(self, reason: FinishReason) -> AssemblerUpdate:
        """End from outside (e.g. the context is full); flushes held-back text."""
        before = len(self.ids)
        if self.finish_reason is None:
            self.finish_reason = reason
        return self._delta(before)

    def _apply_stop(self, before: int) -> None:
        search_from = max(0, len(self._decode(self.ids[:before])) - max(map(len, self.stop)))
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if not hits:
            return
        cut = min(hits)
        self.text = self.text[:cut]
        for m in range(before + 1, len(self.ids) + 1):  # shortest prefix whose text reaches the stop
            if any(s in self._decode(self.ids[:m]) for s in self.stop):
                self.ids = self.ids[:m]
                break
        self.finish_reason = "stop"

    def _delta(self, before: int) -> AssemblerUpdate:
        visible = len(self.text)
        if self.finish_reason is None:
            if self.text.endswith("\ufffd"):
                visible = len(self.text.rstrip("\ufffd"))
            for s in self.stop:  # hold back a suffix that may grow into a stop string
                for j in range(min(len(s) - 1, visible), 0, -1):
                    if self.text[:visible].endswith(s[:j]):
                        visible -= j
                        break
        visible = max(visible, self.shown)
        delta = self.text[self.shown : visible]
        self.shown = visible
        return AssemblerUpdate(delta, self.ids[before:], self.finish_reason)
