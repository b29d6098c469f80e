"""What replicas of the voice server need: stream tokens any replica accepts, and draining on shutdown."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from agent import security
from agent.security import StreamTokens
from tests.servers import WAIT, LiveServer, close_code, http, live, recv_json, twilio_call


def test_stream_tokens_are_signed_bound_to_the_call_and_expire(monkeypatch):
    minted = StreamTokens("secret", 120).mint("CA0")
    assert StreamTokens("other", 120).redeem(minted, "CA0") is False  # another secret
    assert StreamTokens("secret", 120).redeem(minted, "CA1") is False  # another call
    for bad in (None, "", "x", "1.2.3", "abc.def", minted + "x", 42):
        assert StreamTokens("secret", 120).redeem(bad, "CA0") is False
    now = time.time()
    monkeypatch.setattr(security.time, "time", lambda: now + 121)
    assert StreamTokens("secret", 120).redeem(minted, "CA0") is False  # expired
    monkeypatch.setattr(security.time, "time", lambda: now + 119)
    replica = StreamTokens("secret", 120)
    assert replica.redeem(minted, "CA0") is True  # any replica with the secret, in time
    assert replica.redeem(minted, "CA0") is False  # and once per process


def twiml_token(srv: LiveServer, bearer: str, call_sid: str = "CA0") -> str:
    status, _, xml = http(srv, "/twiml", data=f"CallSid={call_sid}".encode(), headers={"Authorization": f"Bearer {bearer}"})
    assert status == 200, xml
    return re.search(r'<Parameter name="token" value="([^"]+)"/>', xml).group(1)


def test_a_stream_token_minted_by_one_server_is_accepted_by_another(voice_agent):
    with live(voice_agent, token="s3cret") as a, live(voice_agent, token="s3cret") as b, live(voice_agent, token="other") as c:
        assert http(a, "/twiml", data=b"From=x", headers={"Authorization": "Bearer s3cret"})[0] == 400  # no CallSid

        async def run():
            ws = await twilio_call(b, twiml_token(a, "s3cret"))  # start names CallSid CA0
            await ws.send(json.dumps({"event": "stop"}))
            assert await close_code(ws) == 1000  # accepted: a refusal is 1008
            ws = await twilio_call(c, twiml_token(a, "s3cret"))  # a replica with another secret
            assert await close_code(ws) == 1008
            ws = await twilio_call(b, twiml_token(a, "s3cret", call_sid="CA7"))  # minted for another call
            assert await close_code(ws) == 1008

        asyncio.run(run())


def stopping(srv: LiveServer) -> None:
    """Ctrl-C, without waiting for the server to finish."""
    srv.server.handle_exit(signal.SIGINT, None)
    deadline = time.monotonic() + WAIT
    while not srv.in_loop(lambda: srv.hub.closing):
        assert time.monotonic() < deadline, "the server did not start closing"
        time.sleep(0.02)


def test_a_draining_server_refuses_new_calls_and_lets_running_ones_finish(voice_agent):
    srv = LiveServer(voice_agent, drain_s=WAIT).start()

    async def run():
        async with connect(srv.url("/v1/realtime")) as ws:
            assert (await recv_json(ws))["type"] == "session.created"
            stopping(srv)
            with pytest.raises(InvalidStatus) as e:
                await connect(srv.url("/v1/realtime"))
            assert e.value.response.status_code == 503
            assert http(srv, "/health")[0] == 503
            await ws.send(json.dumps({"type": "session.update", "session": {"threshold": 0.8}}))
            assert (await recv_json(ws))["type"] == "session.updated"  # the running call goes on
        t0 = time.monotonic()
        srv.thread.join(WAIT)
        return time.monotonic() - t0

    assert asyncio.run(run()) < WAIT / 2 and not srv.thread.is_alive()  # it stopped once the call ended


def test_calls_still_running_when_the_drain_ends_get_1001(voice_agent):
    srv = LiveServer(voice_agent, drain_s=0.5).start()

    async def run():
        async with connect(srv.url("/v1/realtime")) as ws:
            assert (await recv_json(ws))["type"] == "session.created"
            stopping(srv)
            assert await close_code(ws) == 1001

    asyncio.run(run())
    srv.thread.join(WAIT)
    assert not srv.thread.is_alive()
