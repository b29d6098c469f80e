"""The ASGI app: health, the browser client, the Realtime-style WebSocket, WebRTC signaling, and Twilio.

    app = create_app(agent, ServerSettings())   # a Starlette app around one loaded Agent
    run(app)                                    # uvicorn (websockets), Ctrl-C closes sessions with 1001

Admission (Origin, tokens, signatures) happens here, before a WebSocket is accepted; the protocols
live in agent/transports/.
"""

from __future__ import annotations

import json
import logging
import socket
from urllib.parse import parse_qsl, urlsplit
from xml.sax.saxutils import quoteattr

import uvicorn
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from .hub import Hub, ServerSettings
from .security import credential, origin_allowed, token_matches, twilio_valid
from .transports.realtime import RealtimeConnection
from .transports.twilio import TwilioConnection
from .transports.webrtc import OfferError, Signaling
from .voice_agent import Agent

log = logging.getLogger(__name__)

REALTIME_PATH = "/v1/realtime"
TWIML_PATH = "/twiml"
TWILIO_PATH = "/twilio/stream"
WEBRTC_PATH = "/v1/webrtc/offer"
MAX_BODY_BYTES = 64 << 10  # Twilio's webhook form is a few hundred bytes; a browser's SDP offer a few KiB


def create_app(agent: Agent, settings: ServerSettings | None = None) -> Starlette:
    settings = settings or ServerSettings()
    routes = [
        Route("/health", health),
        Route(TWIML_PATH, twiml, methods=["POST"]),
        Route(WEBRTC_PATH, webrtc_offer, methods=["POST"]),
        WebSocketRoute(REALTIME_PATH, realtime),
        WebSocketRoute(TWILIO_PATH, twilio_stream),
    ]
    if settings.web_dir.is_dir():
        routes.append(Mount("/", StaticFiles(directory=settings.web_dir, html=True)))
    else:
        log.warning("no browser client at %s: / will answer 404", settings.web_dir)
    app = Starlette(routes=routes, max_body_size=MAX_BODY_BYTES)
    app.state.hub = Hub(agent, settings)
    app.state.webrtc = Signaling(app.state.hub)
    return app


# ---- HTTP ------------------------------------------------------------------------------------


async def health(request: Request) -> JSONResponse:
    """503 while shutting down, so that a load balancer sends new calls elsewhere."""
    hub: Hub = request.app.state.hub
    return JSONResponse(hub.health(), 503 if hub.closing else 200)


async def twiml(request: Request) -> Response:
    """Twilio's voice webhook: answer the call with a bidirectional media stream back to this server.

    `?instructions=` on the webhook URL becomes the stream's `instructions` parameter: that call's
    system prompt (an operator's own webhook can add the same <Parameter> to its TwiML)."""
    hub: Hub = request.app.state.hub
    s = hub.settings
    params = parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)
    if s.twilio_auth_token:
        if not twilio_valid(s.twilio_auth_token, request.headers.get("x-twilio-signature"), public_url(request), params):
            log.warning("POST %s with an invalid X-Twilio-Signature", TWIML_PATH)
            return PlainTextResponse("invalid X-Twilio-Signature\n", 403)
    elif s.token and not token_matches(credential(request.headers), s.token):
        return PlainTextResponse("unauthorized\n", 401, headers={"WWW-Authenticate": 'Basic realm="voice-agent"'})
    if hub.full or hub.closing:
        return _xml('<Response><Reject reason="busy"/></Response>')
    call_sid = dict(params).get("CallSid")
    if s.auth_required and not call_sid:
        return PlainTextResponse("no CallSid: this endpoint is Twilio's voice webhook\n", 400)
    stream_params = {"token": hub.stream_tokens.mint(call_sid)} if s.auth_required else {}
    if instructions := request.query_params.get("instructions"):  # per number: the webhook URL's ?instructions=
        stream_params["instructions"] = instructions
    tags = "".join(f"<Parameter name={quoteattr(k)} value={quoteattr(v)}/>" for k, v in stream_params.items())
    return _xml(f"<Response><Connect><Stream url={quoteattr(stream_url(request))}>{tags}</Stream></Connect></Response>")


async def webrtc_offer(request: Request) -> JSONResponse:
    """WebRTC signaling in one round trip: `{type: "offer", sdp}` in, `{type: "answer", sdp}` out.

    Admission (origin, token) is here; the offer itself is the WebRTC transport's (`Signaling`).
    """
    hub: Hub = request.app.state.hub
    s = hub.settings
    if refusal := _refusal(request):
        return _refuse(*refusal)
    if s.token and not token_matches(credential(request.headers), s.token):
        return _refuse(401, "invalid or missing token: send Authorization: Bearer TOKEN")
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):
        return _refuse(400, "the body must be JSON: {\"type\": \"offer\", \"sdp\": \"v=0...\"}")
    if not isinstance(body, dict) or body.get("type") != "offer":
        return _refuse(400, "expected {\"type\": \"offer\", \"sdp\": ...}")
    try:
        sdp = await request.app.state.webrtc.answer(body.get("sdp"))
    except OfferError as e:
        return _refuse(e.status, str(e))
    return JSONResponse({"type": "answer", "sdp": sdp})


def _refuse(status: int, message: str) -> JSONResponse:
    log.info("refused %s: %d %s", WEBRTC_PATH, status, message)
    return JSONResponse({"error": message}, status)


def _xml(body: str) -> Response:
    return Response('<?xml version="1.0" encoding="UTF-8"?>' + body, media_type="application/xml")


def public_url(conn: Request | WebSocket) -> str:
    """The URL the client used, as the outside world sees it (Twilio signs this one, not ours behind a proxy)."""
    public = conn.app.state.hub.settings.public_url
    if not public:
        return str(conn.url)
    query = conn.url.query
    return public.rstrip("/") + conn.url.path + (f"?{query}" if query else "")


def stream_url(conn: Request | WebSocket) -> str:
    """wss:// from --public-url (Twilio accepts only wss and no query string); else the request's own host."""
    public = conn.app.state.hub.settings.public_url
    if public:
        u = urlsplit(public)
        return f"{'ws' if u.scheme == 'http' else 'wss'}://{u.netloc}{u.path.rstrip('/')}{TWILIO_PATH}"
    scheme = "wss" if conn.url.scheme in ("https", "wss") else "ws"
    return f"{scheme}://{conn.headers.get('host', conn.url.netloc)}{TWILIO_PATH}"


# ---- WebSockets ------------------------------------------------------------------------------


async def _deny(ws: WebSocket, status: int, message: str) -> None:
    log.info("refused %s: %d %s", ws.url.path, status, message)
    await ws.send_denial_response(JSONResponse({"error": message}, status))


def _refusal(conn: HTTPConnection) -> tuple[int, str] | None:
    """The checks every call endpoint (WebSocket or WebRTC signaling) makes first: (status, why) to refuse."""
    hub: Hub = conn.app.state.hub
    if hub.closing:
        return 503, "server shutting down"
    if not origin_allowed(conn.headers, hub.settings.origins):
        return 403, f"origin {conn.headers.get('origin')} not allowed"
    return None


async def _admit(ws: WebSocket) -> Hub | None:
    """The WebSocket endpoints' first checks; None when the handshake was refused."""
    if refusal := _refusal(ws):
        await _deny(ws, *refusal)
        return None
    return ws.app.state.hub


async def realtime(ws: WebSocket) -> None:
    """Programs send `Authorization: Bearer TOKEN` (an OpenAI SDK's API key); browsers, which cannot,
    send it as the first message."""
    if (hub := await _admit(ws)) is None:
        return
    s = hub.settings
    given = credential(ws.headers)
    if s.token and given is not None and not token_matches(given, s.token):
        return await _deny(ws, 401, "invalid token")
    beta = "realtime=v1" in ws.headers.get("openai-beta", "")  # the beta SDKs' header: they expect the beta's event names
    await RealtimeConnection(ws, hub, authed=not s.token or given is not None, beta=beta).serve()


async def twilio_stream(ws: WebSocket) -> None:
    """Twilio signs the handshake (X-Twilio-Signature over the stream URL); the stream token comes in `start`."""
    if (hub := await _admit(ws)) is None:
        return
    s = hub.settings
    if s.twilio_auth_token and not twilio_valid(s.twilio_auth_token, ws.headers.get("x-twilio-signature"), stream_url(ws)):
        return await _deny(ws, 403, "invalid X-Twilio-Signature")
    await TwilioConnection(ws, hub).serve()


# ---- running it ------------------------------------------------------------------------------


class VoiceServer(uvicorn.Server):
    """uvicorn whose shutdown first drains (refuses new sessions, lets running calls end, up to
    `drain_s`: a rolling restart loses no call), then ends the rest with 1001 (going away), then stops."""

    def __init__(self, config: uvicorn.Config, hub: Hub) -> None:
        super().__init__(config)
        self.hub = hub

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self.hub.drain(self.hub.settings.drain_s)
        await self.hub.close_all(1001, "server shutting down")
        await super().shutdown(sockets)


def server_for(app: Starlette, ssl_certfile: str | None = None, ssl_keyfile: str | None = None, log_level: str = "info") -> VoiceServer:
    """A uvicorn server for `app` with the WebSocket settings this protocol needs."""
    s: ServerSettings = app.state.hub.settings
    config = uvicorn.Config(
        app,
        host=s.host,
        port=s.port,
        ws="websockets-sansio",  # the websockets library, in uvicorn's current (non-deprecated) binding
        ws_max_size=s.max_frame_bytes,  # larger messages: close 1009
        ws_per_message_deflate=False,  # base64 audio barely compresses; keep the 2 cores for the models
        lifespan="off",
        timeout_graceful_shutdown=5,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        log_level=log_level,
    )
    return VoiceServer(config, app.state.hub)


def run(app: Starlette, **kwargs) -> None:
    """Serve until Ctrl-C (or SIGTERM): sessions get close code 1001, then the process exits."""
    server_for(app, **kwargs).run()
