"""The WebRTC transport without a server (agent/transports/webrtc.py): what an offer must hold, how
the signaling answers it, the frames the reply track sends and when, and the data channel's rules.

Offers are real ones from aiortc; the peer connections are real; the agent is a stand-in (no
models), so each case runs in well under a second. tests/test_browser.py makes whole calls to a live
server from aiortc and from Chromium.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import re
import socket

import av
import numpy as np
import pytest
from aiortc import AudioStreamTrack, RTCConfiguration, RTCPeerConnection, RTCRtpSender

from agent import events as ev
from agent.transports.base import ClientGone
from agent.transports.realtime_config import AudioFormat
from agent.transports.webrtc import (
    FRAME,
    MAX_BUFFERED,
    RATE,
    DataChannelSocket,
    OfferError,
    ReplyTrack,
    Signaling,
    WebRTCConnection,
    audio_frame,
    check_offer,
    mono_frames,
)
from tests.helpers import ManualClock, RealtimeSession, eventually, settle
from tests.helpers import stub_hub as hub


async def make_offer(audio: str | None = "sendrecv", channel: bool = True) -> str:
    """A real offer from aiortc, as a browser posts it; `audio` the direction of its microphone m-line."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    if audio:
        pc.addTransceiver(AudioStreamTrack() if audio != "recvonly" else "audio", direction=audio)
    if channel:
        pc.createDataChannel("events")
    await pc.setLocalDescription(await pc.createOffer())
    await pc.close()
    return pc.localDescription.sdp


@pytest.fixture(scope="module")
def offer() -> str:
    return asyncio.run(make_offer())


# ---- what an offer must hold -------------------------------------------------------------------

NO_MIC = "the offer has no microphone: it needs an audio m-line the browser sends on (sendrecv)"


def test_a_browsers_offer_is_accepted_and_named_by_its_ice_ufrag(offer):
    ufrag = next(line.split(":", 1)[1] for line in offer.splitlines() if line.startswith("a=ice-ufrag:"))
    assert check_offer(offer) == ufrag
    first_without = offer.replace(f"a=ice-ufrag:{ufrag}\r\n", "", 1)  # only the data channel's m-line names it
    assert first_without != offer and check_offer(first_without) == ufrag


@pytest.mark.parametrize("sdp,message", [
    (None, "malformed SDP: an offer starts with 'v=0'"),
    ("hello", "malformed SDP: an offer starts with 'v=0'"),
    ("v=0\r\nm=audio x\r\n", "malformed SDP: "),  # the parser's own words follow
])
def test_what_is_not_an_offer_is_refused_with_400(sdp, message):
    with pytest.raises(OfferError) as refused:
        check_offer(sdp)
    assert refused.value.status == 400 and str(refused.value).startswith(message) and len(str(refused.value)) > len("malformed SDP: ")


@pytest.mark.parametrize("change,message", [
    (lambda sdp: re.sub(r"m=audio \d+", "m=audio 0", sdp), NO_MIC),  # a rejected m-line
    (lambda sdp: sdp.replace("a=sendrecv", "a=recvonly", 1), NO_MIC),
    (lambda sdp: sdp.replace("a=sendrecv", "a=inactive", 1), NO_MIC),
    (lambda sdp: sdp.replace("a=sendrecv", "a=sendonly", 1), None),  # a mic that only sends is enough
    (lambda sdp: "\r\n".join(line for line in sdp.split("\r\n") if not line.startswith("a=ice-ufrag")), "malformed SDP: no a=ice-ufrag"),
])
def test_an_offer_without_a_microphone_or_ice_is_refused(offer, change, message):
    sdp = change(offer)
    assert sdp != offer
    if message is None:
        assert check_offer(sdp)
        return
    with pytest.raises(OfferError) as refused:
        check_offer(sdp)
    assert (refused.value.status, str(refused.value)) == (400, message)


async def test_offers_without_audio_or_a_data_channel_are_refused():
    with pytest.raises(OfferError, match="^" + NO_MIC.replace("(", r"\(").replace(")", r"\)") + "$"):
        check_offer(await make_offer(audio=None))
    with pytest.raises(OfferError, match=r"^the offer has no data channel: create one \(e.g. 'events'\) before createOffer$") as refused:
        check_offer(await make_offer(channel=False))
    assert refused.value.status == 400


# ---- signaling -------------------------------------------------------------------------------


async def test_an_offer_is_answered_once_and_its_call_ends_when_nobody_connects(offer):
    h = hub(open_timeout_s=0.2)
    signaling = Signaling(h)
    answer = await signaling.answer(offer)
    assert answer.startswith("v=0") and "m=audio" in answer and "m=application" in answer and not signaling.idle
    with pytest.raises(OfferError) as again:
        await signaling.answer(offer)
    assert again.value.status == 409 and "already answered" in str(again.value)
    # no browser completes ICE: the data channel never opens, and the call ends on its own
    await eventually(lambda: signaling.idle, "the unconnected call never ended", timeout=10)
    assert h.active_sessions == 0 and h.connections == set()


async def test_answering_an_offer_looks_up_no_stun_server(offer, monkeypatch):
    """Offline, where an agent is often deployed, looking up aiortc's default STUN server stalls
    gathering for the resolver's timeout: the answer offers host candidates only."""
    looked_up: list[str] = []

    def gethostbyname(host: str) -> str:
        looked_up.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "offline")

    monkeypatch.setattr(socket, "gethostbyname", gethostbyname)
    answer = await Signaling(hub(open_timeout_s=0.2)).answer(offer)
    assert "a=candidate:" in answer and looked_up == []


async def test_two_calls_are_told_apart_by_their_ice_credentials(offer):
    signaling = Signaling(hub(open_timeout_s=0.2))
    assert await signaling.answer(offer) and await signaling.answer(await make_offer())  # another browser's call


async def test_a_full_server_refuses_offers_with_503(offer):
    h = hub(max_sessions=1)
    h.active_sessions = 1
    with pytest.raises(OfferError) as busy:
        await Signaling(h).answer(offer)
    assert (busy.value.status, str(busy.value)) == (503, "server busy: all 1 sessions are in use, try again later")


async def test_an_offer_aiortc_cannot_take_is_refused_and_leaves_nothing(offer):
    signaling = Signaling(hub())
    broken = "\r\n".join(line for line in offer.split("\r\n") if not line.startswith("a=ice-pwd"))  # passes the checks, not ICE's
    with pytest.raises(OfferError) as refused:
        await signaling.answer(broken)
    assert refused.value.status == 400 and str(refused.value).startswith("offer rejected: ")
    assert signaling.idle
    assert await signaling.answer(offer)  # the same call's good offer is still answerable


# ---- the reply track -------------------------------------------------------------------------


def test_incoming_frames_of_any_layout_format_and_rate_become_int16_mono_at_the_rate_asked():
    convert = mono_frames(RATE)
    t = np.arange(10 * 320) / 16000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    out = []
    for chunk in tone.reshape(10, 320):  # 20 ms frames of 16 kHz stereo float, as a decoder might give
        frame = av.AudioFrame.from_ndarray(np.stack([chunk, chunk]), format="fltp", layout="stereo")
        frame.sample_rate = 16000
        out += convert(frame)
    samples = np.concatenate(out)
    assert {(a.ndim, a.dtype.name) for a in out} == {(1, "int16")} and 9 * FRAME < len(samples) <= 10 * FRAME
    assert 0.45 < np.abs(samples).max() / 32768 < 0.55  # the tone's level, scaled to int16


def test_an_outgoing_frame_is_48khz_mono_s16_stamped_with_its_time():
    f = audio_frame(np.arange(FRAME, dtype=np.int16), 2 * FRAME)
    assert (f.format.name, f.layout.name, f.sample_rate, f.samples) == ("s16", "mono", RATE, FRAME)
    assert (f.pts, f.time_base) == (2 * FRAME, fractions.Fraction(1, RATE))
    np.testing.assert_array_equal(f.to_ndarray().reshape(-1), np.arange(FRAME))


async def test_the_reply_track_fills_a_frame_across_chunks_and_reports_each_turn_played():
    played: list[tuple[int, float]] = []
    track = ReplyTrack(lambda turn, seconds: played.append((turn, seconds)), ManualClock())
    track.push(1, np.full(300, 1, np.int16))
    track.push(2, np.full(1000, 2, np.int16))
    samples = (await track.recv()).to_ndarray().reshape(-1)
    assert samples.tolist() == [1] * 300 + [2] * (FRAME - 300)
    assert played == [(1, 300 / RATE)]  # turn 2's chunk is not played out yet
    assert (track.played_s(2), track.played_s(3)) == ((FRAME - 300) / RATE, 0.0)
    track.clock.advance(0.02)
    samples = (await track.recv()).to_ndarray().reshape(-1)  # the rest of turn 2's chunk, then silence
    assert samples.tolist() == [2] * (1000 - FRAME + 300) + [0] * (2 * FRAME - 1300)
    assert played == [(1, 300 / RATE), (2, 1000 / RATE)]
    track.stop()


class Listener:
    """Reads the track as aiortc does: one `recv` at a time, never cancelled."""

    def __init__(self, track: ReplyTrack) -> None:
        self.track = track
        self.pending: asyncio.Task | None = None

    async def due(self) -> list[int]:
        """The pts of the frames the track sends without the clock moving."""
        out = []
        while True:
            self.pending = self.pending or asyncio.create_task(self.track.recv())
            await settle()
            if not self.pending.done():
                return out
            out.append(self.pending.result().pts)
            self.pending = None


async def test_the_reply_track_catches_up_a_short_delay_but_restarts_its_clock_after_a_stall():
    clock = ManualClock()
    track = ReplyTrack(lambda turn, seconds: None, clock)
    listener = Listener(track)
    assert await listener.due() == [0]  # the first frame starts the clock; the next is due in 20 ms
    clock.advance(0.1)  # 100 ms late: frames 1-5 were due by now and go at once (a jitter buffer absorbs them)
    assert await listener.due() == [FRAME * i for i in range(1, 6)]
    clock.advance(1.0)  # the loop stalled for a second: the frame that was waiting and one late one, then real time again, no burst of 50
    assert await listener.due() == [FRAME * 6, FRAME * 7]
    clock.advance(0.02)
    assert await listener.due() == [FRAME * 8]
    listener.pending.cancel()
    track.stop()


# ---- the connection: audio on tracks, events on the data channel -----------------------------


async def test_a_webrtc_call_keeps_its_track_formats_whatever_session_update_says():
    pc = RTCPeerConnection()
    conn = WebRTCConnection(pc, hub())
    conn.session = RealtimeSession()
    assert conn.input == conn.output == AudioFormat("pcm16", RATE)
    await conn.on_text(json.dumps({"type": "session.update", "session": {"input_audio_format": "g711_ulaw", "output_sample_rate": 16000}}))
    assert conn.input == conn.output == AudioFormat("pcm16", RATE)
    assert json.loads(conn.outbox._items[-1].text)["session"]["transport"] == "webrtc"
    await pc.close()


@pytest.mark.parametrize("message,event", [(json.dumps({"type": "input_audio_buffer.append", "audio": "AAAA"}), "input_audio_buffer.append"),
                                           (b"\x00\x01", None)])
async def test_the_data_channel_refuses_audio_with_a_message_saying_where_it_goes(message, event):
    pc = RTCPeerConnection()
    conn = WebRTCConnection(pc, hub())
    conn.session = RealtimeSession()
    await (conn.on_text(message) if isinstance(message, str) else conn.on_bytes(message))
    [error] = [json.loads(i.text)["error"] for i in conn.outbox._items]
    assert (error["code"], error["event"]) == ("invalid_event", event)
    assert error["message"] == "over WebRTC the microphone is the audio track: send no audio on the data channel"
    assert conn.session.audio == []
    await pc.close()


async def test_a_closed_peer_connection_is_a_disconnect_on_the_data_channel():
    pc = RTCPeerConnection()
    conn = WebRTCConnection(pc, hub())
    await pc.close()  # connectionState "closed": the call is over
    assert await asyncio.wait_for(conn.ws.receive(), 5) == {"type": "websocket.disconnect", "code": 1006}


@pytest.mark.parametrize("codec", ["opus", "PCMU"])  # 48 kHz stereo, 8 kHz mono
async def test_the_data_channel_carries_events_both_ways_and_its_end_is_a_disconnect(codec):
    """A browser (an aiortc peer here) on loopback: its mic is the call's input, its data channel the socket."""
    server = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    conn = WebRTCConnection(server, hub())
    client = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    mic = client.addTransceiver(AudioStreamTrack(), direction="sendrecv")
    mic.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("audio").codecs if c.mimeType.lower() == f"audio/{codec.lower()}"])
    channel = client.createDataChannel("events")
    await client.setLocalDescription(await client.createOffer())
    await server.setRemoteDescription(client.localDescription)
    await server.setLocalDescription(await server.createAnswer())
    await client.setRemoteDescription(server.localDescription)
    try:
        assert conn.mic is not None and conn.mic.kind == "audio"
        await asyncio.wait_for(conn.ws.accept(), 20)  # ICE and DTLS over loopback, then the channel opens
        got: asyncio.Queue = asyncio.Queue()
        channel.on("message", got.put_nowait)
        channel.send('{"type": "response.create"}')
        assert await asyncio.wait_for(conn.ws.receive(), 10) == {"type": "websocket.receive", "text": '{"type": "response.create"}'}
        channel.send(b"\x01\x02")
        assert await asyncio.wait_for(conn.ws.receive(), 10) == {"type": "websocket.receive", "bytes": b"\x01\x02"}
        await conn.ws.send_text('{"type": "session.created"}')
        assert await asyncio.wait_for(got.get(), 10) == '{"type": "session.created"}'
        conn.session = session = RealtimeSession()
        reader = asyncio.create_task(conn._read())  # the data channel and the microphone, together
        channel.send(json.dumps({"type": "session.update", "session": {"instructions": "Be brief."}}))
        await eventually(lambda: session.calls and len(session.audio) >= 10, "no update or no microphone audio reached the session")
        assert session.calls == [("update", "Be brief.", {})]
        heard = session.audio[:10]  # the microphone's 20 ms frames, as 48 kHz mono int16 (a resampler's delay aside)
        assert {(a.ndim, a.dtype.name, rate) for a, rate in heard} == {(1, "int16", RATE)} and 9 * FRAME < sum(len(a) for a, _ in heard) <= 10 * FRAME
        reader.cancel()
        await client.close()  # the browser hangs up
        assert await asyncio.wait_for(conn.ws.receive(), 20) == {"type": "websocket.disconnect", "code": 1006}
        with pytest.raises(RuntimeError, match="^data channel closed$"):
            await conn.ws.send_text("{}")
    finally:
        await client.close()
        await conn.ws.close()
    assert server.connectionState == "closed"


async def test_no_data_channel_in_time_is_a_client_gone():
    pc = RTCPeerConnection()
    conn = WebRTCConnection(pc, hub(open_timeout_s=0.01))
    with pytest.raises(ClientGone):
        await conn.ws.accept()
    await pc.close()


async def test_the_reply_track_reports_what_played_to_the_session_once_there_is_one():
    pc = RTCPeerConnection()
    conn = WebRTCConnection(pc, hub())
    conn._played_up_to(1, 0.5)  # before the session starts (or after it ended): nobody to tell
    conn.session = RealtimeSession()
    conn.track.push(3, np.zeros(FRAME // 2, np.int16))
    await conn.track.recv()  # the chunk plays out within the first frame
    assert conn.session.calls == [("played", 3, FRAME / 2 / RATE)] and conn.heard(3) == FRAME / 2 / RATE
    conn.track.stop()
    await pc.close()


async def test_an_interruption_clears_the_reply_track_and_reports_what_it_had_played():
    pc = RTCPeerConnection()
    conn = WebRTCConnection(pc, hub())
    conn.session = RealtimeSession()
    conn.track.clock = ManualClock()
    conn.on_event(ev.AgentAudio(3, np.full(2 * FRAME, 0.5, np.float32), RATE, "Hi there.", 1))  # two frames of it, on the track
    assert (await conn.track.recv()).to_ndarray().any()
    conn.on_event(ev.Interrupted(3))
    assert conn.session.calls == [("played", 3, FRAME / RATE)]
    conn.track.clock.advance(0.02)
    assert not (await conn.track.recv()).to_ndarray().any()  # silence: the rest was dropped
    assert json.loads(conn.outbox._items[-1].text)["type"] == "response.interrupted"
    conn.track.stop()
    await pc.close()


class Channel:
    """An RTCDataChannel as DataChannelSocket uses it: its state, its send buffer, its event handlers."""

    def __init__(self, label: str = "events", state: str = "open") -> None:
        self.label, self.readyState, self.bufferedAmount = label, state, 0
        self.bufferedAmountLowThreshold: int | None = None
        self.handlers: dict[str, object] = {}
        self.sent: list[str] = []

    def on(self, event: str, handler) -> None:  # noqa: ANN001
        self.handlers[event] = handler

    def send(self, text: str) -> None:
        self.sent.append(text)


async def test_a_browser_that_stops_reading_holds_writes_until_its_buffer_drains():
    pc = RTCPeerConnection()
    sock = DataChannelSocket(pc, 1.0)
    channel = Channel()
    sock._attach(channel)
    sock._attach(Channel("second"))  # a second channel is ignored
    assert sock.channel is channel and channel.bufferedAmountLowThreshold == MAX_BUFFERED // 2
    channel.bufferedAmount = MAX_BUFFERED  # full, but not over
    await sock.send_text("a")
    channel.bufferedAmount = MAX_BUFFERED + 1
    write = asyncio.create_task(sock.send_text("b"))
    await settle()
    assert not write.done() and channel.sent == ["a"]
    channel.bufferedAmount = 0
    channel.handlers["bufferedamountlow"]()
    await asyncio.wait_for(write, 5)
    assert channel.sent == ["a", "b"]
    channel.handlers["close"]()  # the browser closed the channel
    assert await asyncio.wait_for(sock.receive(), 5) == {"type": "websocket.disconnect", "code": 1006}
    await pc.close()


async def test_a_channel_announced_before_it_opens_is_waited_for():
    pc = RTCPeerConnection()
    sock = DataChannelSocket(pc, 5.0)
    channel = Channel(state="connecting")
    sock._attach(channel)
    opening = asyncio.create_task(sock.accept())
    await settle()
    assert not opening.done()
    channel.readyState = "open"
    channel.handlers["open"]()
    await asyncio.wait_for(opening, 5)
    channel.handlers["message"]("hi")
    channel.handlers["message"](b"\x01")
    assert [await sock.receive() for _ in range(2)] == [{"type": "websocket.receive", "text": "hi"}, {"type": "websocket.receive", "bytes": b"\x01"}]
    await pc.close()


class Track:
    def __init__(self, kind: str) -> None:
        self.kind = kind


async def test_the_first_audio_track_is_the_microphone():
    pc = RTCPeerConnection()
    conn = WebRTCConnection(pc, hub())
    conn._on_track(Track("video"))
    assert conn.mic is None
    mic = Track("audio")
    conn._on_track(mic)
    conn._on_track(Track("audio"))
    assert conn.mic is mic
    await pc.close()


class PeerConnection:
    """What DataChannelSocket reads of its peer connection."""

    def __init__(self, state: str) -> None:
        self.connectionState = state

    def on(self, event: str, handler) -> None:  # noqa: ANN001
        pass


@pytest.mark.parametrize("state,gone", [("failed", True), ("closed", True), ("connected", False), ("disconnected", False)])
async def test_a_failed_or_closed_peer_connection_ends_the_call(state, gone):
    sock = DataChannelSocket(PeerConnection(state), 1.0)
    sock._state_changed()
    assert sock._inbox.qsize() == gone
    if gone:
        assert await sock.receive() == {"type": "websocket.disconnect", "code": 1006}
        with pytest.raises(ClientGone):
            await sock.accept()  # no channel ever opened


async def test_a_webrtc_call_needs_no_token_message_on_its_channel():
    pc = RTCPeerConnection()
    conn = WebRTCConnection(pc, hub(token="s3cret", open_timeout_s=0.01))
    await conn.open()  # the token came with the offer
    await pc.close()
