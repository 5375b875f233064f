"""Batched greedy regeneration (`Regenerator.many`) equals one conversation at a time, in fp32."""

from __future__ import annotations

import pytest

from falcon_core.generate import Engine
from falcon_core.target import load_target
from pipelines.stages import RegenerateSettings, Regenerator


@pytest.mark.slow
def test_batched_regeneration_equals_one_at_a_time_fp32(smollm2_path, smollm2_tokenizer):
    engine = Engine(load_target(smollm2_path, dtype="fp32"), smollm2_tokenizer)
    conversations = [
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "x"},
         {"role": "user", "content": "And another one?"}, {"role": "assistant", "content": "y"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
         {"role": "assistant", "content": "z"}],
        [{"role": "user", "content": "Write one sentence about the sea."}, {"role": "assistant", "content": "w"}],
        [{"role": "user", "content": "Say hello in French " * 16}, {"role": "assistant", "content": "v"},
         {"role": "user", "content": "Thanks, and in Spanish?"}, {"role": "assistant", "content": "u"}],
    ]  # fmt: skip
    records = [7, 8, 9, 10]
    # max_seq_len cuts the long one's second turn: both paths must drop it alike
    one = Regenerator(engine, RegenerateSettings(max_new_tokens=12), max_seq_len=100)
    many = Regenerator(engine, RegenerateSettings(max_new_tokens=12, batch_size=3), max_seq_len=100)
    expected = [one(c, r) for c, r in zip(conversations, records, strict=True)]
    got = many.many(conversations, records)
    assert got == expected
    assert many.generated_tokens == one.generated_tokens > 0
    assert [len(c) for c in expected] != [len(c) for c in conversations]  # a turn was dropped
    assert all(m["content"] not in "xyzwvu" for c in got for m in c if m["role"] == "assistant")


@pytest.mark.slow
def test_max_answers_keeps_conversations_up_to_the_nth_answer(smollm2_path, smollm2_tokenizer):
    engine = Engine(load_target(smollm2_path, dtype="fp32"), smollm2_tokenizer)
    conversation = [
        {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "x"},
        {"role": "user", "content": "And another one?"}, {"role": "assistant", "content": "y"},
        {"role": "user", "content": "A third?"},
    ]  # fmt: skip
    for batch_size in (1, 2):
        settings = RegenerateSettings(max_new_tokens=8, batch_size=batch_size, max_answers=1)
        got = Regenerator(engine, settings, max_seq_len=200).many([conversation, conversation[:2]], [0, 1])
        assert [[m["role"] for m in c] for c in got] == [["user", "assistant"]] * 2
        assert got[0] == got[1] and got[0][1]["content"] != "x"
    with pytest.raises(ValueError, match="max_answers"):
        RegenerateSettings(max_answers=0)
