"""The official `openai` SDK's Realtime clients, unchanged, against the server: only the base URL differs.

The current client (`client.realtime`) configures its session as the API's docs show; the beta
client (`client.beta.realtime`) sends the beta shape and its `OpenAI-Beta` header. Each streams a
spoken question, gets the transcript, the reply's text and audio, then interrupts a second reply
and truncates it to what it "played".
"""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import openai
from websockets.asyncio.client import connect

from audio.codec import alaw_decode, to_int16, ulaw_encode
from tests.servers import WAIT, http, pcm16, start_msg, until

RATE = 24000
CURRENT_SESSION = {
    "type": "realtime",
    "instructions": "You are a friendly phone agent. Answer briefly.",
    "output_modalities": ["audio"],
    "audio": {
        "input": {"format": {"type": "audio/pcm", "rate": RATE}, "turn_detection": {"type": "server_vad", "silence_duration_ms": 600}},
        "output": {"format": {"type": "audio/pcm", "rate": RATE}, "voice": "marin"},
    },
    "tools": [{"type": "function", "name": "lookup", "description": "not for this agent", "parameters": {"type": "object"}}],
}
BETA_SESSION = {
    "modalities": ["text", "audio"],
    "instructions": "You are a friendly phone agent. Answer briefly.",
    "voice": "alloy",
    "input_audio_format": "pcm16",
    "output_audio_format": "pcm16",
    "turn_detection": {"type": "server_vad", "silence_duration_ms": 600},
}
CURRENT_NAMES = {"audio": "response.output_audio.delta", "transcript": "response.output_audio_transcript.delta", "item": "conversation.item.added"}
BETA_NAMES = {"audio": "response.audio.delta", "transcript": "response.audio_transcript.delta", "item": "conversation.item.created"}


def client(srv) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key="not-needed-here", websocket_base_url=srv.url("/v1"))


async def say(conn, audio: np.ndarray, chunk_s: float = 0.1) -> None:
    n = int(RATE * chunk_s)
    for i in range(0, len(audio), n):
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm16(audio[i : i + n])).decode())


async def sdk_until(conn, kind: str, seen: list) -> object:
    """Events (parsed by the SDK) until one of `kind`."""
    while True:
        event = await asyncio.wait_for(conn.recv(), WAIT)
        seen.append(event)
        if event.type == kind:
            return event


async def conversation(conn, session: dict, question, names: dict) -> dict:
    """Configure, ask, get a whole reply; ask again, cancel it mid-reply, truncate it."""
    created = await sdk_until(conn, "session.created", [])
    await conn.session.update(session=session)
    updated = await sdk_until(conn, "session.updated", [])

    seen: list = []
    await say(conn, question("What is your name?", RATE))
    done = await sdk_until(conn, "response.done", seen)

    await say(conn, question("Tell me a joke.", RATE))
    cut: list = []
    first = await sdk_until(conn, names["transcript"], cut)  # as early as a reply shows: it is surely still going
    await conn.response.cancel()
    cancelled = await sdk_until(conn, "response.done", cut)
    await conn.conversation.item.truncate(item_id=first.item_id, content_index=0, audio_end_ms=100)
    truncated = await sdk_until(conn, "conversation.item.truncated", cut)
    return {"created": created, "updated": updated, "seen": seen, "done": done, "cut": cut, "cancelled": cancelled, "truncated": truncated}


def role(event) -> str | None:
    """The role of an event's item (the beta SDK leaves items of events it does not know as dicts)."""
    item = getattr(event, "item", None)
    return item.get("role") if isinstance(item, dict) else getattr(item, "role", None)


def check_reply(out: dict, names: dict) -> None:
    types = [e.type if role(e) in (None, "assistant") else "user item" for e in out["seen"]]
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
             "conversation.item.input_audio_transcription.completed", "response.created", names["item"], names["transcript"], names["audio"], "response.done"]
    positions = [types.index(t) for t in order]
    assert positions == sorted(positions), types
    transcript = next(e.transcript for e in out["seen"] if e.type == "conversation.item.input_audio_transcription.completed")
    assert "name" in transcript.lower()
    text = "".join(e.delta for e in out["seen"] if e.type == names["transcript"])
    audio = np.concatenate([np.frombuffer(base64.b64decode(e.delta), dtype="<i2") for e in out["seen"] if e.type == names["audio"]])
    assert text.strip() and len(audio) > 0.3 * RATE and np.abs(audio).max() > 1000
    done = out["done"].response
    assert done.status == "completed" and done.output[0].content[0].transcript == text

    cancelled = out["cancelled"].response
    assert cancelled.status == "cancelled" and "response.interrupted" in [e.type for e in out["cut"]]
    truncated = out["truncated"]
    assert truncated.item_id == cancelled.output[0].id and truncated.audio_end_ms == 100


def test_current_sdk_client_talks_to_the_server_unchanged(srv, question):
    async def run():
        async with client(srv).realtime.connect(model="gpt-realtime") as conn:
            return await conversation(conn, CURRENT_SESSION, question, CURRENT_NAMES)

    out = asyncio.run(run())
    s = out["updated"].session
    assert s.type == "realtime" and s.instructions == CURRENT_SESSION["instructions"] and s.output_modalities == ["audio"]
    assert s.audio.input.turn_detection.silence_duration_ms == 600 and s.audio.output.format.rate == RATE
    assert s.tools == [] and s.audio.output.voice != "marin"  # as it really is: no tools, the installed voice
    check_reply(out, CURRENT_NAMES)


def test_beta_sdk_client_gets_the_beta_names(srv, question):
    async def run():
        async with client(srv).beta.realtime.connect(model="gpt-4o-realtime-preview") as conn:
            return await conversation(conn, BETA_SESSION, question, BETA_NAMES)

    out = asyncio.run(run())
    s = out["updated"].session
    assert s.modalities == ["text", "audio"] and s.input_audio_format == "pcm16" and s.turn_detection.silence_duration_ms == 600
    check_reply(out, BETA_NAMES)
    assert not {e.type for e in out["seen"]} & {*CURRENT_NAMES.values(), "response.output_audio.done", "response.output_audio_transcript.done"}


def test_each_call_gets_a_prompt_built_from_its_own_instructions(srv):
    """Two Realtime sessions (current and flat shape) and a Twilio call, each with its own instructions."""
    mine = {"rt": "You sell bicycles.", "flat": "You are a pirate.", "phone": "You book tables."}
    _, _, twiml = http(srv, "/twiml?instructions=You%20book%20tables.", data=b"CallSid=CA1")
    assert '<Parameter name="instructions" value="You book tables."/>' in twiml

    def prompts() -> list[str]:
        tok = srv.agent.engine.tokenizer
        return [tok.decode(c.session.dialogue.prompt([{"role": "user", "content": "hi"}])) for c in srv.hub.connections if c.session]

    async def error_code(ws, session: dict) -> str:
        await ws.send(json.dumps({"type": "session.update", "session": session}))
        return (await until(ws, "error"))["error"]["code"]

    async def run():
        async with connect(srv.url("/v1/realtime")) as rt, connect(srv.url("/v1/realtime")) as flat:
            for ws, session in ((rt, {"type": "realtime", "instructions": mine["rt"]}), (flat, {"instructions": mine["flat"]})):
                await until(ws, "session.created")
                await ws.send(json.dumps({"type": "session.update", "session": session}))
                assert (await until(ws, "session.updated"))["session"]["instructions"] == session["instructions"]
            assert await error_code(rt, {"type": "realtime", "instructions": "so many words " * 500}) == "invalid_value"  # past the budget
            assert await error_code(flat, {"instructions": 42, "end_ms": 700}) == "invalid_value"
            phone = await connect(srv.url("/twilio/stream"))
            await phone.send(start_msg(instructions=mine["phone"]))
            await srv.wait_until(lambda: sum(c.session is not None for c in srv.hub.connections) == 3, "the phone call has no session")
            built = srv.in_loop(prompts)
            await phone.close()
            await flat.send(json.dumps({"type": "session.update", "session": {"instructions": ""}}))
            cleared = (await until(flat, "session.updated"))["session"]
            return built, cleared

    built, cleared = asyncio.run(run())
    for text in mine.values():
        assert sum(text in p for p in built) == 1, (text, built)
    assert all(sum(t in p for t in mine.values()) == 1 for p in built)
    assert cleared["instructions"] == "" and cleared["end_ms"] != 700  # the refused update changed nothing


def test_push_to_talk_in_g711(srv, question):
    """turn_detection null: silence does not end the turn, the commit does; μ-law in, A-law out."""
    session = {"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcmu"}, "turn_detection": None}, "output": {"format": {"type": "audio/pcma"}}}}

    async def run():
        async with connect(srv.url("/v1/realtime")) as ws:
            await until(ws, "session.created")
            await ws.send(json.dumps({"type": "session.update", "session": session}))
            s = (await until(ws, "session.updated"))["session"]
            assert s["audio"]["input"]["turn_detection"] is None and s["push_to_talk"] and s["audio"]["output"]["format"] == {"type": "audio/pcma"}
            ulaw = ulaw_encode(to_int16(question("What is your name?", 8000)))  # with the silence that would end a turn
            for i in range(0, len(ulaw), 800):
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(ulaw[i : i + 800]).decode()}))
            await ws.send(json.dumps({"type": "session.update", "session": {}}))  # answered once all the audio was heard
            before: list[dict] = []
            await until(ws, "session.updated", before)
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            await ws.send(json.dumps({"type": "response.create"}))
            after: list[dict] = []
            await until(ws, "response.done", after)
            return before, after

    before, after = asyncio.run(run())
    assert "input_audio_buffer.speech_started" in [m["type"] for m in before]
    assert "input_audio_buffer.speech_stopped" not in [m["type"] for m in before]
    assert [m["type"] for m in after].index("input_audio_buffer.committed") < [m["type"] for m in after].index("response.created")
    audio = alaw_decode(b"".join(base64.b64decode(m["delta"]) for m in after if m["type"] == "response.output_audio.delta"))
    assert len(audio) > 0.3 * 8000 and np.abs(audio).max() > 1000
    assert all(m["sample_rate"] == 8000 for m in after if m["type"] == "response.output_audio.delta")
