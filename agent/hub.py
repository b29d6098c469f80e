"""Server-wide state shared by every transport: settings, session slots and live connections.

Transports see only this narrow surface: `settings`, `stream_tokens`, `agent_sample_rate`, and two
context managers. `connection()` registers a call so shutdown can close it; `session()` takes a
session slot and opens the agent's session in it. Each releases what it took in its own `finally`,
the one place that does: whatever ends a call (an error, a cancelled task, a client that vanished)
gives its slot back on the way out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import dataclasses
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from .security import StreamTokens

if TYPE_CHECKING:
    from .session import Session
    from .voice_agent import Agent

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"  # package data: ships with a non-editable install


@dataclasses.dataclass
class ServerSettings:
    """What `voice-agent serve` configures; the defaults are the safe local ones."""

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None  # required from clients when set (and always when bound off loopback)
    public_url: str | None = None  # https://host[:port] as the outside world sees it (Twilio, signatures)
    allowed_origins: tuple[str, ...] = ()  # browser origins besides the server's own
    twilio_auth_token: str | None = None  # when set, Twilio requests must carry a valid X-Twilio-Signature
    max_sessions: int = 4
    max_frame_bytes: int = 1 << 20  # largest WebSocket message (any endpoint); larger ones close with 1009
    max_twilio_frame_bytes: int = 16 << 10  # Twilio sends ~300-byte messages; anything near this is not Twilio
    max_queued_audio_s: float = 60.0  # reply audio waiting to be written to one client
    send_timeout_s: float = 10.0  # a write blocked this long means the client stopped reading
    open_timeout_s: float = 10.0  # time for what must come first: the token message (no header), Twilio's start
    drain_s: float = 0.0  # on shutdown, running calls may go on this long (new ones are refused), then 1001
    stream_token_ttl_s: float = 120.0  # a TwiML answer's stream token must be used within this
    # Signs stream tokens; every replica must have the same. None: derived from the token or the
    # Twilio auth token, which replicas share anyway.
    stream_secret: str | None = None
    web_dir: Path = WEB_DIR

    @property
    def auth_required(self) -> bool:
        return bool(self.token or self.twilio_auth_token)

    @property
    def origins(self) -> tuple[str, ...]:
        """Browser origins besides the Host's own; behind a proxy the public one is what browsers send."""
        if not self.public_url:
            return self.allowed_origins
        u = urlsplit(self.public_url)
        return (*self.allowed_origins, f"{u.scheme}://{u.netloc}")


class Call(Protocol):
    """What the hub needs of a connection to close it at shutdown."""

    finished: asyncio.Event

    def stop(self, code: int, reason: str) -> None: ...


class Busy(Exception):
    """No session slot: every one is in use, or the server is shutting down."""


class Heap:
    """glibc's heap, kept from ratcheting up over a long-running server's calls, or nothing on another
    C library. A call's peaks (a batch of four replies, a long utterance's audio) are freed when it
    ends, but glibc keeps freed memory in its arenas, one per thread that ever allocated, so RSS
    ratchets up with every new peak. The server caps the arenas at two (as MALLOC_ARENA_MAX=2 would)
    and trims the heap when a call ends, on a thread of its own: trimming a large heap takes
    milliseconds, which the event loop must not spend."""

    ARENA_MAX, M_ARENA_MAX = 2, -8  # mallopt's parameter number, from glibc's malloc.h

    def __init__(self) -> None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            libc = None
        self.libc = libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="malloc-trim")  # started on first use

    def cap_arenas(self) -> None:
        if self.libc is not None:
            self.libc.mallopt(self.M_ARENA_MAX, self.ARENA_MAX)

    def trim(self) -> None:
        if self.libc is not None:
            self._thread.submit(self.libc.malloc_trim, 0)


HEAP = Heap()


class Hub:
    """The one Agent, the session slots, and every open connection (so shutdown can close them properly)."""

    def __init__(self, agent: Agent, settings: ServerSettings) -> None:
        self._agent = agent
        self.settings = settings
        self.connections: set[Call] = set()
        self.active_sessions = 0
        secret = settings.stream_secret or settings.token or settings.twilio_auth_token or secrets.token_hex(32)  # the last: no auth, unused
        self.stream_tokens = StreamTokens(secret, settings.stream_token_ttl_s)
        self.closing = False
        HEAP.cap_arenas()

    @property
    def agent_sample_rate(self) -> int:
        return self._agent.tts.sample_rate

    @property
    def full(self) -> bool:
        return self.active_sessions >= self.settings.max_sessions

    @contextlib.contextmanager
    def connection(self, call: Call) -> Iterator[None]:
        """Count `call` among the open connections while the block runs."""
        self.connections.add(call)
        try:
            yield
        finally:
            self.connections.discard(call)

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Session]:
        """A session slot and the agent's session in it; raises Busy when none is free."""
        if self.closing or self.full:
            raise Busy("server shutting down" if self.closing else f"server busy: all {self.settings.max_sessions} sessions are in use, try again later")
        self.active_sessions += 1
        try:
            async with self._agent.session() as s:
                yield s
        finally:
            self.active_sessions -= 1
            HEAP.trim()

    async def drain(self, timeout: float) -> None:
        """Refuse new sessions and wait up to `timeout` s for the running calls to end on their own."""
        self.closing = True
        deadline = asyncio.get_running_loop().time() + timeout
        if self.connections and timeout > 0:
            log.info("draining: %d call(s) may go on for up to %g s; new ones are refused", len(self.connections), timeout)
        while self.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)

    async def close_all(self, code: int, reason: str, timeout: float = 5.0) -> None:
        """Refuse new sessions and end every connection with `code` (Ctrl-C: 1001 going away)."""
        self.closing = True
        conns = list(self.connections)
        if not conns:
            return
        log.info("closing %d connection(s): %s", len(conns), reason)
        for c in conns:
            c.stop(code, reason)
        await asyncio.wait([asyncio.ensure_future(c.finished.wait()) for c in conns], timeout=timeout)

    def health(self) -> dict:
        """What is loaded and how busy the server is; names, never file-system paths (this is public)."""
        s = self.settings
        return {
            "status": "closing" if self.closing else "ok",
            "models": {**self._agent.model_names(), "vad": "silero", "loaded": True},
            "agent_sample_rate": self.agent_sample_rate,
            "sessions": {"active": self.active_sessions, "max": s.max_sessions},
            "connections": len(self.connections),
            "limits": {
                "max_frame_bytes": s.max_frame_bytes,
                "max_twilio_frame_bytes": s.max_twilio_frame_bytes,
                "max_queued_audio_s": s.max_queued_audio_s,
                "send_timeout_s": s.send_timeout_s,
            },
            "auth_required": s.auth_required,
            "endpoints": {"realtime": "/v1/realtime", "webrtc": "/v1/webrtc/offer", "twiml": "/twiml", "twilio": "/twilio/stream"},
        }
