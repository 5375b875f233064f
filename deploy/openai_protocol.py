"""OpenAI-compatible request and response bodies, and OpenAI-style errors.

Requests are validated strictly, as OpenAI's API does: a wrong type (`"max_tokens": "5"`) or an unknown
field is a 400, not a silent coercion. Parameters beyond OpenAI's: `top_k` (0 = off; vLLM's -1 is read as
0) and `speculative` (false turns Falcon speculation off for that request; the output distribution is
the same either way). Errors have OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

FinishReason = Literal["stop", "length"]


# --------------------------------------------------------------------------------------------------
# Errors


class OpenAIError(Exception):
    """An error the HTTP layer turns into `status` with an OpenAI-style JSON body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(err: ValidationError) -> OpenAIError:
    """The first problem of a pydantic validation error, as a 400 naming the parameter."""
    first = err.errors(include_url=False)[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    where = f"{param}: " if param else ""
    msg = first["msg"].removeprefix("Value error, ")
    return OpenAIError(400, f"{where}{msg}", param=param, code=first["type"])


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """Bytes of a request body -> a validated request model, or an `OpenAIError` (400) saying why not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise OpenAIError(
            400,
            f"the request body is not valid UTF-8 ({err.reason} at byte {err.start})",
            code="invalid_utf8",
        ) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise OpenAIError(
            400,
            f"the request body is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})",
            code="invalid_json",
        ) from None
    except RecursionError:
        raise OpenAIError(400, "the request body nests JSON too deeply", code="invalid_json") from None
    except ValueError as err:  # an integer literal longer than Python's int parser takes (4300 digits)
        raise OpenAIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise OpenAIError(400, "the request body must be a JSON object", code="invalid_json")
    if "\\u" in text and _has_lone_surrogate(obj):
        raise OpenAIError(
            400,
            "the request body escapes a lone UTF-16 surrogate (\\ud800-\\udfff), which is not a character",
            code="invalid_unicode",
        )
    try:
        return model.model_validate(obj)
    except ValidationError as err:
        raise validation_error(err) from None


def _has_lone_surrogate(obj: Any) -> bool:
    """True when a string in the parsed body holds an unpaired surrogate (JSON allows `"\\ud800"`; UTF-8
    text, the tokenizer and the response encoder do not)."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# --------------------------------------------------------------------------------------------------
# Requests

PositiveInt = Annotated[int, Field(ge=1)]
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


NULL_MEANS_DEFAULT = frozenset(
    {"temperature", "top_p", "top_k", "n", "presence_penalty", "frequency_penalty", "stream", "speculative"}
)


class _SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: PositiveInt | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] = 1.0
    top_k: Annotated[int, Field(ge=-1, le=INT64_MAX)] = 0
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    """As vLLM: a 64-bit integer (torch's generator takes no more)."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None
    presence_penalty: Literal[0, 0.0] = 0
    frequency_penalty: Literal[0, 0.0] = 0
    speculative: bool = True
    """Falcon extension: false decodes this request without the drafter."""

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """As OpenAI's API and vLLM: an explicit null for a field with a default means the default."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in NULL_MEANS_DEFAULT)}
        return data

    @field_validator("stop", mode="plain")
    @classmethod
    def _stop(cls, v: Any) -> str | list[str] | None:
        if v is None or isinstance(v, str):
            stops = [] if v is None else [v]
        elif isinstance(v, list) and all(isinstance(s, str) for s in v):
            stops = v
        else:
            raise ValueError("stop must be a string or a list of up to 4 strings")
        if len(stops) > 4:
            raise ValueError(f"stop takes at most 4 strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must be non-empty")
        return v

    def sampling(self) -> dict[str, Any]:
        """Engine keyword arguments for sampling and stopping."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": max(self.top_k, 0),
            "stop": [self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            "seed": self.seed,
            "speculative": self.speculative,
        }

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    """`POST /v1/completions`: one prompt, as text or token ids (a one-element batch is accepted)."""

    prompt: str | list[int]
    """Text or token ids; a batch of exactly one (`["text"]`, `[[ids]]`) is unwrapped."""
    echo: Literal[False] = False
    logprobs: Literal[0] | None = None
    best_of: Literal[1] | None = None
    suffix: None = None

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt(cls, v: Any) -> str | list[int]:
        if isinstance(v, list) and v and isinstance(v[0], str | list):
            if len(v) != 1:
                raise ValueError(f"a batch of {len(v)} prompts is not supported; send one prompt per request")
            v = v[0]
        if isinstance(v, str):
            return v
        if isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            return v
        raise ValueError("prompt must be a string or a list of token ids (integers)")

    def prompt_kwargs(self) -> dict[str, Any]:
        """`prompt=` text or `input_ids=` for the engine."""
        if isinstance(self.prompt, str):
            return {"prompt": self.prompt}
        return {"input_ids": list(self.prompt)}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_SamplingRequest):
    """`POST /v1/chat/completions`: the chat template of the target is applied to `messages`."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: Literal[False] | None = None

    @model_validator(mode="after")
    def _one_token_limit(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# --------------------------------------------------------------------------------------------------
# Responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class CompletionResponse(BaseModel):
    """Also the shape of each streamed completion chunk (`object` stays "text_completion", as OpenAI's)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    """Only the fields a chunk carries are sent (OpenAI's deltas omit the others)."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "falcon"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def openai_finish_reason(reason: str) -> FinishReason:
    """The engine's "context" (ran into the context limit) is OpenAI's "length"."""
    return "stop" if reason == "stop" else "length"


def sse(payload: BaseModel | str) -> str:
    """One server-sent event: `data: <json>` (or `data: [DONE]`) and a blank line."""
    data = payload if isinstance(payload, str) else payload.model_dump_json(exclude_none=False)
    return f"data: {data}\n\n"
