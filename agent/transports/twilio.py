"""Twilio Media Streams: a phone call's bidirectional stream, in Twilio's exact JSON protocol.

In: `connected`, `start`, `media` (base64 μ-law 8 kHz, 20 ms), `mark` (echoes), `dtmf`, `stop`.
Out: `media` in 20 ms frames paced near real time (Twilio plays what it gets, so the pacing is
also how we know what was heard), a `mark` after each sentence, and `clear` on barge-in.
DTMF: any key interrupts the agent like a barge-in; digits carry no other meaning.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from typing import TYPE_CHECKING

from starlette.websockets import WebSocket

from audio.codec import resample, to_int16, ulaw_decode, ulaw_encode

from .. import events as ev
from .base import Close, Connection, Outgoing

if TYPE_CHECKING:
    from ..hub import Hub

log = logging.getLogger(__name__)

RATE = 8000
FRAME_BYTES = 160  # 20 ms of μ-law at 8 kHz
FRAME_S = FRAME_BYTES / RATE
LEAD_S = 0.1  # audio written ahead of real time, so Twilio's buffer never runs dry
MEDIA_FORMAT = {"encoding": "audio/x-mulaw", "sampleRate": RATE, "channels": 1}
ULAW_SILENCE = b"\xff"


class TwilioConnection(Connection):
    kind = "twilio"

    def __init__(self, ws: WebSocket, hub: Hub) -> None:
        super().__init__(ws, hub)
        self.stream_sid: str | None = None
        self._clock = 0.0  # clock time when the audio written so far has finished playing
        self._queued: tuple[int | None, float] = (None, 0.0)  # (turn, reply seconds queued): mark offsets
        self._marks: dict[str, tuple[int, float]] = {}  # mark name → (turn, reply seconds before it)
        self._marked: tuple[int | None, float] = (None, 0.0)  # (turn, seconds its echoed marks confirm)
        self._mark_seq = 0
        self.instructions: str | None = None  # the call's own, from its TwiML's <Parameter name="instructions">

    # ---- Twilio → server ---------------------------------------------------------------------

    async def open(self) -> None:
        try:
            async with asyncio.timeout(self.settings.open_timeout_s):
                await self._until_start()
        except TimeoutError:
            raise Close(1008, "no 'start' in time", "protocol_error") from None

    async def _until_start(self) -> None:
        while True:
            msg = self._parse(await self.receive())
            event = msg["event"]
            if event == "start":
                return self._start(msg)
            if event == "stop":
                raise Close(1000, "stream stopped before start")
            if event in ("media", "mark", "dtmf"):
                raise Close(1008, f"'{event}' before 'start'", "protocol_error")
            if event != "connected":
                log.warning("ignoring unknown Twilio event %r", event)

    def _start(self, msg: dict) -> None:
        start = msg.get("start")
        if not isinstance(start, dict):
            raise Close(1007, "'start' needs a start object", "invalid_event")
        fmt = start.get("mediaFormat")
        if fmt != MEDIA_FORMAT:
            raise Close(1003, f"unsupported mediaFormat {fmt!r}: only audio/x-mulaw, 8000 Hz, 1 channel", "unsupported_format")
        params = start.get("customParameters")
        token = params.get("token") if isinstance(params, dict) else None
        if self.settings.auth_required and not self.hub.stream_tokens.redeem(token, start.get("callSid")):
            raise Close(1008, "unauthorized: the stream must carry its TwiML answer's token parameter, for its own call", "unauthorized")
        sid = msg.get("streamSid") or start.get("streamSid")
        if not isinstance(sid, str) or not sid:
            raise Close(1007, "'start' without a streamSid", "invalid_event")
        self.stream_sid = sid
        self.instructions = params.get("instructions") if isinstance(params, dict) else None
        log.info("twilio stream %s started (call %s)", sid, start.get("callSid"))

    def started(self) -> None:
        if self.instructions is None:
            return
        try:
            self.session.update(self.instructions)
        except ValueError as e:  # the operator's webhook is at fault, not the caller: serve the call as configured
            log.warning("twilio stream %s: instructions not used: %s", self.stream_sid, e)

    async def on_text(self, text: str) -> None:
        msg = self._parse(text)
        event = msg["event"]
        if event == "media":
            await self._media(msg.get("media"))
        elif event == "mark":
            self._mark_echo(msg.get("mark"))
        elif event == "dtmf":
            dtmf = msg.get("dtmf")
            log.info("twilio stream %s: DTMF %r interrupts the agent", self.stream_sid, dtmf.get("digit") if isinstance(dtmf, dict) else None)
            self.session.flush()  # a reply still being generated: its Interrupted event clears
            turn, _ = self._queued
            if turn is not None and (self.outbox.audio_s or self._clock > self.clock.monotonic()):
                self._clear(turn)  # a reply generated already but still playing
        elif event == "stop":
            self._report_heard()
            raise Close(1000, "stream stopped")
        elif event == "start":
            raise Close(1008, "a second 'start' on one stream", "protocol_error")
        elif event != "connected":
            log.warning("ignoring unknown Twilio event %r", event)

    async def on_bytes(self, data: bytes) -> None:
        raise Close(1003, "binary frames are not part of the Twilio protocol: send JSON text", "binary_frame")

    def _parse(self, data: str | bytes) -> dict:
        if isinstance(data, bytes):
            raise Close(1003, "binary frames are not part of the Twilio protocol: send JSON text", "binary_frame")
        if len(data) > self.settings.max_twilio_frame_bytes:
            raise Close(1009, f"message of {len(data)} bytes; Twilio messages are under {self.settings.max_twilio_frame_bytes}", "frame_too_big")
        try:
            msg = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
            raise Close(1007, "malformed JSON", "invalid_json") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("event"), str):
            raise Close(1007, "a message must be a JSON object with a string 'event'", "invalid_event")
        return msg

    async def _media(self, media: object) -> None:
        if not isinstance(media, dict):
            raise Close(1007, "'media' needs a media object", "invalid_event")
        if media.get("track", "inbound") != "inbound":
            return
        try:
            payload = base64.b64decode(media.get("payload", ""), validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise Close(1007, "media payload is not base64", "invalid_audio") from None
        await self.session.send_audio(ulaw_decode(payload), RATE)

    def _mark_echo(self, mark: object) -> None:
        name = mark.get("name") if isinstance(mark, dict) else None
        turn, at = self._marks.pop(name, (None, 0.0)) if isinstance(name, str) else (None, 0.0)
        if turn is not None:
            self._marked = (turn, at)

    # ---- server → Twilio ---------------------------------------------------------------------

    def on_event(self, e: ev.Event) -> None:
        if isinstance(e, ev.AgentAudio):
            self._queue_audio(e)
        elif isinstance(e, ev.Interrupted):
            self._clear(e.turn)
        elif isinstance(e, ev.HangUp):
            self.outbox.put(Outgoing("", close=Close(1000, f"session ended: {e.reason}")))
        elif isinstance(e, ev.Error):
            log.warning("twilio stream %s: %s: %s", self.stream_sid, e.code, e.message)
        elif isinstance(e, ev.Transcript):
            log.info("twilio stream %s turn %s heard: %r", self.stream_sid, e.turn, e.text)
        elif isinstance(e, ev.TurnMetrics):
            log.info("twilio stream %s turn %s: %s", self.stream_sid, e.turn, e.timeline)

    def _queue_audio(self, e: ev.AgentAudio) -> None:
        ulaw = ulaw_encode(to_int16(resample(e.samples, e.sample_rate, RATE)))
        ulaw += ULAW_SILENCE * (-len(ulaw) % FRAME_BYTES)
        for i in range(0, len(ulaw), FRAME_BYTES):
            payload = base64.b64encode(ulaw[i : i + FRAME_BYTES]).decode()
            body = {"event": "media", "streamSid": self.stream_sid, "media": {"payload": payload}}
            self.outbox.put(Outgoing(json.dumps(body), e.turn, FRAME_S, playback=True))
        turn, at = self._queued
        if turn != e.turn:  # a new reply: marks of older ones will never matter again
            at, self._marks = 0.0, {}
        at += len(ulaw) / RATE
        self._queued = (e.turn, at)
        name = f"{e.turn}.{self._mark_seq}"
        self._mark_seq += 1
        self._marks[name] = (e.turn, at)
        body = {"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}}
        self.outbox.put(Outgoing(json.dumps(body), e.turn, playback=True))

    def _clear(self, turn: int) -> None:
        """Barge-in: drop what is queued, flush Twilio's buffer, and tell the session what was heard."""
        if turn in self.outbox.dropped:
            return
        heard = self.heard(turn)
        self.outbox.drop(turn)
        self.outbox.put(Outgoing(json.dumps({"event": "clear", "streamSid": self.stream_sid})), front=True)
        self._clock = 0.0
        self._marks = {}  # Twilio echoes cleared marks too: they do not mean played
        self.session.played(turn, heard)
        log.info("twilio stream %s: barge-in on turn %d after %.2f s of reply", self.stream_sid, turn, heard)

    def _report_heard(self) -> None:
        turn, _ = self.written
        if turn is not None:
            self.session.played(turn, self.heard(turn))

    def heard(self, turn: int) -> float:
        """Written audio minus what is still ahead of real time; at least what echoed marks confirm."""
        ahead = max(0.0, self._clock - self.clock.monotonic())
        marked_turn, marked = self._marked
        return max(super().heard(turn) - ahead, marked if marked_turn == turn else 0.0)

    async def pace(self, item: Outgoing) -> None:
        if not item.audio_s:
            return
        now = self.clock.monotonic()
        self._clock = max(self._clock, now)  # after a gap, playback restarts now
        if self._clock - LEAD_S > now:
            await self.clock.sleep(self._clock - LEAD_S - now)
        self._clock += item.audio_s
