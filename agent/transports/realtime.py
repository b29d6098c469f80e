"""The WebSocket endpoint for programs and browsers: the OpenAI Realtime API's protocol.

Stock Realtime clients work unchanged: `session.update` in the current or the beta shape
(`realtime_config.py`), audio in `input_audio_buffer.append` (or raw binary frames) and out in
`response.output_audio.delta`, in pcm16 or G.711. Events carry the current API's names, or the beta's
for a client that asks for them (the `OpenAI-Beta: realtime=v1` header the beta SDKs send, a
session.update in the beta shape, or `event_names: "beta"`). The project's own events
(`turn.metrics`, `turn.speculation`, `turn.continued`, `response.denoise.step`, `response.interrupted`,
`session.hangup`) and fields (`turn` on every event) are extensions. The protocol table is in
README.md ("WebSocket protocol").
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import json
import logging
import math
import re
import secrets
from typing import TYPE_CHECKING

from starlette.websockets import WebSocket

from .. import events as ev
from ..security import token_matches
from .base import Close, Connection, Outgoing
from .realtime_config import AudioFormat, Context, Effective, describe, translate

if TYPE_CHECKING:
    from ..hub import Hub

log = logging.getLogger(__name__)

BETA_NAMES = {  # the beta API's names for the current API's events
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
    "conversation.item.added": "conversation.item.created",
}
RESPONSE_EVENTS = (ev.AgentText, ev.DenoiseStep, ev.AgentAudio, ev.ResponseDone)  # they belong to a response: it opens first


def response_id(turn: int | None) -> str:
    return f"resp_{turn}"


def user_item(turn: int | None) -> str:
    return f"item_{turn}_user"


def agent_item(turn: int | None) -> str:
    return f"item_{turn}_agent"


def turn_of_item(item_id: object) -> int | None:
    """The turn of an agent item id this server made (what `conversation.item.truncate` names)."""
    m = re.fullmatch(r"item_(\d+)_agent", item_id) if isinstance(item_id, str) else None
    return int(m.group(1)) if m else None


@dataclasses.dataclass
class Reply:
    """A response as the client has been told of it so far."""

    audio_s: float = 0.0  # reply audio queued: the next delta's audio_start_ms


class RealtimeConnection(Connection):
    kind = "realtime"
    fixed_audio = False  # the audio formats are the transport's (WebRTC's tracks), not the client's to set

    def __init__(self, ws: WebSocket, hub: Hub, authed: bool, beta: bool = False) -> None:
        super().__init__(ws, hub)
        self.authed = authed
        self.id = "sess_" + secrets.token_hex(8)
        self.input = AudioFormat()
        self.output = AudioFormat()
        self.text_only = False  # output_modalities ["text"]: no reply audio is sent
        self.beta = beta  # the beta API's event names
        self.denoise_steps = False  # one message per denoising step: for visualizations, so opt-in
        self._replies: dict[int, Reply] = {}  # responses opened and not yet done
        self._event_ids = itertools.count(1)
        self._client_event_id: str | None = None  # of the message being handled: errors name it
        self._handlers = {
            "session.update": self._session_update,
            "session.auth": self._auth_again,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": self._commit,
            "response.create": self._create,
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
        s = self.session
        names = s.agent.model_names()
        return describe(Effective(
            self.id, names["llm"], names["tts"], s.instructions, self.input, self.output, self.text_only, self.beta,
            self.denoise_steps, self.hub.agent_sample_rate, s.live_settings(),
        ))

    # ---- client → server ---------------------------------------------------------------------

    async def on_text(self, text: str) -> None:
        try:
            msg = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
            return self.error("invalid_json", "the message is not valid JSON")
        kind = msg.get("type") if isinstance(msg, dict) else None
        if not isinstance(kind, str):
            return self.error("invalid_event", "a message must be a JSON object with a string 'type'")
        event_id = msg.get("event_id")
        self._client_event_id = event_id if isinstance(event_id, str) else None
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
            return self.error("invalid_audio", "'audio' must be base64-encoded audio in the session's input format", event=msg["type"])
        await self._feed(data)

    async def _feed(self, data: bytes) -> None:
        try:
            samples = self.input.decode(data)
        except ValueError as e:
            return self.error("invalid_audio", str(e))
        step = self.input.rate // 4
        for i in range(0, len(samples), step):  # VAD runs on the loop: let other sessions in between slices
            await self.session.send_audio(samples[i : i + step], self.input.rate)
            await self.clock.sleep(0)  # a yield, not a wait: audio is taken as fast as it comes

    async def _commit(self, msg: dict) -> None:
        await self.session.commit(self.input.rate)

    async def _create(self, msg: dict) -> None:
        """The agent answers every turn as it ends (at the commit, in push-to-talk): nothing more to start."""

    async def _cancel(self, msg: dict) -> None:
        self.session.flush()

    async def _played(self, msg: dict) -> None:
        """`conversation.item.truncate` names the agent's item; the project's `response.audio.played` its turn."""
        turn = msg.get("turn") if "turn" in msg or "item_id" not in msg else turn_of_item(msg.get("item_id"))
        end_ms = msg.get("audio_end_ms")
        if not (_is_int(turn) and _is_number(end_ms) and math.isfinite(end_ms) and end_ms >= 0):
            return self.error("invalid_value", "needs 'item_id' (an agent item) or 'turn' (int), and 'audio_end_ms' (a finite number >= 0)", event=msg["type"])
        self.session.played(turn, end_ms / 1000)
        if msg["type"] == "conversation.item.truncate":
            self.post({"type": "conversation.item.truncated", "turn": turn, "item_id": agent_item(turn), "content_index": 0, "audio_end_ms": end_ms})

    async def _auth_again(self, msg: dict) -> None:
        """A client may always send its token first; once in, a repeat changes nothing."""

    async def _session_update(self, msg: dict) -> None:
        cfg = msg.get("session")
        if not isinstance(cfg, dict):
            return self.error("invalid_event", "session.update needs a 'session' object", event=msg["type"])
        agent = self.session.agent
        context = Context(self.input, self.output, agent.model_names()["tts"], agent.config.decode.max_new_tokens)
        try:
            u = translate(cfg, context)
            self.session.update(u.instructions, **u.live)
        except ValueError as e:
            return self.error("invalid_value", str(e), event=msg["type"])
        if not self.fixed_audio:
            self.input, self.output = u.input or self.input, u.output or self.output
        for name in ("text_only", "denoise_steps", "beta"):
            if getattr(u, name) is not None:
                setattr(self, name, getattr(u, name))
        self.post({"type": "session.updated", "turn": None, "session": self.describe()})

    # ---- server → client ---------------------------------------------------------------------

    def on_event(self, e: ev.Event) -> None:
        if isinstance(e, ev.DenoiseStep) and not self.denoise_steps:
            return
        if isinstance(e, RESPONSE_EVENTS) and e.turn not in self._replies:
            self._begin(e.turn)
        if isinstance(e, ev.Interrupted):
            # Barge-in: what the client has not been sent is never heard; the client may refine
            # the figure with conversation.item.truncate once it has stopped its own playback.
            self.outbox.drop(e.turn)
            self.session.played(e.turn, self.heard(e.turn))
        if isinstance(e, ev.AgentAudio):
            return None if self.text_only else self._audio(e)
        for body in self.encode(e):
            self.post(body)
        if isinstance(e, ev.HangUp):
            self.outbox.put(Outgoing("", close=Close(1000, f"session ended: {e.reason}")))

    def encode(self, e: ev.Event) -> list[dict]:
        """A session event as the client's messages (each gets `type`, `turn` and an `event_id` when posted)."""
        turn = e.turn
        if isinstance(e, ev.SpeechStarted):
            return [{"type": e.type, "turn": turn, "audio_start_ms": e.audio_ms, "item_id": user_item(turn)}]
        if isinstance(e, ev.SpeechStopped):
            item = {"id": user_item(turn), "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
                    "content": [{"type": "input_audio", "transcript": None}]}
            return [
                {"type": e.type, "turn": turn, "audio_end_ms": e.audio_ms, "item_id": user_item(turn)},
                {"type": "input_audio_buffer.committed", "turn": turn, "item_id": user_item(turn), "previous_item_id": None},
                {"type": "conversation.item.added", "turn": turn, "item": item, "previous_item_id": None},
                {"type": "conversation.item.done", "turn": turn, "item": item, "previous_item_id": None},
            ]
        if isinstance(e, ev.Transcript):
            return [{"type": e.type, "turn": turn, "item_id": user_item(turn), "content_index": 0, "transcript": e.text,
                     "usage": {"type": "duration", "seconds": round(e.audio_s, 3)}}]
        if isinstance(e, ev.TurnContinued):  # the earlier turn and the reply it cut short leave the conversation
            deleted = [{"type": "conversation.item.deleted", "turn": turn, "item_id": item} for item in (user_item(e.previous), agent_item(e.previous))]
            return [*deleted, {"type": e.type, "turn": turn, "previous": e.previous}]
        if isinstance(e, ev.AgentText):
            kind = "response.output_text.delta" if self.text_only else "response.output_audio_transcript.delta"
            return [{"type": kind, **self._part_ids(turn), "delta": e.text}]
        if isinstance(e, ev.ResponseDone):
            return self._finish(e)
        if isinstance(e, ev.Error):
            return [{"type": "error", "turn": turn, "error": _error("server_error", e.code, e.message)}]
        body = {"type": e.type, "turn": turn, **{f.name: getattr(e, f.name) for f in dataclasses.fields(e) if f.name != "turn"}}
        return [{**body, "response_id": response_id(turn)} if e.type.startswith("response.") or isinstance(e, ev.TurnMetrics) else body]

    def _part_ids(self, turn: int) -> dict:
        return {"turn": turn, "response_id": response_id(turn), "item_id": agent_item(turn), "output_index": 0, "content_index": 0}

    def _item(self, turn: int, status: str, text: str | None) -> dict:
        """The agent's message; its content once the reply is done."""
        audio = "audio" if self.beta else "output_audio"
        part = {"type": "text" if self.beta else "output_text", "text": text} if self.text_only else {"type": audio, "transcript": text}
        content = [] if text is None else [part]
        return {"id": agent_item(turn), "object": "realtime.item", "type": "message", "role": "assistant", "status": status, "content": content}

    def _response(self, turn: int, status: str, output: list[dict], details: dict | None = None) -> dict:
        return {"id": response_id(turn), "object": "realtime.response", "status": status, "status_details": details, "output": output,
                "output_modalities": ["text"] if self.text_only else ["audio"], "conversation_id": self.id, "usage": None}

    def _part(self, text: str) -> dict:
        """A content part as response.content_part.* carry it (the item's own parts say output_audio / output_text)."""
        return {"type": "text", "text": text} if self.text_only else {"type": "audio", "transcript": text}

    def _begin(self, turn: int) -> None:
        """response.created and the items around the first delta of a reply."""
        self._replies[turn] = Reply()
        item = self._item(turn, "in_progress", None)
        previous = user_item(turn) if turn else None
        for body in (
            {"type": "response.created", "turn": turn, "response_id": response_id(turn), "response": self._response(turn, "in_progress", [])},
            {"type": "response.output_item.added", "turn": turn, "response_id": response_id(turn), "output_index": 0, "item": item},
            {"type": "conversation.item.added", "turn": turn, "item": item, "previous_item_id": previous},
            {"type": "response.content_part.added", **self._part_ids(turn), "part": self._part("")},
        ):
            self.post(body)

    def _finish(self, e: ev.ResponseDone) -> list[dict]:
        """The .done events, innermost first, then response.done."""
        self._replies.pop(e.turn, None)
        ids = self._part_ids(e.turn)
        status = "incomplete" if e.interrupted else "completed"
        item = self._item(e.turn, status, e.text)
        if self.text_only:
            parts = [{"type": "response.output_text.done", **ids, "text": e.text}]
        else:
            parts = [{"type": "response.output_audio.done", **ids}, {"type": "response.output_audio_transcript.done", **ids, "transcript": e.text}]
        details = {"type": "cancelled", "reason": "turn_detected"} if e.interrupted else None
        return [
            *parts,
            {"type": "response.content_part.done", **ids, "part": self._part(e.text)},
            {"type": "response.output_item.done", "turn": e.turn, "response_id": response_id(e.turn), "output_index": 0, "item": item},
            {"type": "conversation.item.done", "turn": e.turn, "item": item, "previous_item_id": user_item(e.turn) if e.turn else None},
            {"type": "response.done", "turn": e.turn, "response_id": response_id(e.turn),
             "response": self._response(e.turn, "cancelled" if e.interrupted else "completed", [item], details)},
        ]

    def _audio(self, e: ev.AgentAudio) -> None:
        reply = self._replies[e.turn]
        data = self.output.encode(e.samples, e.sample_rate)
        seconds = len(data) / (1 if self.output.codec != "pcm16" else 2) / self.output.rate
        start, reply.audio_s = reply.audio_s, reply.audio_s + seconds
        body = {
            "type": "response.output_audio.delta",
            **self._part_ids(e.turn),
            "delta": base64.b64encode(data).decode(),
            "sample_rate": self.output.rate,
            "audio_start_ms": round(start * 1000),
            "text": e.text,
            "sentence": e.sentence,
        }
        self.outbox.put(Outgoing(self._message(body), e.turn, seconds, playback=True))

    def _message(self, body: dict) -> str:
        """The JSON text of a server event: its event id, its name in the client's API version."""
        name = BETA_NAMES.get(body["type"], body["type"]) if self.beta else body["type"]
        return json.dumps({**body, "type": name, "event_id": f"event_{next(self._event_ids)}"})

    def post(self, body: dict) -> None:
        self.outbox.put(Outgoing(self._message(body)))

    def error(self, code: str, message: str, event: str | None = None) -> None:
        """A recoverable client mistake: say what was wrong and keep the session."""
        log.info("realtime client error %s: %s", code, message)
        self.post({"type": "error", "turn": None, "error": {**_error("invalid_request_error", code, message), "event": event, "event_id": self._client_event_id}})

    async def farewell(self, close: Close) -> None:
        await self.send(self._message({"type": "error", "turn": None, "error": _error("server_error", close.error, close.reason)}))


def _error(kind: str, code: str, message: str) -> dict:
    return {"type": kind, "code": code, "message": message, "param": None, "event_id": None, "event": None}


def _loads(text: str) -> object | None:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
