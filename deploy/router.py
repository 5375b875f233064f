"""The HTTP ingress: an OpenAI-compatible FastAPI app served through `serve.ingress`.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true` as server-sent
events ending in `data: [DONE]`), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).

The router owns validation, authentication and metrics; it reaches the engine replicas of each model
through a `DeploymentHandle` and always consumes the engine's chunk stream (`handle.options(stream=True)`),
so time to first token is measured the same way for streamed and unary responses. A request first waits
for the engine's first chunk, so a prompt the engine refuses (over the context, empty, bad token ids)
is a plain 400 even when `stream: true`. A client that goes away mid-stream cancels the handle call,
which stops the decode loop in the replica at its next step.

A replica that dies (or becomes unreachable) while it holds a request is retried once, on another or a
replacement replica, as long as nothing of that request has reached the client: before the first chunk
(stream or not), and for a non-streamed request at any point, since its body is sent only at the end.
Generation has no side effects, so re-sending it is safe; one retry bounds the harm of a request that
itself kills replicas. A stream that already sent text ends with a JSON error event and `[DONE]`; a
request whose retry fails too gets a 503. Retries are counted in `/metrics` (`request_retries`).

`build_app(args)` is the builder that `import_path: deploy.router:build_app` names in a Serve config.
"""

import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError, RayError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy.config import ModelConfig, ServerConfig
from deploy.engine import EngineChunk, EngineError, EngineRequest, build_engine_deployment
from deploy.metrics import CONTENT_TYPE, RequestRecord, ServeMetrics
from deploy.openai_protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    OpenAIError,
    Usage,
    new_id,
    now,
    openai_finish_reason,
    parse_body,
    sse,
)
from falcon_core.metrics import GenerationStats

logger = logging.getLogger("ray.serve")

COMPLETION_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default `max_tokens` for `/v1/completions`."""

ENGINE_RETRIES = 1
"""Times a request is re-sent after its engine replica died before any of it reached the client."""

app = FastAPI(title="Falcon speculative decoding", docs_url=None, redoc_url=None)


@app.exception_handler(OpenAIError)
async def _openai_error(_: Request, err: OpenAIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and wrong methods, in OpenAI's error shape."""
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    body = OpenAIError(err.status_code, str(err.detail), type=kind).body()
    return JSONResponse(body, status_code=err.status_code, headers=getattr(err, "headers", None))


@app.exception_handler(Exception)
async def _unexpected_error(_: Request, err: Exception) -> JSONResponse:
    """A bug: still a JSON body in OpenAI's shape (Starlette logs the traceback after sending it)."""
    body = OpenAIError(500, f"internal error: {type(err).__name__}", type="server_error").body()
    return JSONResponse(body, status_code=500)


class EngineLost(OpenAIError):
    """The replica holding the request died or is unreachable (a 503; retryable while nothing was sent)."""

    def __init__(self, err: RayActorError) -> None:
        super().__init__(503, f"the engine is unavailable: {type(err).__name__}", type="server_error")


class GenerationRun:
    """One request's chunk stream from an engine replica, with its timings; records metrics when done.

    `call()` sends the request to a replica (a new `handle.stream.remote(...)`); it is called again, at
    most `retries` times, when the replica is lost before anything reached the client."""

    def __init__(
        self,
        model: str,
        call: Callable[[], DeploymentResponseGenerator],
        arrived: float,
        metrics: ServeMetrics,
        retries: int = ENGINE_RETRIES,
    ):
        self.model = model
        self.call = call
        self.gen = call()
        self.retries_left = retries
        self.arrived = arrived
        self.metrics = metrics
        self.first: EngineChunk | None = None
        self.ttft = 0.0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.stats: GenerationStats | None = None

    async def start(self) -> None:
        """Wait for the first chunk; an engine refusal becomes an `OpenAIError`. A lost replica is
        retried (nothing has reached the client yet)."""
        while True:
            try:
                first = await self._next()
                break
            except EngineLost as err:
                self._resend(err)
        if first is None:
            raise OpenAIError(500, "the engine ended the request without output", type="server_error")
        self.ttft = time.perf_counter() - self.arrived
        self.first = first

    async def chunks(self) -> AsyncIterator[EngineChunk]:
        """The chunks, first included. Cancels the engine call if the consumer stops early."""
        assert self.first is not None, "start() first"
        chunk: EngineChunk | None = self.first
        self.metrics.running.labels(self.model).inc()
        try:
            while chunk is not None:
                self.completion_tokens += len(chunk.token_ids)
                if chunk.finish_reason is not None:
                    self._finish(chunk)
                yield chunk
                if chunk.finish_reason is not None:
                    return
                chunk = await self._next()
            raise OpenAIError(500, "the engine stream ended before a finish reason", type="server_error")
        finally:
            self.metrics.running.labels(self.model).dec()
            if self.finish_reason is None:
                self.gen.cancel()

    async def collect(self) -> str:
        """The whole text, for a non-streamed response: nothing reaches the client before the end, so a
        replica lost mid-generation sends the request again from the start (within the retry budget)."""
        while True:
            try:
                return "".join([c.text async for c in self.chunks()])
            except EngineLost as err:
                self._resend(err)
                await self.start()

    def _resend(self, err: EngineLost) -> None:
        """Send the request again after `err` (its replica is lost), or raise `err` when out of retries."""
        self.gen.cancel()
        if self.retries_left <= 0:
            raise err
        self.retries_left -= 1
        self.metrics.retries.labels(self.model).inc()
        logger.warning("engine replica lost before the client got any output (%s); re-sending", err.message)
        self.first, self.completion_tokens = None, 0
        self.gen = self.call()

    def usage(self) -> Usage:
        return Usage.of(self.prompt_tokens, self.completion_tokens)

    async def _next(self) -> EngineChunk | None:
        try:
            item = await self.gen.__anext__()
        except StopAsyncIteration:
            return None
        except BackPressureError as err:
            raise OpenAIError(429, f"the server is at capacity: {err}", type="rate_limit_error") from None
        except RayActorError as err:  # ActorDiedError, ActorUnavailableError: the replica is gone
            logger.warning("engine replica lost: %r", err)
            raise EngineLost(err) from None
        except (RayError, RayServeException) as err:
            logger.error("engine call failed: %r", err)
            raise OpenAIError(
                503, f"the engine is unavailable: {type(err).__name__}", type="server_error"
            ) from None
        if isinstance(item, EngineError):
            raise OpenAIError(item.status, item.message, type=item.type)
        return item

    def _finish(self, chunk: EngineChunk) -> None:
        assert chunk.stats is not None and chunk.finish_reason is not None
        self.finish_reason = openai_finish_reason(chunk.finish_reason)
        self.stats = chunk.stats
        self.prompt_tokens = chunk.stats.prompt_tokens
        self.metrics.record(
            RequestRecord(
                model=self.model,
                finish_reason=chunk.finish_reason,
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                latency_s=time.perf_counter() - self.arrived,
                ttft_s=self.ttft,
                queue_s=chunk.queue_seconds,
                stats=chunk.stats,
            )
        )


@serve.ingress(app)
class FalconRouter:
    """The ingress deployment: one `DeploymentHandle` per configured model."""

    def __init__(self, config: ServerConfig, engines: dict[str, DeploymentHandle]) -> None:
        self.config = config
        self.engines = engines
        self.metrics = ServeMetrics()
        self.created = now()
        key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        self._api_key = key.encode() if key else None

    # ----------------------------------------------------------------------------------------------
    # Routes

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except OpenAIError as err:
            return self._error(err)
        cards = [ModelCard(id=m.name, created=self.created) for m in self.config.models]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        arrived = time.perf_counter()
        try:
            self._authorize(request)
            req = parse_body(await self._read_body(request), CompletionRequest)
            model = self._model(req.model)
            max_tokens = self._max_tokens(req.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, model)
            engine_req = EngineRequest(**req.prompt_kwargs(), max_new_tokens=max_tokens, **req.sampling())
            run = await self._start(model, engine_req, arrived)
            rid, created = new_id("cmpl"), now()
            if req.stream:
                events = self._completion_events(run, req, rid, created)
                return StreamingResponse(events, media_type="text/event-stream")
            text = await run.collect()
        except OpenAIError as err:
            return self._error(err)
        assert run.finish_reason is not None
        choice = CompletionChoice(text=text, finish_reason=run.finish_reason)  # type: ignore[arg-type]
        body = CompletionResponse(
            id=rid, created=created, model=model.name, choices=[choice], usage=run.usage()
        )
        return JSONResponse(body.model_dump())

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        arrived = time.perf_counter()
        try:
            self._authorize(request)
            req = parse_body(await self._read_body(request), ChatCompletionRequest)
            model = self._model(req.model)
            max_tokens = self._max_tokens(req.token_limit, model.default_max_tokens, model)
            messages = [m.as_template_message() for m in req.messages]
            engine_req = EngineRequest(messages=messages, max_new_tokens=max_tokens, **req.sampling())
            run = await self._start(model, engine_req, arrived)
            rid, created = new_id("chatcmpl"), now()
            if req.stream:
                events = self._chat_events(run, req, rid, created)
                return StreamingResponse(events, media_type="text/event-stream")
            text = await run.collect()
        except OpenAIError as err:
            return self._error(err)
        assert run.finish_reason is not None
        choice = ChatChoice(message=ChatResponseMessage(content=text), finish_reason=run.finish_reason)  # type: ignore[arg-type]
        body = ChatCompletionResponse(
            id=rid, created=created, model=model.name, choices=[choice], usage=run.usage()
        )
        return JSONResponse(body.model_dump())

    # ----------------------------------------------------------------------------------------------
    # Streams

    async def _completion_events(
        self, run: GenerationRun, req: CompletionRequest, rid: str, created: int
    ) -> AsyncIterator[str]:
        model = run.model
        try:
            async for c in run.chunks():
                if c.text or c.finish_reason is not None:
                    reason = openai_finish_reason(c.finish_reason) if c.finish_reason else None
                    choice = CompletionChoice(text=c.text, finish_reason=reason)
                    yield sse(CompletionResponse(id=rid, created=created, model=model, choices=[choice]))
            if req.include_usage:
                yield sse(
                    CompletionResponse(id=rid, created=created, model=model, choices=[], usage=run.usage())
                )
        except OpenAIError as err:
            self.metrics.record_error(err.status)
            yield sse(json.dumps(err.body()))
        yield sse("[DONE]")

    async def _chat_events(
        self, run: GenerationRun, req: ChatCompletionRequest, rid: str, created: int
    ) -> AsyncIterator[str]:
        model = run.model

        def chunk(delta: ChatDelta, reason: str | None = None) -> str:
            choice = ChatChunkChoice(
                delta=delta, finish_reason=openai_finish_reason(reason) if reason else None
            )
            return sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice]))

        try:
            yield chunk(ChatDelta(role="assistant", content=""))
            async for c in run.chunks():
                if c.text:
                    yield chunk(ChatDelta(content=c.text))
                if c.finish_reason is not None:
                    yield chunk(ChatDelta(), c.finish_reason)
            if req.include_usage:
                yield sse(
                    ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=run.usage())
                )
        except OpenAIError as err:
            self.metrics.record_error(err.status)
            yield sse(json.dumps(err.body()))
        yield sse("[DONE]")

    # ----------------------------------------------------------------------------------------------
    # Helpers

    def _authorize(self, request: Request) -> None:
        if self._api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._api_key):
            raise OpenAIError(
                401,
                "missing or incorrect API key (send `Authorization: Bearer <key>`)",
                code="invalid_api_key",
            )

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 once it passes `max_body_bytes` (declared or actual size), and with
        415 when it is declared as something other than JSON (no `Content-Type` is read as JSON)."""
        media = request.headers.get("content-type")
        if media is not None and media.partition(";")[0].strip().lower() != "application/json":
            raise OpenAIError(
                415,
                f"Content-Type must be application/json, got {media[:100]!r}",
                code="unsupported_media_type",
            )
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        too_big = OpenAIError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
        if declared is not None:
            if not declared.isdigit():
                raise OpenAIError(400, "invalid Content-Length header")
            if int(declared) > limit:
                raise too_big
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise too_big
        return bytes(body)

    def _model(self, name: str) -> ModelConfig:
        model = self.config.model(name)
        if model is None:
            served = ", ".join(m.name for m in self.config.models)
            raise OpenAIError(
                404,
                f"the model {name!r} does not exist; served models: {served}",
                param="model",
                code="model_not_found",
            )
        return model

    @staticmethod
    def _max_tokens(asked: int | None, default: int, model: ModelConfig) -> int:
        n = default if asked is None else asked
        if n > model.max_tokens_limit:
            raise OpenAIError(
                400,
                f"max_tokens is {n}; this server allows at most {model.max_tokens_limit} for {model.name}",
                param="max_tokens",
                code="max_tokens_too_large",
            )
        return n

    async def _start(self, model: ModelConfig, req: EngineRequest, arrived: float) -> GenerationRun:
        handle = self.engines[model.name].options(stream=True)
        run = GenerationRun(model.name, lambda: handle.stream.remote(req), arrived, self.metrics)
        try:
            await run.start()
        except BaseException:  # refused, failed, or the client left while the request queued
            run.gen.cancel()
            raise
        return run

    def _error(self, err: OpenAIError) -> JSONResponse:
        self.metrics.record_error(err.status)
        if err.status >= 500:
            logger.error("request failed: %s", err.message)
        return JSONResponse(err.body(), status_code=err.status)


def build_app(args: dict[str, Any]) -> Any:
    """Serve application builder: `args` (the config's `args:`) -> router bound to one engine deployment
    per model."""
    config = ServerConfig.from_dict(args)
    engines = {m.name: build_engine_deployment(m) for m in config.models}
    router = serve.deployment(
        FalconRouter,
        name="router",
        ray_actor_options={"num_cpus": config.router_num_cpus},
        max_ongoing_requests=config.router_max_ongoing_requests,
    )
    return router.bind(config, engines)
