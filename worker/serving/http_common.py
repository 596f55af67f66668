"""What the OpenAI and LoRAX routes share: the request's engine, tenant and adapter, one generation, SSE."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from worker.serving.errors import PromptTooLongError, ServingError
from worker.serving.outputs import FinishReason, TokenOutput
from worker.serving.params import SamplingParams

T = TypeVar("T")

if TYPE_CHECKING:
    from worker.serving.engine_api import ServingEngine

# Where `tenant_auth`'s middleware leaves the tenant it verified (the request scope's state).
TENANT_STATE = "tuneforge_tenant"
# Where a route leaves headers for its response (server.py's ResponseHeaders sends them): the response
# of a streamed request starts later, in the streaming response, out of the route's hands.
RESPONSE_HEADERS_STATE = "tuneforge_response_headers"
SPECULATION_HEADER = "X-Tuneforge-Speculation"


@dataclass(frozen=True)
class RequestContext:
    """Who asks, of which engine: what every route needs before it can generate."""

    engine: ServingEngine
    tenant: str | None
    response_headers: dict[str, str]

    @classmethod
    def of(cls, request: Request) -> RequestContext:
        state = request.scope.setdefault("state", {})
        tenant: str | None = state.get(TENANT_STATE)
        headers: dict[str, str] = state.setdefault(RESPONSE_HEADERS_STATE, {})
        return cls(engine=request.app.state.engine, tenant=tenant, response_headers=headers)

    def adapter_for(self, model: str | None) -> str | None:
        """`""`, None or the base model's name mean the base model; anything else is an adapter id."""
        if not model or model == self.engine.model_name:
            return None
        return model

    def max_tokens(self, prompt_tokens: int, requested: int | None, default: int | None, field: str) -> int:
        """The completion budget: what was asked if it fits the context, else the rest of the context.

        A prompt that fills the context, or an explicit budget that overflows it, is a 400 that says
        by how much; an unset budget is `default`, cut to what fits (None: all that fits).
        """
        context = self.engine.max_model_len
        remaining = context - prompt_tokens
        if remaining < 1:
            raise PromptTooLongError(
                f"the prompt has {prompt_tokens} tokens; this model's context is {context} tokens, "
                "prompt and completion together",
                field="prompt",
            )
        if requested is not None and requested > remaining:
            raise PromptTooLongError(
                f"{field}: this model's context is {context} tokens, but {prompt_tokens + requested} were "
                f"asked for ({prompt_tokens} in the prompt, {requested} in the completion); reduce the "
                "prompt or the completion",
                field=field,
            )
        if requested is not None:
            return requested
        return remaining if default is None else min(default, remaining)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, model: str | None) -> Generation:
        adapter_id = self.adapter_for(model)
        # Resolving reads the database (a deleted version must stop being served): off the event loop.
        adapter = (
            await run_in_threadpool(self.engine.resolve_adapter, adapter_id, self.tenant)
            if adapter_id
            else None
        )
        if params.constraint is not None:  # compiled here (cached): a bad grammar never reaches the engine
            await run_in_threadpool(self.engine.grammars.compile, params.constraint)
        if self.tenant is not None:  # cached prompt KV is shared within a tenant only (SamplingParams)
            params = replace(params, cache_scope=self.tenant)
        stream = self.engine.generate(prompt_ids, params, adapter)
        generation = await Generation.start(stream, params.n)  # closing the generator aborts the request
        if generation.first.speculation_note:
            self.response_headers[SPECULATION_HEADER] = generation.first.speculation_note
        return generation


class Generation:
    """One request's token stream (of its `choices`, interleaved) whose first output has already arrived.

    Awaiting the first output before answering lets an unknown adapter or an over-long prompt (both
    found by the engine) fail the request with its own HTTP status, even for a streaming request.
    Every way out (end, error, client gone) closes the engine's stream, which aborts the request.
    """

    def __init__(
        self, stream: AsyncGenerator[TokenOutput, None], first: TokenOutput, choices: int = 1
    ) -> None:
        self._stream = stream
        self.first = first
        self.choices = choices

    @classmethod
    async def start(cls, stream: AsyncGenerator[TokenOutput, None], choices: int = 1) -> Generation:
        try:
            first = await anext(stream, None)
        except BaseException:
            await stream.aclose()
            raise
        if first is None:
            raise ServingError("the engine ended the request without output; retry it")
        return cls(stream, first, choices)

    async def outputs(self) -> AsyncGenerator[TokenOutput, None]:
        """Every output, until each choice has finished."""
        unfinished = self.choices - self.first.finished
        try:
            yield self.first
            if not unfinished:
                return
            async for output in self._stream:
                yield output
                unfinished -= output.finished
                if not unfinished:
                    return
        finally:
            await self._stream.aclose()

    async def aclose(self) -> None:
        """Abort the request without reading it (another request of the same reply failed)."""
        await self._stream.aclose()

    async def collect(self, request: Request) -> list[TokenOutput]:
        """Every output, for a whole (non-streamed) response (see `read_all`)."""
        return await read_all(request, self.outputs()) or [self.first]  # cut short only when no one reads


async def read_all(request: Request, items: AsyncIterator[T]) -> list[T]:
    """Every item, for a whole (non-streamed) response; a client that leaves meanwhile stops the reading,
    which aborts the request as a streaming one does, instead of holding its slot to the last token."""
    read: list[T] = []
    async with anyio.create_task_group() as group:

        async def abort_on_disconnect() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(abort_on_disconnect)
        async for item in items:
            read.append(item)
        group.cancel_scope.cancel()
    return read


def completion_text(outputs: list[TokenOutput]) -> str:
    return "".join(output.text for output in outputs)


def finish_reason_of(outputs: list[TokenOutput]) -> FinishReason:
    return outputs[-1].finish_reason or FinishReason.ABORTED


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event (`data: ...` and a blank line)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


class EventStreamResponse(StreamingResponse):
    """SSE that closes its body generator however the response ends.

    Starlette cancels the sending task when the client disconnects, but a generator suspended at a
    `yield` (the send was in flight) would be left for the garbage collector to close; closing it
    here makes the engine abort the request at its next step, deterministically.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncGenerator[str, None]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._generator = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream_then_stop() -> None:
                    await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream_then_stop)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        except OSError:
            pass  # the client went away while a chunk was being sent
        finally:
            with anyio.CancelScope(shield=True):
                await self._generator.aclose()


# --- error bodies: OpenAI's shape under /v1, LoRAX's everywhere else ------------------------------

_OPENAI_TYPES = {400: "invalid_request_error", 404: "not_found_error", 422: "invalid_request_error"}
# lorax-client maps `error_type` to its exception classes; an unknown type falls back to the status.
_LORAX_TYPES = {400: "validation", 404: "not_found", 422: "validation", 503: "overloaded"}


def error_code(exc: ServingError) -> str:
    """`AdapterNotFoundError` → `adapter_not_found`: a stable machine-readable name for the failure."""
    name = type(exc).__name__.removesuffix("Error")
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_") or "serving_error"


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/")


def openai_error_body(status: int, message: str, param: str | None, code: str) -> dict[str, Any]:
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def lorax_error_body(status: int, message: str) -> dict[str, Any]:
    kind = _LORAX_TYPES.get(status, "validation" if 400 <= status < 500 else "generation")
    return {"error": message, "error_type": kind}


def error_body(path: str, status: int, message: str, param: str | None, code: str) -> dict[str, Any]:
    if is_openai_path(path):
        return openai_error_body(status, message, param, code)
    return lorax_error_body(status, message)
