"""Chat rendering with SmolLM2's real template, and the assistant-token loss mask."""

from __future__ import annotations

import pytest

from falcon_core.chat import assistant_spans, prompt_ids, render
from falcon_core.data import read_sharegpt

CONVERSATION = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome is the capital of Italy.\n\nIt has been since 1871."},
]


def masked_runs(tokenizer, rendered) -> list[str]:
    """Decoded text of each maximal run of masked tokens."""
    runs, current = [], []
    for token, m in zip(rendered.input_ids, rendered.loss_mask, strict=True):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def expected_runs(tokenizer, messages) -> list[str]:
    return [m["content"] + tokenizer.eos_token for m in messages if m["role"] == "assistant"]


def test_mask_covers_exactly_the_assistant_text_and_end_of_turn(smollm2_tokenizer):
    rendered = render(smollm2_tokenizer, CONVERSATION)
    assert rendered.text == smollm2_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert len(rendered.input_ids) == len(rendered.loss_mask)
    assert 0 < sum(rendered.loss_mask) < len(rendered.loss_mask)
    assert masked_runs(smollm2_tokenizer, rendered) == expected_runs(smollm2_tokenizer, CONVERSATION)
    assert smollm2_tokenizer.decode(rendered.input_ids) == rendered.text
    # nothing of the system or user turns, nor any role header, is masked
    unmasked = [t for t, m in zip(rendered.input_ids, rendered.loss_mask, strict=True) if not m]
    assert "France?" in smollm2_tokenizer.decode(unmasked)
    assert "Paris" not in smollm2_tokenizer.decode(unmasked)


def test_template_default_system_prompt_is_not_masked(smollm2_tokenizer):
    messages = CONVERSATION[1:3]
    rendered = render(smollm2_tokenizer, messages)
    assert "You are a helpful AI assistant named SmolLM" in rendered.text
    assert masked_runs(smollm2_tokenizer, rendered) == ["The capital of France is Paris.<|im_end|>"]


def test_mask_on_real_sharegpt_conversations(smollm2_tokenizer):
    conversations, _ = read_sharegpt(max_records=60)
    exact = 0
    for conversation in conversations:
        messages = conversation.as_dicts()
        rendered = render(smollm2_tokenizer, messages)
        runs = masked_runs(smollm2_tokenizer, rendered)
        expected = expected_runs(smollm2_tokenizer, messages)
        assert len(runs) == len(expected)
        # a boundary token can only add template whitespace around a content with edge whitespace
        assert all(e.strip() in r for r, e in zip(runs, expected, strict=True))
        exact += runs == expected
    assert exact >= 0.9 * len(conversations), exact


def test_edge_whitespace_is_masked_inclusively(smollm2_tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\n\nHello there."}]
    (run,) = masked_runs(smollm2_tokenizer, render(smollm2_tokenizer, messages))
    assert run.endswith("\n\nHello there.<|im_end|>")
    assert run[: len(run) - len("\n\nHello there.<|im_end|>")].strip() == ""


def test_prompt_ids_end_with_the_assistant_header(smollm2_tokenizer):
    ids = prompt_ids(smollm2_tokenizer, CONVERSATION[:2])
    text = smollm2_tokenizer.decode(ids)
    assert text.endswith("What is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    full = render(smollm2_tokenizer, CONVERSATION[:3])
    assert full.input_ids[: len(ids)] == ids  # the prompt is a prefix of the rendered conversation
    assert sum(full.loss_mask[: len(ids)]) == 0
    assert assistant_spans(smollm2_tokenizer, CONVERSATION[:3])[0][0] == len(text)


def test_template_that_rewrites_content_is_refused(smollm2_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    )
    with pytest.raises(ValueError, match="cannot locate assistant message 1"):
        render(tokenizer, CONVERSATION[1:3])
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        render(tokenizer, CONVERSATION[1:3])
