"""What every WebSocket transport shares: one Session per connection, driven by three tasks.

reader (client messages → session), pump (session events → outbox), writer (outbox → client).
The first of them to end decides how the connection closes; the others are cancelled, so a
client that vanishes, misbehaves or stops reading never holds a session slot or a task. The slot
is the hub's (`Hub.session`), released on the way out whatever ended the call; a task that
ignores its cancellation is logged and left behind rather than allowed to hold the call open.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from .. import events as ev
from ..clock import SYSTEM, Clock
from ..hub import Busy

if TYPE_CHECKING:
    from ..hub import Hub
    from ..session import Session

log = logging.getLogger(__name__)

CLOSE_LINGER_S = 30.0  # how long a close waits on a client that is not reading before the socket is just dropped
CANCEL_GRACE_S = 5.0  # how long a call's cancelled tasks get to finish before the call ends without them


class Close(Exception):
    """End the connection with a WebSocket close code; `error` is the slug a client can match on."""

    def __init__(self, code: int, reason: str, error: str = "closed") -> None:
        super().__init__(reason)
        self.code, self.reason, self.error = code, reason, error


class ClientGone(Exception):
    """The client disconnected (or its socket failed): nothing more can be sent."""


@dataclasses.dataclass(slots=True)
class Outgoing:
    text: str
    turn: int | None = None
    audio_s: float = 0.0  # reply audio this message carries
    playback: bool = False  # part of a reply's playback (audio, marks): dropped on barge-in
    close: Close | None = None  # end the connection here, once everything queued before is written


class Outbox:
    """Messages waiting for the writer, with the reply audio they hold counted against a limit."""

    def __init__(self, max_audio_s: float) -> None:
        self.max_audio_s = max_audio_s
        self.audio_s = 0.0
        self.dropped: set[int] = set()  # turns whose playback was dropped (barge-in)
        self._items: collections.deque[Outgoing] = collections.deque()
        self._ready = asyncio.Event()

    def put(self, item: Outgoing, front: bool = False) -> None:
        if item.audio_s and self.audio_s + item.audio_s > self.max_audio_s:
            raise Close(1008, f"client is not reading: over {self.max_audio_s:g} s of reply audio queued", "queue_full")
        self.audio_s += item.audio_s
        self._items.appendleft(item) if front else self._items.append(item)
        self._ready.set()

    def drop(self, turn: int) -> None:
        """Forget the playback of `turn` not yet written (barge-in)."""
        self.dropped.add(turn)
        kept = [i for i in self._items if not (i.playback and i.turn == turn)]
        self._items = collections.deque(kept)
        self.audio_s = sum(i.audio_s for i in kept)

    async def get(self) -> Outgoing:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        self.audio_s = self.audio_s - item.audio_s if self._items else 0.0  # no float residue once empty: 'nothing queued' is exact
        return item


class Connection:
    """One WebSocket client bound to one Session; subclasses speak a protocol."""

    kind = "ws"

    def __init__(self, ws: WebSocket, hub: Hub) -> None:
        self.ws = ws
        self.hub = hub
        self.settings = hub.settings
        self.outbox = Outbox(hub.settings.max_queued_audio_s)
        self.session: Session | None = None
        self.written: tuple[int | None, float] = (None, 0.0)  # (turn, reply seconds written to the client)
        self.clock: Clock = SYSTEM  # real-time pacing and 'heard' read it; tests set their own
        self.finished = asyncio.Event()
        self._stop: asyncio.Future[Close] = asyncio.get_running_loop().create_future()

    # ---- for subclasses ----------------------------------------------------------------------

    async def open(self) -> None:
        """The protocol's handshake before a session starts (auth, Twilio's start)."""

    def started(self) -> None:
        """The session exists: queue whatever the client is told first."""

    async def on_text(self, text: str) -> None:
        raise NotImplementedError

    async def on_bytes(self, data: bytes) -> None:
        raise NotImplementedError

    def on_event(self, event: ev.Event) -> None:
        raise NotImplementedError

    async def pace(self, item: Outgoing) -> None:
        """Wait until `item` may be written (Twilio paces audio in real time)."""

    async def farewell(self, close: Close) -> None:
        """Last words before a non-normal close (an error event where the protocol has one)."""

    # ---- lifecycle ---------------------------------------------------------------------------

    def stop(self, code: int, reason: str) -> None:
        """Ask the connection to close with `code` (server shutdown)."""
        if not self._stop.done():
            self._stop.set_result(Close(code, reason, "server_shutdown"))

    async def serve(self) -> None:
        """Accept, run the protocol until one side ends it, then close with the code that says why."""
        outcome: Close | None = Close(1001, "going away", "server_shutdown")  # if cancelled from outside
        with self.hub.connection(self):
            try:
                await self.ws.accept()
                await self._race(self.open())
                await self._run_session()  # it ends by an exception: Close (a reason to close) or ClientGone
            except Close as c:
                outcome = c
            except ClientGone:
                outcome = None
            except Exception:
                log.exception("%s connection failed", self.kind)
                outcome = Close(1011, "internal server error", "internal_error")
            finally:
                if outcome is not None:
                    await self._close(outcome)
                self.finished.set()

    async def _run_session(self) -> None:
        try:
            async with self.hub.session() as s:
                self.session = s
                try:
                    self.started()
                    await self._race(self._read(), self._pump(), self._write())
                finally:
                    self.session = None
        except Busy as e:
            raise Close(1013, str(e), "session_limit") from None

    async def _race(self, primary: Coroutine[Any, Any, None], *others: Coroutine[Any, Any, None]) -> None:
        """Run the coroutines until `primary` returns, any of them raises, or a stop is requested."""
        tasks = [asyncio.create_task(c) for c in (primary, *others)]
        waiting: set[asyncio.Future] = {*tasks, self._stop}
        try:
            while True:
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if t is self._stop:
                        raise t.result()
                    if t.exception() is not None:
                        raise t.exception()
                    if t is tasks[0]:
                        return
        finally:
            for t in tasks:
                t.cancel()
            _, stuck = await asyncio.wait(tasks, timeout=CANCEL_GRACE_S)
            for t in stuck:  # a bug, not a client's doing: say so, and do not let it hold the call
                log.error("%s connection: task %s ignored its cancellation for %g s; left behind", self.kind, t.get_coro(), CANCEL_GRACE_S)

    async def receive(self) -> str | bytes:
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            log.debug("%s client left (code %s)", self.kind, message.get("code"))
            raise ClientGone()
        text = message.get("text")
        return text if text is not None else message.get("bytes") or b""

    async def _read(self) -> None:
        while True:
            data = await self.receive()
            await (self.on_text(data) if isinstance(data, str) else self.on_bytes(data))

    async def _pump(self) -> None:
        async for event in self.session.events():
            self.on_event(event)

    async def _write(self) -> None:
        while True:
            item = await self.outbox.get()
            if item.close is not None:
                raise item.close
            await self.pace(item)
            if item.playback and item.turn in self.outbox.dropped:
                continue
            await self.send(item.text)
            if item.audio_s:
                turn, seconds = self.written
                self.written = (item.turn, (seconds if turn == item.turn else 0.0) + item.audio_s)

    async def send(self, text: str) -> None:
        try:
            async with asyncio.timeout(self.settings.send_timeout_s):  # not wait_for: on 3.11 it can swallow a cancel
                await self.ws.send_text(text)
        except TimeoutError:
            raise Close(1008, f"client stopped reading: a write waited {self.settings.send_timeout_s:g} s", "slow_client") from None
        except (WebSocketDisconnect, WebSocketDisconnected, OSError, RuntimeError) as e:
            # RuntimeError: the ASGI server already closed the socket (an oversize frame) or the state moved on.
            log.debug("%s send failed: %r", self.kind, e)
            raise ClientGone() from None

    def heard(self, turn: int) -> float:
        """Reply seconds of `turn` written to the client (subclasses refine it with what they know)."""
        written_turn, seconds = self.written
        return seconds if written_turn == turn else 0.0

    async def _close(self, c: Close) -> None:
        log.info("%s connection closing: %d %s", self.kind, c.code, c.reason)
        reason = c.reason.encode()[:120].decode(errors="ignore")  # a close frame's reason is at most 123 bytes
        try:
            async with asyncio.timeout(CLOSE_LINGER_S):  # the session is already gone; only the socket waits
                if c.code != 1000 and c.error != "slow_client":  # a client that does not read gets no last words
                    await self.farewell(c)
                await self.ws.close(c.code, reason)
        except (TimeoutError, WebSocketDisconnect, WebSocketDisconnected, OSError, RuntimeError, Close, ClientGone) as e:
            log.debug("%s close not delivered: %r", self.kind, e)
