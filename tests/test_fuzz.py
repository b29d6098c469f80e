"""Hostile clients, generated: random and adversarial event sequences against a real server on loopback.

Each example is one connection: valid events with hostile values (NaN, ±Infinity, huge and negative
integers, wrong types, deep nesting, unicode) interleaved with valid audio and commits. After each
message the client asks for an empty `session.update`: every message must have got either nothing
or an `error` with a documented code, the call must still serve, and every live setting it
reports must be inside its bounds. Once the client is gone,
`/health` must say zero sessions and zero connections.

CI runs the `ci` Hypothesis profile (few examples, derandomized); `--hypothesis-profile=fuzz-long`
runs 10,000 per test (README, Reliability).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from hypothesis import example, given
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from agent.live_settings import SETTINGS
from agent.transports.realtime_config import BETA_KEYS, CURRENT_KEYS, PROJECT_KEYS
from tests.servers import SID, WAIT, http, start_msg

REALTIME_ERRORS = {"invalid_json", "invalid_event", "unknown_event", "invalid_value", "invalid_audio"}
TWILIO_CLOSES = {1000, 1003, 1007, 1008, 1009}  # README: the Twilio endpoint's close codes
SENTINEL_MS = 4321  # pause_ms values no strategy below aims at: each check's own session.updated is recognised

# ---- strategies --------------------------------------------------------------------------------

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=24)  # any unicode a socket can carry
special_numbers = st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 5e-324, 10**30, -(10**30), 2**63, -1, 0])
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), special_numbers, text)
hostile = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=6)
in_range = st.sampled_from(sorted(SETTINGS)).flatmap(
    lambda k: st.tuples(st.just(k), st.booleans() if SETTINGS[k].kind is bool else st.integers(int(SETTINGS[k].low), int(SETTINGS[k].high)))
)
at_the_edges = st.sampled_from(sorted(k for k in SETTINGS if SETTINGS[k].kind is not bool)).flatmap(
    lambda k: st.tuples(st.just(k), st.sampled_from([SETTINGS[k].low, SETTINGS[k].high, SETTINGS[k].low - 1, SETTINGS[k].high + 1, SETTINGS[k].high + 0.5]) | special_numbers)
)
setting = st.one_of(
    st.tuples(st.sampled_from(sorted(SETTINGS) + sorted(PROJECT_KEYS | CURRENT_KEYS | BETA_KEYS)), hostile),
    in_range,
    at_the_edges,
    st.tuples(text, hostile),
)
quiet_pcm = st.integers(1, 2400).flatmap(lambda n: st.integers(0, 2**32 - 1).map(lambda seed: _quiet(n, seed)))


def _quiet(n: int, seed: int) -> bytes:
    """Low-level noise: valid pcm16 that the VAD hears as silence, so no example pays for a reply."""
    return (np.random.default_rng(seed).normal(0, 30, n)).astype("<i2").tobytes()


def deep(n: int) -> str:
    return "[" * n + "]" * n


realtime_event = st.one_of(
    st.lists(at_the_edges, min_size=1, max_size=3).map(lambda kv: json.dumps({"type": "session.update", "session": dict(kv)})),
    st.lists(setting, max_size=4).map(lambda kv: json.dumps({"type": "session.update", "session": dict(kv)})),
    hostile.map(lambda s: json.dumps({"type": "session.update", "session": s})),
    quiet_pcm.map(lambda b: json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b).decode()})),
    hostile.map(lambda a: json.dumps({"type": "input_audio_buffer.append", "audio": a})),
    quiet_pcm,  # binary pcm16 frames
    st.binary(max_size=9),  # odd lengths too
    st.sampled_from([json.dumps({"type": t}) for t in ("input_audio_buffer.commit", "response.cancel", "session.auth")]),
    st.tuples(st.sampled_from(["response.audio.played", "conversation.item.truncate"]), hostile, hostile).map(
        lambda t: json.dumps({"type": t[0], "turn": t[1], "audio_end_ms": t[2]})
    ),
    hostile.map(lambda v: json.dumps({"type": v})),
    hostile.map(json.dumps),
    text,
    st.integers(1, 200_000).map(deep),
)


# ---- checks ------------------------------------------------------------------------------------


def health(srv) -> tuple[int, int]:
    status, _, body = http(srv, "/health")
    assert status == 200
    h = json.loads(body)
    return h["sessions"]["active"], h["connections"]


async def health_back_to_zero(srv) -> None:
    deadline = time.monotonic() + WAIT
    while (now := await asyncio.to_thread(health, srv)) != (0, 0):
        assert time.monotonic() < deadline, f"/health still shows (sessions, connections) = {now}"
        await asyncio.sleep(0.02)


def within_bounds(session: dict) -> bool:
    """The documented bounds, checked by the test itself (not by the code under test)."""
    for key, spec in SETTINGS.items():
        v = session[key]
        if spec.kind is bool:
            ok = isinstance(v, bool)
        else:
            ok = type(v) is spec.kind and spec.low <= v <= spec.high
        if not ok:
            return False
    return True


async def answers_then_alive(recv, send, message: str | bytes, check: int) -> list[str]:
    """Send `message`, then a sentinel update; the error codes in between (the call must still answer)."""
    await send(message)
    await send(json.dumps({"type": "session.update", "session": {"pause_ms": SENTINEL_MS + check}}))
    codes = []
    while True:
        msg = json.loads(await asyncio.wait_for(recv(), WAIT))
        assert msg["type"] != "session.created", msg
        if msg["type"] == "error":
            codes.append(msg["error"]["code"])
        elif msg["type"] == "session.updated":
            assert within_bounds(msg["session"]), msg["session"]  # nothing out of bounds got in
            if msg["session"]["pause_ms"] == SENTINEL_MS + check:
                return codes


# ---- the endpoints -----------------------------------------------------------------------------


@given(events=st.lists(realtime_event, min_size=1, max_size=6), abort=st.booleans())
@example(events=['{"type": "input_audio_buffer.append", "audio": "\\u0080"}'], abort=False)  # found by a long run: 1011
def test_realtime_websocket_survives_hostile_sequences(srv, events, abort):
    async def run():
        ws = await connect(srv.url("/v1/realtime"), max_size=None)
        try:
            assert json.loads(await ws.recv())["type"] == "session.created"
            for k, message in enumerate(events):
                codes = await answers_then_alive(ws.recv, ws.send, message, k)
                assert set(codes) <= REALTIME_ERRORS and len(codes) <= 1, (message[:200], codes)
        finally:
            ws.transport.abort() if abort else await ws.close()
        await health_back_to_zero(srv)

    asyncio.run(run())


twilio_event = st.one_of(
    st.binary(max_size=320).map(lambda b: json.dumps({"event": "media", "streamSid": SID, "media": {"track": "inbound", "payload": base64.b64encode(b).decode()}})),
    st.tuples(hostile, hostile).map(lambda t: json.dumps({"event": "media", "streamSid": SID, "media": {"track": t[0], "payload": t[1]}})),
    hostile.map(lambda m: json.dumps({"event": "media", "streamSid": SID, "media": m})),
    hostile.map(lambda m: json.dumps({"event": "mark", "streamSid": SID, "mark": m})),
    hostile.map(lambda d: json.dumps({"event": "dtmf", "streamSid": SID, "dtmf": d})),
    hostile.map(lambda e: json.dumps({"event": e})),
    hostile.map(json.dumps),
    text,
    st.binary(max_size=9),
    st.integers(1, 10_000).map(deep),
    st.just(start_msg()),  # a second start
)
twilio_start = st.one_of(st.just(start_msg()), hostile.map(lambda s: json.dumps({"event": "start", "streamSid": SID, "start": s})))


@given(start=twilio_start, events=st.lists(twilio_event, max_size=6))
def test_twilio_stream_survives_hostile_sequences(srv, start, events):
    """The Twilio protocol closes on a violation: with one of its documented codes, never 1011."""

    async def run():
        ws = await connect(srv.url("/twilio/stream"))
        code = None
        try:
            await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            for message in [start, *events, json.dumps({"event": "stop", "streamSid": SID})]:
                await ws.send(message)
            async with asyncio.timeout(WAIT):
                async for _ in ws:  # reply media until the server closes (at the stop, or at a violation)
                    pass
        except ConnectionClosed:
            pass
        finally:
            code = ws.close_code
            await ws.close()
        assert code in TWILIO_CLOSES, (code, ws.close_reason)
        await health_back_to_zero(srv)

    asyncio.run(run())


datachannel_event = realtime_event.filter(lambda m: isinstance(m, str) and len(m) < 60_000)  # an SCTP message's size; bytes: below


@given(events=st.lists(st.one_of(datachannel_event, quiet_pcm), min_size=1, max_size=4))
def test_webrtc_data_channel_survives_hostile_sequences(srv, events):
    """Over WebRTC the data channel speaks the same protocol, minus audio (the mic is the track)."""

    async def run():
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        inbox: asyncio.Queue[str] = asyncio.Queue()
        channel = pc.createDataChannel("events")
        channel.on("message", inbox.put_nowait)
        pc.addTransceiver("audio", direction="sendrecv")
        try:
            await pc.setLocalDescription(await pc.createOffer())
            offer = json.dumps({"type": "offer", "sdp": pc.localDescription.sdp}).encode()
            status, _, body = await asyncio.to_thread(http, srv, "/v1/webrtc/offer", offer)
            assert status == 200, body
            await pc.setRemoteDescription(RTCSessionDescription(json.loads(body)["sdp"], "answer"))
            assert json.loads(await asyncio.wait_for(inbox.get(), WAIT))["type"] == "session.created"

            async def send(m: str | bytes) -> None:
                channel.send(m)

            for k, message in enumerate(events):
                codes = await answers_then_alive(inbox.get, send, message, k)
                assert set(codes) <= REALTIME_ERRORS and len(codes) <= 1, (message[:200], codes)
                if isinstance(message, bytes) or '"input_audio_buffer.append"' in message:
                    assert codes == ["invalid_event"], codes  # audio belongs on the track
        finally:
            await pc.close()
        await health_back_to_zero(srv)

    asyncio.run(run())
