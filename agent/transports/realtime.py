"""The WebSocket endpoint for programs and browsers: JSON events named after the OpenAI Realtime API.

Audio is pcm16 mono little-endian: base64 in `input_audio_buffer.append` / `response.audio.delta`,
or raw in binary frames from the client. The protocol table is in README.md ("WebSocket protocol").
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import math
import secrets
from typing import TYPE_CHECKING

import numpy as np
from starlette.websockets import WebSocket

from audio.codec import SUPPORTED_RATES, resample, to_int16

from .. import events as ev
from ..security import token_matches
from .base import Close, Connection, Outgoing

if TYPE_CHECKING:
    from ..hub import Hub

log = logging.getLogger(__name__)

DEFAULT_RATE = 24000  # the Realtime API's pcm16 rate, both ways, until session.update says otherwise
FORMATS = ("pcm16",)
TRANSPORT_KEYS = ("input_audio_format", "output_audio_format", "input_sample_rate", "output_sample_rate", "denoise_steps")


def response_id(turn: int | None) -> str:
    return f"resp_{turn}"


def encode(e: ev.Event) -> dict:
    """A session event as its JSON message: `type`, `turn`, the response id for reply events, its fields."""
    body: dict = {"type": e.type, "turn": e.turn}
    if e.type.startswith("response.") or isinstance(e, ev.TurnMetrics):
        body["response_id"] = response_id(e.turn)
    if isinstance(e, ev.SpeechStarted):
        body["audio_start_ms"] = e.audio_ms
    elif isinstance(e, ev.SpeechStopped):
        body["audio_end_ms"] = e.audio_ms
    elif isinstance(e, ev.Transcript):
        body["transcript"] = e.text
    elif isinstance(e, ev.AgentText):
        body["delta"] = e.text
    elif isinstance(e, ev.ResponseDone):
        body.update(text=e.text, status="interrupted" if e.interrupted else "completed")
    elif isinstance(e, ev.Error):
        body["error"] = {"code": e.code, "message": e.message, "event": None}
    else:
        body.update({f.name: getattr(e, f.name) for f in dataclasses.fields(e) if f.name != "turn"})
    return body


class RealtimeConnection(Connection):
    kind = "realtime"

    def __init__(self, ws: WebSocket, hub: Hub, authed: bool) -> None:
        super().__init__(ws, hub)
        self.authed = authed
        self.id = "sess_" + secrets.token_hex(8)
        self.input_rate = DEFAULT_RATE
        self.output_rate = DEFAULT_RATE
        self.denoise_steps = False  # one message per denoising step: for visualizations, so opt-in
        self._reply_audio: tuple[int | None, float] = (None, 0.0)  # (turn, seconds queued) → audio_start_ms
        self._handlers = {
            "session.update": self._session_update,
            "session.auth": self._auth_again,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": self._commit,
            "response.cancel": self._cancel,
            "response.audio.played": self._played,
            "conversation.item.truncate": self._played,
        }

    # ---- before the session: the token as a first message (browsers cannot set headers) ------

    async def open(self) -> None:
        if self.authed:
            return
        try:
            async with asyncio.timeout(self.settings.open_timeout_s):
                data = await self.receive()
        except TimeoutError:
            raise Close(1008, "unauthorized: no session.auth message in time", "unauthorized") from None
        msg = _loads(data) if isinstance(data, str) else None  # None also for a JSON null: not an auth either
        if not (isinstance(msg, dict) and msg.get("type") == "session.auth" and token_matches(msg.get("token"), self.settings.token)):
            raise Close(1008, "unauthorized: send Authorization: Bearer TOKEN or a first message {type: session.auth, token}", "unauthorized")

    def started(self) -> None:
        self.post({"type": "session.created", "turn": None, "session": self.describe()})

    def describe(self) -> dict:
        return {
            "id": self.id,
            "input_audio_format": "pcm16",
            "input_sample_rate": self.input_rate,
            "output_audio_format": "pcm16",
            "output_sample_rate": self.output_rate,
            "agent_sample_rate": self.hub.agent_sample_rate,
            "denoise_steps": self.denoise_steps,
            **self.session.live_settings(),
        }

    # ---- client → server ---------------------------------------------------------------------

    async def on_text(self, text: str) -> None:
        try:
            msg = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
            return self.error("invalid_json", "the message is not valid JSON")
        kind = msg.get("type") if isinstance(msg, dict) else None
        if not isinstance(kind, str):
            return self.error("invalid_event", "a message must be a JSON object with a string 'type'")
        handler = self._handlers.get(kind)
        if handler is None:
            return self.error("unknown_event", f"unknown event type {kind!r}", event=kind)
        await handler(msg)

    async def on_bytes(self, data: bytes) -> None:
        await self._feed(data)

    async def _append(self, msg: dict) -> None:
        audio = msg.get("audio")
        try:
            data = base64.b64decode(audio, validate=True) if isinstance(audio, str) else None
        except ValueError:  # binascii.Error, or a str with non-ASCII characters
            data = None
        if data is None:
            return self.error("invalid_audio", "'audio' must be base64-encoded pcm16", event=msg["type"])
        await self._feed(data)

    async def _feed(self, data: bytes) -> None:
        if len(data) % 2:
            return self.error("invalid_audio", f"pcm16 audio has an even number of bytes, got {len(data)}")
        samples = np.frombuffer(data, dtype="<i2")
        step = self.input_rate // 4
        for i in range(0, len(samples), step):  # VAD runs on the loop: let other sessions in between slices
            await self.session.send_audio(samples[i : i + step], self.input_rate)
            await asyncio.sleep(0)

    async def _commit(self, msg: dict) -> None:
        """End the user's turn now: enough silence for the endpointer (push-to-talk release, end of a file)."""
        ms = self.session.config.turns.end_ms + 100
        await self.session.send_audio(np.zeros(self.input_rate * ms // 1000, dtype=np.int16), self.input_rate)

    async def _cancel(self, msg: dict) -> None:
        self.session.flush()

    async def _played(self, msg: dict) -> None:
        turn, end_ms = msg.get("turn"), msg.get("audio_end_ms")
        if not (_is_int(turn) and _is_number(end_ms) and math.isfinite(end_ms) and end_ms >= 0):
            return self.error("invalid_value", "needs 'turn' (int) and 'audio_end_ms' (a finite number >= 0)", event=msg["type"])
        self.session.played(turn, end_ms / 1000)

    async def _auth_again(self, msg: dict) -> None:
        """A client may always send its token first; once in, a repeat changes nothing."""

    async def _session_update(self, msg: dict) -> None:
        cfg = msg.get("session")
        if not isinstance(cfg, dict):
            return self.error("invalid_event", "session.update needs a 'session' object", event=msg["type"])
        try:
            _check_transport(cfg)
            self.session.update(**{k: v for k, v in cfg.items() if k not in TRANSPORT_KEYS})
        except ValueError as e:
            return self.error("invalid_value", str(e), event=msg["type"])
        self.input_rate = cfg.get("input_sample_rate", self.input_rate)
        self.output_rate = cfg.get("output_sample_rate", self.output_rate)
        self.denoise_steps = cfg.get("denoise_steps", self.denoise_steps)
        self.post({"type": "session.updated", "turn": None, "session": self.describe()})

    # ---- server → client ---------------------------------------------------------------------

    def on_event(self, e: ev.Event) -> None:
        if isinstance(e, ev.DenoiseStep) and not self.denoise_steps:
            return
        if isinstance(e, ev.AgentAudio):
            return self._audio(e)
        if isinstance(e, ev.Interrupted):
            # Barge-in: what the client has not been sent is never heard; the client may refine
            # the figure with response.audio.played once it has stopped its own playback.
            self.outbox.drop(e.turn)
            self.session.played(e.turn, self.heard(e.turn))
        self.post(encode(e))
        if isinstance(e, ev.HangUp):
            self.outbox.put(Outgoing("", close=Close(1000, f"session ended: {e.reason}")))

    def _audio(self, e: ev.AgentAudio) -> None:
        pcm = resample(e.samples, e.sample_rate, self.output_rate)
        seconds = len(pcm) / self.output_rate
        turn, start = self._reply_audio
        start = start if turn == e.turn else 0.0
        self._reply_audio = (e.turn, start + seconds)
        body = {
            "type": e.type,
            "turn": e.turn,
            "response_id": response_id(e.turn),
            "delta": base64.b64encode(to_int16(pcm).astype("<i2").tobytes()).decode(),
            "sample_rate": self.output_rate,
            "audio_start_ms": round(start * 1000),
            "text": e.text,
            "sentence": e.sentence,
        }
        self.outbox.put(Outgoing(json.dumps(body), e.turn, seconds, playback=True))

    def post(self, body: dict) -> None:
        self.outbox.put(Outgoing(json.dumps(body)))

    def error(self, code: str, message: str, event: str | None = None) -> None:
        """A recoverable client mistake: say what was wrong and keep the session."""
        log.info("realtime client error %s: %s", code, message)
        self.post({"type": "error", "turn": None, "error": {"code": code, "message": message, "event": event}})

    async def farewell(self, close: Close) -> None:
        body = {"type": "error", "turn": None, "error": {"code": close.error, "message": close.reason, "event": None}}
        await self.send(json.dumps(body))


def _loads(text: str) -> object | None:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_transport(cfg: dict) -> None:
    for key in ("input_audio_format", "output_audio_format"):
        if key in cfg and cfg[key] not in FORMATS:
            raise ValueError(f"{key} {cfg[key]!r} is not supported (supported: {', '.join(FORMATS)})")
    for key in ("input_sample_rate", "output_sample_rate"):
        if key in cfg and not (_is_int(cfg[key]) and cfg[key] in SUPPORTED_RATES):
            raise ValueError(f"{key} {cfg[key]!r} is not supported (supported: {', '.join(map(str, SUPPORTED_RATES))})")
    if "denoise_steps" in cfg and not isinstance(cfg["denoise_steps"], bool):
        raise ValueError("denoise_steps must be true or false")

