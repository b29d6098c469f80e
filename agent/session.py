"""One conversation: audio in → VAD/endpointing → ASR → dialogue → engine → sentences → TTS → events out.

The state machine, in media time (the audio received), with speculation and barge-in:
- speech start opens a turn; a short pause starts final ASR + the reply speculatively, holding its
  events back; speech that resumes cancels that work; the end of turn releases it (or starts it);
- user speech of `barge_in_ms` while the agent talks (after the echo guard) cancels the reply and
  its TTS, tells the transport to flush (`Interrupted`), and the history keeps only what was played.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import time
from typing import AsyncIterator

import numpy as np

from audio.codec import AudioError, Framer, Resampler, to_float32
from audio.vad import FRAME, SAMPLE_RATE, SileroVAD

from . import events as ev
from . import live_settings
from .dialogue import Dialogue
from .metrics import TurnTimeline
from .sentences import SentenceSplitter
from .turns import Endpointer, Signal, transcript_end_ms

log = logging.getLogger(__name__)

FRAME_MS = FRAME * 1000 / SAMPLE_RATE
PRE_ROLL_FRAMES = 10  # audio kept from before the speech start was confirmed (320 ms)
VAD_INLINE_FRAMES = 8  # up to 256 ms of audio is scored on the event loop (~0.2 ms a frame)


@dataclasses.dataclass
class _Reply:
    """A reply being produced for one turn; its events are held back until the turn is confirmed."""

    turn: int
    timeline: TurnTimeline
    task: asyncio.Task | None = None
    confirmed: bool = False
    discarded: bool = False  # a speculation the user talked past: never shown, never kept
    pending: list[ev.Event] = dataclasses.field(default_factory=list)
    user_text: str = ""
    text: str = ""
    sentences: list[list] = dataclasses.field(default_factory=list)  # [index, text, samples] per sentence sent
    sample_rate: int = 0
    sent_samples: int = 0  # taken by the transport
    audio_samples: int = 0  # produced (sent or still queued): the agent talks until it has all played
    heard_samples: int | None = None  # from played(); None: assume what was sent was heard
    first_sent_at: float | None = None
    done: bool = False
    recorded: dict | None = None  # the assistant turn in the dialogue history, updated by played()

    def heard_text(self) -> str:
        """The words the listener heard: whole sentences, then a proportional share of the next."""
        budget = self.sent_samples if self.heard_samples is None else min(self.heard_samples, self.sent_samples)
        words: list[str] = []
        for _, sentence, n in self.sentences:
            if budget >= n:
                words += sentence.split()
                budget -= n
            else:
                parts = sentence.split()
                words += parts[: int(len(parts) * budget / max(n, 1))]
                break
        return " ".join(words)


class Session:
    """Use as `async with agent.session() as s:`; feed `send_audio`, read `events()`."""

    def __init__(self, agent, config) -> None:  # noqa: ANN001 (Agent, AgentConfig: import cycle)
        self.agent = agent
        self.config = config
        self.dialogue = Dialogue.for_engine(agent.engine, config.system_prompt, config.max_history_tokens)
        self.vad = SileroVAD(agent.vad_session)
        self.endpointer = Endpointer(config.turns, FRAME_MS)
        self.framer = Framer(FRAME)
        self._resampler: Resampler | None = None
        self._queue: asyncio.Queue[ev.Event | None] = asyncio.Queue()
        self._pre_roll: collections.deque[np.ndarray] = collections.deque(maxlen=PRE_ROLL_FRAMES)
        self._turn_audio: list[np.ndarray] = []
        self._turn = 0  # id of the current/last user turn (0 is the greeting)
        self._reply: _Reply | None = None  # the reply in progress or last spoken
        self._speech_end: tuple[int, float] | None = None  # (media ms, arrival time) of the last speech frame
        self._media_frames = 0
        self._last_speech_frame = 0
        self._timelines: dict[int, TurnTimeline] = {}
        self._audio_lock = asyncio.Lock()
        self._request_ids = itertools.count()
        self.conversation = f"{id(self):x}"  # engine request ids and the cached prefix are keyed by it
        self.closed = False
        self.stats = collections.Counter()  # speculations started/kept/cancelled, barge-ins, turns

    # ---- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> "Session":
        self.agent.sessions += 1
        if self.config.greeting:
            self._start_reply(0, TurnTimeline(0), confirmed=True, fixed_text=self.config.greeting)
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
        if self._reply and self._reply.task and not self._reply.task.done():
            self._reply.task.cancel()
        self._queue.put_nowait(ev.HangUp(self._turn, reason))
        self._queue.put_nowait(None)

    async def events(self) -> AsyncIterator[ev.Event]:
        """Every event of the session in order, until it hangs up or closes."""
        while (event := await self._queue.get()) is not None:
            if isinstance(event, ev.AgentAudio):
                self._on_audio_sent(event)
            yield event
            if isinstance(event, ev.ResponseDone) and event.turn in self._timelines:
                yield ev.TurnMetrics(event.turn, self._timelines.pop(event.turn).to_dict())

    # ---- the two calls every transport needs -------------------------------------------------

    def flush(self) -> None:
        """Stop the agent now (an interrupt button, or a transport-detected barge-in)."""
        r = self._reply
        if r and (not r.done or self._agent_audible(echo_guard=False)):
            self._interrupt()

    def played(self, turn: int, seconds: float) -> None:
        """The listener heard `seconds` of turn `turn`'s reply audio: the history keeps only that."""
        r = self._reply
        if r is None or r.turn != turn or not r.sample_rate:
            return
        r.heard_samples = int(seconds * r.sample_rate)
        if r.recorded is not None:
            r.recorded["content"] = r.heard_text()

    def live_settings(self) -> dict[str, bool | int | float]:
        """The settings `update` may change, as this session now has them."""
        cfg = self.config
        return {k: getattr(cfg.decode if k in live_settings.DECODE else cfg.turns if k in live_settings.TURNS else cfg, k) for k in live_settings.SETTINGS}

    def update(self, **settings: bool | int | float) -> None:
        """Live settings (`live_settings.SETTINGS`), all or nothing: ValueError names the bad one."""
        settings = live_settings.check(settings)
        decode = {k: settings.pop(k) for k in live_settings.DECODE if k in settings}
        turns = {k: settings.pop(k) for k in live_settings.TURNS if k in settings}
        cfg = dataclasses.replace(
            self.config,
            decode=dataclasses.replace(self.config.decode, **decode),  # validates
            turns=dataclasses.replace(self.config.turns, **turns),
            **settings,
        )
        self.config = cfg
        self.endpointer.config = cfg.turns

    # ---- audio in ----------------------------------------------------------------------------

    async def send_audio(self, samples: np.ndarray, sample_rate: int) -> None:
        """Feed caller audio (int16 or float, mono, any supported rate). Bad audio → an `Error` event."""
        if self.closed:
            return
        arrival = time.monotonic()
        try:
            audio = to_float32(samples, sample_rate)
        except AudioError as e:
            self._emit(ev.Error(self._turn, "bad_audio", str(e)))
            return
        if self._resampler is None or self._resampler.in_rate != sample_rate:
            self._resampler = Resampler(sample_rate, SAMPLE_RATE)
        async with self._audio_lock:  # chunks are framed and scored strictly in arrival order
            frames = self.framer.push(self._resampler(audio))
            if len(frames) > VAD_INLINE_FRAMES:  # a big chunk: keep the event loop (and others' pacing) free
                probs = await asyncio.to_thread(lambda: [self.vad(f) for f in frames])
            else:
                probs = [self.vad(f) for f in frames]
            for frame, prob in zip(frames, probs):
                self._on_frame(frame, prob, arrival)
                if self.closed:
                    return

    def _on_frame(self, frame: np.ndarray, prob: float, arrival: float) -> None:
        self._media_frames += 1
        if self.endpointer.in_speech:
            self._turn_audio.append(frame)
        else:
            self._pre_roll.append(frame)
        if prob >= self.config.turns.vad_threshold:
            self._last_speech_frame = self._media_frames
            self._speech_end = (self._media_ms, arrival)
        signal = self.endpointer.push(prob)
        if signal is Signal.SPEECH_START:
            self._on_speech_start()
        elif signal is Signal.PAUSE:
            if self.config.speculation:
                self._start_turn_reply(confirmed=False)
        elif signal is Signal.RESUME:
            self._cancel_speculation()
        elif signal in (Signal.END_OF_TURN, Signal.CAPPED):
            if signal is Signal.CAPPED:
                self._emit(ev.Error(self._turn, "turn_too_long", f"turn cut at {self.config.turns.max_turn_s:g} s of speech"))
            self._on_end_of_turn()
        if self.endpointer.in_speech and self._agent_audible() and self.endpointer.speech_ms >= self.config.barge_in_ms:
            self._interrupt()
        self._check_limits()

    @property
    def _media_ms(self) -> int:
        return int(self._media_frames * FRAME_MS)

    def _on_speech_start(self) -> None:
        self._turn += 1
        self.stats["turns"] += 1
        self._turn_audio = list(self._pre_roll)
        self._pre_roll.clear()
        self._emit(ev.SpeechStarted(self._turn, self._media_ms))

    def _on_end_of_turn(self) -> None:
        self._emit(ev.SpeechStopped(self._turn, self._speech_end[0] if self._speech_end else self._media_ms))
        r = self._reply
        if r and r.turn == self._turn and not r.confirmed and not r.discarded:
            r.timeline.mark("endpoint")
            r.timeline.speculative = True
            self.stats["speculations_kept"] += 1
            self._emit(ev.Speculation(r.turn, "kept"))
            self._confirm(r)
        else:
            self._start_turn_reply(confirmed=True)
        self._turn_audio = []

    def _check_limits(self) -> None:
        cfg = self.config
        replying = self._reply is not None and not self._reply.done
        idle_ms = (self._media_frames - self._last_speech_frame) * FRAME_MS
        if cfg.max_call_s and self._media_ms >= cfg.max_call_s * 1000:
            self._hang_up("max_duration")
        elif cfg.idle_timeout_s and not replying and idle_ms >= cfg.idle_timeout_s * 1000:
            self._hang_up("idle")

    # ---- replies -----------------------------------------------------------------------------

    def _start_turn_reply(self, confirmed: bool) -> None:
        if not self._turn_audio:
            return
        timeline = TurnTimeline(self._turn)
        if self._speech_end:
            timeline.mark("speech_end", self._speech_end[1])
        if confirmed:
            timeline.mark("endpoint")
        else:
            self.stats["speculations_started"] += 1
        self._start_reply(self._turn, timeline, confirmed, audio=np.concatenate(self._turn_audio))
        if not confirmed:
            self._emit(ev.Speculation(self._turn, "started"))

    def _start_reply(self, turn: int, timeline: TurnTimeline, confirmed: bool, audio: np.ndarray | None = None, fixed_text: str | None = None) -> None:
        r = self._reply
        if r and (not r.done or self._agent_audible(echo_guard=False)):
            self._interrupt() if self._reply.confirmed else self._cancel_speculation()
        r = _Reply(turn, timeline, confirmed=confirmed)
        self._timelines[turn] = timeline
        r.task = asyncio.get_running_loop().create_task(self._run_reply(r, audio, fixed_text))
        self._reply = r

    def _cancel_speculation(self) -> None:
        r = self._reply
        if r and not r.confirmed and not r.discarded:
            r.done = r.discarded = True
            r.task.cancel()
            self.stats["speculations_cancelled"] += 1
            self._emit(ev.Speculation(r.turn, "cancelled"))

    def _move_endpoint(self, r: _Reply) -> None:
        """A speculative transcript moves the end of the pause: soon after a question, late mid-phrase."""
        if r is self._reply and not r.confirmed and not r.discarded and r.turn == self._turn:
            if self.endpointer.set_end(transcript_end_ms(r.user_text, self.config.turns)):
                self.endpointer.end()
                self._on_end_of_turn()

    def _confirm(self, r: _Reply) -> None:
        r.confirmed = True
        if r.user_text:
            self.dialogue.add("user", r.user_text)
        for e in r.pending:
            self._queue.put_nowait(e)
        r.pending.clear()
        if r.done:
            self._record(r)

    def _emit(self, event: ev.Event) -> None:
        self._queue.put_nowait(event)

    def _emit_reply(self, r: _Reply, event: ev.Event) -> None:
        """A reply's events wait while it is speculative and vanish if it is discarded."""
        if r.discarded:
            return
        if r.confirmed:
            self._queue.put_nowait(event)
        else:
            r.pending.append(event)

    async def _run_reply(self, r: _Reply, audio: np.ndarray | None, fixed_text: str | None) -> None:
        loop = asyncio.get_running_loop()
        agent = self.agent
        sentences: asyncio.Queue[str | None] = asyncio.Queue()
        try:
            if fixed_text is None:
                r.user_text = await loop.run_in_executor(agent.asr_pool, agent.asr.transcribe, audio)
                r.timeline.mark("asr_final")
                self._emit_reply(r, ev.Transcript(r.turn, r.user_text))
                self._move_endpoint(r)
                if not r.user_text:
                    r.done = True
                    return
                if r.confirmed:
                    self.dialogue.add("user", r.user_text)
                await asyncio.gather(self._generate(r, sentences), self._speak(r, sentences))
            else:
                for sentence in SentenceSplitter().push(fixed_text + "\n"):
                    await sentences.put(sentence)
                await sentences.put(None)
                r.text = fixed_text
                self._emit_reply(r, ev.AgentText(r.turn, fixed_text))
                await self._speak(r, sentences)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a failed reply is reported; the session and the process go on
            log.exception("reply for turn %d failed", r.turn)
            self._emit_reply(r, ev.Error(r.turn, "reply_failed", str(e)))
        r.done = True
        self._last_speech_frame = max(self._last_speech_frame, self._media_frames)  # idle time counts from here
        self._emit_reply(r, ev.ResponseDone(r.turn, r.text))
        if r.confirmed:
            self._record(r)

    async def _generate(self, r: _Reply, sentences: asyncio.Queue[str | None]) -> None:
        engine, tok = self.agent.engine, self.agent.engine.tokenizer
        params = self.config.decode
        pending_user = [] if r.confirmed else [{"role": "user", "content": r.user_text}]
        prompt = self.dialogue.prompt(pending_user)
        splitter = SentenceSplitter()
        try:
            request_id = f"{self.conversation}-{r.turn}-{next(self._request_ids)}"
            reuse = self.config.reuse_prefix
            conversation = self.conversation if (engine.exact_prefix_reuse if reuse is None else reuse) else None
            async for out in engine.stream(prompt, params, request_id=request_id, step_events=True, conversation=conversation):
                if out.step is not None:
                    s = out.step
                    self._emit_reply(r, ev.DenoiseStep(r.turn, s.block, s.step, params.block_size, [p % params.block_size for p in s.positions], [tok.decode([t]) for t in s.tokens], s.masked_left))
                if out.text:
                    r.timeline.mark("llm_first_text")
                    r.text += out.text
                    self._emit_reply(r, ev.AgentText(r.turn, out.text))
                    for sentence in splitter.push(out.text):
                        r.timeline.mark("first_sentence")
                        await sentences.put(sentence)
            for sentence in splitter.flush():
                r.timeline.mark("first_sentence")
                await sentences.put(sentence)
        finally:
            await sentences.put(None)

    async def _speak(self, r: _Reply, sentences: asyncio.Queue[str | None]) -> None:
        loop = asyncio.get_running_loop()
        tts = self.agent.tts
        index = 0
        while (sentence := await sentences.get()) is not None:
            index += 1
            chunks = tts.synthesize(sentence)
            while (chunk := await loop.run_in_executor(self.agent.tts_pool, next, chunks, None)) is not None:
                r.timeline.mark("tts_first_audio")
                r.sample_rate = tts.sample_rate
                r.audio_samples += len(chunk)
                self._emit_reply(r, ev.AgentAudio(r.turn, chunk, tts.sample_rate, sentence, index))

    # ---- audio out, barge-in and history -----------------------------------------------------

    def _on_audio_sent(self, audio: ev.AgentAudio) -> None:
        r = self._reply
        if r is None or r.turn != audio.turn:
            return
        if r.first_sent_at is None:
            r.first_sent_at = time.monotonic()
            r.timeline.mark("first_audio_sent", r.first_sent_at)
        if r.sentences and r.sentences[-1][0] == audio.sentence:
            r.sentences[-1][2] += len(audio.samples)
        else:
            r.sentences.append([audio.sentence, audio.text, len(audio.samples)])
        r.sent_samples += len(audio.samples)
        if r.recorded is not None:
            r.recorded["content"] = r.heard_text()

    def _agent_audible(self, echo_guard: bool = True) -> bool:
        """The agent is talking: its reply audio went out and (as far as we know) is still playing."""
        r = self._reply
        if r is None or not r.confirmed or r.first_sent_at is None or r.timeline.interrupted:
            return False
        now = time.monotonic()
        if echo_guard and (now - r.first_sent_at) * 1000 < self.config.echo_guard_ms:
            return False
        played_until = r.first_sent_at + r.audio_samples / max(r.sample_rate, 1)
        return not r.done or now < played_until

    def _interrupt(self) -> None:
        r = self._reply
        if r is None or r.timeline.interrupted:
            return
        self.stats["barge_ins"] += 1
        r.timeline.interrupted = True
        # Drop reply audio the transport has not taken yet.
        kept = [e for e in self._drain() if not (isinstance(e, ev.AgentAudio) and e.turn == r.turn)]
        for e in kept:
            self._queue.put_nowait(e)
        self._queue.put_nowait(ev.Interrupted(r.turn))
        if not r.done:
            r.done = True
            r.task.cancel()
            self._queue.put_nowait(ev.ResponseDone(r.turn, r.text, interrupted=True))
        self._record(r)

    def _drain(self) -> list[ev.Event | None]:
        items = []
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        return items

    def _record(self, r: _Reply) -> None:
        """Put the assistant's reply in the history as heard (updated again by later `played` calls)."""
        if r.recorded is None and r.confirmed and (r.user_text or r.turn == 0):
            self.dialogue.add("assistant", r.heard_text())
            r.recorded = self.dialogue.turns[-1]
