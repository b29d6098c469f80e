"""Soak: K real-time callers for N minutes with churn, watching the server for leaks (`python -m benchmarks.soak`).

The server runs in this process (the real Agent behind `voice-agent serve`, on a free loopback
port) with --max-sessions slots (default: one per caller). K caller slots run for the whole
duration; each opens a call, and when it ends the next one. Every call is, drawn with --seed:

  stay        asks --turns questions in real time, as the latency benchmark's callers do (its
              synthesized speech, its Caller); every turn must be answered: first audible reply
              within --timeout seconds of the end of speech
  hangup      asks one question and aborts its socket the moment the reply's first audio arrives
  never_read  asks one question from a socket with a tiny receive window and stops reading (it
              keeps streaming silence, as a phone line does). The server must end the call with
              close 1008 once a write has waited its send timeout. When the reply has backed up
              and that timeout plus a margin has passed, the client reads again, only to learn
              how the call was closed

--churn is the fraction of calls that churn; the two churn kinds are equally likely.

Every --sample-s seconds: RSS, threads (Python's and the process's), open file descriptors,
asyncio tasks on the server's loop, engine requests in flight, the hub's sessions and connections.
Before the run, one warm-up call per slot starts the pools that start threads on first use, and
an idle sample is taken; at the end the callers hang up, the hub must become idle, and the final
sample is compared with the idle one.

Verdict: RSS slope over the second half of the run below 1 MB/min (least squares; MB = 10^6
bytes); no unanswered turn and no failed call among staying callers; every never_read call that
ran its course closed with 1008; threads and server tasks back to at most their idle counts; the
hub idle (no session, connection or engine request) at the end.

Output: a table (exit status 1 when a target is missed); --json OUT holds everything: the configuration, the machine, the idle, periodic
and final samples, the counts per kind of call, every call with its turns, and the verdict.

Example:
  python -m benchmarks.soak --callers 4 --minutes 20 --json out/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import random
import re
import socket
import struct
import termios
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import numpy as np
from tqdm import tqdm

from agent import events as ev
from agent import live_settings
from agent.transports.base import CLOSE_LINGER_S
from dllm_engine.options import positive_int

from .common import machine
from .latency import SILENCE, Caller, Probe, TurnResult, Utterance, prepare_speech, setting_arg
from .lines import BenchError, Line, LineError, LocalServer, Target, realtime_line

if TYPE_CHECKING:
    from agent.voice_agent import Agent

log = logging.getLogger(__name__)

KINDS = ("stay", "hangup", "never_read")
MB = 1e6
RSS_SLOPE_LIMIT_MB_MIN = 1.0
STALL_RCVBUF = 4096  # the never_read client's receive buffer: the server's writes back up at once
STALL_LIVE = {"output_sample_rate": 48000}  # the most reply bytes per second: the buffers fill sooner
BACKED_UP_BYTES = 2048  # unread bytes in the never_read client's socket: the reply is arriving and not read
STALL_MARGIN_S = 5.0  # read again this long after the server's send timeout could have ended the call
DRAIN_TIMEOUT_S = 15.0  # reading again: the server's close frame comes right after what it had queued
BUSY_TRIES, BUSY_WAIT_S = 20, 0.5  # a slot given back a moment late (a hangup) is worth waiting for
IDLE_TIMEOUT_S = CLOSE_LINGER_S + 30.0  # the server may linger that long on closing a client that does not read
SETTLE_S = 10.0  # after the hub is idle: time for the last tasks of closed calls to finish
POLL_S = 0.25
DEFAULT_SNDBUF = 16384


# ---- the plan: which call each slot makes ----------------------------------------------------


def call_plan(seed: int, churn: float, slot: int) -> Iterator[str]:
    """The kinds of a slot's calls, one per call: the same for the same seed, whatever the timing."""
    rng = random.Random(f"{seed}:{slot}")
    while True:
        yield rng.choice(KINDS[1:]) if rng.random() < churn else "stay"


def pick(pool: list[Utterance], rng: random.Random, n: int) -> list[Utterance]:
    """n consecutive utterances of the pool from a random start (the pool alternates plain and paused)."""
    start = rng.randrange(len(pool))
    return [pool[(start + i) % len(pool)] for i in range(n)]


# ---- what is sampled -------------------------------------------------------------------------


def proc_status() -> dict[str, int]:
    """VmRSS (kB) and Threads of this process, from /proc: no dependency."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                out[key] = int(value.split()[0])
    return out


def process_sample() -> dict:
    st = proc_status()
    return {
        "rss_mb": round(st["VmRSS"] * 1024 / MB, 2),
        "threads": st["Threads"],
        "py_threads": threading.active_count(),
        "fds": len(os.listdir("/proc/self/fd")),
    }


def thread_kinds() -> dict[str, int]:
    """Live Python threads by name without its numbers, so a pool that grew shows as a pool."""
    return dict(Counter(re.sub(r"(?:[-_]\d+)+$", "", t.name) for t in threading.enumerate()))


class ServerWatch:
    """Reads the server's state on its own loop: the hub and the tasks belong to that thread."""

    def __init__(self, server: LocalServer, agent: Agent) -> None:
        self.server, self.agent = server, agent

    def _read(self) -> dict:
        hub = self.server.hub
        return {"server_tasks": len(asyncio.all_tasks()) - 1, "sessions": hub.active_sessions, "connections": len(hub.connections)}

    async def state(self) -> dict:
        async def read() -> dict:
            return self._read()

        future = asyncio.run_coroutine_threadsafe(read(), self.server.loop)
        async with asyncio.timeout(10.0):
            out = await asyncio.wrap_future(future)
        out["engine_requests"] = self.agent.engine.active_requests
        return out

    async def sample(self, t0: float) -> dict:
        return {"t_s": round(time.monotonic() - t0, 1), **process_sample(), **await self.state(), "client_tasks": len(asyncio.all_tasks())}

    async def wait(self, ok: Callable[[dict], bool], timeout: float) -> bool:
        """Poll the server until ok(state) or the timeout; whether it got there."""
        deadline = time.monotonic() + timeout
        while not ok({**process_sample(), **await self.state()}):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(POLL_S)
        return True


def is_idle(s: dict) -> bool:
    return s["sessions"] == 0 and s["connections"] == 0 and s["engine_requests"] == 0


# ---- calls -----------------------------------------------------------------------------------


@dataclasses.dataclass
class CallRecord:
    slot: int
    kind: str
    start_s: float
    end_s: float | None = None
    outcome: str = "running"  # done | cut (the run ended first) | failed: why
    turns: list[dict] = dataclasses.field(default_factory=list)
    close_code: int | None = None  # never_read: how the server ended it (None: it did not)
    busy_retries: int = 0


def turn_entry(res: TurnResult) -> dict:
    return {"text": res.text, "answered": res.failed is None, "caller_v2v_ms": res.caller_v2v_ms, "failed": res.failed}


def abort(line: Line) -> None:
    """Hang up as a vanished client does: the socket goes, no close handshake."""
    line.ws.transport.abort()


@contextlib.asynccontextmanager
async def listening(caller: Caller) -> AsyncIterator[Caller]:
    """The caller's listener for the length of the call."""
    task = asyncio.create_task(caller.receive())
    try:
        yield caller
    finally:
        task.cancel()
        await asyncio.wait([task])


class HangUpCaller(Caller):
    """Hangs up on the reply: waiting for it ends at its first audible audio."""

    async def wait_reply(self, p: Probe) -> str | None:
        while p.first_audible is None:
            if self.listener.ended:
                raise LineError(f"the server ended the session ({self.listener.ended})")
            if time.monotonic() > p.speech_end + self.timeout:
                return f"no reply within {self.timeout:g} s"
            await self.send(SILENCE)
        return None


def unread_bytes(line: Line) -> int:
    """Bytes waiting in the client's socket: the reply arriving at a client that does not read."""
    sock = line.ws.transport.get_extra_info("socket")
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


async def say(caller: Caller, audio: np.ndarray) -> None:
    """Speak in real time with nobody listening (the never_read client)."""
    step = len(SILENCE)
    padded = np.pad(audio, (0, -len(audio) % step))
    for i in range(0, len(padded), step):
        await caller.send(padded[i : i + step])


async def drain(line: Line) -> int | None:
    """Read again until the line closes: the server's close code, or None if it kept the call open."""
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            async for e in line.events():
                if isinstance(e, ev.HangUp):
                    break
    except TimeoutError:
        return None
    return line.ws.close_code


@contextlib.asynccontextmanager
async def stalled_line(base: str) -> AsyncIterator[Line]:
    """A Realtime line on a socket with a tiny receive window and a one-message client queue."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALL_RCVBUF)
    sock.setblocking(False)
    u = urlsplit(base)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (u.hostname, u.port))
    except OSError as e:
        sock.close()
        raise LineError(f"cannot connect to {base}: {e}") from None
    async with realtime_line(base, None, STALL_LIVE, sock=sock, max_queue=1) as line:
        yield line


class Soak:
    """One run: the slots, their calls, the samples."""

    def __init__(self, args: argparse.Namespace, server: LocalServer, watch: ServerWatch, pool: list[Utterance]) -> None:
        self.args, self.server, self.watch, self.pool = args, server, watch, pool
        self.send_timeout_s = server.hub.settings.send_timeout_s
        self.t0 = time.monotonic()
        self.calls: list[CallRecord] = []
        self.samples: list[dict] = []

    def elapsed(self) -> float:
        return round(time.monotonic() - self.t0, 1)

    def target(self, kind: str) -> Target:
        if kind == "never_read":
            return lambda: stalled_line(self.server.url)
        return lambda: realtime_line(self.server.url, None, {})

    async def open_line(self, stack: AsyncExitStack, kind: str, rec: CallRecord) -> Line:
        """Open the call; a busy server (a slot not yet given back) is asked again a few times."""
        for attempt in range(BUSY_TRIES):
            try:
                return await stack.enter_async_context(self.target(kind)())
            except LineError as e:
                if "server busy" not in str(e) or attempt + 1 == BUSY_TRIES:
                    raise
            rec.busy_retries += 1
            await asyncio.sleep(BUSY_WAIT_S)
        raise AssertionError("unreachable")

    async def call(self, rec: CallRecord, utterances: list[Utterance]) -> None:
        """One call of its kind, recorded however it ends."""
        body = {"stay": self.stay, "hangup": self.hang_up, "never_read": self.stall}[rec.kind]
        try:
            async with AsyncExitStack() as stack:
                line = await self.open_line(stack, rec.kind, rec)
                try:
                    await body(line, rec, utterances)
                except asyncio.CancelledError:
                    abort(line)
                    raise
            rec.outcome = "done"
        except asyncio.CancelledError:
            rec.outcome = "cut"
            raise
        except LineError as e:
            rec.outcome = f"failed: {e}"
        except Exception as e:  # a bug here or in the server: counted, and the soak goes on
            log.exception("slot %d: %s call failed", rec.slot, rec.kind)
            rec.outcome = f"failed: {e!r}"
        finally:
            rec.end_s = self.elapsed()
            if rec.outcome.startswith("failed"):
                log.warning("slot %d: %s call %s", rec.slot, rec.kind, rec.outcome)

    async def stay(self, line: Line, rec: CallRecord, utterances: list[Utterance]) -> None:
        async with listening(Caller(line, rec.slot, self.args.timeout)) as caller:
            for u in utterances:
                rec.turns.append(turn_entry(await caller.speak(u)))

    async def hang_up(self, line: Line, rec: CallRecord, utterances: list[Utterance]) -> None:
        async with listening(HangUpCaller(line, rec.slot, self.args.timeout)) as caller:
            res = await caller.speak(utterances[0])
            abort(line)
        rec.turns.append(turn_entry(res))

    async def stall(self, line: Line, rec: CallRecord, utterances: list[Utterance]) -> None:
        """Speak, stop reading until the reply has backed up and the server's send timeout has passed, then read."""
        caller = Caller(line, rec.slot, self.args.timeout)
        await say(caller, utterances[0].audio)
        backed_up = await self.stream_silence(caller, self.args.timeout, lambda: unread_bytes(line) >= BACKED_UP_BYTES)
        rec.turns.append({"text": utterances[0].text, "answered": backed_up, "caller_v2v_ms": None,
                          "failed": None if backed_up else f"no reply backed up within {self.args.timeout:g} s"})
        if backed_up:
            await self.stream_silence(caller, self.send_timeout_s + STALL_MARGIN_S, lambda: False)
        rec.close_code = await drain(line)

    @staticmethod
    async def stream_silence(caller: Caller, seconds: float, until: Callable[[], bool]) -> bool:
        """Silence in real time for `seconds` or until until(); whether until() came true. A closed line ends it."""
        deadline = time.monotonic() + seconds
        try:
            while not until():
                if time.monotonic() > deadline:
                    return False
                await caller.send(SILENCE)
        except LineError:
            return False
        return True

    async def slot(self, index: int, bar: tqdm) -> None:
        """A slot's calls, one after another, until the run cancels it."""
        await asyncio.sleep(index * 2.0 / self.args.callers)  # staggered, as the latency benchmark's callers
        rng = random.Random(f"{self.args.seed}:{index}:speech")
        for kind in call_plan(self.args.seed, self.args.churn, index):
            rec = CallRecord(index, kind, self.elapsed())
            self.calls.append(rec)
            await self.call(rec, pick(self.pool, rng, self.args.turns if kind == "stay" else 1))
            bar.set_postfix_str(progress_note(self.calls), refresh=False)

    async def warm_up(self) -> list[dict]:
        """One one-turn call per slot at once: pools that start threads on first use start them now."""
        recs = [CallRecord(i, "stay", 0.0) for i in range(self.args.callers)]
        await asyncio.gather(*(self.call(r, [self.pool[(3 * r.slot) % len(self.pool)]]) for r in recs))
        return [dataclasses.asdict(r) for r in recs]

    async def run(self, bar: tqdm) -> None:
        """The slots for --minutes, sampling every --sample-s; then every call still going is cut."""
        duration = self.args.minutes * 60
        self.t0 = time.monotonic()
        slots = [asyncio.create_task(self.slot(i, bar)) for i in range(self.args.callers)]
        try:
            next_sample = 0.0
            while (now := time.monotonic() - self.t0) < duration:
                if now >= next_sample:
                    self.samples.append(await self.watch.sample(self.t0))
                    next_sample += self.args.sample_s
                bar.update(int(now) - bar.n)
                await asyncio.sleep(min(1.0, max(0.0, min(next_sample, duration) - now)))
            self.samples.append(await self.watch.sample(self.t0))  # the last one under load
            bar.update(int(duration) - bar.n)
        finally:
            for t in slots:
                t.cancel()
            await asyncio.wait(slots)


def progress_note(calls: list[CallRecord]) -> str:
    turns = [t for c in calls for t in c.turns if c.kind == "stay"]
    return f"calls {len(calls)}, stay turns {sum(t['answered'] for t in turns)}/{len(turns)} answered"


# ---- the report ------------------------------------------------------------------------------


def per_kind(calls: list[CallRecord]) -> dict[str, dict]:
    """Counts per kind of call, from the call records alone."""
    out = {}
    for kind in KINDS:
        mine = [c for c in calls if c.kind == kind]
        turns = [t for c in mine for t in c.turns]
        out[kind] = {
            "calls": len(mine),
            "cut": sum(c.outcome == "cut" for c in mine),
            "failed_calls": sum(c.outcome.startswith("failed") for c in mine),
            "turns_answered": sum(t["answered"] for t in turns),
            "turns_unanswered": sum(not t["answered"] for t in turns),
            "busy_retries": sum(c.busy_retries for c in mine),
            "close_codes": dict(Counter(str(c.close_code) for c in mine if c.outcome == "done")) if kind == "never_read" else None,
            "failures": sorted({c.outcome for c in mine if c.outcome.startswith("failed")} | {t["failed"] for t in turns if t["failed"]}),
        }
    return out


def rss_slope(samples: list[dict], duration_s: float) -> tuple[float | None, int]:
    """MB per minute over the second half of the run (least squares), and how many samples it rests on."""
    half = [s for s in samples if s["t_s"] >= duration_s / 2]
    if len(half) < 2:
        return None, len(half)
    t = np.array([s["t_s"] for s in half]) / 60
    rss = np.array([s["rss_mb"] for s in half])
    return round(float(np.polyfit(t, rss, 1)[0]), 3), len(half)


def verdict(report: dict) -> dict[str, bool | None]:
    """Each target: True met, False missed, None not exercised in this run."""
    k, idle, end = report["kinds"], report["idle"], report["end"]
    stay = k["stay"]
    finished = [c for c in report["calls"] if c["kind"] == "never_read" and c["outcome"] == "done"]
    slope = report["rss"]["slope_mb_per_min_second_half"]
    return {
        "rss_slope_below_1_mb_per_min": None if slope is None else slope < RSS_SLOPE_LIMIT_MB_MIN,
        "staying_callers_all_answered": None if not stay["calls"] else stay["turns_unanswered"] == 0 and stay["failed_calls"] == 0,
        "never_readers_closed_1008": None if not finished else all(c["close_code"] == 1008 for c in finished),
        "hub_idle_at_end": report["idle_reached"] and is_idle(end),
        "threads_back_to_idle": end["threads"] <= idle["threads"] and end["py_threads"] <= idle["py_threads"],
        "server_tasks_back_to_idle": end["server_tasks"] <= idle["server_tasks"],
    }


def print_table(report: dict) -> None:
    cfg, idle, end, rss = report["config"], report["idle"], report["end"], report["rss"]
    print(f"soak: {cfg['callers']} callers, {cfg['minutes']:g} min, churn {cfg['churn']:g}, seed {cfg['seed']}, {cfg['max_sessions']} sessions")
    print(f"{'kind':<11} {'calls':>5} {'cut':>4} {'failed':>6} {'answered':>8} {'unanswered':>10} {'busy retries':>12}  close codes")
    for kind, k in report["kinds"].items():
        codes = ", ".join(f"{c}: {n}" for c, n in (k["close_codes"] or {}).items()) or "-"
        print(f"{kind:<11} {k['calls']:>5} {k['cut']:>4} {k['failed_calls']:>6} {k['turns_answered']:>8} {k['turns_unanswered']:>10} {k['busy_retries']:>12}  {codes}")
    slope = "n/a" if rss["slope_mb_per_min_second_half"] is None else f"{rss['slope_mb_per_min_second_half']:+.3f}"
    print(f"RSS MB: start {rss['start_mb']:.1f}, end {rss['end_mb']:.1f}, slope over the second half {slope} MB/min ({rss['samples_in_fit']} samples)")
    print(f"idle -> end: threads {idle['threads']} -> {end['threads']} (Python {idle['py_threads']} -> {end['py_threads']}), "
          f"server tasks {idle['server_tasks']} -> {end['server_tasks']}, fds {idle['fds']} -> {end['fds']}")
    print(f"hub at end: {end['sessions']} sessions, {end['connections']} connections, {end['engine_requests']} engine requests")
    for name, ok in report["checks"].items():
        print(f"  {'not run' if ok is None else 'PASS' if ok else 'FAIL':<7} {name}")
    print("PASS" if report["passed"] else "FAIL")


def describe(args: argparse.Namespace, server: LocalServer) -> dict:
    return {
        "callers": args.callers, "minutes": args.minutes, "sample_s": args.sample_s, "churn": args.churn, "seed": args.seed,
        "turns_per_call": args.turns, "timeout_s": args.timeout, "transport": "ws", "max_sessions": server.hub.settings.max_sessions,
        "send_timeout_s": server.hub.settings.send_timeout_s, "server_sndbuf": args.server_sndbuf or "os default",
        "settings": dict(args.set),
    }


def finish(report: dict, soak: Soak, duration_s: float) -> dict:
    """Counts, RSS, checks: everything derived from the records and samples."""
    report["calls"] = [dataclasses.asdict(c) for c in soak.calls]
    report["kinds"] = per_kind(soak.calls)
    slope, points = rss_slope(soak.samples, duration_s)
    first = soak.samples[0] if soak.samples else report["end"]
    report["rss"] = {"start_mb": first["rss_mb"], "end_mb": report["end"]["rss_mb"], "slope_mb_per_min_second_half": slope, "samples_in_fit": points}
    report["checks"] = verdict(report)
    report["passed"] = all(v is not False for v in report["checks"].values())
    return report


async def end_state(watch: ServerWatch, idle: dict) -> tuple[bool, dict]:
    """Wait for the hub to be idle, then a little for threads and tasks to settle; the final sample."""
    reached = await watch.wait(is_idle, IDLE_TIMEOUT_S)
    await watch.wait(lambda s: s["server_tasks"] <= idle["server_tasks"] and s["threads"] <= idle["threads"], SETTLE_S)
    return reached, await watch.sample(time.monotonic())


async def soak(args: argparse.Namespace, agent: Agent, pool: list[Utterance] | None = None) -> dict:
    """The whole run against a server started here on `agent`; prints the table, writes --json."""
    check(args)
    pool = pool or prepare_speech(agent.tts)
    with LocalServer(agent, args.max_sessions or args.callers, sndbuf=args.server_sndbuf or None) as server:
        watch = ServerWatch(server, agent)
        run = Soak(args, server, watch, pool)
        report: dict = {"config": describe(args, server), "machine": machine()}
        log.info("warm-up: %d calls", args.callers)
        report["warm_up"] = await run.warm_up()
        report["idle_reached_before"] = await watch.wait(is_idle, IDLE_TIMEOUT_S)
        report["idle"] = {**await watch.sample(time.monotonic()), "thread_kinds": thread_kinds()}
        with Bar(total=int(args.minutes * 60), desc="soak", unit="s") as bar:
            await run.run(bar)
        report["samples"] = run.samples
        report["idle_reached"], end = await end_state(watch, report["idle"])
        report["end"] = {**end, "t_s": run.elapsed(), "thread_kinds": thread_kinds()}
        finish(report, run, args.minutes * 60)
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return report


class Bar(tqdm):
    """tqdm without its monitor thread, which would count as a thread the server left behind."""

    monitor_interval = 0


# ---- command line ----------------------------------------------------------------------------


def check(args: argparse.Namespace) -> None:
    """Refuse bad input before minutes of loading, with one line that says what to change."""
    if args.callers < 1:
        raise BenchError(f"--callers must be at least 1, got {args.callers}")
    if not args.minutes > 0:
        raise BenchError(f"--minutes must be above 0, got {args.minutes:g}")
    if not args.sample_s > 0:
        raise BenchError(f"--sample-s must be above 0, got {args.sample_s:g}")
    if not 0 <= args.churn <= 1:
        raise BenchError(f"--churn is a fraction of calls, from 0 to 1; got {args.churn:g}")
    if args.turns < 1:
        raise BenchError(f"--turns must be at least 1, got {args.turns}")
    if not args.timeout > 0:
        raise BenchError(f"--timeout must be above 0, got {args.timeout:g}")
    if args.max_sessions is not None and args.max_sessions < args.callers:
        raise BenchError(f"--max-sessions ({args.max_sessions}) must be at least --callers ({args.callers}): every caller needs a slot")
    if args.server_sndbuf < 0:
        raise BenchError(f"--server-sndbuf must be 0 (the OS default) or a size in bytes, got {args.server_sndbuf}")


def build_parser(prog: str = "python -m benchmarks.soak") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    load = p.add_argument_group("load")
    load.add_argument("--callers", type=int, default=4, help="caller slots, busy for the whole run (default: %(default)s)")
    load.add_argument("--minutes", type=float, default=20.0, help="how long the callers call (default: %(default)s)")
    load.add_argument("--churn", type=float, default=0.25, help="fraction of calls that hang up mid-reply or never read (default: %(default)s)")
    load.add_argument("--seed", type=int, default=0, help="draws the kind of each call and its questions (default: %(default)s)")
    load.add_argument("--turns", type=int, default=3, help="questions per staying call (default: %(default)s)")
    load.add_argument("--timeout", type=float, default=20.0, help="seconds from the end of speech to the first audible reply before a turn is unanswered (default: %(default)s)")
    srv = p.add_argument_group("server (started in this process)")
    srv.add_argument("--max-sessions", type=int, help="session slots (default: --callers)")
    srv.add_argument("--server-sndbuf", type=int, default=DEFAULT_SNDBUF, metavar="BYTES",
                     help="kernel send buffer of the server's sockets; 0: the OS default, which on loopback grows to megabytes, so a client "
                          "that stops reading is noticed only after that much reply audio (default: %(default)s)")
    srv.add_argument("--model", type=Path, help="dLLM directory or named model (smollm2) (default: the shipped model)")
    srv.add_argument("--set", type=setting_arg, action="append", default=[], metavar="KEY=VALUE",
                     help="a live setting as every session's default, e.g. question_end_ms=0 (repeatable; checked as session.update checks it)")
    srv.add_argument("--threads", type=positive_int, help="the agent's torch threads, as `serve --threads` (default: AgentConfig's)")
    srv.add_argument("--asr-window", type=float, default=15.0, metavar="SECONDS", help="the agent's Whisper window, as `serve --asr-window` (default: %(default)s)")
    out = p.add_argument_group("output")
    out.add_argument("--sample-s", type=float, default=30.0, help="seconds between samples (default: %(default)s)")
    out.add_argument("--json", type=Path, help="write the report (samples and every call included) here")
    out.add_argument("-v", "--verbose", action="store_true", help="log each server and caller event of note")
    return p


def run(args: argparse.Namespace) -> dict:
    """Check the input, load the agent, soak. Bad input: one line, exit status 1."""
    from agent.voice_agent import Agent, AgentConfig

    try:
        check(args)
        agent = Agent.load(AgentConfig(model=args.model, asr_window_s=args.asr_window, max_sessions=args.max_sessions or args.callers,
                                       **({"torch_threads": args.threads} if args.threads else {})))
        agent.config = live_settings.apply(agent.config, dict(args.set))  # every session's defaults
        try:
            return asyncio.run(soak(args, agent))
        finally:
            agent.close()
    except BenchError as e:
        raise SystemExit(f"error: {e}") from None


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    report = run(args)
    raise SystemExit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
