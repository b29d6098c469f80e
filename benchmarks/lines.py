"""How a benchmark caller reaches the agent: in process, over the Realtime WebSocket, as a WebRTC
peer, or as a Twilio call.

A line takes the caller's 20 ms frames (16 kHz float32) and yields what the caller receives as
agent.events objects, so one caller loop measures every transport the same way. Twilio's protocol
carries only audio: its lines yield AgentAudio without turn ids and nothing else.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol
from urllib.parse import urlsplit

import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from agent import events as ev
from agent.server import REALTIME_PATH, TWILIO_PATH, TWIML_PATH, WEBRTC_PATH
from agent.transports import webrtc
from audio.codec import Framer, Resampler, to_float32, to_int16, ulaw_decode, ulaw_encode

log = logging.getLogger(__name__)

RATE = 16000  # what callers send; every line converts to its protocol's format
OPEN_TIMEOUT_S = 15.0
TWILIO_RATE = 8000
TWILIO_FRAME = 160  # 20 ms of μ-law
TWILIO_FORMAT = {"encoding": "audio/x-mulaw", "sampleRate": TWILIO_RATE, "channels": 1}


class BenchError(Exception):
    """Input or a server the benchmark cannot use at all: the message says which and what to do."""


class LineError(Exception):
    """One caller's line failed (refused, closed by the server): its remaining turns fail, the run goes on."""


class Line(Protocol):
    turn_ids: bool  # events carry the server's turn ids and metrics (Twilio's protocol has neither)
    audio_behind: bool  # reply audio may arrive after the turn's last event (media paced in real time)

    async def send(self, frame: np.ndarray) -> None: ...

    def events(self) -> AsyncIterator[ev.Event]: ...

    async def close(self) -> None: ...


Target = Callable[[], AbstractAsyncContextManager[Line]]  # opens one caller's line


# ---- in process ------------------------------------------------------------------------------


class InprocLine:
    """A session of the embedding API: no network, the reference the network figures compare to."""

    turn_ids = True
    audio_behind = False

    def __init__(self, session) -> None:  # noqa: ANN001 (agent.session.Session)
        self.session = session

    async def send(self, frame: np.ndarray) -> None:
        await self.session.send_audio(frame, RATE)

    def events(self) -> AsyncIterator[ev.Event]:
        return self.session.events()

    async def close(self) -> None:
        await self.session.close()


@asynccontextmanager
async def inproc_line(agent, live: dict) -> AsyncIterator[Line]:  # noqa: ANN001 (Agent)
    async with agent.session() as s:
        s.update(**live)
        yield InprocLine(s)


# ---- the Realtime-style WebSocket ------------------------------------------------------------


async def _open_ws(url: str, headers: dict | None = None, **options: Any) -> ClientConnection:
    """Connect, turning every way a handshake fails into a LineError that names the URL; `options` go to connect()."""
    try:
        return await connect(url, additional_headers=headers, max_size=None, compression=None, open_timeout=OPEN_TIMEOUT_S, **options)
    except InvalidStatus as e:
        body = e.response.body.decode(errors="replace").strip() if e.response.body else ""
        raise LineError(f"{url} refused the connection: HTTP {e.response.status_code} {body}") from None
    except (OSError, TimeoutError, InvalidURI, InvalidHandshake) as e:
        raise LineError(f"cannot connect to {url}: {e}") from None


def decode_realtime(msg: dict) -> ev.Event | None:
    """A server message of the Realtime protocol as the session event it was made from (None: not needed here)."""
    kind, turn = msg.get("type"), msg.get("turn")
    if kind == "input_audio_buffer.speech_started":
        return ev.SpeechStarted(turn, msg["audio_start_ms"])
    if kind == "input_audio_buffer.speech_stopped":
        return ev.SpeechStopped(turn, msg["audio_end_ms"])
    if kind == "conversation.item.input_audio_transcription.completed":
        return ev.Transcript(turn, msg["transcript"], (msg.get("usage") or {}).get("seconds", 0.0))
    if kind == "response.output_audio.delta":
        pcm = np.frombuffer(base64.b64decode(msg["delta"]), dtype="<i2").astype(np.int16)
        return ev.AgentAudio(turn, to_float32(pcm, msg["sample_rate"]), msg["sample_rate"], msg.get("text", ""), msg.get("sentence", 0))
    if kind == "response.done":
        response = msg.get("response") or {}
        content = [c for item in response.get("output") or [] for c in item.get("content") or []]
        return ev.ResponseDone(turn, content[0].get("transcript") or "" if content else "", response.get("status") == "cancelled")
    if kind == "turn.metrics":
        return ev.TurnMetrics(turn, msg["timeline"])
    if kind == "turn.continued":
        return ev.TurnContinued(turn, msg["previous"])
    if kind == "session.hangup":
        return ev.HangUp(turn, msg.get("reason", "closed"))
    if kind == "error":
        err = msg.get("error") or {}
        log.warning("server error on turn %s: %s: %s", turn, err.get("code"), err.get("message"))
    return None


class WsLine:
    """What both WebSocket protocols share: sending, and the server's close as a HangUp event."""

    turn_ids = True
    audio_behind = False

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def _send(self, message: str | bytes) -> None:
        try:
            await self.ws.send(message)
        except ConnectionClosed as e:
            raise LineError(f"the server closed the line: {_close_reason(e)}") from None

    def decode(self, message: str | bytes) -> ev.Event | None:
        raise NotImplementedError

    async def events(self) -> AsyncIterator[ev.Event]:
        try:
            async for message in self.ws:
                if (e := self.decode(message)) is not None:
                    yield e
        except ConnectionClosed:
            pass
        yield ev.HangUp(None, f"connection closed: {self.ws.close_code} {self.ws.close_reason or ''}".strip())

    async def close(self) -> None:
        await self.ws.close()


def _close_reason(e: ConnectionClosed) -> str:
    frame = e.rcvd or e.sent
    return f"{frame.code} {frame.reason}".strip() if frame else "no close frame"


class RealtimeLine(WsLine):
    async def send(self, frame: np.ndarray) -> None:
        await self._send(to_int16(frame).astype("<i2").tobytes())  # a binary frame: raw pcm16, no base64

    def decode(self, message: str | bytes) -> ev.Event | None:
        return decode_realtime(json.loads(message)) if isinstance(message, str) else None


async def _expect(ws: ClientConnection, kind: str) -> dict:
    """Read until a `kind` message; an `error` (or the server closing) first is a LineError."""
    try:
        async with asyncio.timeout(OPEN_TIMEOUT_S):
            while True:
                msg = json.loads(await ws.recv())
                if msg.get("type") == kind:
                    return msg
                if msg.get("type") == "error":
                    raise LineError(f"the server refused the session: {msg['error'].get('message')}")
    except TimeoutError:
        raise LineError(f"no {kind} from the server within {OPEN_TIMEOUT_S:g} s") from None
    except ConnectionClosed as e:
        raise LineError(f"the server closed the line: {_close_reason(e)}") from None


@asynccontextmanager
async def realtime_line(base: str, token: str | None, live: dict, **options: Any) -> AsyncIterator[Line]:
    """A Realtime session sending 16 kHz, receiving the agent's own rate; `live`: session.update settings.

    `options` go to websockets' connect(): a prepared `sock`, a small `max_queue` (a client that stops reading).
    """
    ws = await _open_ws(base + REALTIME_PATH, {"Authorization": f"Bearer {token}"} if token else None, **options)
    async with ws:
        created = await _expect(ws, "session.created")
        update = {"input_sample_rate": RATE, "output_sample_rate": created["session"]["agent_sample_rate"], **live}
        await ws.send(json.dumps({"type": "session.update", "session": update}))
        await _expect(ws, "session.updated")
        yield RealtimeLine(ws)


# ---- Twilio Media Streams --------------------------------------------------------------------


class TwilioLine(WsLine):
    """Plays Twilio: μ-law 8 kHz media in 20 ms messages; marks echoed with the next frame, as if played at once."""

    turn_ids = False

    def __init__(self, ws: ClientConnection, sid: str) -> None:
        super().__init__(ws)
        self.sid = sid
        self.resampler = Resampler(RATE, TWILIO_RATE)
        self.framer = Framer(TWILIO_FRAME)
        self.chunk = 0
        self.marks: list[dict] = []  # marks received, echoed with the next frame

    async def send(self, frame: np.ndarray) -> None:
        marks, self.marks = self.marks, []
        for mark in marks:
            await self._send(json.dumps({"event": "mark", "streamSid": self.sid, "mark": mark}))
        for f in self.framer.push(self.resampler(frame)):
            self.chunk += 1
            media = {"track": "inbound", "chunk": str(self.chunk), "timestamp": str(self.chunk * 20), "payload": base64.b64encode(ulaw_encode(to_int16(f))).decode()}
            await self._send(json.dumps({"event": "media", "streamSid": self.sid, "media": media}))

    def decode(self, message: str | bytes) -> ev.Event | None:
        msg = json.loads(message)
        if msg.get("event") == "media":
            pcm = ulaw_decode(base64.b64decode(msg["media"]["payload"]))
            return ev.AgentAudio(None, to_float32(pcm, TWILIO_RATE), TWILIO_RATE, "", 0)
        if msg.get("event") == "mark":
            self.marks.append(msg["mark"])
        return None


def http_url(base: str, path: str) -> str:
    """The HTTP(S) URL of `path` on the server at ws[s]://host:port."""
    u = urlsplit(base)
    return f"{'https' if u.scheme == 'wss' else 'http'}://{u.netloc}{path}"


def _stream_token(base: str, token: str, call_sid: str) -> str:
    """A protected server hands the stream token out in its TwiML answer (for that call), as it does to Twilio."""
    url = http_url(base, TWIML_PATH)
    req = urllib.request.Request(url, data=f"CallSid={call_sid}".encode(), headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=OPEN_TIMEOUT_S) as r:
            twiml = r.read().decode()
    except (urllib.error.URLError, OSError) as e:
        raise LineError(f"POST {url} failed: {e}") from None
    found = re.search(r'<Parameter name="token" value="([^"]+)"', twiml)
    if not found:
        raise LineError(f"the TwiML answer from {url} has no stream token: {twiml[:200]}")
    return found.group(1)


@asynccontextmanager
async def twilio_line(base: str, token: str | None, live: dict) -> AsyncIterator[Line]:
    """A Twilio media stream (`live` must be empty: the protocol cannot change settings)."""
    call_sid = "CA" + secrets.token_hex(16)
    params = {"token": await asyncio.to_thread(_stream_token, base, token, call_sid)} if token else {}
    ws = await _open_ws(base + TWILIO_PATH)
    async with ws:
        sid = "MZ" + secrets.token_hex(16)
        start = {"streamSid": sid, "callSid": call_sid, "tracks": ["inbound"], "mediaFormat": TWILIO_FORMAT, "customParameters": params}
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send(json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": sid, "start": start}))
        yield TwilioLine(ws, sid)


# ---- WebRTC ----------------------------------------------------------------------------------


class MicTrack(MediaStreamTrack):
    """The caller's microphone: each frame leaves when `WebRTCLine.send` hands it over (in real time)."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.frames: asyncio.Queue[np.ndarray] = asyncio.Queue()
        self.pts = 0

    async def recv(self) -> av.AudioFrame:
        samples = await self.frames.get()
        frame = webrtc.audio_frame(samples, self.pts)
        self.pts += len(samples)
        return frame


class WebRTCLine:
    """A browser-like peer on aiortc: speech on an Opus track, the Realtime protocol on the data channel.

    The reply track carries silence between replies; only frames with sound become AgentAudio,
    tagged with the turn the data channel last named (media carries no turn ids). Audio arrives
    as the server paces it, through aiortc's jitter buffer: when a browser would play it.
    """

    turn_ids = True
    audio_behind = True
    SOUND = 32  # int16 peak: below this a frame is the track's idle silence (after Opus)

    def __init__(self, pc: RTCPeerConnection) -> None:
        self.pc = pc
        self.mic = MicTrack()
        self.resampler = Resampler(RATE, webrtc.RATE)
        self.framer = Framer(webrtc.FRAME)
        self.inbox: asyncio.Queue[ev.Event] = asyncio.Queue()
        self.control: asyncio.Queue[dict] = asyncio.Queue()  # session.created / session.updated / error
        self.turn: int | None = None
        self.tasks: list[asyncio.Task] = []
        self.channel = pc.createDataChannel("events")
        self.channel.on("message", self._on_message)
        self.channel.on("close", lambda: self.inbox.put_nowait(ev.HangUp(None, "data channel closed")))
        pc.addTrack(self.mic)
        pc.on("track", lambda track: self.tasks.append(asyncio.create_task(self._listen(track))))

    def _on_message(self, message: str | bytes) -> None:
        msg = json.loads(message)
        if msg.get("type") in ("session.created", "session.updated", "error"):
            self.control.put_nowait(msg)
        if (e := decode_realtime(msg)) is not None:
            self.turn = e.turn if e.turn is not None else self.turn
            self.inbox.put_nowait(e)

    async def _listen(self, track: MediaStreamTrack) -> None:
        convert = webrtc.mono_frames(webrtc.RATE)
        try:
            while True:
                for samples in convert(await track.recv()):
                    if np.abs(samples).max() > self.SOUND:
                        self.inbox.put_nowait(ev.AgentAudio(self.turn, to_float32(samples, webrtc.RATE), webrtc.RATE, "", 0))
        except MediaStreamError:
            self.inbox.put_nowait(ev.HangUp(None, "the reply track ended"))

    async def expect(self, kind: str) -> dict:
        try:
            async with asyncio.timeout(OPEN_TIMEOUT_S):
                while (msg := await self.control.get())["type"] != kind:
                    if msg["type"] == "error":
                        raise LineError(f"the server refused the session: {msg['error'].get('message')}")
                return msg
        except TimeoutError:
            raise LineError(f"no {kind} on the data channel within {OPEN_TIMEOUT_S:g} s (ICE or DTLS failed?)") from None

    async def send(self, frame: np.ndarray) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            raise LineError(f"the peer connection is {self.pc.connectionState}")
        for f in self.framer.push(self.resampler(frame)):
            self.mic.frames.put_nowait(to_int16(f))

    async def events(self) -> AsyncIterator[ev.Event]:
        while not isinstance(e := await self.inbox.get(), ev.HangUp):
            yield e
        yield e

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await self.pc.close()


def _post_offer(base: str, token: str | None, sdp: str) -> str:
    url = http_url(base, WEBRTC_PATH)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(url, data=json.dumps({"type": "offer", "sdp": sdp}).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=OPEN_TIMEOUT_S) as r:
            return json.loads(r.read())["sdp"]
    except urllib.error.HTTPError as e:
        raise LineError(f"POST {url} refused the offer: HTTP {e.code} {e.read().decode(errors='replace')}") from None
    except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
        raise LineError(f"POST {url} failed: {e}") from None


@asynccontextmanager
async def webrtc_line(base: str, token: str | None, live: dict) -> AsyncIterator[Line]:
    """A WebRTC call: one offer/answer round trip, then `live` settings as session.update on the data channel."""
    line = WebRTCLine(RTCPeerConnection(RTCConfiguration(iceServers=[])))  # loopback: no STUN, as the server
    try:
        await line.pc.setLocalDescription(await line.pc.createOffer())  # aiortc gathers every candidate here
        answer = await asyncio.to_thread(_post_offer, base, token, line.pc.localDescription.sdp)
        await line.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await line.expect("session.created")
        if live:
            line.channel.send(json.dumps({"type": "session.update", "session": live}))
            await line.expect("session.updated")
        yield line
    finally:
        await line.close()


NETWORK_LINES = {"ws": realtime_line, "webrtc": webrtc_line, "twilio": twilio_line}


# ---- servers ---------------------------------------------------------------------------------


def base_url(url: str) -> str:
    """ws[s]://host:port from what the user gave (an endpoint path is allowed and dropped)."""
    u = urlsplit(url)
    if u.scheme not in ("ws", "wss") or not u.netloc:
        raise BenchError(f"--url must look like ws://host:port or wss://host:port, got {url!r}")
    if u.path.rstrip("/") not in ("", REALTIME_PATH, TWILIO_PATH):
        raise BenchError(f"--url takes the server's address (ws://host:port), not the path {u.path!r}")
    return f"{u.scheme}://{u.netloc}"


def check_reachable(base: str) -> dict:
    """GET /health first, so an unreachable server is one clear error and not a failure per turn."""
    url = http_url(base, "/health")
    try:
        with urllib.request.urlopen(url, timeout=OPEN_TIMEOUT_S) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise BenchError(f"cannot reach the server at {base} (GET {url}: {reason}); is `voice-agent serve` running there?") from None


class LocalServer:
    """`voice-agent serve` inside the benchmark: uvicorn on a free loopback port, in its own thread and loop.

    `hub` and `loop` are there for benchmarks that watch the server (its state belongs to `loop`'s
    thread); `sndbuf` sets the kernel send buffer of every accepted socket (None: the OS's own, which
    on loopback grows to megabytes, so a client that stops reading is noticed only that much later).
    """

    def __init__(self, agent, max_sessions: int, sndbuf: int | None = None) -> None:  # noqa: ANN001 (Agent)
        from agent.hub import ServerSettings
        from agent.server import create_app, server_for

        self.sock = socket.socket()
        if sndbuf:  # accepted sockets inherit it
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"ws://127.0.0.1:{self.sock.getsockname()[1]}"
        app = create_app(agent, ServerSettings(port=self.sock.getsockname()[1], max_sessions=max_sessions))
        self.hub = app.state.hub
        self.server = server_for(app, log_level="warning")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve()), name="bench-server", daemon=True)

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.server.serve(sockets=[self.sock])

    def __enter__(self) -> LocalServer:
        self.thread.start()
        deadline = time.monotonic() + OPEN_TIMEOUT_S
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise BenchError("the in-process server did not start (see the log above)")
            time.sleep(0.02)
        log.info("in-process server at %s", self.url)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True  # closes sessions with 1001, as Ctrl-C does
        self.thread.join(OPEN_TIMEOUT_S * 2)
        self.sock.close()
