"""The voice agent on a Ray cluster: the sessions and the engine as two Serve applications, each with
its own replicas and resources.

- `llm` (route /llm): `dllm serve`'s OpenAI-compatible app on one in-process Engine per replica
  (continuous batching inside it); give it `num_gpus` where there are GPUs.
- `voice` (route /): the voice server (browser page, Realtime WebSocket, Twilio, WebRTC signaling)
  per replica, decoding on `llm` through the Serve proxy (`--llm-url`), so either scales alone.

Both are mounted in a FastAPI ingress (Ray Serve carries WebSockets only through one). Every response
and WebSocket handshake names its replica in `X-Replica`. Run with `serve run deploy/serve.yaml`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.hub import ServerSettings
from agent.server import create_app as voice_app
from agent.voice_agent import Agent, AgentConfig
from dllm_engine.config import ConfigError
from dllm_engine.decoding import DecodeParams
from dllm_engine.engine import Engine
from dllm_engine.default_model import resolve_model
from serving.openai_api import ApiSettings
from serving.openai_api import create_app as api_app
from serving.protocol import tokenizer_fingerprint

ENGINE_WAIT_S = 600.0  # a voice replica waits this long for the engine to come up (they start together)
SESSION_HEADROOM = 8  # requests a voice replica takes besides its sessions' WebSockets: /twiml, /health, the page


class ReplicaHeader:
    """Adds `X-Replica: <id>` to every HTTP response and WebSocket accept (which replica answered)."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app, self.header = app, (b"x-replica", replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def tagged(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, tagged)


def ingress(app: ASGIApp) -> FastAPI:
    outer = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    outer.mount("/", ReplicaHeader(app, serve.get_replica_context().replica_id.unique_id))
    return outer


@serve.deployment(name="LLM", ray_actor_options={"num_cpus": 1})
@serve.ingress()
class LLM:
    """One Engine behind the OpenAI-compatible API."""

    def __init__(self, model: str | None = None, dtype: str = "auto", device: str = "cpu", max_batch: int = 8,
                 max_requests: int = 32, token: str | None = None, decode: dict[str, Any] | None = None) -> None:
        path = resolve_model(model)
        self.engine = Engine.from_pretrained(path, device=device, dtype=dtype, max_batch=max_batch)
        settings = ApiSettings(token=token, model_name=path.name, max_requests=max_requests,
                               decode=dataclasses.replace(self.engine.default_params, **(decode or {})), tokenizer_fingerprint=tokenizer_fingerprint(path))
        self.asgi = api_app(self.engine, settings)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return ingress(self.asgi)

    def __del__(self) -> None:
        self.engine.close()


@serve.deployment(name="VoiceSessions", ray_actor_options={"num_cpus": 1}, graceful_shutdown_timeout_s=600)
@serve.ingress()
class VoiceSessions:
    """The voice server, its dLLM remote. Serve stops routing to a replica being stopped and waits
    `graceful_shutdown_timeout_s` for its calls (WebSockets are requests) before `__del__` ends the rest."""

    def __init__(self, llm_url: str, settings: dict[str, Any] | None = None, agent: dict[str, Any] | None = None) -> None:
        settings = ServerSettings(**(settings or {}))
        config = AgentConfig(**{"max_sessions": settings.max_sessions, **(agent or {}), "llm_url": llm_url})
        if isinstance(config.decode, dict):
            config.decode = DecodeParams(**config.decode)
        self.agent = _when_engine_is_up(config)
        self.asgi = voice_app(self.agent, settings)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return ingress(self.asgi)

    async def __del__(self) -> None:
        await self.asgi.state.hub.close_all(1001, "replica shutting down")
        self.agent.close()


def _when_engine_is_up(config: AgentConfig) -> Agent:
    """Agent.load, retried while the engine (deployed alongside) is not answering yet."""
    deadline = time.monotonic() + ENGINE_WAIT_S
    while True:
        try:
            return Agent.load(config)
        except ConfigError as e:
            if "cannot reach" not in str(e) and "refused /models" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def build_llm(args: dict[str, Any]) -> Application:
    """`serve.yaml`'s `llm` application: `args` are LLM's keyword arguments (Serve takes a builder of one
    argument; the deployment's options come from the file's `deployments`)."""
    return LLM.bind(**args)


def build_voice(args: dict[str, Any]) -> Application:
    """`serve.yaml`'s `voice` application: `llm_url`, `settings` (ServerSettings) and `agent` (AgentConfig).

    A call holds one request (its WebSocket) for its whole length, so a replica takes its sessions
    plus a few short requests; past that Serve routes to another replica."""
    max_sessions = ServerSettings(**args.get("settings", {})).max_sessions
    return VoiceSessions.options(max_ongoing_requests=max_sessions + SESSION_HEADROOM).bind(**args)
