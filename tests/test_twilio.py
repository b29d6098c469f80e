"""Twilio Media Streams over a live server: paced media, marks and clear, what the caller heard, protocol violations."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from contextlib import suppress

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from audio.codec import ulaw_decode
from tests.helpers import silence
from tests.servers import SID, WAIT, close_code, http, media_msgs, start_msg


class TwilioCaller:
    """Plays Twilio's part of a call: sends the caller's μ-law audio, keeps what the server sends, echoes marks."""

    def __init__(self, ws, piper_speech) -> None:
        self.ws, self.piper_speech = ws, piper_speech
        self.got: list[dict] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            self.got.append(msg)
            if msg["event"] == "mark":  # played up to here (the server paces in real time)
                await self.ws.send(json.dumps({"event": "mark", "sequenceNumber": "99", "streamSid": SID, "mark": msg["mark"]}))

    async def say(self, text: str | np.ndarray, pause_s: float = 2.5) -> None:
        """Speak `text` (or ready 8 kHz audio: no synthesis delay where timing matters), then `pause_s` of
        silence: by default past the longest end of turn (2 s, for a transcript that trails off)."""
        speech = self.piper_speech(text, 8000) if isinstance(text, str) else text
        for m in media_msgs(np.concatenate([speech, silence(pause_s, 8000)])):
            await self.ws.send(m)

    async def wait_for(self, event: str, index: int = 0) -> int:
        """The position of the first `event` from the server at or after `index`, once it is there."""
        deadline = time.monotonic() + WAIT
        while not any(m["event"] == event for m in self.got[index:]):
            assert time.monotonic() < deadline and not self.reader.done(), f"no {event}: {[m['event'] for m in self.got]}"
            await asyncio.sleep(0.01)
        return next(i for i in range(index, len(self.got)) if self.got[i]["event"] == event)

    async def hang_up(self) -> int:
        await self.ws.send(json.dumps({"event": "stop", "sequenceNumber": "500", "streamSid": SID, "stop": {"accountSid": "AC0", "callSid": "CA0"}}))
        await asyncio.wait_for(self.reader, WAIT)
        return self.ws.close_code


def playing_past_guard(session) -> bool:
    reply = session and session._reply
    return bool(reply and reply.audible(session.config.echo_guard_ms))


def test_twilio_calls_get_paced_media_marks_and_clear(srv, piper_speech):
    """A reply plays to its mark; talking over a reply gets `clear`; so does a key press (DTMF)."""
    _, _, twiml = http(srv, "/twiml", data=b"CallSid=CA1")
    stream_url = re.search(r'<Stream url="([^"]+)"', twiml).group(1)

    async def call(script) -> list[dict]:
        async with connect(stream_url) as ws:
            await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            await ws.send(start_msg())
            caller = TwilioCaller(ws, piper_speech)
            await script(caller)
            assert await caller.hang_up() == 1000
            return caller.got

    async def heard_to_the_end(c: TwilioCaller) -> None:
        await c.ws.send(json.dumps({"event": "mystery", "streamSid": SID}))  # unknown events are ignored (forward compatible)
        await c.say("What do you eat?")
        await c.wait_for("mark", await c.wait_for("media"))

    async def talked_over(c: TwilioCaller) -> None:
        interruption = piper_speech("Do you like dogs?", 8000)
        await c.say("Tell me a joke.")
        await c.wait_for("media")
        await srv.wait_until(lambda: any(playing_past_guard(c.session) for c in srv.hub.connections), "the reply playing past its echo guard")
        await c.say(interruption, 0.2)
        await c.wait_for("clear")

    async def key_pressed(c: TwilioCaller) -> None:
        await c.say("Tell me a joke.")
        await c.wait_for("media")
        await c.ws.send(json.dumps({"event": "dtmf", "streamSid": SID, "sequenceNumber": "40", "dtmf": {"track": "inbound_track", "digit": "1"}}))
        await c.wait_for("clear")

    async def run():
        return [await call(heard_to_the_end), await call(talked_over), await call(key_pressed)]

    full, barged, keyed = asyncio.run(run())
    for got in (full, barged, keyed):
        assert all(m["streamSid"] == SID for m in got)
        assert all(len(base64.b64decode(m["media"]["payload"])) == 160 for m in got if m["event"] == "media")  # 20 ms of μ-law
    events = [m["event"] for m in full]
    assert set(events) == {"media", "mark"} and events[-1] == "mark"  # a sentence's mark follows its last frame
    audio = np.concatenate([ulaw_decode(base64.b64decode(m["media"]["payload"])) for m in full if m["event"] == "media"])
    assert len(audio) > 0.3 * 8000 and np.abs(audio).max() > 1000  # speech, not silence
    for got in (barged, keyed):
        events = [m["event"] for m in got]
        assert events.count("clear") == 1 and events.index("media") < events.index("clear")
        assert "mark" not in events  # the reply's mark was dropped with its audio
    assert asyncio.run(_eventually(srv.idle))


async def _eventually(pred, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


CONNECTED = json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
MEDIA = media_msgs(silence(0.02, 8000))[0]
# Each rule has its fast case in tests/test_twilio_protocol.py; these show the codes reach a real client.
CLOSES = {
    "binary after start": ([CONNECTED, start_msg(), b"\x7f" * 160], 1003),
    "media before start": ([CONNECTED, MEDIA], 1008),
    "not JSON": (["{not json"], 1007),
    "bigger than any Twilio message": ([json.dumps({"event": "connected", "pad": "x" * (20 << 10)})], 1009),
    "dtmf then stop": ([CONNECTED, start_msg(), MEDIA, json.dumps({"event": "dtmf", "streamSid": SID, "dtmf": {"digit": "5"}}),
                        json.dumps({"event": "stop", "streamSid": SID})], 1000),
}


@pytest.mark.parametrize("case", CLOSES)
def test_twilio_protocol_violations_get_close_codes(srv, case):
    messages, code = CLOSES[case]

    async def code_after() -> int:
        async with connect(srv.url("/twilio/stream")) as ws:
            with suppress(ConnectionClosed):  # the server may close before the last frame is all sent
                for m in messages:
                    await ws.send(m)
            return await close_code(ws)

    assert asyncio.run(code_after()) == code
    assert asyncio.run(_eventually(srv.idle))
