"""Rendering conversations with the target's chat template, and the assistant-token loss mask.

The drafter is trained only where the target speaks: the *loss mask* is 1 on the tokens of every
assistant message's content **plus the end-of-turn token that closes it** (the tokenizer's EOS, e.g.
SmolLM2's `<|im_end|>`, when the template puts it right after the content), and 0 elsewhere (system
and user turns, role headers, the template's separators). The end-of-turn token is included because
the target emits it to stop: a drafter that never learns to predict it stalls at every turn's end.

Templates without `{% generation %}` markers (SmolLM2's has none) give no mask of their own, so the
mask is derived from the rendered text's boundaries: for each assistant message the conversation up
to it is rendered with a sentinel in place of its content, which fixes where the content starts in
the full rendering; the content (and the EOS after it) is then checked to be there verbatim. The
full text is tokenized once with character offsets, and a token is masked if its characters overlap
a masked span. A token that straddles a boundary (possible only when a content begins or ends with
whitespace that merges with the template's own) is masked; decoding the masked tokens of each turn
then gives its content exactly whenever it has no such edge whitespace.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_SENTINEL = "\x00FALCON_ASSISTANT_CONTENT\x00"


@dataclass(frozen=True)
class Rendered:
    input_ids: list[int]
    """Token ids of the whole rendered conversation (no special tokens added beyond the template's)."""
    loss_mask: list[int]
    """1 on assistant content tokens and their end-of-turn token, 0 elsewhere; same length as input_ids."""
    text: str
    """The rendered conversation, as the chat template wrote it."""

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(f"{len(self.input_ids)} input ids but {len(self.loss_mask)} mask entries")


def render(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> Rendered:
    """Render `messages` with `tokenizer`'s chat template; mask the assistant turns (see module doc)."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = _template(tokenizer, messages, add_generation_prompt=False)
    spans = assistant_spans(tokenizer, messages, text)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    loss_mask = _mask_from_spans(encoding["offset_mapping"], spans)
    return Rendered(input_ids=input_ids, loss_mask=loss_mask, text=text)


def prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of `messages` followed by the template's generation prompt (the assistant header)."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = _template(tokenizer, messages, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def assistant_spans(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], text: str | None = None
) -> list[tuple[int, int]]:
    """Character spans `[start, end)` in the rendered `text` of each assistant content (+ its EOS)."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if text is None:
        text = _template(tokenizer, messages, add_generation_prompt=False)
    eos = tokenizer.eos_token or ""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        probe = [*messages[:i], {"role": "assistant", "content": _SENTINEL}]
        probe_text = _template(tokenizer, probe, add_generation_prompt=False)
        start = probe_text.find(_SENTINEL)
        end = start + len(message["content"])
        if start < 0 or probe_text[:start] != text[:start] or text[start:end] != message["content"]:
            raise ValueError(
                f"cannot locate assistant message {i} in the rendered conversation: the chat template "
                f"is not prefix-stable or rewrites message content, so the loss mask cannot be derived"
            )
        if eos and text.startswith(eos, end):
            end += len(eos)
        spans.append((start, end))
    return spans


def _mask_from_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters overlap one of the (sorted, disjoint) spans."""
    mask = [0] * len(offsets)
    s = 0
    for t, (tok_start, tok_end) in enumerate(offsets):
        while s < len(spans) and spans[s][1] <= tok_start:
            s += 1
        if s == len(spans):
            break
        if tok_start < spans[s][1] and tok_end > spans[s][0]:
            mask[t] = 1
    return mask


def _template(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat template")
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
