"""What every WebSocket transport shares (agent/transports/base.py), on the real classes and a real Hub:
the outbox and its limit, reading and writing the socket, and a call's life from accept to close —
whatever ends it, the session slot is given back and the client is told why.

Only the socket and the agent are stand-ins (tests/helpers.py's ScriptedSocket and RealtimeSession),
so each case runs in milliseconds; tests/test_server.py and test_reliability.py do the same over a
live server.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from starlette.websockets import WebSocketDisconnect

from agent import events as ev
from agent.hub import Hub
from agent.transports import base
from agent.transports.base import ClientGone, Close, Connection, Outbox, Outgoing
from agent.transports.realtime import RealtimeConnection
from tests.helpers import ScriptedSocket, settle
from tests.helpers import stub_hub as hub

# ---- the outbox ------------------------------------------------------------------------------


async def test_the_outbox_holds_reply_audio_up_to_its_limit_and_counts_what_leaves():
    box = Outbox(max_audio_s=1.0)
    box.put(Outgoing("a", 1, 0.75, playback=True))
    box.put(Outgoing("b", 1, 0.25, playback=True))  # exactly the limit: still queued
    with pytest.raises(Close) as full:
        box.put(Outgoing("c", 1, 0.125, playback=True))
    assert (full.value.code, full.value.error, full.value.reason) == (1008, "queue_full", "client is not reading: over 1 s of reply audio queued")
    assert str(full.value) == full.value.reason
    box.put(Outgoing("first"), front=True)
    assert box.audio_s == 1.0
    assert [(await box.get()).text for _ in range(2)] == ["first", "a"] and box.audio_s == 0.25
    assert (await box.get()).text == "b" and box.audio_s == 0.0


def test_dropping_a_turn_drops_only_its_playback():
    box = Outbox(max_audio_s=10.0)
    for item in (Outgoing("t1 audio", 1, 0.5, playback=True), Outgoing("t1 done", 1), Outgoing("t2 audio", 2, 0.25, playback=True)):
        box.put(item)
    box.drop(1)
    assert [i.text for i in box._items] == ["t1 done", "t2 audio"] and box.audio_s == 0.25 and box.dropped == {1}


# ---- reading and writing the socket ---------------------------------------------------------


class Socket(ScriptedSocket):
    """Hands out raw ASGI messages; its writes block, fail, or are kept."""

    def __init__(self, *received: dict, send_fails: BaseException | None = None, send_blocks: bool = False) -> None:
        super().__init__()
        self.received, self.send_fails, self.send_blocks = list(received), send_fails, send_blocks

    async def receive(self) -> dict:
        return self.received.pop(0)

    async def send_text(self, text: str) -> None:
        if self.send_blocks:
            await asyncio.sleep(3600)
        if self.send_fails:
            raise self.send_fails
        await super().send_text(text)


@pytest.mark.parametrize("message,data", [
    ({"type": "websocket.receive", "text": "hi"}, "hi"),
    ({"type": "websocket.receive", "bytes": b"\x01\x02"}, b"\x01\x02"),
    ({"type": "websocket.receive", "text": None, "bytes": None}, b""),
])
async def test_receive_gives_a_message_as_text_or_bytes(message, data):
    assert await Connection(Socket(message), hub()).receive() == data


async def test_receive_turns_a_disconnect_into_client_gone():
    with pytest.raises(ClientGone):
        await Connection(Socket({"type": "websocket.disconnect", "code": 1006}), hub()).receive()


async def test_a_write_the_client_does_not_take_in_time_closes_with_slow_client():
    conn = Connection(Socket(send_blocks=True), hub(send_timeout_s=0.01))
    async with asyncio.timeout(30):  # the write's own timeout ends it long before
        with pytest.raises(Close) as slow:
            await conn.send("{}")
    assert (slow.value.code, slow.value.error, slow.value.reason) == (1008, "slow_client", "client stopped reading: a write waited 0.01 s")


@pytest.mark.parametrize("failure", [WebSocketDisconnect(1006), OSError("reset"), RuntimeError("closed by the server")])
async def test_a_write_to_a_vanished_client_is_client_gone(failure):
    with pytest.raises(ClientGone):
        await Connection(Socket(send_fails=failure), hub()).send("{}")


async def test_the_writer_counts_the_reply_audio_written_of_each_turn():
    ws = Socket()
    conn = Connection(ws, hub())
    writer = asyncio.create_task(conn._write())
    for turn, seconds in ((1, 0.5), (1, 0.25)):
        conn.outbox.put(Outgoing(json.dumps({"turn": turn}), turn, seconds, playback=True))
    await settle()
    assert conn.written == (1, 0.75) and conn.heard(1) == 0.75
    conn.outbox.put(Outgoing(json.dumps({"turn": 2}), 2, 0.125, playback=True))
    await settle()
    assert conn.written == (2, 0.125) and (conn.heard(1), conn.heard(2)) == (0.0, 0.125)
    conn.outbox.drop(2)
    conn.outbox.put(Outgoing(json.dumps({"turn": 2, "late": True}), 2, 0.125, playback=True))  # queued after the drop: never written
    conn.outbox.put(Outgoing(json.dumps({"turn": 3}), 3))
    await settle()
    assert ws.sent == [{"turn": 1}, {"turn": 1}, {"turn": 2}, {"turn": 3}]
    writer.cancel()


# ---- a call's life ---------------------------------------------------------------------------


def connection(h: Hub, messages: list[str] = (), silent: bool = True, authed: bool = True) -> RealtimeConnection:
    return RealtimeConnection(ScriptedSocket(messages, silent=silent), h, authed=authed)


async def started(conn: RealtimeConnection) -> asyncio.Task:
    """The call served in a task, once its session has started."""
    task = asyncio.create_task(conn.serve())
    for _ in range(1000):
        if conn.session is not None:
            return task
        await asyncio.sleep(0)
    raise AssertionError("the session never started")


def ends(h: Hub, conn: RealtimeConnection) -> None:
    """After any call: finished, its slot given back, no longer among the hub's connections, no session left."""
    assert conn.finished.is_set() and h.active_sessions == 0 and h.connections == set() and conn.session is None


async def test_a_client_that_hangs_up_gives_its_slot_back_and_gets_no_close():
    h = hub(max_sessions=1)
    conn = connection(h, [json.dumps({"type": "response.create"})], silent=False)
    await conn.serve()
    assert conn.ws.accepted and conn.ws.closed is None and len(h._agent.sessions) == 1
    ends(h, conn)


async def test_a_stopped_call_holds_its_slot_until_then_and_closes_with_1001():
    h = hub(max_sessions=1)
    conn = connection(h)
    task = await started(conn)
    assert h.active_sessions == 1 and h.connections == {conn} and h.full
    conn.stop(1001, "server shutting down")
    conn.stop(1012, "restarting")  # the first stop stands
    await task
    assert conn.ws.closed == (1001, "server shutting down")
    assert conn.ws.sent[-1]["error"]["code"] == "server_shutdown"  # last words before a non-normal close
    ends(h, conn)


async def test_no_free_slot_closes_with_1013_and_says_so():
    h = hub(max_sessions=1)
    h.active_sessions = 1  # another call holds the only slot
    conn = connection(h)
    await conn.serve()
    assert conn.ws.closed == (1013, "server busy: all 1 sessions are in use, try again later")
    assert [m["error"]["code"] for m in conn.ws.sent] == ["session_limit"] and h._agent.sessions == []
    h.active_sessions = 0
    ends(h, conn)


async def test_a_failing_session_closes_with_1011_and_the_rest_of_the_server_goes_on():
    h = hub()
    conn = connection(h)
    task = await started(conn)
    conn.session.outgoing.put_nowait(RuntimeError("a bug"))
    await task
    assert conn.ws.closed == (1011, "internal server error") and conn.ws.sent[-1]["error"]["code"] == "internal_error"
    ends(h, conn)
    again = connection(h)
    task = await started(again)  # the slot is free for the next caller
    again.stop(1001, "bye")
    await task
    ends(h, again)


async def test_a_refused_token_closes_before_any_session():
    h = hub(token="s3cret")
    conn = connection(h, [json.dumps({"type": "session.auth", "token": "wrong"})], authed=False)
    await conn.serve()
    assert conn.ws.closed[0] == 1008 and conn.ws.sent[-1]["error"]["code"] == "unauthorized" and h._agent.sessions == []
    ends(h, conn)


async def test_a_hangup_closes_with_1000_and_no_error_event():
    h = hub()
    conn = connection(h)
    task = await started(conn)
    conn.session.outgoing.put_nowait(ev.HangUp(None, "idle"))
    await task
    assert conn.ws.closed == (1000, "session ended: idle")
    assert [m["type"] for m in conn.ws.sent] == ["session.created", "session.hangup"]
    ends(h, conn)


async def test_a_client_that_stops_reading_gets_no_last_words():
    h = hub(send_timeout_s=0.01)

    class Stuck(ScriptedSocket):
        async def send_text(self, text: str) -> None:
            await asyncio.sleep(3600)

    conn = RealtimeConnection(Stuck(silent=True), h, authed=True)
    async with asyncio.timeout(20):  # a farewell would wait for the close linger (30 s): it must not be tried
        await conn.serve()
    assert conn.ws.closed == (1008, "client stopped reading: a write waited 0.01 s")
    ends(h, conn)


@pytest.mark.parametrize("reason,sent", [("x" * 200, "x" * 120), ("x" + "é" * 100, "x" + "é" * 59)])  # bytes, not characters; no half a character
async def test_a_close_reason_is_cut_to_fit_a_close_frame(reason, sent):
    h = hub()
    conn = connection(h)
    task = await started(conn)
    conn.stop(1001, reason)  # a close frame's reason holds 123 bytes
    await task
    assert conn.ws.closed == (1001, sent)
    ends(h, conn)


async def test_a_call_reads_text_and_binary_messages():
    h = hub()
    pcm = (np.arange(2400) % 50).astype("<i2").tobytes()
    conn = connection(h, [json.dumps({"type": "session.update", "session": {"instructions": "Be brief."}}), pcm], silent=False)
    session = None

    async def keep() -> None:
        nonlocal session
        while conn.session is None:
            await asyncio.sleep(0)
        session = conn.session

    keeper = asyncio.create_task(keep())
    await conn.serve()
    await keeper
    assert session.calls == [("update", "Be brief.", {})] and sum(len(a) for a, _ in session.audio) == 2400
    ends(h, conn)


async def test_a_client_whose_close_never_completes_is_dropped_after_the_linger(monkeypatch):
    monkeypatch.setattr(base, "CLOSE_LINGER_S", 0.05)
    h = hub()

    class Deaf(ScriptedSocket):
        async def close(self, code: int, reason: str) -> None:
            await asyncio.sleep(3600)

    conn = RealtimeConnection(Deaf(silent=True), h, authed=True)
    task = await started(conn)
    conn.stop(1001, "bye")
    async with asyncio.timeout(30):
        await task
    ends(h, conn)


async def test_a_task_that_ignores_its_cancellation_is_left_behind_not_waited_for(monkeypatch, caplog):
    monkeypatch.setattr(base, "CANCEL_GRACE_S", 0.05)
    h = hub()
    release = asyncio.Event()

    class Stubborn(RealtimeConnection):
        async def _pump(self) -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await release.wait()  # a bug: it goes on after being cancelled

    conn = Stubborn(ScriptedSocket(silent=True), h, authed=True)
    task = await started(conn)
    conn.stop(1001, "bye")
    async with asyncio.timeout(30):
        await task
    assert conn.ws.closed == (1001, "bye") and "ignored its cancellation" in caplog.text
    ends(h, conn)
    release.set()


async def test_a_close_the_client_cannot_receive_still_ends_the_call():
    h = hub()

    class Gone(ScriptedSocket):
        async def close(self, code: int, reason: str) -> None:
            raise RuntimeError("the ASGI server already closed the socket")

    conn = RealtimeConnection(Gone(silent=True), h, authed=True)
    task = await started(conn)
    conn.stop(1001, "bye")
    await task
    ends(h, conn)


async def test_a_call_cancelled_from_outside_closes_with_1001_going_away():
    h = hub()
    conn = connection(h)
    task = await started(conn)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert conn.ws.closed == (1001, "going away") and conn.ws.sent[-1]["error"]["code"] == "server_shutdown"
