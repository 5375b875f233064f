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


@pytest.mark.slow
def test_sampled_regeneration_is_reproducible_from_its_seed(smollm2_path, smollm2_tokenizer):
    """`--regenerate --temperature T --seed S`: a record's answers are a function of (seed, record, turn)."""
    engine = Engine(load_target(smollm2_path, dtype="bf16"), smollm2_tokenizer)
    conversation = [
        {"role": "user", "content": "Write one sentence about the sea."}, {"role": "assistant", "content": "w"},
        {"role": "user", "content": "And one about the sky."}, {"role": "assistant", "content": "v"},
    ]  # fmt: skip

    def regenerate(seed: int, record: int, temperature: float = 1.0) -> list[dict[str, str]]:
        settings = RegenerateSettings(max_new_tokens=12, temperature=temperature, seed=seed)
        return Regenerator(engine, settings, max_seq_len=256)(conversation, record)

    sampled = regenerate(seed=1, record=5)
    assert regenerate(seed=1, record=5) == sampled  # same seed, same record: the same answers
    assert [m["role"] for m in sampled] == [m["role"] for m in conversation]
    assert sampled[::2] == conversation[::2]  # user turns kept
    others = [regenerate(seed=2, record=5), regenerate(seed=3, record=5), regenerate(seed=1, record=6)]
    assert any(o != sampled for o in others)  # the seed and the record number drive the draws
    greedy = regenerate(seed=1, record=5, temperature=0.0)
    assert any(s != greedy for s in [sampled, *others])  # sampling, not greedy decoding
    # in a batch (`many`, as a shard actor calls it) a record's answers do not depend on its neighbours
    settings = RegenerateSettings(max_new_tokens=12, temperature=1.0, seed=1, batch_size=4)
    batched = Regenerator(engine, settings, max_seq_len=256)
    assert batched.many([conversation, conversation], [6, 5]) == [others[2], sampled]
