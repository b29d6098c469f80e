"""A real server for tests: uvicorn on a loopback port in its own thread, and the client-side helpers
that speak its protocols (Realtime WebSocket, Twilio Media Streams) with real `websockets` clients.

No helper depends on how fast anything is: waits are bounded only so that a hang fails.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from agent.hub import ServerSettings
from agent.server import create_app, server_for
from dllm_engine.engine import Engine
from serving.openai_api import ApiSettings, create_app as create_api_app, server_for as api_server_for
from audio.codec import to_int16, ulaw_encode

from tests.helpers import WAIT  # noqa: E402  (re-exported: every server test bounds its waits by it)


class RT:
    """Realtime event names as the server speaks them today: a rename of the protocol is a change here."""

    created = "session.created"
    update = "session.update"
    updated = "session.updated"
    audio_delta = "response.output_audio.delta"
    text_delta = "response.output_audio_transcript.delta"
    interrupted = "response.interrupted"
    done = "response.done"
    speculation = "turn.speculation"
    hangup = "session.hangup"


class LiveServer:
    """A VoiceServer on 127.0.0.1:<free port> in a thread with its own event loop."""

    def __init__(self, agent, sndbuf: int | None = None, ssl: tuple[str, str] | None = None, **settings) -> None:
        self.sock = socket.socket()
        if sndbuf:  # accepted sockets inherit it: a small kernel buffer lets backpressure reach the app
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.agent = agent
        self.app = create_app(agent, ServerSettings(port=self.port, **settings))
        self.hub = self.app.state.hub
        certfile, keyfile = ssl or (None, None)  # TLS: (certificate, key) PEM files
        self.server = server_for(self.app, ssl_certfile=certfile, ssl_keyfile=keyfile, log_level="warning")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, name=f"server-{self.port}", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve(sockets=[self.sock])

        asyncio.run(main())

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + WAIT
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """What Ctrl-C does."""
        self.server.handle_exit(signal.SIGINT, None)
        self.thread.join(WAIT)
        assert not self.thread.is_alive()

    def url(self, path: str, scheme: str = "ws") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def in_loop(self, fn):
        """Run `fn()` on the server's loop (its state belongs to that thread)."""

        async def call():
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(WAIT)

    def idle(self) -> bool:
        return self.in_loop(lambda: not self.hub.connections and self.hub.active_sessions == 0)

    async def wait_until(self, condition, what: str) -> None:
        """Poll `condition()` (run on the server's loop) until it holds; only a hang fails."""
        deadline = time.monotonic() + WAIT
        while not self.in_loop(condition):
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.05)

    async def wait_idle(self) -> None:
        await self.wait_until(lambda: not self.hub.connections and self.hub.active_sessions == 0, "sessions were not cleaned up")


@contextmanager
def live(agent, sndbuf: int | None = None, **settings):
    srv = LiveServer(agent, sndbuf, **settings).start()
    try:
        yield srv
    finally:
        srv.stop()



def pcm16(samples: np.ndarray) -> bytes:
    return to_int16(samples).astype("<i2").tobytes()


def http(srv: LiveServer, path: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, str, str]:
    req = urllib.request.Request(srv.url(path, "http"), data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=WAIT) as r:
            return r.status, r.headers.get("content-type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read().decode()


async def recv_json(ws, timeout: float = WAIT) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def until(ws, type_: str, seen: list | None = None) -> dict:
    """Read Realtime events until one of `type_` (keeping them all in `seen`)."""
    while True:
        msg = await recv_json(ws)
        if seen is not None:
            seen.append(msg)
        if msg["type"] == type_:
            return msg


async def close_code(ws) -> int:
    """Read until the server closes; its close code."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), WAIT)
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd else 1006


async def send_rt_audio(ws, samples: np.ndarray, rate: int, chunk_s: float = 0.1) -> None:
    """Half the chunks as base64 appends, half as binary frames: both are the protocol."""
    n = int(rate * chunk_s)
    for k, i in enumerate(range(0, len(samples), n)):
        data = pcm16(samples[i : i + n])
        if k % 2:
            await ws.send(data)
        else:
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(data).decode()}))


# ---- Twilio helpers ------------------------------------------------------------------------

SID = "MZ0123456789abcdef0123456789abcdef"
MULAW = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}


def start_msg(token: str | None = None, fmt: dict = MULAW, **params: str) -> str:
    """Twilio's `start`; `params`: the TwiML's other <Parameter>s."""
    start = {"streamSid": SID, "accountSid": "AC0", "callSid": "CA0", "tracks": ["inbound"], "mediaFormat": fmt,
             "customParameters": {**({"token": token} if token else {}), **params}}
    return json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": SID, "start": start})


def media_msgs(samples_8k: np.ndarray) -> list[str]:
    ulaw = ulaw_encode(to_int16(samples_8k))
    return [
        json.dumps({"event": "media", "sequenceNumber": str(3 + k), "streamSid": SID,
                    "media": {"track": "inbound", "chunk": str(k + 1), "timestamp": str(20 * k), "payload": base64.b64encode(ulaw[i : i + 160]).decode()}})
        for k, i in enumerate(range(0, len(ulaw), 160))
    ]


async def twilio_call(srv: LiveServer, token: str | None = None):
    ws = await connect(srv.url("/twilio/stream"))
    await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
    await ws.send(start_msg(token))
    return ws


# ---- HTTP ----------------------------------------------------------------------------------


@contextmanager
def serving(server, sock: socket.socket):
    """Run any uvicorn `server` on a bound socket in its own thread until the block ends (then what Ctrl-C does)."""
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), name="server", daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield server
    finally:
        server.handle_exit(signal.SIGINT, None)
        thread.join(WAIT)
        assert not thread.is_alive()


def free_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def api_server(engine: Engine, **settings):
    sock = free_socket()
    port = sock.getsockname()[1]
    app = create_api_app(engine, ApiSettings(port=port, model_name="tiny", **settings))
    with serving(api_server_for(app, drain_s=5, log_level="warning"), sock):
        yield f"http://127.0.0.1:{port}/v1", app.state.api
