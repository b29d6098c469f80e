"""One conversation: the state machine between the listener (audio in → turns) and the reply
(turn → engine → speech out), with speculation and barge-in. Everything is in media time.

- speech start opens a turn; a short pause starts the reply speculatively (its events held back)
  and asks the end-of-turn model whether the speaker is done; its verdict and the pause's
  transcript move the end of the turn (`turns.end_of_turn_ms`: the end waits for that transcript);
  speech that resumes discards the speculation; the end of turn confirms it (or starts the reply then);
- speech that starts within `continue_ms` of a turn's end, while the reply to it has not finished
  playing, continues that turn: the speaker had only paused. The reply is cut, it and the turn's
  words leave the history, and the new turn's reply answers both parts (`TurnContinued`);
- speech that starts while the agent's voice is playing is not a turn until it interrupts: after
  the echo guard, `barge_in_ms` of it is a barge-in, an explicit `Interrupted` event after which
  none of that reply's audio leaves the session and the history keeps only what the listener
  heard; speech that stops short of that (a backchannel, a cough, the agent's own echo) is
  dropped, and the agent talks on. Speech that outlasts the reply's playback is a turn.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
from typing import AsyncIterator

import numpy as np

from audio.codec import AudioError

from . import events as ev
from . import live_settings
from .clock import SYSTEM, Clock
from .dialogue import Dialogue
from .listener import Heard, Listener
from .metrics import TurnTimeline, TurnVerdict
from .reply import Reply
from .turns import Signal, end_of_turn_ms

log = logging.getLogger(__name__)


class Session:
    """Use as `async with agent.session() as s:`; feed `send_audio`, read `events()`."""

    def __init__(self, agent, config) -> None:  # noqa: ANN001 (Agent, AgentConfig: they create sessions)
        self.agent = agent
        self.config = config
        self.dialogue = Dialogue.for_engine(agent.engine, config.system_prompt, config.max_history_tokens)
        self.listener = Listener(agent.vad_session, config.turns)
        self._queue: asyncio.Queue[ev.Event | None] = asyncio.Queue()
        self._interrupted: set[int] = set()  # turns whose audio must not leave the session any more
        self._turn = 0  # id of the current/last user turn (0 is the greeting)
        self._reply: Reply | None = None  # the reply in progress or last spoken
        self._timelines: dict[int, TurnTimeline] = {}  # reported after the turn's ResponseDone
        self._pause_ids = itertools.count(1)
        self._pause = 0  # a fresh id at each pause, resume and turn end: a verdict for an older one is stale
        self._pause_text: str | None = None  # this pause's transcript (speculative ASR)
        self._verdict: TurnVerdict | None = None  # this pause's end-of-turn model verdict
        self._turn_end_ms: int | None = None  # media ms where the last turn's speech ended
        self._carried = ""  # the words of the turn the current one continues
        self._over_reply: int | None = None  # media ms where speech began over the agent's voice, until it is a turn
        self._over_reply_long = False  # that speech has had a run as long as a barge-in (the echo guard held it off)
        self._judging: set[asyncio.Task] = set()
        self._audio_lock = asyncio.Lock()
        self._request_ids = itertools.count()
        self.conversation = f"{id(self):x}"  # engine request ids and the cached prefix are keyed by it
        self.clock: Clock = SYSTEM  # wall time for the echo guard and playback; tests set their own
        self.closed = False
        self.stats = collections.Counter()  # speculations started/kept/cancelled, barge-ins, turns

    # ---- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Session:
        self.agent.sessions += 1
        if self.config.greeting:
            self._start_reply(0, TurnTimeline(0, clock=self.clock), confirmed=True, fixed_text=self.config.greeting)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self, reason: str = "closed") -> None:
        self._hang_up(reason)

    def _hang_up(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.agent.sessions -= 1
        self.agent.engine.forget(self.conversation)
        if self._reply and not self._reply.done:
            self._reply.task.cancel()
        for task in self._judging:
            task.cancel()
        self._queue.put_nowait(ev.HangUp(self._turn, reason))
        self._queue.put_nowait(None)

    async def events(self) -> AsyncIterator[ev.Event]:
        """Every event of the session in order, until it hangs up or closes."""
        while (event := await self._queue.get()) is not None:
            if isinstance(event, ev.AgentAudio):
                if event.turn in self._interrupted:
                    continue  # produced before the interruption, never to be heard
                if self._reply is not None and self._reply.turn == event.turn:
                    self._reply.sent(event)
            yield event
            if isinstance(event, ev.ResponseDone) and event.turn in self._timelines:
                yield ev.TurnMetrics(event.turn, self._timelines.pop(event.turn).to_dict())

    # ---- the two calls every transport needs -------------------------------------------------

    def flush(self) -> None:
        """Stop the agent now (an interrupt button, or a transport-detected barge-in)."""
        r = self._reply
        if r and (not r.done or r.audible(echo_guard_ms=None)):
            self._interrupt()

    def played(self, turn: int, seconds: float) -> None:
        """The listener heard `seconds` of turn `turn`'s reply audio: the history keeps only that."""
        if self._reply is not None and self._reply.turn == turn:
            self._reply.played(seconds)

    def live_settings(self) -> dict[str, bool | int | float]:
        """The settings `update` may change, as this session now has them."""
        cfg = self.config
        return {k: getattr(cfg.decode if k in live_settings.DECODE else cfg.turns if k in live_settings.TURNS else cfg, k) for k in live_settings.SETTINGS}

    @property
    def instructions(self) -> str:
        """The session's system prompt ('' for none)."""
        return self.dialogue.system_prompt or ""

    def update(self, instructions: str | None = None, **settings: bool | int | float) -> None:
        """Live settings (`live_settings.SETTINGS`) and the instructions (the system prompt, '' clears
        it; None leaves it), all or nothing: ValueError names the bad one."""
        cfg = live_settings.apply(self.config, settings)
        if cfg.turns.turn_model and self.agent.turn_model is None:
            raise ValueError("turn_model: this server runs without an end-of-turn model")
        system = self.dialogue.system_prompt if instructions is None else self.dialogue.check_system_prompt(instructions)
        self.config = cfg
        self.listener.config = cfg.turns
        self.dialogue.system_prompt = system

    async def commit(self, sample_rate: int) -> None:
        """End the user's turn now (push-to-talk release, the end of a file): silence as long as the
        endpointer needs, at the rate the caller's audio has, with silence ending turns meanwhile."""
        end_ms = max(self.config.turns.end_ms, self.listener.endpointer.end_ms) + 100  # a pause transcript may have moved the end
        self.listener.config = dataclasses.replace(self.config.turns, push_to_talk=False)
        try:
            await self.send_audio(np.zeros(int(sample_rate * end_ms / 1000), dtype=np.int16), sample_rate)
        finally:
            self.listener.config = self.config.turns

    # ---- audio in: the listener's verdicts, frame by frame -----------------------------------

    async def send_audio(self, samples: np.ndarray, sample_rate: int) -> None:
        """Feed caller audio (int16 or float, mono, any supported rate). Bad audio → an `Error` event."""
        if self.closed:
            return
        arrival = self.clock.monotonic()
        async with self._audio_lock:  # chunks are framed and scored strictly in arrival order
            try:
                heard = await self.listener.hear(samples, sample_rate, arrival)
            except AudioError as e:
                self.emit(ev.Error(self._turn, "bad_audio", str(e)))
                return
            for h in heard:
                self._on_heard(h)
                if self.closed:
                    return

    def _on_heard(self, h: Heard) -> None:
        if h.signal in (Signal.SPEECH_START, Signal.PAUSE, Signal.RESUME):  # a new pause, or none
            self._pause = next(self._pause_ids)
            self._pause_text = self._verdict = None
        if self._talked_over(h):
            self._check_limits(h)
            return
        if h.signal is Signal.SPEECH_START:
            self._open_turn(h.media_ms)
        elif h.signal is Signal.PAUSE:
            if self.config.turns.turn_model and self.agent.turn_model is not None and h.audio is not None:
                task = asyncio.get_running_loop().create_task(self._judge(h.audio, self._pause))
                self._judging.add(task)
                task.add_done_callback(self._judging.discard)
            if self.config.speculation:
                self._start_turn_reply(h.audio, confirmed=False)
                self._move_end()  # its transcript is on its way: the end waits for it
        elif h.signal is Signal.RESUME:
            self._discard_speculation()
        elif h.signal in (Signal.END_OF_TURN, Signal.CAPPED):
            if h.signal is Signal.CAPPED:
                self.emit(ev.Error(self._turn, "turn_too_long", f"turn cut at {self.config.turns.max_turn_s:g} s of speech"))
            self._end_of_turn(h.audio)
        if self._reply is not None and self._barges_in(h):
            self._interrupt()  # a reply that began playing while the user was already talking
        self._check_limits(h)

    def _barges_in(self, h: Heard) -> bool:
        """`barge_in_ms` of speech while the reply plays, past its echo guard."""
        return h.in_speech and h.speech_ms >= self.config.barge_in_ms and self._reply.audible(self.config.echo_guard_ms)

    def _talked_over(self, h: Heard) -> bool:
        """Whether `h` belongs to speech over the agent's voice that is not (yet) a turn.

        It becomes one at a barge-in (which interrupts the reply), at its end if it was as long as a
        barge-in but the echo guard held that off (a client sending faster than real time), or once
        the reply has finished playing; shorter speech that ends first is dropped: nothing starts.
        In push-to-talk the user's commit says what is a turn: speech is never dropped."""
        r = self._reply
        talking = r is not None and r.audible(echo_guard_ms=None, while_generating=False)  # its voice sounds now
        if h.signal is Signal.SPEECH_START and talking and not self.config.turns.push_to_talk:
            self._over_reply, self._over_reply_long = h.media_ms, False
        if self._over_reply is None:
            return False
        self._over_reply_long |= h.in_speech and h.speech_ms >= self.config.barge_in_ms
        ended = h.signal in (Signal.END_OF_TURN, Signal.CAPPED)
        interrupts = self._barges_in(h) or (ended and self._over_reply_long)
        if interrupts or not talking:
            start, self._over_reply = self._over_reply, None
            self._open_turn(start)
            if interrupts:
                self._interrupt()
            return h.signal is Signal.SPEECH_START  # any other signal is the new turn's
        if ended:
            self._over_reply = None
            self.stats["talked_over"] += 1
            log.debug("speech over the reply ended short of a barge-in: dropped")
        return True

    def _open_turn(self, media_ms: int) -> None:
        continued = self._continued_reply(media_ms)
        self._turn += 1
        self.stats["turns"] += 1
        self._carried = ""
        self.emit(ev.SpeechStarted(self._turn, media_ms))
        if continued is not None:
            self._interrupt()
            continued.withdraw()
            self._carried = continued.user_text
            self.stats["turns_continued"] += 1
            self.emit(ev.TurnContinued(self._turn, continued.turn))

    def _continued_reply(self, media_ms: int) -> Reply | None:
        """The reply to the last turn, if speech starting at `media_ms` goes on with that turn: it
        starts within `continue_ms` of the turn's end and the reply has not finished playing."""
        r, cfg = self._reply, self.config.turns
        if not cfg.continue_ms or cfg.push_to_talk or r is None or not r.turn or r.turn != self._turn or not (r.confirmed and r.user_text):
            return None
        near = self._turn_end_ms is not None and media_ms - self._turn_end_ms <= cfg.continue_ms
        return r if near and (not r.done or r.audible(echo_guard_ms=None)) else None

    async def _judge(self, audio: np.ndarray, pause: int) -> None:
        """Ask the end-of-turn model about this pause (off the event loop); its verdict moves the end."""
        t0 = self.clock.monotonic()
        try:
            complete = await asyncio.get_running_loop().run_in_executor(self.agent.turn_pool, self.agent.turn_model, audio)
        except Exception:  # the transcript rule still ends the turn
            log.exception("end-of-turn model failed")
            return
        if pause == self._pause and not self.closed:
            self._verdict = TurnVerdict(complete, (self.clock.monotonic() - t0) * 1000)
            self._move_end()

    def _move_end(self) -> None:
        """This pause's end of turn, from its transcript and verdict so far; the turn ends now if the silence reaches it."""
        ms = end_of_turn_ms(self._pause_text, self._verdict and self._verdict.complete, self.config.turns, self._transcribing())
        if self.listener.move_end(ms):
            self._end_of_turn(None)

    def _transcribing(self) -> bool:
        """This pause's speculative transcript is still on its way."""
        r = self._reply
        return self._pause_text is None and r is not None and r.turn == self._turn and not (r.confirmed or r.discarded or r.done)

    def _end_of_turn(self, audio: np.ndarray | None) -> None:
        verdict, self._pause = self._verdict, next(self._pause_ids)  # a verdict still on its way is too late
        speech_end = self.listener.speech_end
        self._turn_end_ms = speech_end[0] if speech_end else self.listener.media_ms
        self.emit(ev.SpeechStopped(self._turn, self._turn_end_ms))
        r = self._reply
        if r and r.turn == self._turn and not r.confirmed and not r.discarded:
            r.timeline.mark("endpoint")
            r.timeline.speculative = True
            self.stats["speculations_kept"] += 1
            self.emit(ev.Speculation(r.turn, "kept"))
            r.confirm()
        else:
            self._start_turn_reply(audio, confirmed=True)
        if self._reply is not None and self._reply.turn == self._turn:
            self._reply.timeline.turn_model = verdict

    def _check_limits(self, h: Heard) -> None:
        cfg = self.config
        replying = self._reply is not None and not self._reply.done
        if cfg.max_call_s and h.media_ms >= cfg.max_call_s * 1000:
            self._hang_up("max_duration")
        elif cfg.idle_timeout_s and not replying and h.idle_ms >= cfg.idle_timeout_s * 1000:
            self._hang_up("idle")

    # ---- replies -----------------------------------------------------------------------------

    def _start_turn_reply(self, audio: np.ndarray | None, confirmed: bool) -> None:
        if audio is None:
            return
        timeline = TurnTimeline(self._turn, clock=self.clock)
        if self.listener.speech_end:
            timeline.mark("speech_end", self.listener.speech_end[1])
        if confirmed:
            timeline.mark("endpoint")
        else:
            self.stats["speculations_started"] += 1
        self._start_reply(self._turn, timeline, confirmed, audio=audio)
        if not confirmed:
            self.emit(ev.Speculation(self._turn, "started"))

    def _start_reply(self, turn: int, timeline: TurnTimeline, confirmed: bool, audio: np.ndarray | None = None, fixed_text: str | None = None) -> None:
        r = self._reply
        if r and (not r.done or r.audible(echo_guard_ms=None)):
            self._interrupt() if r.confirmed else self._discard_speculation()
        self._timelines[turn] = timeline
        self._reply = Reply(turn, timeline, self, confirmed=confirmed, carried=self._carried)
        self._reply.start(audio, fixed_text)

    def _discard_speculation(self) -> None:
        r = self._reply
        if r and not r.confirmed and not r.discarded:
            r.discard()
            self.stats["speculations_cancelled"] += 1
            self.emit(ev.Speculation(r.turn, "cancelled"))

    def _interrupt(self) -> None:
        r = self._reply
        if r is None or r.timeline.interrupted:
            return
        self.stats["barge_ins"] += 1
        r.timeline.interrupted = True
        self._interrupted.add(r.turn)
        self.emit(ev.Interrupted(r.turn))
        if r.stop():
            self.emit(ev.ResponseDone(r.turn, r.text, interrupted=True))
        r.record()

    # ---- what a reply asks of its session (reply.Host) ---------------------------------------

    def emit(self, event: ev.Event) -> None:
        self._queue.put_nowait(event)

    def engine_request(self, reply: Reply) -> tuple[str, str | None]:
        reuse = self.config.reuse_prefix
        exact = self.agent.engine.exact_prefix_reuse
        return f"{self.conversation}-{reply.turn}-{next(self._request_ids)}", self.conversation if (exact if reuse is None else reuse) else None

    def transcribed(self, reply: Reply) -> None:
        """A speculative transcript moves the end of the pause: soon after a question, late mid-phrase."""
        if reply is self._reply and not reply.confirmed and not reply.discarded and reply.turn == self._turn:
            self._pause_text = reply.user_text
            self._move_end()

    def finished(self, reply: Reply) -> None:
        self.listener.reset_idle()  # idle time counts from the end of the reply
        if reply is self._reply and reply.turn == self._turn and not reply.confirmed:
            self._move_end()  # a speculation that failed before its transcript holds the end no longer
