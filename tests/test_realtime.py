"""The Realtime WebSocket's promises mid-conversation, over a live server: barge-in and response.cancel,
truncation, speculation, hang-up, all-or-nothing session.update.

Event names come from tests/servers.py (`RT`), so a protocol rename is a one-line change there.
Sessions run on a clock that stands still (`frozen_clock`): a reply stays 'playing' however slow the
machine is, so whether a barge-in lands never depends on its speed.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import threading

import numpy as np
import pytest
from websockets.asyncio.client import connect

from agent import session as session_module
from tests.helpers import ManualClock, heard_prefix, silence
from tests.servers import RT, WAIT, close_code, recv_json, send_rt_audio, until

RATE = 16000


@pytest.fixture
def frozen_clock(monkeypatch) -> ManualClock:
    """Sessions opened from now on read this clock (it moves only when the test says)."""
    clock = ManualClock()
    monkeypatch.setattr(session_module, "SYSTEM", clock)
    return clock


@pytest.fixture
def hold_speech(srv, monkeypatch):
    """`hold_speech()`: from now on the agent's speech stops after each sentence's first chunk until
    the returned event is set.

    A reply is then still being produced when the client interrupts it, however fast the machine
    (the tiny model's one-sentence reply could otherwise be finished before a cancel arrives).
    """
    release = threading.Event()

    def hold() -> threading.Event:
        tts = srv.agent.tts
        synthesize = tts.synthesize

        def held(text, config=None):  # noqa: ANN001, ANN202
            chunks = synthesize(text, config)
            yield next(chunks)
            release.wait(WAIT)
            yield from chunks

        monkeypatch.setattr(tts, "synthesize", held)
        return release

    yield hold
    release.set()


async def open_session(srv, **settings):
    ws = await connect(srv.url("/v1/realtime"))
    await until(ws, RT.created)
    await ws.send(json.dumps({"type": RT.update, "session": {"input_sample_rate": RATE, "output_sample_rate": RATE, **settings}}))
    await until(ws, RT.updated)
    return ws


def history(srv) -> list[dict]:
    """The dialogue history of the server's one open session."""
    return srv.in_loop(lambda: [c.session for c in srv.hub.connections if c.session][0].dialogue.turns)


@pytest.mark.parametrize("how", ["response.cancel", "speech"])
def test_a_reply_interrupted_mid_way_says_so_and_sends_no_more_audio(srv, question, piper_speech, frozen_clock, hold_speech, how):
    audio = question("Tell me a joke.", RATE)
    stop = np.concatenate([piper_speech("Stop, wait a moment please.", RATE), silence(0.2, RATE)])
    release = hold_speech()

    async def run():
        ws = await open_session(srv, echo_guard_ms=0, barge_in_ms=200, speculation=False)
        await send_rt_audio(ws, audio, RATE)
        seen: list[dict] = []
        await until(ws, RT.audio_delta, seen)
        if how == "speech":
            await send_rt_audio(ws, stop, RATE)
        else:
            await ws.send(json.dumps({"type": "response.cancel"}))
        interrupted = await until(ws, RT.interrupted, seen)
        done = await until(ws, RT.done, seen)
        after = seen.index(interrupted)
        release.set()  # the rest of the sentence is synthesized now, and must not be sent
        await ws.send(json.dumps({"type": RT.update, "session": {}}))
        await until(ws, RT.updated, seen)
        await ws.close()
        return seen, interrupted, done, after

    seen, interrupted, done, after = asyncio.run(run())
    assert interrupted["turn"] == done["turn"] == 1 and interrupted["response_id"] == "resp_1"
    assert done["response"]["status"] == "cancelled"
    assert not [m for m in seen[after:] if m["type"] == RT.audio_delta and m["turn"] == 1]


@pytest.mark.parametrize("message", ["response.audio.played", "conversation.item.truncate"])
def test_the_client_says_how_much_it_played_and_the_history_keeps_that(srv, question, message):
    async def run():
        ws = await open_session(srv)
        await send_rt_audio(ws, question("Tell me a joke.", RATE), RATE)
        seen: list[dict] = []
        await until(ws, RT.done, seen)
        audio = [m for m in seen if m["type"] == RT.audio_delta]
        first = len(base64.b64decode(audio[0]["delta"])) // 2
        played_ms = 600 * first // RATE  # 60 % of the first sentence
        await ws.send(json.dumps({"type": message, "turn": 1, "audio_end_ms": played_ms}))
        await ws.send(json.dumps({"type": RT.update, "session": {}}))
        await until(ws, RT.updated)  # messages are handled in order: the report has been applied
        turns = history(srv)
        await ws.close()
        return audio, played_ms, turns

    audio, played_ms, turns = asyncio.run(run())
    sent = [(m["sentence"], m["text"], len(base64.b64decode(m["delta"])) // 2) for m in audio]
    expected = heard_prefix(sent, played_ms / 1000, RATE)
    assert expected and turns[-1] == {"role": "assistant", "content": expected}


def test_speculation_is_announced_and_kept(srv, piper_speech):
    """A pause mid-question starts a speculative reply (turn.speculation started); the end of turn keeps it."""
    from tests.helpers import trim

    audio = np.concatenate([silence(0.5, RATE), trim(piper_speech("I would like to know", RATE)), silence(0.4, RATE),
                            trim(piper_speech("what time it is in Paris.", RATE)), silence(1.5, RATE)])

    async def run():
        ws = await open_session(srv, speculation=True, pause_ms=200)
        await send_rt_audio(ws, audio, RATE)
        seen: list[dict] = []
        await until(ws, RT.done, seen)
        await ws.close()
        return [m["action"] for m in seen if m["type"] == RT.speculation]

    actions = asyncio.run(run())
    assert actions[0] == "started" and actions[-1] == "kept", actions


def test_a_session_that_hangs_up_says_why_then_closes_1000(srv, monkeypatch):
    monkeypatch.setattr(srv.agent, "config", dataclasses.replace(srv.agent.config, max_call_s=0.5))

    async def run():
        ws = await open_session(srv)
        await send_rt_audio(ws, silence(1.0, RATE), RATE)
        hangup = await until(ws, RT.hangup)
        return hangup, await close_code(ws)

    hangup, code = asyncio.run(run())
    assert hangup["reason"] == "max_duration" and code == 1000


@pytest.mark.parametrize("update", [
    {"pause_ms": 300, "threshold": 5.0},  # one good session key, one bad
    {"output_sample_rate": 8000, "end_ms": "long"},  # a good transport key, a bad session key
    {"barge_in_ms": 100, "input_sample_rate": 12345},  # a good session key, a bad transport key
])
def test_session_update_is_all_or_nothing(srv, update):
    async def run():
        ws = await open_session(srv)
        await ws.send(json.dumps({"type": RT.update, "session": {}}))
        before = (await until(ws, RT.updated))["session"]
        await ws.send(json.dumps({"type": RT.update, "session": update}))
        error = await recv_json(ws)
        await ws.send(json.dumps({"type": RT.update, "session": {}}))
        after = (await until(ws, RT.updated))["session"]
        await ws.close()
        return before, error, after

    before, error, after = asyncio.run(run())
    assert error["type"] == "error" and error["error"]["code"] == "invalid_value"
    assert after == before
