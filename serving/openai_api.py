"""The engine behind an OpenAI-compatible API: `POST /v1/chat/completions`, `POST /v1/completions`
(prompts as text or token ids), `GET /v1/models`, `GET /health`.

    app = create_app(engine, ApiSettings(model_name="default"))   # a Starlette app on one Engine

Every request goes to the one in-process engine, whose continuous batching shares forwards between
them. A client that disconnects (mid-stream or while waiting) cancels its request, which frees its
engine slot at the next step. Refusals are OpenAI-shaped errors (protocol.ApiError).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from dllm_engine.decoding import DecodeParams, Output
from dllm_engine.engine import Engine, RequestError

from .protocol import ApiError, Job, bearer_matches, chat_messages, completion_prompt, parse_job

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
T = TypeVar("T")


@dataclasses.dataclass
class ApiSettings:
    """What `dllm serve` configures; the defaults are the safe local ones."""

    host: str = "127.0.0.1"
    port: int = 8001
    token: str | None = None  # required as `Authorization: Bearer TOKEN` when set (always off loopback)
    model_name: str = "default"
    max_requests: int = 16  # decoding or queued for a batch slot; more get 429
    decode: DecodeParams = DecodeParams()  # defaults for what a request leaves out
    tokenizer_fingerprint: str | None = None  # lets clients that render prompts check they render the same


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class Api:
    """The engine, the settings, and the requests in flight."""

    def __init__(self, engine: Engine, settings: ApiSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.in_flight = 0
        self.draining = False
        self.created = int(time.time())

    def admit(self) -> None:
        """Take a request slot, or refuse: 503 while draining, 429 at the limit (clients retry both)."""
        if self.draining:
            raise ApiError(503, "the server is shutting down", code="server_shutting_down", type="server_error")
        if self.in_flight >= self.settings.max_requests:
            raise ApiError(429, f"all {self.settings.max_requests} request slots are in use, retry later", code="rate_limit_exceeded", type="rate_limit_error")
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    def model_card(self) -> dict[str, Any]:
        e = self.engine
        return {
            "id": self.settings.model_name, "object": "model", "created": self.created, "owned_by": "dllm-voice-agent",
            "dllm": {  # what a client that renders its own prompts (serving.remote) needs to know
                "tokenizer_sha256": self.settings.tokenizer_fingerprint, "max_new_tokens": e.max_new_tokens,
                "max_prompt_tokens": e.max_prompt_tokens, "exact_prefix_reuse": e.exact_prefix_reuse, "max_batch": e.max_batch,
                "shared_prefixes": e.share_prefixes and e.exact_prefix_reuse,
            },
        }


def create_app(engine: Engine, settings: ApiSettings | None = None) -> Starlette:
    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, max_body_size=MAX_BODY_BYTES, exception_handlers={ApiError: _error, 404: _not_found, 405: _not_allowed})
    app.state.api = Api(engine, settings or ApiSettings())
    return app


def _error(request: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, ApiError)
    return JSONResponse(e.body(), e.status)


def _not_found(request: Request, e: Exception) -> JSONResponse:
    return _error(request, ApiError(404, f"no route {request.url.path}", code="not_found"))


def _not_allowed(request: Request, e: Exception) -> JSONResponse:
    return _error(request, ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed"))


# ---- endpoints -------------------------------------------------------------------------------


async def health(request: Request) -> JSONResponse:
    api: Api = request.app.state.api
    return JSONResponse({"status": "closing" if api.draining else "ok", "model": api.settings.model_name,
                         "requests": {"in_flight": api.in_flight, "max": api.settings.max_requests, "engine_active": api.engine.active_requests}})


async def models(request: Request) -> JSONResponse:
    api = _authorized(request)
    return JSONResponse({"object": "list", "data": [api.model_card()]})


async def chat_completions(request: Request) -> Response:
    api = _authorized(request)
    body = await _json(request)
    job = parse_job(body, "messages", api.settings.decode)
    job.prompt = chat_messages(job.prompt)
    if not api.engine.tokenizer.has_system_role and any(m["role"] == "system" for m in job.prompt):
        raise ApiError(400, "this model's chat template has no system role", "messages")
    return await _answer(request, api, job, body.get("model"), chat=True)


async def completions(request: Request) -> Response:
    api = _authorized(request)
    body = await _json(request)
    job = parse_job(body, "prompt", api.settings.decode)
    job.prompt = completion_prompt(job.prompt)
    return await _answer(request, api, job, body.get("model"), chat=False)


def _authorized(request: Request) -> Api:
    api: Api = request.app.state.api
    if api.settings.token and not bearer_matches(request.headers.get("authorization"), api.settings.token):
        raise ApiError(401, "invalid or missing API key: send Authorization: Bearer TOKEN", code="invalid_api_key")
    return api


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, RecursionError):
        raise ApiError(400, "the body must be JSON") from None


# ---- answering -------------------------------------------------------------------------------


async def _answer(request: Request, api: Api, job: Job, model: object, chat: bool) -> Response:
    if model is not None and model != api.settings.model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server has {api.settings.model_name!r}", "model", "model_not_found")
    kind = "chat.completion" if chat else "text_completion"
    reply = Reply(f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", kind, api.settings.model_name, chat)
    api.admit()
    outputs = api.engine.stream(job.prompt, job.params, request_id=reply.id, conversation=job.conversation)
    try:
        first = await _unless_gone(request.receive, anext(outputs))  # refusals come here, before any byte is sent
    except BaseException as e:
        await outputs.aclose()
        api.release()
        if isinstance(e, RequestError):
            raise ApiError(400, str(e), "messages" if chat else "prompt") from None
        if isinstance(e, ClientGone):
            return Response(status_code=499)
        raise
    if job.stream:
        return EventStream(reply.events(first, outputs, job.include_usage), outputs, api.release)
    try:
        return JSONResponse(await _unless_gone(request.receive, reply.whole(first, outputs)))
    except ClientGone:
        return Response(status_code=499)
    finally:
        await outputs.aclose()
        api.release()


async def _unless_gone(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (then ClientGone)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, gone):
            t.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream(StreamingResponse):
    """Server-sent events that stop when the client leaves; `release` runs once, whatever ends them."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], outputs: AsyncIterator[Output], release: Callable[[], None]) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._outputs = outputs
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            with contextlib.suppress(ClientGone, OSError):
                await _unless_gone(receive, self.stream_response(send))
        finally:
            await self.body_iterator.aclose()
            await self._outputs.aclose()  # leaves engine.stream: the request is cancelled if unfinished
            self._release()


@dataclasses.dataclass
class Reply:
    """One answer in the OpenAI shape, whole or as chunks."""

    id: str
    object: str
    model: str
    chat: bool
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def _choice(self, text: str | None, finish: str | None, chunk: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        content = {"content": text} if text is not None else {}
        return {"index": 0, ("delta" if chunk else "message"): ({"role": "assistant"} if not chunk else {}) | content, "logprobs": None, "finish_reason": finish}

    def _envelope(self, choices: list, chunk: bool) -> dict[str, Any]:
        kind = f"{self.object}.chunk" if chunk and self.chat else self.object
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    @staticmethod
    def _usage(out: Output) -> dict[str, int]:
        s = out.stats
        prompt, new = (s.prompt_tokens, s.new_tokens) if s else (0, 0)
        return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}

    async def whole(self, first: Output, rest: AsyncIterator[Output]) -> dict[str, Any]:
        text, last = [first.text], first
        if not first.finished:
            async for out in rest:
                text.append(out.text)
                last = out
        return self._envelope([self._choice("".join(text), _finish(last), chunk=False)], chunk=False) | {"usage": self._usage(last)}

    async def events(self, first: Output, rest: AsyncIterator[Output], include_usage: bool) -> AsyncIterator[str]:
        def sse(payload: dict) -> str:
            return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

        if self.chat:  # OpenAI's first chunk names the role
            yield sse(self._envelope([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}], chunk=True))
        out = first
        try:
            while True:
                if out.text or out.finished:
                    yield sse(self._envelope([self._choice(out.text or None, _finish(out) if out.finished else None, chunk=True)], chunk=True))
                if out.finished:
                    break
                out = await anext(rest)
        except RequestError as e:  # the engine failed mid-reply: an error event, as OpenAI sends one
            yield sse(ApiError(500, str(e), code="engine_error", type="server_error").body())
            return
        if include_usage:
            yield sse(self._envelope([], chunk=True) | {"usage": self._usage(out)})
        yield "data: [DONE]\n\n"


def _finish(out: Output) -> str:
    return "length" if out.finish_reason == "length" else "stop"


class ApiServer(uvicorn.Server):
    """uvicorn that, when stopped, refuses new requests (503) and lets running ones finish up to its drain time."""

    def __init__(self, config: uvicorn.Config, api: Api) -> None:
        super().__init__(config)
        self.api = api

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.api.draining = True
        await super().shutdown(sockets)


def server_for(app: Starlette, drain_s: float = 30.0, log_level: str = "info") -> ApiServer:
    s: ApiSettings = app.state.api.settings
    config = uvicorn.Config(app, host=s.host, port=s.port, lifespan="off", timeout_graceful_shutdown=drain_s, log_level=log_level)
    return ApiServer(config, app.state.api)
