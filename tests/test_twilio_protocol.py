"""The Twilio Media Streams protocol, message by message, on the real `TwilioConnection`: which messages
are accepted, which close the stream with which code and error, and what reaches the session.

Only the socket and the session are stand-ins that record, so each case runs in milliseconds and a
broken rule fails its own case (tests/test_twilio.py runs whole calls over a live server).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json

import numpy as np
import pytest

from agent import events as ev
from agent.hub import ServerSettings
from agent.security import StreamTokens
from agent.transports.base import Close
from agent.transports.twilio import TwilioConnection
from audio.codec import ulaw_decode
from tests.helpers import RecordingSession, ScriptedSocket
from tests.servers import MULAW, SID, start_msg

CALL = "CA0"  # start_msg's callSid
CONNECTED = json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
ULAW = bytes(range(0, 256, 16)) * 10  # 160 bytes: one 20 ms frame of assorted μ-law codes


def msg(event: str, **fields: object) -> str:
    return json.dumps({"event": event, "streamSid": SID, **fields})


def media(payload: str = base64.b64encode(ULAW).decode(), **fields: object) -> str:
    return msg("media", media={"payload": payload, **fields})


@dataclasses.dataclass
class Hub:
    settings: ServerSettings = dataclasses.field(default_factory=ServerSettings)
    stream_tokens: StreamTokens = dataclasses.field(default_factory=lambda: StreamTokens("secret", 60))


async def opened(*before_start: str | bytes, hub: Hub | None = None, silent: bool = False) -> TwilioConnection:
    """A connection that has read `before_start` and then Twilio's `start` (or raised what they cause)."""
    conn = TwilioConnection(ScriptedSocket(before_start, silent), hub or Hub())
    conn.session = RecordingSession()
    await conn.open()
    return conn


def raised(coro) -> Close:
    with pytest.raises(Close) as e:
        asyncio.run(coro)
    assert isinstance(e.value.reason, str) and e.value.reason, "the close frame says why"
    return e.value


# ---- before the session: the handshake ---------------------------------------------------------

def test_start_after_connected_and_unknown_events_opens_the_stream():
    conn = asyncio.run(opened(CONNECTED, msg("someday"), start_msg(instructions="Speak French.")))
    assert conn.stream_sid == SID and conn.instructions == "Speak French."


@pytest.mark.parametrize("where", ["start", "top"])
def test_the_stream_sid_may_sit_at_either_level(where):
    start = json.loads(start_msg())
    del (start if where == "start" else start["start"])["streamSid"]
    assert asyncio.run(opened(json.dumps(start))).stream_sid == SID


def test_custom_parameters_that_are_not_an_object_are_no_parameters():
    start = json.loads(start_msg())
    start["start"]["customParameters"] = "instructions=Speak French."
    assert asyncio.run(opened(json.dumps(start))).instructions is None


BAD_OPENINGS = {
    "binary frame": ([CONNECTED, b"\x7f" * 160], 1003, "binary_frame"),
    "media before start": ([CONNECTED, media()], 1008, "protocol_error"),
    "mark before start": ([msg("mark", mark={"name": "x"})], 1008, "protocol_error"),
    "dtmf before start": ([msg("dtmf", dtmf={"digit": "1"})], 1008, "protocol_error"),
    "stop before start": ([CONNECTED, msg("stop")], 1000, "closed"),
    "not JSON": (["{not json"], 1007, "invalid_json"),
    "nested past the parser": (["[" * 10_000], 1007, "invalid_json"),
    "no event": ([json.dumps({"no": "event"})], 1007, "invalid_event"),
    "event not a string": ([json.dumps({"event": 5})], 1007, "invalid_event"),
    "not an object": ([json.dumps(["start"])], 1007, "invalid_event"),
    "over Twilio's size": ([json.dumps({"event": "connected", "pad": "x" * (16 << 10)})], 1009, "frame_too_big"),
    "start without start object": ([msg("start", start="yes")], 1007, "invalid_event"),
    "16 kHz linear": ([start_msg(fmt={"encoding": "audio/x-l16", "sampleRate": 16000, "channels": 1})], 1003, "unsupported_format"),
    "stereo": ([start_msg(fmt={**MULAW, "channels": 2})], 1003, "unsupported_format"),
    "no format": ([start_msg(fmt=None)], 1003, "unsupported_format"),
    "no stream sid": ([json.dumps({"event": "start", "start": json.loads(start_msg())["start"] | {"streamSid": ""}})], 1007, "invalid_event"),
}


@pytest.mark.parametrize("name", BAD_OPENINGS)
def test_a_bad_opening_closes_with_its_code(name):
    messages, code, error = BAD_OPENINGS[name]
    c = raised(opened(*messages))
    assert (c.code, c.error) == (code, error), c.reason


def test_a_message_of_exactly_the_limit_is_read():
    hub = Hub(settings=ServerSettings(max_twilio_frame_bytes=len(start_msg())))
    assert asyncio.run(opened(start_msg(), hub=hub)).stream_sid == SID


def test_no_start_in_time_closes_1008():
    hub = Hub(settings=ServerSettings(open_timeout_s=0.01))
    c = raised(asyncio.wait_for(opened(CONNECTED, hub=hub, silent=True), 5))
    assert (c.code, c.error) == (1008, "protocol_error")


@pytest.fixture
def secured() -> Hub:
    return Hub(settings=ServerSettings(token="s3cret"))


def test_with_auth_the_start_must_carry_a_token_minted_for_its_call(secured):
    assert asyncio.run(opened(start_msg(token=secured.stream_tokens.mint(CALL)), hub=secured)).stream_sid == SID


@pytest.mark.parametrize("token", [None, "garbage", "other call"])
def test_with_auth_a_start_without_its_calls_token_is_refused(secured, token):
    token = secured.stream_tokens.mint("CA1") if token == "other call" else token
    c = raised(opened(start_msg(token=token), hub=secured))
    assert (c.code, c.error) == (1008, "unauthorized")


def test_instructions_reach_the_session_and_bad_ones_do_not_end_the_call():
    conn = asyncio.run(opened(start_msg(instructions="Speak French.")))
    conn.started()
    assert conn.session.calls == [("update", "Speak French.", {})]
    conn = asyncio.run(opened(start_msg(instructions=" ")))
    conn.started()  # logged: the operator's webhook is at fault, not the caller
    conn = asyncio.run(opened(start_msg()))
    conn.started()
    assert conn.session.calls == []


# ---- during the call ---------------------------------------------------------------------------

async def reading(*messages: str) -> TwilioConnection:
    """A started stream that has read `messages`; raises what they cause."""
    conn = await opened(start_msg())
    for m in messages:
        await conn.on_text(m)
    return conn


def during(*messages: str) -> TwilioConnection:
    return asyncio.run(reading(*messages))


def test_inbound_media_reaches_the_session_decoded_at_8_khz():
    conn = during(media(), media(track="inbound"))
    assert [rate for _, rate in conn.session.audio] == [8000, 8000]
    for samples, _ in conn.session.audio:
        np.testing.assert_array_equal(samples, ulaw_decode(ULAW))


def test_outbound_media_connected_and_unknown_events_are_ignored():
    conn = during(media(track="outbound"), CONNECTED, msg("someday"))
    assert conn.session.audio == [] and conn.session.calls == []


def test_media_without_a_payload_is_no_audio():
    conn = during(msg("media", media={"track": "inbound"}))
    [(samples, _)] = conn.session.audio
    assert len(samples) == 0


BAD_MESSAGES = {
    "second start": ([start_msg()], 1008, "protocol_error"),
    "payload not base64": ([media("%%%")], 1007, "invalid_audio"),
    "payload not a string": ([media(5)], 1007, "invalid_audio"),
    "media not an object": ([msg("media", media="AAAA")], 1007, "invalid_event"),
    "not JSON": (["{"], 1007, "invalid_json"),
    "no event": ([json.dumps({"media": {}})], 1007, "invalid_event"),
    "stop": ([media(), msg("stop")], 1000, "closed"),
}


@pytest.mark.parametrize("name", BAD_MESSAGES)
def test_a_message_during_the_call_closes_with_its_code(name):
    messages, code, error = BAD_MESSAGES[name]
    c = raised(reading(*messages))
    assert (c.code, c.error) == (code, error), c.reason


def test_binary_during_the_call_closes_1003():
    async def run():
        conn = await opened(start_msg())
        await conn.on_bytes(b"\x7f" * 160)

    c = raised(run())
    assert (c.code, c.error) == (1003, "binary_frame")


@pytest.mark.parametrize("pending", [False, True])
def test_marks_that_name_nothing_sent_are_ignored(pending):
    async def run() -> TwilioConnection:
        conn = await opened(start_msg())
        if pending:
            conn.on_event(ev.AgentAudio(1, np.full(800, 0.1, np.float32), 8000, "Hello.", 0))  # mark "1.0" waits
        for mark in [{"name": "9.9"}, "1.0", None, {"name": {"turn": 1}}, {"name": ["1.0"]}]:
            await conn.on_text(msg("mark", mark=mark))
        return conn

    conn = asyncio.run(run())
    assert conn._marked == (None, 0.0) and list(conn._marks) == (["1.0"] if pending else [])


def test_dtmf_interrupts_a_reply_being_generated():
    conn = during(msg("dtmf", dtmf={"digit": "5"}), msg("dtmf"))
    assert conn.session.calls == [("flush",), ("flush",)]
    assert len(conn.outbox._items) == 0  # nothing was playing: nothing to clear


def test_dtmf_clears_a_reply_still_playing_and_reports_what_was_heard():
    async def run():
        conn = await opened(start_msg())
        conn.on_event(ev.AgentAudio(2, np.full(800, 0.1, np.float32), 8000, "Hello.", 0))
        await conn.on_text(msg("dtmf", dtmf={"digit": "5"}))
        return conn

    conn = asyncio.run(run())
    assert conn.session.calls == [("flush",), ("played", 2, 0.0)]  # nothing written yet: nothing heard
    [clear] = [json.loads(i.text) for i in conn.outbox._items]
    assert clear == {"event": "clear", "streamSid": SID}
    assert 2 in conn.outbox.dropped


def test_stop_reports_the_seconds_written_of_the_last_turn():
    conn = asyncio.run(opened(start_msg()))
    conn.written = (3, 0.5)  # nothing ahead of real time: all of it played
    with pytest.raises(Close) as e:
        asyncio.run(conn.on_text(msg("stop")))
    assert e.value.code == 1000 and conn.session.calls == [("played", 3, 0.5)]


def test_stop_before_any_reply_reports_nothing():
    conn = asyncio.run(opened(start_msg()))
    with pytest.raises(Close):
        asyncio.run(conn.on_text(msg("stop")))
    assert conn.session.calls == []


# ---- server → Twilio ---------------------------------------------------------------------------

def test_a_hangup_queues_a_normal_close_after_what_is_queued():
    conn = asyncio.run(opened(start_msg()))
    conn.on_event(ev.AgentAudio(1, np.full(160, 0.1, np.float32), 8000, "Bye.", 0))
    conn.on_event(ev.HangUp(1, "goodbye"))
    *playback, last = list(conn.outbox._items)
    assert [json.loads(i.text)["event"] for i in playback] == ["media", "mark"]
    assert last.close is not None and last.close.code == 1000 and "goodbye" in last.close.reason


@pytest.mark.parametrize("event", [ev.Error(1, "x", "y"), ev.Transcript(1, "hi", 0.5), ev.TurnMetrics(1, {}), ev.AgentText(1, "Hi."), ev.ResponseDone(1, "Hi.")])
def test_events_with_nothing_for_twilio_send_nothing(event):
    conn = asyncio.run(opened(start_msg()))
    conn.on_event(event)
    assert len(conn.outbox._items) == 0
