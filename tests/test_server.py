"""The server over real sockets: uvicorn on a loopback port, real `websockets` clients, the real agent.

Each server runs in its own thread and event loop (as `voice-agent serve` does in its process);
clients run in the test's own loop. No assertion depends on how fast anything is.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import wave
from contextlib import suppress
from pathlib import Path

import numpy as np
import pytest
import torch
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from cli.voice_agent import build_parser, main as cli_main
from agent.security import twilio_signature
from agent.session import Session
from audio.codec import ulaw_decode
from tests.helpers import silence
from tests.servers import (
    SID, WAIT, close_code, http, live, media_msgs, pcm16, recv_json, send_rt_audio, start_msg, twilio_call, until,
)


def test_health_static_and_twiml(srv):
    status, ctype, body = http(srv, "/health")
    health = json.loads(body)
    assert status == 200 and ctype.startswith("application/json")
    assert health["status"] == "ok" and health["models"]["loaded"] is True
    assert health["sessions"] == {"active": 0, "max": 3} and health["agent_sample_rate"] > 0
    assert health["limits"]["max_frame_bytes"] == 1 << 20 and health["auth_required"] is False

    status, ctype, body = http(srv, "/")
    assert status == 200 and ctype.startswith("text/html") and "<html" in body

    status, ctype, body = http(srv, "/twiml", data=b"CallSid=CA1&From=%2B15550001")
    assert status == 200 and ctype.startswith("application/xml")
    assert f'<Connect><Stream url="ws://127.0.0.1:{srv.port}/twilio/stream"></Stream></Connect>' in body


def test_cli_serve_help_and_refusals(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--host", "--port", "--model", "--token", "--public-url", "--ssl-certfile", "--ssl-keyfile", "--max-sessions", "--allow-origin", "--compile", "TWILIO_AUTH_TOKEN"):
        assert flag in out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--threads", "0"])  # torch would fail later, with a traceback
    assert "--threads: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-sessions", "0"])
    assert "--max-sessions: must be >= 1, got 0" in capsys.readouterr().err
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0"])
    assert args.port == 8000
    with pytest.raises(SystemExit, match="--token"):
        args.func(args)  # refused before any model loads
    args = build_parser().parse_args(["serve", "--ssl-certfile", "cert.pem"])
    with pytest.raises(SystemExit, match="ssl-keyfile"):
        args.func(args)
    # what the model loader refuses: one line, no traceback
    with pytest.raises(SystemExit, match="error: model directory .*nowhere does not exist"):
        cli_main(["chat", "--model", "/nowhere"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="error: CUDA graphs need the model on a CUDA device"):
            cli_main(["chat", "--cuda-graphs"])


# ---- Realtime ------------------------------------------------------------------------------


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


# ---- Twilio --------------------------------------------------------------------------------


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

    async def say(self, text: str | np.ndarray, pause_s: float = 1.5) -> None:
        """Speak `text` (or ready 8 kHz audio: no synthesis delay where timing matters)."""
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
        await asyncio.sleep(0.6)  # past the echo guard, while the reply plays
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


def test_twilio_protocol_violations_get_close_codes(srv):
    async def code_after(*messages) -> int:
        async with connect(srv.url("/twilio/stream")) as ws:
            with suppress(ConnectionClosed):  # the server may close before the last frame is all sent
                for m in messages:
                    await ws.send(m)
            return await close_code(ws)

    connected = json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
    media = media_msgs(silence(0.02, 8000))[0]

    async def run():
        assert await code_after(connected, b"\x7f" * 160) == 1003  # binary frame
        assert await code_after(connected, start_msg(), b"\x7f" * 160) == 1003  # binary after start too
        assert await code_after(connected, media) == 1008  # media before start
        assert await code_after(connected, json.dumps({"event": "mark", "mark": {"name": "x"}})) == 1008
        assert await code_after(start_msg(fmt={"encoding": "audio/x-l16", "sampleRate": 16000, "channels": 1})) == 1003
        assert await code_after(start_msg(fmt={"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 2})) == 1003
        assert await code_after("{not json") == 1007
        assert await code_after(json.dumps({"no": "event"})) == 1007
        assert await code_after(start_msg(), json.dumps({"event": "media", "streamSid": SID, "media": {"payload": "%%%"}})) == 1007
        assert await code_after(start_msg(), start_msg()) == 1008  # a second start
        assert await code_after(json.dumps({"event": "connected", "pad": "x" * (20 << 10)})) == 1009  # no Twilio message is this big
        assert await code_after(connected, start_msg(), media, json.dumps({"event": "dtmf", "streamSid": SID, "dtmf": {"digit": "5"}}),
                                json.dumps({"event": "stop", "streamSid": SID})) == 1000

    asyncio.run(run())
    assert asyncio.run(_eventually(srv.idle))


# ---- clients that vanish, stop reading, or come and go ---------------------------------------


def test_abrupt_disconnects_mid_reply_leave_other_sessions_going(srv, question):
    async def abort_mid_reply_realtime():
        ws = await connect(srv.url("/v1/realtime"))
        await until(ws, "session.created")
        await send_rt_audio(ws, question("Where do you live?", 24000), 24000)
        await until(ws, "response.output_audio.delta")
        ws.transport.abort()  # no close frame: the TCP connection just dies

    async def abort_mid_reply_twilio():
        ws = await twilio_call(srv)
        for m in media_msgs(question("What do you eat?", 8000)):
            await ws.send(m)
        while json.loads(await asyncio.wait_for(ws.recv(), WAIT))["event"] != "media":
            pass
        ws.transport.abort()

    async def witness():
        async with connect(srv.url("/v1/realtime")) as ws:
            await until(ws, "session.created")
            await asyncio.sleep(0.5)  # let the others get going first
            await send_rt_audio(ws, question("Do you like dogs?", 24000), 24000)
            seen: list[dict] = []
            done = await until(ws, "response.done", seen)
            assert any(m["type"] == "response.output_audio.delta" for m in seen)
            return done["response"]["output"][0]["content"][0]["transcript"]

    async def run():
        _, _, text = await asyncio.gather(abort_mid_reply_realtime(), abort_mid_reply_twilio(), witness())
        assert text.strip()
        await srv.wait_idle()

    asyncio.run(run())


def test_connect_disconnect_cycles_leak_nothing(srv):
    def server_tasks() -> int:
        return len(asyncio.all_tasks(srv.loop))

    async def cycle(k: int) -> None:
        if k % 2:
            ws = await connect(srv.url("/v1/realtime"))
            await until(ws, "session.created")
        else:
            ws = await twilio_call(srv)
            await ws.send(media_msgs(silence(0.1, 8000))[0])
        if k % 3 == 0:
            ws.transport.abort()
        else:
            await ws.close()

    async def run():
        await srv.wait_idle()
        gc.collect()
        tasks, threads = srv.in_loop(server_tasks), threading.active_count()
        for k in range(50):
            await cycle(k)
        await srv.wait_idle()
        await asyncio.sleep(0.2)
        assert srv.in_loop(server_tasks) <= tasks
        assert threading.active_count() <= threads

    asyncio.run(run())
    gc.collect()
    assert [o for o in gc.get_objects() if type(o) is Session] == []


# ---- security, limits, shutdown -------------------------------------------------------------


def test_tokens_origins_signatures_and_session_limit(voice_agent):
    twilio_token = "tw-auth-token"
    settings = dict(token="s3cret", twilio_auth_token=twilio_token, public_url="https://agent.example.com", allowed_origins=("https://app.example.com",), max_sessions=1, open_timeout_s=1.0)
    with live(voice_agent, **settings) as sec:
        bearer = {"Authorization": "Bearer s3cret"}

        async def run():
            url = sec.url("/v1/realtime")
            with pytest.raises(InvalidStatus) as e:
                await connect(url, additional_headers={"Authorization": "Bearer wrong"})
            assert e.value.response.status_code == 401
            with pytest.raises(InvalidStatus) as e:
                await connect(url, additional_headers=bearer, origin="https://evil.example.com")
            assert e.value.response.status_code == 403

            async with connect(url) as ws:  # a browser: no header, nothing sent in time
                assert await close_code(ws) == 1008
            async with connect(url) as ws:
                await ws.send(json.dumps({"type": "session.auth", "token": "nope"}))
                assert await close_code(ws) == 1008

            async with connect(url, origin="https://app.example.com") as ws:  # a browser with the first-message token
                await ws.send(json.dumps({"type": "session.auth", "token": "s3cret"}))
                assert (await recv_json(ws))["type"] == "session.created"
                async with connect(url, additional_headers=bearer) as second:  # over max_sessions
                    err = await recv_json(second)
                    assert err["type"] == "error" and err["error"]["code"] == "session_limit"
                    assert await close_code(second) == 1013
                status, _, body = http(sec, "/twiml", data=b"CallSid=CA1", headers={"X-Twilio-Signature": twilio_signature(twilio_token, "https://agent.example.com/twiml", [("CallSid", "CA1")])})
                assert status == 200 and '<Reject reason="busy"/>' in body

            for origin in (f"http://127.0.0.1:{sec.port}", "https://agent.example.com"):  # same origin; the public one
                async with connect(url, additional_headers=bearer, origin=origin) as ws:
                    assert (await recv_json(ws))["type"] == "session.created"

            # Twilio: the webhook is signed over the public URL + sorted form fields.
            form = [("From", "+15550001"), ("CallSid", "CA0")]  # the call start_msg names
            body = "&".join(f"{k}={v}" for k, v in form).replace("+", "%2B").encode()
            assert http(sec, "/twiml", data=body)[0] == 403
            assert http(sec, "/twiml", data=body, headers={"X-Twilio-Signature": twilio_signature("other", "https://agent.example.com/twiml", form)})[0] == 403
            status, _, xml = http(sec, "/twiml", data=body, headers={"X-Twilio-Signature": twilio_signature(twilio_token, "https://agent.example.com/twiml", form)})
            assert status == 200 and '<Stream url="wss://agent.example.com/twilio/stream">' in xml
            token = re.search(r'<Parameter name="token" value="([^"]+)"/>', xml).group(1)

            stream = sec.url("/twilio/stream")
            sig = {"X-Twilio-Signature": twilio_signature(twilio_token, "wss://agent.example.com/twilio/stream")}
            with pytest.raises(InvalidStatus) as e:
                await connect(stream)
            assert e.value.response.status_code == 403
            async with connect(stream, additional_headers=sig) as ws:
                await ws.send(start_msg("not-the-token"))
                assert await close_code(ws) == 1008
            async with connect(stream, additional_headers=sig) as ws:
                await ws.send(start_msg(token))
                await ws.send(json.dumps({"event": "stop", "streamSid": SID}))
                assert await close_code(ws) == 1000
            async with connect(stream, additional_headers=sig) as ws:  # single use
                await ws.send(start_msg(token))
                assert await close_code(ws) == 1008
            async with connect(stream, additional_headers=sig) as ws:  # connected, then nothing
                await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
                assert await close_code(ws) == 1008

        asyncio.run(run())


def test_ctrl_c_on_voice_agent_serve_closes_sessions_with_1001(tiny_chat):
    """The real command in its own process: Ctrl-C (SIGINT) gives every client 1001, then it exits."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "cli.voice_agent", "serve", "--model", str(tiny_chat / "model"), "--dtype", "float32",
           "--block-size", "32", "--max-new-tokens", "32", "--port", str(port), "--max-sessions", "2"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 3 * WAIT
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "no /health"
            try:
                with urllib.request.urlopen(f"http://{base}/health", timeout=5) as r:
                    assert json.load(r)["sessions"] == {"active": 0, "max": 2}
                    break
            except OSError:
                time.sleep(0.2)

        async def run():
            rt = await connect(f"ws://{base}/v1/realtime")
            await until(rt, "session.created")
            tw = await connect(f"ws://{base}/twilio/stream")
            await tw.send(start_msg())
            await asyncio.sleep(0.3)
            proc.send_signal(signal.SIGINT)
            last = None
            try:
                while True:
                    last = json.loads(await asyncio.wait_for(rt.recv(), WAIT))
            except ConnectionClosed as e:
                assert e.rcvd.code == 1001
            assert last["type"] == "error" and last["error"]["code"] == "server_shutdown"
            assert await close_code(tw) == 1001

        asyncio.run(run())
        out, _ = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, out
        assert "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
