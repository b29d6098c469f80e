"""WebRTC for browsers: the microphone and the agent's voice as Opus media tracks, events on a data channel.

The data channel speaks the Realtime-style protocol of `realtime.py` unchanged (same JSON events
both ways), except that audio never travels as JSON: the mic arrives on the browser's track and
the reply leaves on `ReplyTrack`, paced in real time, so the server itself knows what was played.

Signaling is one HTTP round trip (`POST /v1/webrtc/offer`, no trickle ICE): the browser gathers
its candidates, posts the offer, gets the complete answer. No STUN/TURN by default (offline).
"""

from __future__ import annotations

import asyncio
import collections
import fractions
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import av
import numpy as np
from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.sdp import SessionDescription

from audio.codec import resample, to_int16

from .. import events as ev
from ..clock import SYSTEM, Clock
from .base import ClientGone
from .realtime import RealtimeConnection
from .realtime_config import AudioFormat

if TYPE_CHECKING:
    from ..hub import Hub

log = logging.getLogger(__name__)

RATE = 48000  # Opus runs at 48 kHz; the browser's mic arrives as 48 kHz stereo s16
FRAME = RATE // 50  # 20 ms
MAX_BUFFERED = 1 << 20  # data channel bytes waiting to be sent before a write waits


class OfferError(Exception):
    """A signaling request the server refuses: HTTP `status` with a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_offer(sdp: object) -> str:
    """Refuse what cannot become a call, before any peer connection exists; returns the offer's ICE ufrag.

    aiortc accepts garbage silently (an empty description), so the checks are explicit.
    """
    if not isinstance(sdp, str) or not sdp.startswith("v=0"):
        raise OfferError(400, "malformed SDP: an offer starts with 'v=0'")
    try:
        desc = SessionDescription.parse(sdp)
    except Exception as e:  # the parser asserts and raises ValueError/IndexError on broken lines
        raise OfferError(400, f"malformed SDP: {type(e).__name__} {e}".strip()) from None
    kinds = {m.kind: m for m in desc.media}
    audio = kinds.get("audio")
    if audio is None or audio.port == 0 or audio.direction not in (None, "sendrecv", "sendonly"):
        raise OfferError(400, "the offer has no microphone: it needs an audio m-line the browser sends on (sendrecv)")
    if "application" not in kinds:
        raise OfferError(400, "the offer has no data channel: create one (e.g. 'events') before createOffer")
    ufrag = next((m.ice.usernameFragment for m in desc.media if m.ice and m.ice.usernameFragment), None)
    if not ufrag:
        raise OfferError(400, "malformed SDP: no a=ice-ufrag")
    return ufrag


def audio_frame(samples: np.ndarray, pts: int) -> av.AudioFrame:
    """A 48 kHz mono s16 frame for an outgoing track."""
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = RATE
    frame.pts = pts
    frame.time_base = fractions.Fraction(1, RATE)
    return frame


def mono_frames(rate: int) -> Callable[[av.AudioFrame], list[np.ndarray]]:
    """Converts a track's incoming frames (any layout and rate) to int16 mono at `rate`."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
    return lambda frame: [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]


class ReplyTrack(MediaStreamTrack):
    """The agent's voice: 20 ms frames at 48 kHz in real time, silence when idle.

    Pacing here is what makes 'played' meaningful: a sample leaves when it is due, so the samples
    taken so far are what the listener has heard (give or take the jitter buffer).
    """

    kind = "audio"

    def __init__(self, on_played: Callable[[int, float], None], clock: Clock = SYSTEM) -> None:
        super().__init__()
        self.on_played = on_played
        self.clock = clock
        self._chunks: collections.deque[list] = collections.deque()  # [turn, int16 samples, position]
        self._played: dict[int, int] = {}  # turn → samples taken
        self._start: float | None = None
        self._pts = 0

    def push(self, turn: int, samples: np.ndarray) -> None:
        self._chunks.append([turn, samples, 0])

    def clear(self) -> None:
        """Barge-in: drop everything not yet played."""
        self._chunks.clear()

    def played_s(self, turn: int) -> float:
        return self._played.get(turn, 0) / RATE

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = self.clock.monotonic()
        if self._start is None:
            self._start = now
        else:
            self._pts += FRAME
            wait = self._start + self._pts / RATE - now
            if wait > 0:
                await self.clock.sleep(wait)
            elif wait < -0.5:  # the loop stalled: restart the clock rather than burst to catch up
                self._start = now - self._pts / RATE
        return audio_frame(self._take(), self._pts)

    def _take(self) -> np.ndarray:
        out = np.zeros(FRAME, dtype=np.int16)
        filled = 0
        while filled < FRAME and self._chunks:
            chunk = self._chunks[0]
            turn, samples, pos = chunk
            n = min(FRAME - filled, len(samples) - pos)
            out[filled : filled + n] = samples[pos : pos + n]
            filled += n
            chunk[2] = pos + n
            self._played[turn] = self._played.get(turn, 0) + n
            if chunk[2] == len(samples):
                self._chunks.popleft()
                self.on_played(turn, self.played_s(turn))
        return out


class DataChannelSocket:
    """The slice of Starlette's WebSocket that `Connection` uses, over an RTCDataChannel."""

    def __init__(self, pc: RTCPeerConnection, open_timeout_s: float) -> None:
        self.pc = pc
        self.open_timeout_s = open_timeout_s
        self.channel: RTCDataChannel | None = None
        self._opened = asyncio.Event()
        self._inbox: asyncio.Queue[dict] = asyncio.Queue()
        self._drained = asyncio.Event()
        pc.on("datachannel", self._attach)
        pc.on("connectionstatechange", self._state_changed)

    def _attach(self, channel: RTCDataChannel) -> None:
        if self.channel is not None:
            log.info("webrtc: ignoring a second data channel %r", channel.label)
            return
        self.channel = channel
        channel.bufferedAmountLowThreshold = MAX_BUFFERED // 2
        channel.on("message", lambda m: self._inbox.put_nowait({"type": "websocket.receive", **({"text": m} if isinstance(m, str) else {"bytes": m})}))
        channel.on("close", self._gone)
        channel.on("bufferedamountlow", self._drained.set)
        if channel.readyState == "open":
            self._opened.set()
        else:
            channel.on("open", self._opened.set)

    def _state_changed(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            self._gone()

    def _gone(self) -> None:
        self._inbox.put_nowait({"type": "websocket.disconnect", "code": 1006})
        self._opened.set()  # wake accept(), which then finds no open channel

    async def accept(self) -> None:
        """Wait for the browser's data channel to open (ICE and DTLS have succeeded by then)."""
        try:
            async with asyncio.timeout(self.open_timeout_s):
                await self._opened.wait()
        except TimeoutError:
            log.info("webrtc: no data channel within %g s (ICE failed?)", self.open_timeout_s)
            raise ClientGone() from None
        if self.channel is None or self.channel.readyState != "open":
            raise ClientGone()

    async def receive(self) -> dict:
        return await self._inbox.get()

    async def send_text(self, text: str) -> None:
        channel = self.channel
        if channel is None or channel.readyState != "open":
            raise RuntimeError("data channel closed")
        while channel.bufferedAmount > MAX_BUFFERED:  # the browser is not reading: let send()'s timeout decide
            self._drained.clear()
            await self._drained.wait()
        channel.send(text)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.pc.close()


class WebRTCConnection(RealtimeConnection):
    """A Realtime session whose audio rides on media tracks; everything else is the Realtime protocol."""

    kind = "webrtc"
    fixed_audio = True

    def __init__(self, pc: RTCPeerConnection, hub: Hub) -> None:
        super().__init__(DataChannelSocket(pc, hub.settings.open_timeout_s), hub, authed=True)  # the token came with the offer
        self.input = self.output = AudioFormat("pcm16", RATE)  # what the tracks carry; session.update cannot change them
        self.mic: MediaStreamTrack | None = None
        self.track = ReplyTrack(self._played_up_to)
        self._handlers["input_audio_buffer.append"] = self._not_here
        pc.on("track", self._on_track)

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and self.mic is None:
            self.mic = track

    # ---- in: the data channel (base class) and the microphone track --------------------------

    async def _read(self) -> None:
        await asyncio.gather(super()._read(), self._listen())

    async def _listen(self) -> None:
        convert = mono_frames(RATE)  # mono only: the session's listener resamples, as for every transport
        while True:
            try:
                frame = await self.mic.recv()
            except MediaStreamError:
                raise ClientGone() from None
            for samples in convert(frame):
                await self.session.send_audio(samples, RATE)

    async def on_bytes(self, data: bytes) -> None:
        await self._not_here({"type": None})

    async def _not_here(self, msg: dict) -> None:
        self.error("invalid_event", "over WebRTC the microphone is the audio track: send no audio on the data channel", event=msg["type"])

    # ---- out: the reply track ----------------------------------------------------------------

    def _audio(self, e: ev.AgentAudio) -> None:
        self.track.push(e.turn, to_int16(resample(e.samples, e.sample_rate, RATE)))

    def on_event(self, e: ev.Event) -> None:
        if isinstance(e, ev.Interrupted):
            self.track.clear()  # before the base class reports heard(): what was taken is what was played
        super().on_event(e)

    def heard(self, turn: int) -> float:
        return self.track.played_s(turn)

    def _played_up_to(self, turn: int, seconds: float) -> None:
        if self.session is not None:
            self.session.played(turn, seconds)

    def describe(self) -> dict:
        return {**super().describe(), "transport": "webrtc"}


class Signaling:
    """Answers offers, one per call: an offer whose ICE credentials belong to a call already
    answered is a retry or a renegotiation, neither of which this server does (409)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._calls: set[str] = set()  # ICE ufrags of the calls answered and not yet ended
        self._tasks: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks

    @property
    def idle(self) -> bool:
        """No call answered here is still running."""
        return not self._calls and not self._tasks

    async def answer(self, sdp: object) -> str:
        """The SDP answer to a browser's offer, its call running; OfferError(status) to refuse."""
        ufrag = check_offer(sdp)
        if ufrag in self._calls:
            raise OfferError(409, "this offer was already answered: one offer per call (no renegotiation); create a new RTCPeerConnection")
        if self.hub.full:
            raise OfferError(503, f"server busy: all {self.hub.settings.max_sessions} sessions are in use, try again later")
        self._calls.add(ufrag)
        try:
            answer, task = await _start_call(self.hub, sdp, lambda: self._calls.discard(ufrag))
        except OfferError:
            self._calls.discard(ufrag)
            raise
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return answer


async def _start_call(hub: Hub, sdp: str, on_done: Callable[[], None]) -> tuple[str, asyncio.Task]:
    """Accept a checked offer: a peer connection, its session task, and the SDP answer."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # offline: the default STUN server stalls gathering
    conn = WebRTCConnection(pc, hub)
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        pc.addTrack(conn.track)  # reuses the offer's audio transceiver: the voice goes back on the mic's m-line
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception as e:
        await pc.close()
        raise OfferError(400, f"offer rejected: {e}") from None
    if conn.mic is None:
        await pc.close()
        raise OfferError(400, "the offer has no microphone track")

    async def run() -> None:
        try:
            await conn.serve()
        finally:
            await pc.close()
            on_done()

    return pc.localDescription.sdp, asyncio.create_task(run(), name="webrtc-session")
