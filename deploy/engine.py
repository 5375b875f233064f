"""The engine deployment: each replica loads one target (+ drafter) once and streams generations.

`FalconEngine` is a plain class (usable and testable without Serve); `build_engine_deployment` wraps it
as a Serve deployment with the model's replica options, as Ray's `ray.llm` builds its `LLMServer`.

Concurrency inside a replica: `falcon_core.generate.Engine` runs one request at a time (a lock), so a
replica serves its requests one by one; requests beyond that wait in the replica (up to Serve's
`max_ongoing_requests`), then in the router's handle queue, while the autoscaler adds replicas. The
decode loop runs in a worker thread so the replica's event loop stays free for health checks and for
noticing cancellation; a cancelled request (client gone) stops at the next decode step and frees the
engine.

The contract between router and engine is `EngineRequest` in, a stream of `EngineChunk` out (the last
one has `finish_reason` and `stats`), or a single `EngineError` when the request is invalid.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from deploy.config import ModelConfig
from falcon_core.metrics import GenerationStats


@dataclass(frozen=True)
class EngineRequest:
    """One generation: exactly one of `prompt`, `messages`, `input_ids`, and the sampling parameters."""

    prompt: str | None = None
    messages: Sequence[dict[str, str]] | None = None
    input_ids: Sequence[int] | None = None
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: Sequence[str] = ()
    seed: int | None = None
    speculative: bool = True

    def engine_kwargs(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "messages": None if self.messages is None else list(self.messages),
            "input_ids": None if self.input_ids is None else list(self.input_ids),
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "stop": list(self.stop),
            "seed": self.seed,
            "speculative": self.speculative,
        }


@dataclass(frozen=True)
class EngineChunk:
    """New text and tokens; the last chunk has `finish_reason`, `stats` and the replica's queue wait."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stats: GenerationStats | None = field(default=None, repr=False)
    queue_seconds: float = 0.0


@dataclass(frozen=True)
class EngineError:
    """A request the engine refused (`status` 400: bad prompt or parameters) or failed on (500)."""

    status: int
    message: str
    type: str = "invalid_request_error"


_DONE = object()


class FalconEngine:
    """A replica: one `falcon_core` Engine for one configured model."""

    def __init__(self, model: ModelConfig) -> None:
        import torch

        from falcon_core.generate import Engine

        if model.torch_threads is not None:
            torch.set_num_threads(model.torch_threads)
        self.config = model
        self.engine = Engine.from_pretrained(
            model=model.target_spec(),
            drafter=model.drafter_path(),
            dtype=model.dtype,
            device=model.device,
            tree=model.tree,
        )
        self._pool = ThreadPoolExecutor(
            max_workers=model.max_ongoing_requests + 1, thread_name_prefix="falcon-engine"
        )

    def info(self) -> dict[str, Any]:
        """What this replica serves (for `/v1/models` and benchmarks)."""
        return {
            "name": self.config.name,
            "max_context": self.engine.max_context,
            "drafter": self.engine.drafter is not None,
            "tree": self.engine.tree.name if self.engine.drafter is not None else None,
            "dtype": self.config.dtype,
        }

    async def stream(self, request: EngineRequest) -> AsyncIterator[EngineChunk | EngineError]:
        """Generate `request`, yielding chunks as the engine decides them."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (replica shutting down)
                cancelled.set()

        def work() -> None:
            try:
                for item in self._run(request, cancelled):
                    put(item)
            finally:
                put(_DONE)

        loop.run_in_executor(self._pool, work)
        try:
            while (item := await queue.get()) is not _DONE:
                yield item
        finally:
            cancelled.set()

    def _run(self, request: EngineRequest, cancelled: threading.Event) -> Iterator[EngineChunk | EngineError]:
        """The blocking side, in a worker thread: validate, wait for the engine, decode."""
        arrived = time.perf_counter()
        try:
            chunks = self.engine.stream(**request.engine_kwargs())
        except (ValueError, TypeError) as err:
            yield EngineError(400, str(err))
            return
        try:
            for chunk in chunks:
                if chunk.finish_reason is not None:
                    stats = chunk.stats
                    assert stats is not None
                    busy = time.perf_counter() - arrived
                    yield EngineChunk(
                        chunk.text,
                        chunk.token_ids,
                        chunk.finish_reason,
                        stats,
                        queue_seconds=max(busy - stats.total_seconds, 0.0),
                    )
                    return
                yield EngineChunk(chunk.text, chunk.token_ids)
                if cancelled.is_set():
                    return
        except Exception as err:  # a bug or an out-of-memory: this request fails, the replica lives
            yield EngineError(500, f"generation failed: {type(err).__name__}: {err}", type="server_error")
        finally:
            chunks.close()

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def deployment_options(model: ModelConfig) -> dict[str, Any]:
    """Ray Serve options of the engine deployment of `model`."""
    return {
        "name": model.deployment_name,
        "ray_actor_options": {"num_cpus": model.num_cpus, "num_gpus": model.gpus},
        "max_ongoing_requests": model.max_ongoing_requests,
        "autoscaling_config": model.autoscaling.to_serve(),
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 60.0,
    }


def build_engine_deployment(model: ModelConfig) -> Any:
    """A bound Serve application (`serve.Application`) running `FalconEngine(model)` replicas."""
    from ray import serve

    return serve.deployment(FalconEngine, **deployment_options(model)).bind(model)
