"""The Realtime WebSocket protocol, message by message, on the real `RealtimeConnection`: what a client
message does to the session, which mistakes get which error (and the session goes on), and the order
and shape of the events a reply becomes.

Only the socket and the session are stand-ins that record, so each case runs in milliseconds
(tests/test_realtime.py runs whole conversations over a live server, with the official client).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import json
import re

import numpy as np
import pytest

from agent import events as ev
from agent.hub import ServerSettings
from agent.transports.base import Close
from agent.transports.realtime import RealtimeConnection
from agent.transports.realtime_config import AudioFormat, Effective, describe
from tests.helpers import WAIT, ManualClock, RealtimeSession, ScriptedSocket

PCM = (np.arange(2400, dtype=np.int16) % 200 - 100).tobytes()  # 0.1 s of 24 kHz pcm16


@dataclasses.dataclass
class Hub:
    settings: ServerSettings = dataclasses.field(default_factory=ServerSettings)
    agent_sample_rate: int = 22050


def connect(authed: bool = True, beta: bool = False, messages: list[str | bytes] = (), settings: ServerSettings | None = None) -> RealtimeConnection:
    async def make() -> RealtimeConnection:
        conn = RealtimeConnection(ScriptedSocket(messages, silent=True), Hub(settings or ServerSettings()), authed=authed, beta=beta)
        conn.session = RealtimeSession()
        return conn

    return asyncio.run(make())


def sent(conn: RealtimeConnection) -> list[dict]:
    """Every message queued for the client so far (and taken off the queue)."""
    out = [json.loads(i.text) for i in conn.outbox._items if i.text]
    conn.outbox._items.clear()
    conn.outbox.audio_s = 0.0
    return out


def handle(conn: RealtimeConnection, *messages: dict | str | bytes) -> list[dict]:
    async def run() -> None:
        for m in messages:
            if isinstance(m, bytes):
                await conn.on_bytes(m)
            else:
                await conn.on_text(m if isinstance(m, str) else json.dumps(m))

    asyncio.run(run())
    return sent(conn)


# ---- the token as a first message ------------------------------------------------------------

SECURED = ServerSettings(token="s3cret")


def test_an_unauthenticated_connection_opens_on_a_session_auth_with_the_token():
    conn = connect(authed=False, messages=[json.dumps({"type": "session.auth", "token": "s3cret"})], settings=SECURED)
    asyncio.run(conn.open())


@pytest.mark.parametrize("first", [
    json.dumps({"type": "session.auth", "token": "wrong"}),
    json.dumps({"type": "session.update", "token": "s3cret"}),
    json.dumps({"token": "s3cret"}),
    "null",
    "{",
    b"s3cret",
    json.dumps({"type": "session.auth", "token": "s3cret"}).encode(),  # the right auth, but as a binary frame
])
def test_any_other_first_message_is_refused(first):
    conn = connect(authed=False, messages=[first], settings=SECURED)
    with pytest.raises(Close) as e:
        asyncio.run(conn.open())
    assert (e.value.code, e.value.error) == (1008, "unauthorized")
    assert e.value.reason == "unauthorized: send Authorization: Bearer TOKEN or a first message {type: session.auth, token}"


def test_no_first_message_in_time_is_refused():
    conn = connect(authed=False, settings=dataclasses.replace(SECURED, open_timeout_s=0.01))
    with pytest.raises(Close) as e:
        asyncio.run(conn.open())
    assert (e.value.code, e.value.error, e.value.reason) == (1008, "unauthorized", "unauthorized: no session.auth message in time")


def test_an_authenticated_connection_reads_nothing_before_the_session():
    conn = connect(messages=["{"])
    asyncio.run(conn.open())
    assert conn.ws.messages == ["{"]


# ---- client → session --------------------------------------------------------------------------

def test_appended_audio_reaches_the_session_in_quarter_second_slices():
    conn = connect()
    assert handle(conn, {"type": "input_audio_buffer.append", "audio": base64.b64encode(PCM * 4).decode()}) == []
    assert [(len(s), rate) for s, rate in conn.session.audio] == [(6000, 24000), (3600, 24000)]
    np.testing.assert_array_equal(np.concatenate([s for s, _ in conn.session.audio])[:2400], np.frombuffer(PCM, np.int16))


def test_a_long_append_is_taken_at_once_letting_the_loop_run_between_slices():
    conn = connect()
    conn.clock = ManualClock()  # never advanced: taking the audio must not wait for time to pass

    async def run() -> None:
        async def other_session() -> None:
            while True:
                conn.session.audio.append("other")
                await asyncio.sleep(0)

        other = asyncio.create_task(other_session())
        await asyncio.sleep(0)
        await asyncio.wait_for(conn.on_bytes(PCM * 20), WAIT)  # 2 s of audio in one message
        other.cancel()

    asyncio.run(run())
    order = ["other" if a == "other" else "slice" for a in conn.session.audio]
    slices = [i for i, a in enumerate(order) if a == "slice"]
    assert len(slices) == 8 and all("other" in order[i:j] for i, j in itertools.pairwise(slices))


def test_binary_frames_are_audio_too():
    conn = connect()
    handle(conn, PCM)
    assert sum(len(s) for s, _ in conn.session.audio) == 2400


@pytest.mark.parametrize("message,call", [
    ({"type": "input_audio_buffer.commit"}, ("commit", 24000)),
    ({"type": "response.cancel"}, ("flush",)),
    ({"type": "response.audio.played", "turn": 2, "audio_end_ms": 1500}, ("played", 2, 1.5)),
    ({"type": "conversation.item.truncate", "item_id": "item_3_agent", "content_index": 0, "audio_end_ms": 250}, ("played", 3, 0.25)),
    ({"type": "session.update", "session": {"instructions": "Speak French."}}, ("update", "Speak French.", {})),
])
def test_a_client_message_calls_its_session_method(message, call):
    conn = connect()
    handle(conn, message)
    assert conn.session.calls == [call]


def test_truncate_is_answered_with_truncated():
    conn = connect()
    [msg] = handle(conn, {"type": "conversation.item.truncate", "item_id": "item_3_agent", "content_index": 0, "audio_end_ms": 250})
    assert msg == {"type": "conversation.item.truncated", "turn": 3, "item_id": "item_3_agent", "content_index": 0, "audio_end_ms": 250,
                   "event_id": "event_1"}


def test_played_takes_its_turn_before_an_item_and_accepts_nothing_heard():
    conn = connect()
    handle(conn, {"type": "response.audio.played", "turn": 2, "item_id": "item_5_agent", "audio_end_ms": 0})
    assert conn.session.calls == [("played", 2, 0.0)]


def test_a_connection_speaks_the_current_api_unless_told_otherwise():
    async def make() -> RealtimeConnection:
        return RealtimeConnection(ScriptedSocket(), Hub(), authed=True)

    assert asyncio.run(make()).beta is False


def test_session_created_field_by_field():
    conn = connect()
    conn.started()
    [created] = sent(conn)
    sid = created["session"]["id"]
    assert re.fullmatch(r"sess_[0-9a-f]{16}", sid)
    live = conn.session.live_settings()
    assert created == {"type": "session.created", "turn": None, "event_id": "event_1", "session": describe(Effective(
        sid, "llm-x", "tts-y", "Be brief.", AudioFormat(), AudioFormat(), text_only=False, beta=False, denoise_steps=False,
        agent_sample_rate=22050, live=live))}


def test_a_beta_session_is_described_with_its_event_names():
    conn = connect(beta=True)
    conn.started()
    [created] = sent(conn)
    assert created["session"]["event_names"] == "beta"


def test_session_update_applies_what_it_says_and_answers_session_updated():
    conn = connect()
    conn.input, conn.output = AudioFormat("pcm16", 16000), AudioFormat("pcm16", 48000)
    [updated] = handle(conn, {"type": "session.update", "session": {
        "input_audio_format": "pcm16", "output_audio_format": "pcm16", "modalities": ["text"], "max_response_output_tokens": "inf",
        "voice": "tts-y", "event_names": "current", "barge_in_ms": 300}})
    assert conn.session.calls == [("update", None, {"max_new_tokens": 48, "barge_in_ms": 300})]
    assert (conn.input, conn.output, conn.text_only, conn.beta) == (AudioFormat("pcm16", 16000), AudioFormat("pcm16", 48000), True, False)
    assert (updated["type"], updated["turn"], updated["event_id"]) == ("session.updated", None, "event_1")
    assert updated["session"]["output_modalities"] == ["text"] and updated["session"]["output_sample_rate"] == 48000
    handle(conn, {"type": "session.update", "session": {"input_audio_format": "g711_ulaw", "denoise_steps": True}})
    assert (conn.input, conn.output, conn.text_only, conn.denoise_steps) == (AudioFormat("pcmu", 8000), AudioFormat("pcm16", 48000), True, True)


def test_response_create_and_a_repeated_auth_change_nothing():
    conn = connect()
    assert handle(conn, {"type": "response.create"}, {"type": "session.auth", "token": "x"}) == []
    assert conn.session.calls == []


MISTAKES = {  # the message, its error code, the event it names, the error's message (a prefix where it ends in "...")
    "not JSON": ("{", "invalid_json", None, "the message is not valid JSON"),
    "nested past the parser": ("[" * 10_000, "invalid_json", None, "the message is not valid JSON"),
    "not an object": (json.dumps(["session.update"]), "invalid_event", None, "a message must be a JSON object with a string 'type'"),
    "no type": (json.dumps({"event_id": "e1"}), "invalid_event", None, "a message must be a JSON object with a string 'type'"),
    "type not a string": (json.dumps({"type": 1}), "invalid_event", None, "a message must be a JSON object with a string 'type'"),
    "unknown type": (json.dumps({"type": "response.dance", "event_id": "e7"}), "unknown_event", "response.dance", "unknown event type 'response.dance'"),
    "audio not base64": (json.dumps({"type": "input_audio_buffer.append", "audio": "%%%", "event_id": "e2"}), "invalid_audio", "input_audio_buffer.append", "'audio' must be base64-encoded audio in the session's input format"),
    "audio not a string": (json.dumps({"type": "input_audio_buffer.append", "audio": 5}), "invalid_audio", "input_audio_buffer.append", "'audio' must be base64-encoded audio in the session's input format"),
    "audio not ASCII": (json.dumps({"type": "input_audio_buffer.append", "audio": "ÿÿÿÿ"}), "invalid_audio", "input_audio_buffer.append", "'audio' must be base64-encoded audio in the session's input format"),
    "half a sample": (json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x01\x02\x03").decode()}), "invalid_audio", None,
                      "pcm16 audio has an even number of bytes, got 3"),
    "played without turn": (json.dumps({"type": "response.audio.played", "audio_end_ms": 5}), "invalid_value", "response.audio.played", "needs 'item_id' (an agent item) or 'turn' (int), and 'audio_end_ms' (a finite number >= 0)"),
    "played turn not int": (json.dumps({"type": "response.audio.played", "turn": True, "audio_end_ms": 5}), "invalid_value", "response.audio.played", "needs 'item_id' (an agent item) or 'turn' (int), and 'audio_end_ms' (a finite number >= 0)"),
    "played negative": (json.dumps({"type": "response.audio.played", "turn": 1, "audio_end_ms": -1}), "invalid_value", "response.audio.played", "needs 'item_id' (an agent item) or 'turn' (int), and 'audio_end_ms' (a finite number >= 0)"),
    "played not finite": ('{"type": "response.audio.played", "turn": 1, "audio_end_ms": Infinity}', "invalid_value", "response.audio.played", "needs 'item_id' (an agent item) or 'turn' (int), and 'audio_end_ms' (a finite number >= 0)"),
    "played not a number": (json.dumps({"type": "response.audio.played", "turn": 1, "audio_end_ms": "5"}), "invalid_value", "response.audio.played", "needs 'item_id' (an agent item) or 'turn' (int), and 'audio_end_ms' (a finite number >= 0)"),
    "truncate of a user item": (json.dumps({"type": "conversation.item.truncate", "item_id": "item_3_user", "audio_end_ms": 5}), "invalid_value",
                                "conversation.item.truncate", "needs 'item_id' (an agent item) or 'turn' (int), and 'audio_end_ms' (a finite number >= 0)"),
    "truncate of no item": (json.dumps({"type": "conversation.item.truncate", "item_id": 3, "audio_end_ms": 5}), "invalid_value", "conversation.item.truncate", "needs 'item_id' (an agent item) or 'turn' (int), and 'audio_end_ms' (a finite number >= 0)"),
    "update without session": (json.dumps({"type": "session.update", "session": "fast"}), "invalid_event", "session.update", "session.update needs a 'session' object"),
    "update of an unknown key": (json.dumps({"type": "session.update", "session": {"volume": 11}}), "invalid_value", "session.update",
                                 "unknown setting(s): volume (known: ..."),
    "update of a bad value": (json.dumps({"type": "session.update", "session": {"voice": "bob"}}), "invalid_value", "session.update",
                              'voice must be "tts-y" (the installed voice) or one of the Realtime API\'s names'),
}


@pytest.mark.parametrize("name", MISTAKES)
def test_a_mistake_gets_its_error_naming_the_event_and_changes_nothing(name):
    text, code, event, message = MISTAKES[name]
    msg_type = json.loads(text).get("type") if text.startswith("{") and code != "invalid_json" else None
    conn = connect()
    [msg] = handle(conn, text)
    assert msg["type"] == "error" and msg["turn"] is None
    error = msg["error"]
    assert (error["type"], error["code"], error["event"]) == ("invalid_request_error", code, event)
    # the client's event_id is named once the message has a type to name it by
    assert error["event_id"] == (json.loads(text).get("event_id") if isinstance(msg_type, str) else None)
    assert error["message"].startswith(message[:-3]) if message.endswith("...") else error["message"] == message
    assert conn.session.calls == [] and conn.session.audio == []


def test_an_error_names_the_event_id_of_its_own_message_only():
    conn = connect()
    handle(conn, {"type": "response.create", "event_id": "e1"})
    [msg] = handle(conn, {"type": "response.dance"})
    assert msg["error"]["event_id"] is None
    [msg] = handle(conn, {"type": "response.dance", "event_id": 5})  # not a string: not echoed
    assert msg["error"]["event_id"] is None


# ---- session → client --------------------------------------------------------------------------

def audio(turn: int, seconds: float = 0.1, rate: int = 24000) -> ev.AgentAudio:
    return ev.AgentAudio(turn, np.full(int(seconds * rate), 0.1, np.float32), rate, "Hi there.", 0)


def emit(conn: RealtimeConnection, *events: ev.Event) -> list[dict]:
    for e in events:
        conn.on_event(e)
    return sent(conn)


def test_a_reply_opens_its_response_before_the_first_delta_and_closes_it_after_the_last():
    conn = connect()
    msgs = emit(conn, ev.AgentText(4, "Hi there."), audio(4), audio(4, 0.2), ev.ResponseDone(4, "Hi there."))
    assert [m["type"] for m in msgs] == [
        "response.created", "response.output_item.added", "conversation.item.added", "response.content_part.added",
        "response.output_audio_transcript.delta", "response.output_audio.delta", "response.output_audio.delta",
        "response.output_audio.done", "response.output_audio_transcript.done", "response.content_part.done",
        "response.output_item.done", "conversation.item.done", "response.done",
    ]
    assert all(m["turn"] == 4 for m in msgs)
    assert [m["event_id"] for m in msgs] == [f"event_{i}" for i in range(1, len(msgs) + 1)]
    deltas = [m for m in msgs if m["type"] == "response.output_audio.delta"]
    assert [d["audio_start_ms"] for d in deltas] == [0, 100]
    assert [len(base64.b64decode(d["delta"])) for d in deltas] == [4800, 9600]
    assert all((d["response_id"], d["item_id"]) == ("resp_4", "item_4_agent") for d in deltas)
    done = msgs[-1]["response"]
    assert (done["id"], done["status"], done["status_details"]) == ("resp_4", "completed", None)
    assert done["output"][0]["content"] == [{"type": "output_audio", "transcript": "Hi there."}]
    assert msgs[2]["previous_item_id"] == "item_4_user"


def without_ids(msgs: list[dict]) -> list[dict]:
    assert [m.pop("event_id") for m in msgs] == [f"event_{i}" for i in range(1, len(msgs) + 1)]
    return msgs


def agent_item(status: str, content: list[dict]) -> dict:
    return {"id": "item_3_agent", "object": "realtime.item", "type": "message", "role": "assistant", "status": status, "content": content}


def response(status: str, output: list[dict], details: dict | None = None, modalities: tuple[str, ...] = ("audio",)) -> dict:
    return {"id": "resp_3", "object": "realtime.response", "status": status, "status_details": details, "output": output,
            "output_modalities": list(modalities), "conversation_id": "sess_1", "usage": None}


IDS = {"turn": 3, "response_id": "resp_3", "item_id": "item_3_agent", "output_index": 0, "content_index": 0}


def test_a_turn_field_by_field():
    """Every field of a whole turn's events as the Realtime API reference gives them (a stock client reads them)."""
    conn = connect()
    conn.id = "sess_1"
    msgs = without_ids(emit(conn, ev.SpeechStarted(3, 1200), ev.SpeechStopped(3, 2400), ev.Transcript(3, "hello", 1.2004),
                            ev.AgentText(3, "Hi there."), ev.ResponseDone(3, "Hi there."), ev.TurnMetrics(3, {"v2v_ms": 500})))
    user = {"id": "item_3_user", "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
            "content": [{"type": "input_audio", "transcript": None}]}
    said = agent_item("completed", [{"type": "output_audio", "transcript": "Hi there."}])
    assert msgs == [
        {"type": "input_audio_buffer.speech_started", "turn": 3, "audio_start_ms": 1200, "item_id": "item_3_user"},
        {"type": "input_audio_buffer.speech_stopped", "turn": 3, "audio_end_ms": 2400, "item_id": "item_3_user"},
        {"type": "input_audio_buffer.committed", "turn": 3, "item_id": "item_3_user", "previous_item_id": None},
        {"type": "conversation.item.added", "turn": 3, "item": user, "previous_item_id": None},
        {"type": "conversation.item.done", "turn": 3, "item": user, "previous_item_id": None},
        {"type": "conversation.item.input_audio_transcription.completed", "turn": 3, "item_id": "item_3_user", "content_index": 0,
         "transcript": "hello", "usage": {"type": "duration", "seconds": 1.2}},
        {"type": "response.created", "turn": 3, "response_id": "resp_3", "response": response("in_progress", [])},
        {"type": "response.output_item.added", "turn": 3, "response_id": "resp_3", "output_index": 0, "item": agent_item("in_progress", [])},
        {"type": "conversation.item.added", "turn": 3, "item": agent_item("in_progress", []), "previous_item_id": "item_3_user"},
        {"type": "response.content_part.added", **IDS, "part": {"type": "audio", "transcript": ""}},
        {"type": "response.output_audio_transcript.delta", **IDS, "delta": "Hi there."},
        {"type": "response.output_audio.done", **IDS},
        {"type": "response.output_audio_transcript.done", **IDS, "transcript": "Hi there."},
        {"type": "response.content_part.done", **IDS, "part": {"type": "audio", "transcript": "Hi there."}},
        {"type": "response.output_item.done", "turn": 3, "response_id": "resp_3", "output_index": 0, "item": said},
        {"type": "conversation.item.done", "turn": 3, "item": said, "previous_item_id": "item_3_user"},
        {"type": "response.done", "turn": 3, "response_id": "resp_3", "response": response("completed", [said])},
        {"type": "turn.metrics", "turn": 3, "timeline": {"v2v_ms": 500}, "response_id": "resp_3"},
    ]


def test_an_audio_delta_field_by_field():
    conn = connect()
    conn.output = AudioFormat("pcm16", 16000)
    emit(conn, ev.AgentText(3, "Hi."))
    conn.on_event(ev.AgentAudio(3, np.full(16000, 0.5, np.float32), 16000, "Hi.", 2))
    conn.on_event(ev.AgentAudio(3, np.full(800, 0.5, np.float32), 16000, "Hi.", 2))
    first, second = [json.loads(i.text) for i in conn.outbox._items if i.text][-2:]
    pcm = np.frombuffer(base64.b64decode(first.pop("delta")), "<i2")
    assert len(pcm) == 16000 and np.all(np.abs(pcm - 0.5 * 32767) <= 1)
    assert first == {"type": "response.output_audio.delta", **IDS, "sample_rate": 16000, "audio_start_ms": 0, "text": "Hi.", "sentence": 2,
                     "event_id": first["event_id"]}
    assert second["audio_start_ms"] == 1000 and len(base64.b64decode(second["delta"])) == 1600
    assert [(i.audio_s, i.turn) for i in conn.outbox._items if i.playback] == [(1.0, 3), (0.05, 3)]


def test_a_g711_delta_is_one_byte_a_sample_at_8khz():
    conn = connect()
    conn.output = AudioFormat("pcmu", 8000)
    conn.on_event(ev.AgentAudio(3, np.full(2400, 0.5, np.float32), 24000, "Hi.", 0))
    conn.on_event(ev.AgentAudio(3, np.full(2400, 0.5, np.float32), 24000, "Hi.", 0))
    deltas = [json.loads(i.text) for i in conn.outbox._items if i.playback]
    assert [len(base64.b64decode(d["delta"])) for d in deltas] == [800, 800]
    assert [d["audio_start_ms"] for d in deltas] == [0, 100] and deltas[0]["sample_rate"] == 8000


def test_a_text_only_reply_field_by_field():
    conn = connect()
    conn.id, conn.text_only = "sess_1", True
    msgs = without_ids(emit(conn, ev.AgentText(3, "Hi."), ev.ResponseDone(3, "Hi.")))
    said = agent_item("completed", [{"type": "output_text", "text": "Hi."}])
    text = ("text",)
    assert msgs == [
        {"type": "response.created", "turn": 3, "response_id": "resp_3", "response": response("in_progress", [], modalities=text)},
        {"type": "response.output_item.added", "turn": 3, "response_id": "resp_3", "output_index": 0, "item": agent_item("in_progress", [])},
        {"type": "conversation.item.added", "turn": 3, "item": agent_item("in_progress", []), "previous_item_id": "item_3_user"},
        {"type": "response.content_part.added", **IDS, "part": {"type": "text", "text": ""}},
        {"type": "response.output_text.delta", **IDS, "delta": "Hi."},
        {"type": "response.output_text.done", **IDS, "text": "Hi."},
        {"type": "response.content_part.done", **IDS, "part": {"type": "text", "text": "Hi."}},
        {"type": "response.output_item.done", "turn": 3, "response_id": "resp_3", "output_index": 0, "item": said},
        {"type": "conversation.item.done", "turn": 3, "item": said, "previous_item_id": "item_3_user"},
        {"type": "response.done", "turn": 3, "response_id": "resp_3", "response": response("completed", [said], modalities=text)},
    ]


def test_an_interrupted_reply_field_by_field():
    conn = connect()
    conn.id = "sess_1"
    msgs = without_ids(emit(conn, ev.AgentText(3, "Well"), ev.Interrupted(3), ev.ResponseDone(3, "Well", interrupted=True)))
    cut = agent_item("incomplete", [{"type": "output_audio", "transcript": "Well"}])
    assert msgs[5:] == [
        {"type": "response.interrupted", "turn": 3, "response_id": "resp_3"},
        {"type": "response.output_audio.done", **IDS},
        {"type": "response.output_audio_transcript.done", **IDS, "transcript": "Well"},
        {"type": "response.content_part.done", **IDS, "part": {"type": "audio", "transcript": "Well"}},
        {"type": "response.output_item.done", "turn": 3, "response_id": "resp_3", "output_index": 0, "item": cut},
        {"type": "conversation.item.done", "turn": 3, "item": cut, "previous_item_id": "item_3_user"},
        {"type": "response.done", "turn": 3, "response_id": "resp_3",
         "response": response("cancelled", [cut], {"type": "cancelled", "reason": "turn_detected"})},
    ]


def test_the_greeting_follows_no_user_item_and_beta_items_say_audio():
    conn = connect(beta=True)
    msgs = emit(conn, ev.AgentText(0, "Hello."), ev.ResponseDone(0, "Hello."))
    assert [m["previous_item_id"] for m in msgs if "previous_item_id" in m] == [None, None]
    assert msgs[-1]["response"]["output"][0]["content"] == [{"type": "audio", "transcript": "Hello."}]
    conn.text_only = True
    msgs = emit(conn, ev.AgentText(1, "Hi."), ev.ResponseDone(1, "Hi."))
    assert msgs[-1]["response"]["output"][0]["content"] == [{"type": "text", "text": "Hi."}]
    assert [m["type"] for m in msgs][4:6] == ["response.text.delta", "response.text.done"]


def test_the_projects_events_field_by_field():
    conn = connect()
    conn.denoise_steps = True
    msgs = without_ids(emit(conn, ev.Speculation(2, "started"), ev.DenoiseStep(2, 1, 3, 4, [0, 2], ["Hi", "."], 5),
                            ev.TurnContinued(3, 2), ev.Error(2, "engine_busy", "try again"), ev.HangUp(None, "idle")))
    assert msgs[0] == {"type": "turn.speculation", "turn": 2, "action": "started"}
    assert msgs[5] == {"type": "response.denoise.step", "turn": 2, "block": 1, "step": 3, "block_size": 4, "positions": [0, 2],
                       "tokens": ["Hi", "."], "masked_left": 5, "response_id": "resp_2"}
    assert msgs[6:9] == [  # turn 3 continues turn 2: its user item and the reply it cut short leave the conversation
        {"type": "conversation.item.deleted", "turn": 3, "item_id": "item_2_user"},
        {"type": "conversation.item.deleted", "turn": 3, "item_id": "item_2_agent"},
        {"type": "turn.continued", "turn": 3, "previous": 2},
    ]
    assert msgs[9:] == [
        {"type": "error", "turn": 2, "error": {"type": "server_error", "code": "engine_busy", "message": "try again", "param": None,
                                               "event_id": None, "event": None}},
        {"type": "session.hangup", "turn": None, "reason": "idle"},
    ]


def test_an_interrupted_reply_is_cancelled_and_its_unsent_audio_dropped():
    conn = connect()
    conn.on_event(audio(2))
    conn.on_event(ev.Interrupted(2))
    assert conn.session.calls == [("played", 2, 0.0)]  # nothing written to the socket: nothing heard
    msgs = sent(conn)
    assert "response.output_audio.delta" not in [m["type"] for m in msgs]
    assert msgs[-1]["type"] == "response.interrupted"
    [done] = emit(conn, ev.ResponseDone(2, "Hi", interrupted=True))[-1:]
    assert done["response"]["status"] == "cancelled" and done["response"]["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    assert done["response"]["output"][0]["status"] == "incomplete"


def test_an_interruption_reports_what_the_client_was_sent_of_its_turn():
    conn = connect()
    conn.written = (2, 0.5)  # the writer has sent 0.5 s of turn 2
    conn.on_event(ev.Interrupted(2))
    assert conn.session.calls == [("played", 2, 0.5)]


def test_a_done_response_leaves_nothing_open():
    conn = connect()
    emit(conn, ev.AgentText(1, "Hi."), audio(1), ev.ResponseDone(1, "Hi."))
    assert conn._replies == {}


def test_text_only_sends_text_deltas_and_no_audio():
    conn = connect()
    conn.text_only = True
    msgs = emit(conn, ev.AgentText(1, "Hi."), audio(1), ev.ResponseDone(1, "Hi."))
    types_ = [m["type"] for m in msgs]
    assert "response.output_text.delta" in types_ and "response.output_text.done" in types_
    assert not any("audio" in t for t in types_)
    assert msgs[-1]["response"]["output_modalities"] == ["text"]


def test_beta_clients_get_beta_names():
    conn = connect(beta=True)
    msgs = emit(conn, ev.AgentText(1, "Hi."), audio(1), ev.ResponseDone(1, "Hi."))
    types_ = [m["type"] for m in msgs]
    assert "response.audio.delta" in types_ and "response.audio_transcript.delta" in types_ and "conversation.item.created" in types_
    assert "response.output_audio.delta" not in types_
    assert types_[0] == "response.created" and types_[-1] == "response.done"  # names the beta shares keep them
    assert msgs[-1]["response"]["output"][0]["content"][0]["type"] == "audio"


def test_denoise_steps_are_opt_in():
    step = ev.DenoiseStep(1, 0, 0, 4, [0, 1], ["Hi", "."], 2)
    conn = connect()
    assert emit(conn, step) == []
    conn.denoise_steps = True
    msgs = emit(conn, step)
    assert msgs[-1]["type"] == "response.denoise.step" and msgs[-1]["tokens"] == ["Hi", "."] and msgs[-1]["response_id"] == "resp_1"


def test_user_speech_becomes_the_user_item():
    conn = connect()
    msgs = emit(conn, ev.SpeechStarted(5, 1200), ev.SpeechStopped(5, 2400), ev.Transcript(5, "hello", 1.2))
    assert [m["type"] for m in msgs] == [
        "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
        "conversation.item.added", "conversation.item.done", "conversation.item.input_audio_transcription.completed",
    ]
    assert (msgs[0]["audio_start_ms"], msgs[1]["audio_end_ms"]) == (1200, 2400)
    assert {m.get("item_id") or m["item"]["id"] for m in msgs} == {"item_5_user"}
    assert msgs[-1]["transcript"] == "hello"


def test_a_server_error_and_a_hangup():
    conn = connect()
    [err] = emit(conn, ev.Error(None, "engine_busy", "try again"))
    assert err["error"]["type"] == "server_error" and err["error"]["code"] == "engine_busy"
    conn.on_event(ev.HangUp(None, "idle"))
    *said, last = list(conn.outbox._items)
    assert json.loads(said[-1].text)["type"] == "session.hangup" and json.loads(said[-1].text)["reason"] == "idle"
    assert last.close is not None and (last.close.code, last.close.reason) == (1000, "session ended: idle")


def test_farewell_is_an_error_event_naming_the_close():
    async def run() -> dict:
        conn = RealtimeConnection(ScriptedSocket(), Hub(), authed=True)
        await conn.farewell(Close(1008, "client is not reading", "queue_full"))
        [msg] = conn.ws.sent
        return msg

    msg = asyncio.run(run())
    assert msg == {"type": "error", "turn": None, "event_id": "event_1", "error": {
        "type": "server_error", "code": "queue_full", "message": "client is not reading", "param": None, "event_id": None, "event": None}}


# ---- against the official SDK's types ----------------------------------------------------------

EXTENSIONS = {"turn.metrics", "turn.speculation", "turn.continued", "response.denoise.step", "response.interrupted", "session.hangup"}


@pytest.mark.parametrize("text_only", [False, True])
def test_every_server_event_validates_as_the_official_sdks_type(text_only):
    """What a stock client parses: each event the connection sends validates against the `openai`
    package's RealtimeServerEvent (required fields, types, literal values); extensions are the project's."""
    import pydantic
    from openai.types.realtime import RealtimeServerEvent

    adapter = pydantic.TypeAdapter(RealtimeServerEvent)
    conn = connect()
    conn.text_only = text_only
    conn.started()
    msgs = sent(conn)
    msgs += emit(conn, ev.SpeechStarted(1, 500), ev.SpeechStopped(1, 2000), ev.Transcript(1, "hello", 1.5), ev.AgentText(1, "Hi there."),
                 audio(1), ev.ResponseDone(1, "Hi there."), ev.TurnMetrics(1, {}), ev.AgentText(2, "Well"), audio(2),
                 ev.Interrupted(2), ev.ResponseDone(2, "Well", interrupted=True), ev.TurnContinued(3, 2), ev.Error(2, "engine_busy", "try again"))
    msgs += handle(conn, {"type": "conversation.item.truncate", "item_id": "item_1_agent", "content_index": 0, "audio_end_ms": 300},
                   {"type": "session.update", "session": {"instructions": "Be brief."}}, {"type": "response.dance"})
    checked = [m for m in msgs if m["type"] not in EXTENSIONS]
    assert {m["type"] for m in checked} >= {"session.created", "session.updated", "response.created", "response.done", "error",
                                           "conversation.item.truncated", "input_audio_buffer.speech_started", "conversation.item.deleted"}
    for m in checked:
        parsed = adapter.validate_python(m)
        assert parsed.type == m["type"] and parsed.event_id == m["event_id"]
