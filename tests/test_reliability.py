"""A call that goes wrong ends with a documented code and gives back everything it held.

Reproductions of the slot leak (a hostile `session.update` pair left a session slot taken for good),
the overflow on an infinite integer setting, unbounded settings, a handler that fails, a task that
ignores its cancellation, and a client that stops reading under the default limits.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import threading

import pytest
from websockets.asyncio.client import connect

from agent import hub, live_settings
from agent.session import Session
from agent.transports import base, realtime
from tests.helpers import silence
from tests.servers import WAIT, close_code, http, live, media_msgs, send_rt_audio, twilio_call, until


async def errors_then_alive(srv, messages: list[str]) -> list[dict]:
    """Send `messages` on a new call; the errors they got, then proof the call still serves (an empty update)."""
    async with connect(srv.url("/v1/realtime")) as ws:
        await until(ws, "session.created")
        for m in messages:
            await ws.send(m)
        await ws.send(json.dumps({"type": "session.update", "session": {}}))
        seen: list[dict] = []
        await until(ws, "session.updated", seen)
    await srv.wait_idle()
    return [m["error"] for m in seen if m["type"] == "error"]


def update(**session) -> str:
    return json.dumps({"type": "session.update", "session": session})  # json writes NaN / Infinity literals


def test_nan_then_infinity_gets_two_errors_and_frees_the_slot(srv):
    """The reported leak: four such clients locked every caller out until a restart."""

    async def run():
        for _ in range(srv.hub.settings.max_sessions + 1):  # more calls than slots: a leak would refuse the last
            errors = await errors_then_alive(srv, [update(threshold=float("nan")), update(end_ms=float("inf"))])
            assert [e["code"] for e in errors] == ["invalid_value", "invalid_value"]
            assert "threshold" in errors[0]["message"] and "end_ms" in errors[1]["message"]
        errors = await errors_then_alive(srv, ["{x", update(end_ms=float("inf"))])
        assert [e["code"] for e in errors] == ["invalid_json", "invalid_value"]

    asyncio.run(run())
    assert srv.idle()


def test_the_heap_is_trimmed_when_a_call_ends(srv, monkeypatch):
    """glibc keeps a call's freed peaks in its arenas; the hub hands them back when each call ends,
    on one thread of its own (not one per call)."""
    assert hub.HEAP.libc is not None  # glibc (Debian, as CI and the Makefile assume)
    trims = []
    monkeypatch.setattr(hub.HEAP.libc, "malloc_trim", lambda pad: trims.append(threading.current_thread().name) or 1)

    async def run():
        for n in (1, 2):
            await errors_then_alive(srv, [])
            await asyncio.wrap_future(hub.HEAP._thread.submit(lambda: None))  # what was queued before it has run
            assert len(trims) == n

    asyncio.run(run())
    assert {t.split("_")[0] for t in trims} == {"malloc-trim"}


@pytest.mark.parametrize("key", ["end_ms", "max_new_tokens"])
@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "1e400", "NaN"])
def test_non_finite_integer_settings_are_invalid_values(srv, key, literal):
    """`int(inf)` raised OverflowError past the handler: an internal error and close 1011."""
    message = '{"type": "session.update", "session": {"%s": %s}}' % (key, literal)
    errors = asyncio.run(errors_then_alive(srv, [message]))
    assert [e["code"] for e in errors] == ["invalid_value"] and key in errors[0]["message"]


@pytest.mark.parametrize("setting", sorted(live_settings.SETTINGS))
def test_every_live_setting_has_bounds_that_are_enforced(srv, setting):
    spec = live_settings.SETTINGS[setting]
    if spec.kind is bool:
        bad, good = [1, "true", None], [True]
    else:
        bad = [spec.low - 1, spec.high + 1, 10**30, -(10**30), float("inf"), "1", [1]]
        good = [spec.low, spec.high]

    async def run():
        async with connect(srv.url("/v1/realtime")) as ws:
            await until(ws, "session.created")
            for value in bad:
                await ws.send(update(**{setting: value}))
                err = (await until(ws, "error"))["error"]
                assert err["code"] == "invalid_value" and setting in err["message"], (value, err)
            for value in good:
                await ws.send(update(**{setting: value}))
                assert (await until(ws, "session.updated"))["session"][setting] == value
        await srv.wait_idle()

    asyncio.run(run())


def test_health_shows_no_file_system_paths(srv):
    _, _, body = http(srv, "/health")
    strings: list[str] = []

    def walk(v: object) -> None:
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, str):
            strings.append(v)

    walk(json.loads(body))
    assert strings and not [s for s in strings if "/" in s and not s.startswith(("/v1/", "/twiml", "/twilio/"))]


def test_a_handler_that_fails_closes_1011_and_frees_the_slot(srv, monkeypatch):
    """A bug inside one call's handling: that call ends with 1011, the server and its slots go on."""

    async def broken(self, msg):
        self.post({"type": "note", "turn": None})  # a write in flight while the handler fails
        raise RuntimeError("a bug")

    monkeypatch.setattr(realtime.RealtimeConnection, "_cancel", broken)

    async def run():
        for _ in range(srv.hub.settings.max_sessions + 1):
            async with connect(srv.url("/v1/realtime")) as ws:
                await until(ws, "session.created")
                await ws.send(json.dumps({"type": "response.cancel"}))
                assert await close_code(ws) == 1011
            await srv.wait_idle()

    asyncio.run(run())


def test_a_task_that_ignores_its_cancellation_does_not_hold_the_slot(srv, monkeypatch):
    """The slot is released on the way out even when a task of the call will not end."""
    monkeypatch.setattr(base, "CANCEL_GRACE_S", 0.2)
    release = asyncio.Event()

    async def stubborn_pace(self, item):
        while "stuck" in item.text:  # the writer, on this message only, will not be cancelled
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if release.is_set():
                    raise

    async def post_stuck(self, msg):
        self.post({"type": "stuck", "turn": None})

    monkeypatch.setattr(realtime.RealtimeConnection, "pace", stubborn_pace)
    monkeypatch.setattr(realtime.RealtimeConnection, "_cancel", post_stuck)

    async def run():
        for _ in range(srv.hub.settings.max_sessions + 1):
            async with connect(srv.url("/v1/realtime")) as ws:
                await until(ws, "session.created")
                await ws.send(json.dumps({"type": "response.cancel"}))
            await srv.wait_idle()

    try:
        asyncio.run(run())
    finally:
        srv.in_loop(release.set)


def test_a_client_that_stops_reading_is_closed_1008_under_the_default_limits(voice_agent, question):
    """A write blocked `send_timeout_s` (10 s by default) ends the call with 1008 and frees it."""
    with live(voice_agent, sndbuf=8192) as slow:
        assert slow.hub.settings.send_timeout_s == 10.0 and slow.hub.settings.max_queued_audio_s == 60.0

        async def run() -> int:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a tiny window: the server's writes back up
            sock.connect(("127.0.0.1", slow.port))
            ws = await connect(slow.url("/v1/realtime"), sock=sock, max_queue=1)
            await until(ws, "session.created")
            await ws.send(json.dumps({"type": "session.update", "session": {"output_sample_rate": 48000, "denoise_steps": True}}))
            await send_rt_audio(ws, question("Tell me a joke.", 24000), 24000)
            await slow.wait_until(lambda: slow.hub.active_sessions == 0, "the session was not ended")  # the server gave up
            code = await close_code(ws)  # reading again: what was buffered, then the close frame
            await slow.wait_idle()
            return code

        assert asyncio.run(run()) == 1008
        assert slow.idle()


# ---- clients that vanish, stop reading, or come and go ---------------------------------------


def test_abrupt_disconnects_mid_reply_leave_other_sessions_going(srv, question):
    replying = [asyncio.Event(), asyncio.Event()]  # each caller that will vanish is mid-reply

    async def abort_mid_reply_realtime():
        ws = await connect(srv.url("/v1/realtime"))
        await until(ws, "session.created")
        await send_rt_audio(ws, question("Where do you live?", 24000), 24000)
        await until(ws, "response.output_audio.delta")
        replying[0].set()
        ws.transport.abort()  # no close frame: the TCP connection just dies

    async def abort_mid_reply_twilio():
        ws = await twilio_call(srv)
        for m in media_msgs(question("What do you eat?", 8000)):
            await ws.send(m)
        while json.loads(await asyncio.wait_for(ws.recv(), WAIT))["event"] != "media":
            pass
        replying[1].set()
        ws.transport.abort()

    async def witness():
        async with connect(srv.url("/v1/realtime")) as ws:
            await until(ws, "session.created")
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in replying)), WAIT)  # the others are mid-reply, then gone
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
        await srv.wait_until(lambda: server_tasks() <= tasks, f"server tasks above the {tasks} at the start")
        deadline = asyncio.get_running_loop().time() + WAIT
        while threading.active_count() > threads:  # a closing connection's thread may still be ending
            assert asyncio.get_running_loop().time() < deadline, f"{threading.active_count()} threads, {threads} at the start"
            await asyncio.sleep(0.05)

    asyncio.run(run())
    gc.collect()
    assert [o for o in gc.get_objects() if type(o) is Session] == []
