"""What the phone and browser transports tell the session was heard, and how they pace audio, on a
clock the test moves: no real time passes, so no result depends on the machine's speed.

The connections are the real classes; only the socket and the session are stand-ins that record.
"""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest

from agent import events as ev
from agent.hub import ServerSettings
from agent.transports.twilio import FRAME_S, LEAD_S, RATE, ULAW_SILENCE, TwilioConnection
from agent.transports.webrtc import FRAME as RTC_FRAME, ReplyTrack
from audio.codec import to_int16, ulaw_encode
from tests.helpers import ManualClock, settle, spoken_reply
from tests.servers import SID


class Socket:
    """The slice of Starlette's WebSocket a writer uses: keeps what was sent."""

    def __init__(self) -> None:
        self.sent: list[dict] = []

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))


class Session:
    """What a transport calls on its session: keeps every `played` report."""

    def __init__(self) -> None:
        self.played_reports: list[tuple[int, float]] = []

    def played(self, turn: int, seconds: float) -> None:
        self.played_reports.append((turn, seconds))

    def flush(self) -> None:
        pass


class Hub:
    settings = ServerSettings()


def speech(seconds: float, rate: int = RATE) -> np.ndarray:
    return np.full(int(seconds * rate), 0.1, dtype=np.float32)


def sentence(turn: int, index: int, seconds: float) -> ev.AgentAudio:
    return ev.AgentAudio(turn, speech(seconds), RATE, f"sentence {index}", index)


@pytest.fixture
async def call():
    """A Twilio connection mid-call on a manual clock, its writer running; yields (connection, socket, session, clock)."""
    ws, session, clock = Socket(), Session(), ManualClock()
    conn = TwilioConnection(ws, Hub())
    conn.clock, conn.session, conn.stream_sid = clock, session, SID
    writer = asyncio.create_task(conn._write())
    yield conn, ws, session, clock
    writer.cancel()


def media_s(ws: Socket) -> float:
    return sum(FRAME_S for m in ws.sent if m["event"] == "media")


async def play(clock: ManualClock, seconds: float) -> None:
    """Real time passes, 20 ms at a time (from when the writer has caught up with what is queued)."""
    await settle()
    for _ in range(round(seconds / FRAME_S)):
        clock.advance(FRAME_S)
        await settle()


async def test_twilio_pacing_stays_at_most_100_ms_ahead_and_never_runs_dry(call):
    conn, ws, _, clock = call
    conn.on_event(sentence(1, 1, 1.0))
    start = clock.monotonic()
    await settle()
    for _ in range(60):
        elapsed = clock.monotonic() - start
        ahead = media_s(ws) - elapsed
        assert ahead <= LEAD_S + FRAME_S + 1e-9, f"{ahead:.3f} s ahead of real time"
        assert media_s(ws) >= min(1.0, elapsed + LEAD_S) - 1e-9, "Twilio's buffer would run dry"
        await play(clock, FRAME_S)
    assert media_s(ws) == pytest.approx(1.0)


async def test_twilio_marks_are_named_turn_dot_n_and_follow_their_sentence(call):
    conn, ws, _, clock = call
    for index in range(3):
        conn.on_event(sentence(3, index, 0.1))
    await play(clock, 0.4)
    events = [m["event"] for m in ws.sent]
    assert events == (["media"] * 5 + ["mark"]) * 3
    assert [m["mark"]["name"] for m in ws.sent if m["event"] == "mark"] == ["3.0", "3.1", "3.2"]
    assert all(m["streamSid"] == SID for m in ws.sent)


async def test_twilio_media_is_the_reply_in_mulaw_in_whole_20_ms_frames(call):
    conn, ws, _, clock = call
    samples = np.sin(np.arange(450) / 7).astype(np.float32) * 0.5  # 56 ms: the last frame is part silence
    conn.on_event(ev.AgentAudio(1, samples, RATE, "Hi.", 0))
    await play(clock, 0.1)
    payloads = [base64.b64decode(m["media"]["payload"]) for m in ws.sent if m["event"] == "media"]
    assert [len(p) for p in payloads] == [160, 160, 160]
    assert b"".join(payloads) == ulaw_encode(to_int16(samples)) + ULAW_SILENCE * 30


async def test_twilio_heard_is_what_was_sent_minus_what_is_still_ahead_of_real_time(call):
    conn, ws, session, clock = call
    conn.on_event(sentence(1, 1, 1.0))
    await play(clock, 0.3)
    assert media_s(ws) > 0.3 + FRAME_S  # written ahead of real time: more than was played
    assert conn.heard(1) == pytest.approx(0.3)
    conn.on_event(ev.Interrupted(1))
    assert session.played_reports == [(1, pytest.approx(0.3))]
    await play(clock, FRAME_S)  # the writer, waiting on its next frame, wakes and drops it
    assert ws.sent[-1]["event"] == "clear"


async def test_twilio_an_echoed_mark_confirms_its_sentence_was_played(call):
    """Twilio's own playback may run ahead of our clock: its mark echo is proof, and counts."""
    conn, ws, _, clock = call
    conn.on_event(sentence(1, 1, 0.2))
    conn.on_event(sentence(1, 2, 1.0))
    await play(clock, 0.1)
    [first_mark] = [m["mark"] for m in ws.sent if m["event"] == "mark"]
    await conn.on_text(json.dumps({"event": "mark", "streamSid": SID, "mark": first_mark}))
    assert conn.heard(1) == pytest.approx(0.2)  # the clock says 0.1; the mark says the whole first sentence
    assert conn.heard(2) == 0.0  # another turn's marks say nothing of this one
    await conn.on_text(json.dumps({"event": "mark", "streamSid": SID, "mark": {"name": "1.1"}}))
    assert conn.heard(1) == pytest.approx(1.2)  # the second mark: both sentences


async def test_twilio_dtmf_after_the_reply_has_played_out_clears_nothing(call):
    conn, ws, session, clock = call
    conn.on_event(sentence(1, 1, 0.1))
    await play(clock, 0.3)
    await conn.on_text(json.dumps({"event": "dtmf", "streamSid": SID, "dtmf": {"digit": "1"}}))
    await settle()
    assert "clear" not in [m["event"] for m in ws.sent] and session.played_reports == []


async def test_twilio_clear_goes_out_before_anything_already_queued(call):
    conn, ws, _, clock = call
    conn.on_event(sentence(1, 1, 1.0))
    conn.on_event(ev.HangUp(1, "max_duration"))  # queued behind the reply
    conn.on_event(ev.Interrupted(1))
    assert json.loads(conn.outbox._items[0].text)["event"] == "clear"


async def test_twilio_marks_echoed_after_a_clear_do_not_count(call):
    """Twilio echoes the marks a `clear` dropped too: they do not mean played."""
    conn, ws, session, clock = call
    conn.on_event(sentence(1, 1, 0.1))
    conn.on_event(sentence(1, 2, 1.0))
    await play(clock, 0.2)
    marks = [m["mark"] for m in ws.sent if m["event"] == "mark"]
    conn.on_event(ev.Interrupted(1))
    await settle()
    heard = session.played_reports[-1][1]
    for mark in marks + [{"name": "1.1"}]:
        await conn.on_text(json.dumps({"event": "mark", "streamSid": SID, "mark": mark}))
    assert conn._marked[1] <= heard < 1.0


async def test_webrtc_what_the_reply_track_played_reaches_the_history():
    """The track takes 20 ms per frame when due; what it took of a turn is what the history keeps."""
    clock = ManualClock()
    reply, audio = spoken_reply(clock, ["One two three four five.", "Six seven."], seconds=[0.1, 0.1])
    track = ReplyTrack(lambda turn, seconds: reply.played(seconds), clock)  # WebRTCConnection wires it so
    for a in audio:
        track.push(reply.turn, (a.samples * 32767).astype(np.int16))
    first = await track.recv()
    assert first.samples == RTC_FRAME and track.played_s(1) == pytest.approx(0.02)
    pending = asyncio.create_task(track.recv())
    await settle()
    assert not pending.done()  # not due yet: the clock has not moved
    for _ in range(5):  # 0.1 s: the first sentence has played
        clock.advance(0.02)
        await asyncio.wait_for(pending, 1)
        pending = asyncio.create_task(track.recv())
        await settle()
    pending.cancel()
    track.stop()
    assert track.played_s(1) == pytest.approx(0.12)
    assert reply.recorded["content"] == "One two three four five."


@pytest.mark.parametrize("message", [json.dumps({"type": "input_audio_buffer.append", "audio": "AAAA"}), b"\x00\x01"])
async def test_the_webrtc_data_channel_refuses_audio(message):
    """Over WebRTC the microphone is the media track: audio on the data channel is an error, not input."""
    from aiortc import RTCPeerConnection

    from agent.transports.webrtc import WebRTCConnection

    pc = RTCPeerConnection()
    conn = WebRTCConnection(pc, Hub())
    conn.session = Session()
    await (conn.on_text(message) if isinstance(message, str) else conn.on_bytes(message))
    [error] = [json.loads((await conn.outbox.get()).text) for _ in range(len(conn.outbox._items))]
    assert error["type"] == "error" and error["error"]["code"] == "invalid_event"
    await pc.close()
