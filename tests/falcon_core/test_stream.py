"""`Engine.stream` / `Engine.generate` on a tiny fp32 target with SmolLM2's tokenizer: streamed chunks,
the four ways a request ends (max tokens, EOS, stop string, context limit) with their reasons, and the
metrics of a request (tau, acceptance per depth, drafter passes and time, verification time) and their
aggregate."""

from __future__ import annotations

import itertools

import pytest

from falcon_core.generate import Engine
from falcon_core.metrics import GenerationStats, aggregate
from falcon_core.target import TargetModel
from tests.falcon_core.test_generate import OracleEngine, drafter_for, make_tree, tiny_target

PROMPT = [{"role": "user", "content": "Tell me a story about a lighthouse."}]


@pytest.fixture(scope="module")
def target(tmp_path_factory, smollm2_tokenizer) -> TargetModel:
    return tiny_target(tmp_path_factory.mktemp("stream"), vocab=len(smollm2_tokenizer), seed=11)


@pytest.fixture(scope="module")
def plain(target, smollm2_tokenizer) -> Engine:
    return Engine(target, smollm2_tokenizer)


@pytest.fixture(scope="module")
def spec(target, smollm2_tokenizer) -> Engine:
    return Engine(target, smollm2_tokenizer, drafter_for(target, 2, seed=3), make_tree("kmask2_8layer_tree"))


@pytest.fixture(scope="module")
def reference(plain) -> list[int]:
    """Plain greedy token ids of PROMPT (no EOS among them: the tiny target's config has none)."""
    res = plain.generate(messages=PROMPT, max_new_tokens=40)
    assert res.finish_reason == "length" and len(res.token_ids) == 40
    assert not set(res.token_ids) & set(plain.eos_ids)
    return res.token_ids


@pytest.mark.parametrize("engine", ["plain", "spec"])
def test_stream_chunks_add_up_to_generate(request, reference, engine):
    eng: Engine = request.getfixturevalue(engine)
    chunks = list(eng.stream(messages=PROMPT, max_new_tokens=40))
    assert len(chunks) > 2 and all(c.finish_reason is None and c.stats is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == "length" and last.stats is not None
    ids = [t for c in chunks for t in c.token_ids]
    text = "".join(c.text for c in chunks)
    assert ids == reference
    assert text == eng.tokenizer.decode(reference, skip_special_tokens=True)
    res = eng.generate(messages=PROMPT, max_new_tokens=40)
    assert (res.text, res.token_ids, res.finish_reason) == (text, ids, "length")
    assert res.prompt_tokens == last.stats.prompt_tokens > 0 and res.stats.new_tokens == 40


def test_eos_ends_with_stop_and_is_not_output(target, smollm2_tokenizer, reference):
    j = next(i for i in range(5, 40) if reference[i] not in reference[:i])  # first occurrence at j
    for drafter in (None, drafter_for(target, 2, seed=3)):
        eng = Engine(target, smollm2_tokenizer, drafter, make_tree("chain-4"))
        eng.eos_ids = (reference[j],)
        res = eng.generate(messages=PROMPT, max_new_tokens=40)
        assert res.finish_reason == "stop" and res.token_ids == reference[:j]
        assert res.text == smollm2_tokenizer.decode(reference[:j], skip_special_tokens=True)


@pytest.mark.parametrize("engine", ["plain", "spec"])
def test_stop_string_ends_with_stop_and_is_cut(request, reference, engine):
    eng: Engine = request.getfixturevalue(engine)
    full = eng.tokenizer.decode(reference, skip_special_tokens=True)
    # a stop string spanning a token boundary in the middle of the output
    cut = len(eng.tokenizer.decode(reference[:20], skip_special_tokens=True))
    stop = full[cut - 2 : cut + 2]
    start = full.find(stop)
    assert len(stop) == 4 and start > 0
    chunks = list(eng.stream(messages=PROMPT, max_new_tokens=40, stop=["never appears \u2603", stop]))
    text = "".join(c.text for c in chunks)
    ids = [t for c in chunks for t in c.token_ids]
    assert chunks[-1].finish_reason == "stop"
    assert text == full[:start] and stop not in text
    # ids end with the first token whose text completes the stop string
    m = next(m for m in range(1, 41) if stop in eng.tokenizer.decode(reference[:m], skip_special_tokens=True))
    assert ids == reference[:m]
    res = eng.generate(messages=PROMPT, max_new_tokens=40, stop=stop)
    assert (res.text, res.token_ids, res.finish_reason) == (text, ids, "stop")


@pytest.mark.parametrize("engine", ["plain", "spec"])
def test_context_limit_ends_with_context(request, engine):
    eng: Engine = request.getfixturevalue(engine)
    limit = eng.max_context  # 512 positions
    ids = [(7 * i) % 500 + 10 for i in range(limit - 30)]
    res = eng.generate(input_ids=ids, max_new_tokens=100)
    assert res.finish_reason == "context" and len(ids) + len(res.token_ids) == limit
    want = Engine(eng.target, eng.tokenizer).generate(input_ids=ids, max_new_tokens=30)
    assert res.token_ids == want.token_ids  # speculation near the limit stays lossless
    short = eng.generate(input_ids=ids, max_new_tokens=29)
    assert short.finish_reason == "length" and len(short.token_ids) == 29


def test_metrics_of_a_request_and_their_aggregate(target, smollm2_tokenizer, reference):
    tree = make_tree("chain-4")
    oracle = OracleEngine(target, smollm2_tokenizer, drafter_for(target, 2), tree)
    a = oracle.generate(messages=PROMPT, max_new_tokens=21).stats
    # 1 token from the prefill, then 4 speculative steps of 4 accepted + 1 bonus: tau 5, all accepted
    assert (a.new_tokens, a.decode_tokens, a.target_forwards, a.speculative_steps) == (21, 20, 4, 4)
    assert a.tau == 5.0 and a.acceptance_per_depth == [1.0, 1.0, 1.0, 1.0]
    assert a.drafts_per_depth == a.accepted_per_depth == [4, 4, 4, 4]
    assert a.drafter_passes == 4 and a.drafter_seconds == 0.0  # the oracle reports 1 pass, no drafter time
    assert a.verify_seconds > 0 and a.prefill_seconds > 0 and a.total_seconds >= a.verify_seconds

    random = Engine(target, smollm2_tokenizer, drafter_for(target, 2, seed=3), tree)
    b = random.generate(messages=PROMPT, max_new_tokens=21).stats
    assert b.speculative_steps == b.target_forwards > 0
    assert b.drafter_passes == 2 * b.speculative_steps  # chain-4 with k = 2: pass 1 and one tree pass
    assert b.drafter_seconds > 0 and b.verify_seconds > 0
    assert b.tau == b.decode_tokens / b.target_forwards
    assert b.drafts_per_depth == [b.speculative_steps] * 4
    assert all(0.0 <= x <= 1.0 for x in b.acceptance_per_depth)
    acc = b.accepted_per_depth  # a path that reaches depth d + 1 passed depth d
    assert all(x >= y for x, y in itertools.pairwise(acc))

    total = aggregate([a, b])
    assert total.new_tokens == 42 and total.target_forwards == a.target_forwards + b.target_forwards
    assert total.tau == (a.decode_tokens + b.decode_tokens) / total.target_forwards
    assert total.drafts_per_depth == [
        x + y for x, y in zip(a.drafts_per_depth, b.drafts_per_depth, strict=True)
    ]
    assert total.drafter_seconds == a.drafter_seconds + b.drafter_seconds
    d = total.to_dict()
    assert d["tau"] == total.tau and d["tau_no_bonus"] == total.tau - 1
    assert d["acceptance_per_depth"] == total.acceptance_per_depth
    assert d["drafter_passes_per_step"] == total.drafter_passes / total.speculative_steps

    plain = Engine(target, smollm2_tokenizer).generate(messages=PROMPT, max_new_tokens=21).stats
    assert plain.tau == 1.0 and plain.speculative_steps == plain.drafter_passes == 0
    assert plain.target_forwards == 20 and plain.acceptance_per_depth == []
    assert GenerationStats().tau == 0.0 and aggregate([]).to_dict()["drafter_passes_per_step"] == 0.0
