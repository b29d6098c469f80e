"""The Realtime WebSocket over a live server: a whole conversation, bad input, the README's client, and
the promises mid-conversation: barge-in and response.cancel, truncation, speculation, hang-up,
all-or-nothing session.update.

Event names come from tests/servers.py (`RT`), so a protocol rename is a one-line change there.
Sessions run on a clock that stands still (`frozen_clock`): a reply stays 'playing' however slow the
machine is, so whether a barge-in lands never depends on its speed.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import subprocess
import sys
import threading
import wave
from contextlib import suppress
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from agent import session as session_module
from tests.helpers import ManualClock, heard_prefix, silence
from tests.servers import RT, WAIT, close_code, pcm16, recv_json, send_rt_audio, until

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
            first = next(chunks, None)
            if first is None:  # nothing to say ("..")
                return
            yield first
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


# ---- a whole conversation, bad input, the README client ---------------------------------


def test_realtime_conversation(srv, question):
    async def run():
        async with connect(srv.url("/v1/realtime")) as ws:
            created = await recv_json(ws)
            assert created["type"] == "session.created" and created["turn"] is None
            s = created["session"]
            assert s["input_sample_rate"] == s["output_sample_rate"] == 24000 and s["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
            assert s["agent_sample_rate"] == srv.agent.tts.sample_rate and s["end_ms"] == srv.agent.config.turns.end_ms

            await ws.send(json.dumps({"type": "session.update", "session": {"input_sample_rate": 16000, "output_sample_rate": 16000, "denoise_steps": True, "end_ms": 650.0, "barge_in_ms": 400}}))
            updated = await recv_json(ws)
            assert updated["type"] == "session.updated"
            assert updated["session"]["output_sample_rate"] == 16000 and updated["session"]["barge_in_ms"] == 400 and updated["session"]["end_ms"] == 650

            await send_rt_audio(ws, question("What is your name?", 16000), 16000)
            seen: list[dict] = []
            done = await until(ws, "response.done", seen)
            metrics = await until(ws, "turn.metrics", seen)
            return seen, done, metrics

    seen, done, metrics = asyncio.run(run())
    types = [m["type"] for m in seen]
    for t in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "conversation.item.input_audio_transcription.completed",
              "response.created", "response.output_audio_transcript.delta", "response.denoise.step", "response.output_audio.delta"):
        assert t in types, f"no {t} in {types}"
    assert types.index("input_audio_buffer.speech_started") < types.index("conversation.item.input_audio_transcription.completed") < types.index("response.output_audio.delta")
    transcript = next(m["transcript"] for m in seen if m["type"].endswith("transcription.completed"))
    assert "name" in transcript.lower()
    assert all(m["turn"] == 1 for m in seen)
    assert all(m["response_id"] == "resp_1" for m in seen if m["type"].startswith("response."))
    reply = "".join(m["delta"] for m in seen if m["type"] == "response.output_audio_transcript.delta")
    assert reply.strip() and done["response"]["output"][0]["content"][0]["transcript"] == reply and done["response"]["status"] == "completed"
    assert types.index("response.created") < types.index("response.output_audio.delta") < types.index("response.output_audio.done") < types.index("response.done")
    audio = [m for m in seen if m["type"] == "response.output_audio.delta"]
    samples = np.concatenate([np.frombuffer(base64.b64decode(m["delta"]), dtype="<i2") for m in audio])
    assert all(m["sample_rate"] == 16000 and m["text"] for m in audio)
    assert audio[0]["audio_start_ms"] == 0 and len(samples) > 0.3 * 16000 and np.abs(samples).max() > 1000
    assert metrics["timeline"]["turn"] == 1 and metrics["timeline"]["server_voice_to_voice_ms"] is not None


def test_realtime_bad_input_gets_errors_and_the_session_goes_on(srv):
    async def error_for(ws, payload) -> dict:
        await ws.send(payload)
        msg = await recv_json(ws)
        assert msg["type"] == "error", msg
        return msg["error"]

    async def run():
        async with connect(srv.url("/v1/realtime")) as ws:
            await until(ws, "session.created")
            assert (await error_for(ws, "{not json"))["code"] == "invalid_json"
            assert (await error_for(ws, "[1, 2]"))["code"] == "invalid_event"
            assert (await error_for(ws, json.dumps({"type": 7})))["code"] == "invalid_event"
            err = await error_for(ws, json.dumps({"type": "input_audio_buffer.bogus"}))
            assert err["code"] == "unknown_event" and err["event"] == "input_audio_buffer.bogus"
            for bad in ({"input_audio_format": "mp3"}, {"output_sample_rate": 12345}, {"input_sample_rate": "16000"}, {"end_ms": "long"},
                        {"block_size": 31.5}, {"threshold": 5.0}, {"colour": "blue"}, {"denoise_steps": 1}, {"speculation": "yes"}):
                err = await error_for(ws, json.dumps({"type": "session.update", "session": bad}))
                assert err["code"] == "invalid_value", (bad, err)
            assert (await error_for(ws, json.dumps({"type": "session.update", "session": 3})))["code"] == "invalid_event"
            assert (await error_for(ws, json.dumps({"type": "input_audio_buffer.append", "audio": "@@not base64@@"})))["code"] == "invalid_audio"
            assert (await error_for(ws, json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x01\x02\x03").decode()})))["code"] == "invalid_audio"
            assert (await error_for(ws, b"\x00\x01\x02"))["code"] == "invalid_audio"  # odd-length binary pcm16
            assert (await error_for(ws, json.dumps({"type": "conversation.item.truncate", "turn": "one"})))["code"] == "invalid_value"
            # Still a working session: a valid update applies, and nothing bad was applied before it.
            await ws.send(json.dumps({"type": "session.update", "session": {"pause_ms": 250}}))
            s = (await until(ws, "session.updated"))["session"]
            assert s["pause_ms"] == 250 and s["output_sample_rate"] == 24000 and s["threshold"] == srv.agent.config.decode.threshold
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))  # silence only: no turn, no error
            await ws.send(json.dumps({"type": "response.cancel"}))
            await ws.send(json.dumps({"type": "response.audio.played", "turn": 0, "audio_end_ms": 0}))
            await ws.send(json.dumps({"type": "session.update", "session": {}}))
            assert (await recv_json(ws))["type"] == "session.updated"  # the three before it answered nothing

        async with connect(srv.url("/v1/realtime"), max_size=None) as ws:
            await until(ws, "session.created")
            with suppress(ConnectionClosed):  # the server may close (1009) before the frame is all sent
                await ws.send(b"\x00" * ((1 << 20) + 2))  # over max_frame_bytes
            assert await close_code(ws) == 1009

    asyncio.run(run())


def test_the_readme_client_example(srv, piper_speech, tmp_path):
    """examples/ws_client.py: a WAV without trailing silence, ended by input_audio_buffer.commit."""
    with wave.open(str(tmp_path / "q.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm16(np.concatenate([silence(0.3, 16000), piper_speech("Hello, how are you?", 16000)])))
    run = subprocess.run([sys.executable, "examples/ws_client.py", str(tmp_path / "q.wav"), "--out", str(tmp_path / "a.wav"), "--url", srv.url("/v1/realtime")],
                         capture_output=True, text=True, timeout=WAIT, cwd=Path(__file__).parent.parent)
    assert run.returncode == 0, run.stderr
    assert "you:" in run.stdout and "agent:" in run.stdout
    with wave.open(str(tmp_path / "a.wav")) as w:
        assert w.getframerate() == 24000 and w.getnframes() > 0.3 * 24000
