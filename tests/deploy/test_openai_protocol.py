"""Request parsing: strict types, OpenAI-style 400s, one-element batches unwrapped."""

from __future__ import annotations

import json

import pytest

from deploy.openai_protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    CompletionRequest,
    OpenAIError,
    openai_finish_reason,
    parse_body,
    sse,
)


def body(**fields: object) -> bytes:
    return json.dumps({"model": "m", **fields}).encode()


@pytest.mark.parametrize(
    ("raw", "param", "code"),
    [
        (b"{not json", None, "invalid_json"),
        (b"[1, 2]", None, "invalid_json"),
        (b'{"model": "m", "prompt": "caf\xe9"}', None, "invalid_utf8"),
        (body(prompt="x", max_tokens="5"), "max_tokens", "int_type"),
        (body(prompt="x", max_tokens=True), "max_tokens", "int_type"),
        (body(prompt="x", max_tokens=0), "max_tokens", "greater_than_equal"),
        (body(prompt="x", temperature="hot"), "temperature", "float_type"),
        (body(prompt="x", temperature=3.0), "temperature", "less_than_equal"),
        (body(prompt="x", top_p=0), "top_p", "greater_than"),
        (body(prompt=5), "prompt", "value_error"),
        (body(prompt=["a", "b"]), "prompt", "value_error"),
        (body(prompt=[1, True]), "prompt", "value_error"),
        (body(prompt="x", stop=["a", "b", "c", "d", "e"]), "stop", "value_error"),
        (body(prompt="x", stop=""), "stop", "value_error"),
        (body(prompt="x", n=2), "n", "literal_error"),
        (body(prompt="x", speculative="no"), "speculative", "bool_type"),
        (body(prompt="x", unknown_field=1), "unknown_field", "extra_forbidden"),
        (body(), "prompt", "missing"),
    ],
)
def test_bad_completion_bodies(raw: bytes, param: str | None, code: str) -> None:
    with pytest.raises(OpenAIError) as info:
        parse_body(raw, CompletionRequest)
    err = info.value
    assert err.status == 400
    assert (err.param, err.code) == (param, code)
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}
    assert err.body()["error"]["type"] == "invalid_request_error"


def test_completion_prompt_forms() -> None:
    assert parse_body(body(prompt="hi"), CompletionRequest).prompt_kwargs() == {"prompt": "hi"}
    assert parse_body(body(prompt=["hi"]), CompletionRequest).prompt_kwargs() == {"prompt": "hi"}
    assert parse_body(body(prompt=[1, 2]), CompletionRequest).prompt_kwargs() == {"input_ids": [1, 2]}
    assert parse_body(body(prompt=[[3]]), CompletionRequest).prompt_kwargs() == {"input_ids": [3]}


def test_sampling_fields_reach_the_engine_kwargs() -> None:
    req = parse_body(
        body(prompt="x", temperature=0, top_p=0.5, top_k=-1, stop="\n", seed=7, speculative=False),
        CompletionRequest,
    )
    assert req.sampling() == {
        "temperature": 0.0,
        "top_p": 0.5,
        "top_k": 0,
        "stop": ["\n"],
        "seed": 7,
        "speculative": False,
    }


def test_chat_messages_and_token_limits() -> None:
    raw = body(
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
            {"role": "user", "content": "hi"},
        ],
        max_completion_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    req = parse_body(raw, ChatCompletionRequest)
    assert [m.as_template_message() for m in req.messages] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    assert req.token_limit == 9 and req.include_usage
    for bad in (
        body(messages=[]),
        body(messages=[{"role": "tool", "content": "x"}]),
        body(messages=[{"role": "user", "content": "x"}], max_tokens=1, max_completion_tokens=2),
    ):
        with pytest.raises(OpenAIError):
            parse_body(bad, ChatCompletionRequest)


def test_finish_reason_context_is_length_and_sse_framing() -> None:
    assert openai_finish_reason("context") == "length"
    assert openai_finish_reason("stop") == "stop"
    event = sse(
        ChatCompletionChunk(
            id="c", created=1, model="m", choices=[ChatChunkChoice(delta=ChatDelta(content="a"))]
        )
    )
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert json.loads(event[6:])["choices"][0]["delta"] == {"content": "a"}
    assert sse("[DONE]") == "data: [DONE]\n\n"


def test_null_means_the_default_as_in_openai_clients() -> None:
    nulls = dict(temperature=None, top_p=None, top_k=None, n=None, stream=None, seed=None, stop=None)
    req = parse_body(body(prompt="x", **nulls), CompletionRequest)
    assert req.sampling() == parse_body(body(prompt="x"), CompletionRequest).sampling()
    assert req.stream is False and req.temperature == 1.0
    chat = parse_body(
        json.dumps(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": None}
        ).encode(),
        ChatCompletionRequest,
    )
    assert chat.temperature == 1.0
    with pytest.raises(OpenAIError) as err:  # the model has no default: null stays an error
        parse_body(body(prompt="x", model=None), CompletionRequest)
    assert err.value.status == 400
