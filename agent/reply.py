"""The agent's side of a session: one reply to one user turn, ASR → dialogue → engine → sentences → TTS.

A reply may start speculatively, at a short pause: its events are held back until the session
confirms the turn (`confirm`) and vanish if the user talks on (`discard`). What the listener
actually heard of it — whole sentences, then a share of the next — is what the history keeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Protocol

import numpy as np

from audio.asr import SAMPLE_RATE as ASR_RATE

from . import events as ev
from .clock import Clock
from .dialogue import Dialogue
from .metrics import TurnTimeline
from .sentences import SentenceSplitter

log = logging.getLogger(__name__)


class Host(Protocol):
    """What a reply needs of its session."""

    agent: object  # voice_agent.Agent: models and thread pools
    config: object  # voice_agent.AgentConfig: decoding and prefix-reuse settings
    dialogue: Dialogue
    clock: Clock  # the echo guard and 'still playing' are measured on it

    def engine_request(self, reply: Reply) -> tuple[str, str | None]: ...  # (request id, conversation or None)

    def emit(self, event: ev.Event) -> None: ...

    def transcribed(self, reply: Reply) -> None: ...

    def finished(self, reply: Reply) -> None: ...


@dataclasses.dataclass
class Spoken:
    """A sentence as it went out: its audio samples taken by the transport so far."""

    index: int
    text: str
    samples: int


@dataclasses.dataclass(eq=False)
class Reply:
    turn: int
    timeline: TurnTimeline
    host: Host
    confirmed: bool = False
    discarded: bool = False  # a speculation the user talked past: never shown, never kept
    done: bool = False
    task: asyncio.Task | None = None
    pending: list[ev.Event] = dataclasses.field(default_factory=list)
    carried: str = ""  # the words of the turn this one continues (the user had only paused)
    user_text: str = ""
    user_entry: dict | None = None  # the user turn in the dialogue history
    text: str = ""
    spoken: list[Spoken] = dataclasses.field(default_factory=list)
    sample_rate: int = 0
    sent_samples: int = 0  # taken by the transport
    audio_samples: int = 0  # produced (sent or still queued): the agent talks until it has all played
    heard_samples: int | None = None  # from `played`; None: assume what was sent was heard
    first_sent_at: float | None = None
    recorded: dict | None = None  # the assistant turn in the dialogue history, kept equal to what was heard

    # ---- lifecycle, driven by the session ----------------------------------------------------

    def start(self, audio: np.ndarray | None, fixed_text: str | None = None) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(audio, fixed_text))

    def confirm(self) -> None:
        """The turn really ended: release what was held back and let the reply into the history."""
        self.confirmed = True
        if self.user_text:
            self.user_entry = self.host.dialogue.add("user", self.user_text)
        for e in self.pending:
            self.host.emit(e)
        self.pending.clear()
        if self.done:
            self.record()

    def discard(self) -> None:
        """The user talked on: drop the speculation, unseen."""
        self.done = self.discarded = True
        self.task.cancel()

    def withdraw(self) -> None:
        """The user's turn went on past this reply (cut by now): it and the words it answered leave the history."""
        for entry in (self.user_entry, self.recorded):
            self.host.dialogue.remove(entry)
        self.user_entry = self.recorded = None

    def stop(self) -> bool:
        """Barge-in: stop producing; True if it was still being produced."""
        if self.done:
            return False
        self.done = True
        self.task.cancel()
        return True

    # ---- what was heard ----------------------------------------------------------------------

    def sent(self, audio: ev.AgentAudio) -> None:
        """The transport took this audio: it is on its way to the listener."""
        if self.first_sent_at is None:
            self.first_sent_at = self.host.clock.monotonic()
            self.timeline.mark("first_audio_sent", self.first_sent_at)
        if self.spoken and self.spoken[-1].index == audio.sentence:
            self.spoken[-1].samples += len(audio.samples)
        else:
            self.spoken.append(Spoken(audio.sentence, audio.text, len(audio.samples)))
        self.sent_samples += len(audio.samples)
        self._update_record()

    def played(self, seconds: float) -> None:
        """The listener heard `seconds` of this reply (the transport knows best)."""
        if self.sample_rate:
            self.heard_samples = int(seconds * self.sample_rate)
            self._update_record()

    def heard_text(self) -> str:
        """The words the listener heard: whole sentences, then a proportional share of the next."""
        budget = self.sent_samples if self.heard_samples is None else min(self.heard_samples, self.sent_samples)
        words: list[str] = []
        for s in self.spoken:
            if budget >= s.samples:
                words += s.text.split()
                budget -= s.samples
            else:
                parts = s.text.split()
                words += parts[: int(len(parts) * budget / max(s.samples, 1))]
                break
        return " ".join(words)

    def audible(self, echo_guard_ms: float | None, while_generating: bool = True) -> bool:
        """Its audio went out and, as far as we know, is still playing (after the echo guard, if given).
        A reply still being generated counts as playing unless `while_generating` is False: then only
        audio produced and not yet played does (between sentences the agent may be silent)."""
        if not self.confirmed or self.first_sent_at is None or self.timeline.interrupted:
            return False
        now = self.host.clock.monotonic()
        if echo_guard_ms is not None and (now - self.first_sent_at) * 1000 < echo_guard_ms:
            return False
        return (while_generating and not self.done) or now < self.first_sent_at + self.audio_samples / max(self.sample_rate, 1)

    def record(self) -> None:
        """Put the reply in the history as heard (kept up to date by later `sent` / `played`)."""
        if self.recorded is None and self.confirmed and (self.user_text or self.turn == 0):
            self.host.dialogue.add("assistant", self.heard_text())
            self.recorded = self.host.dialogue.turns[-1]

    def _update_record(self) -> None:
        if self.recorded is not None:
            self.recorded["content"] = self.heard_text()

    # ---- producing it ------------------------------------------------------------------------

    def _emit(self, event: ev.Event) -> None:
        """Held back while speculative, dropped once discarded."""
        if self.discarded:
            return
        if self.confirmed:
            self.host.emit(event)
        else:
            self.pending.append(event)

    async def _run(self, audio: np.ndarray | None, fixed_text: str | None) -> None:
        agent = self.host.agent
        sentences: asyncio.Queue[str | None] = asyncio.Queue()
        try:
            if fixed_text is None:
                heard = await asyncio.get_running_loop().run_in_executor(agent.asr_pool, agent.asr.transcribe, audio)
                self.user_text = f"{self.carried} {heard}".strip()
                self.timeline.mark("asr_final")
                if self.confirmed and self.user_text:  # else `confirm` adds it, maybe in `transcribed` just below
                    self.user_entry = self.host.dialogue.add("user", self.user_text)
                self._emit(ev.Transcript(self.turn, self.user_text, len(audio) / ASR_RATE))
                self.host.transcribed(self)
                if not self.user_text:
                    self.done = True
                    return
                await asyncio.gather(self._generate(sentences), self._speak(sentences))
            else:
                for sentence in SentenceSplitter().push(fixed_text + "\n"):
                    await sentences.put(sentence)
                await sentences.put(None)
                self.text = fixed_text
                self._emit(ev.AgentText(self.turn, fixed_text))
                await self._speak(sentences)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a failed reply is reported; the session and the process go on
            log.exception("reply for turn %d failed", self.turn)
            self._emit(ev.Error(self.turn, "reply_failed", str(e)))
        self.done = True
        self.host.finished(self)
        self._emit(ev.ResponseDone(self.turn, self.text))
        if self.confirmed:
            self.record()

    async def _generate(self, sentences: asyncio.Queue[str | None]) -> None:
        engine = self.host.agent.engine
        tok = engine.tokenizer
        params = self.host.config.decode
        pending_user = [] if self.confirmed else [{"role": "user", "content": self.user_text}]
        prompt = self.host.dialogue.prompt(pending_user)
        splitter = SentenceSplitter()
        request_id, conversation = self.host.engine_request(self)
        try:
            async for out in engine.stream(prompt, params, request_id=request_id, step_events=True, conversation=conversation):
                if out.step is not None:
                    s = out.step
                    positions = [p % params.block_size for p in s.positions]
                    self._emit(ev.DenoiseStep(self.turn, s.block, s.step, params.block_size, positions, [tok.decode([t]) for t in s.tokens], s.masked_left))
                if out.text:
                    self.timeline.mark("llm_first_text")
                    self.text += out.text
                    self._emit(ev.AgentText(self.turn, out.text))
                    for sentence in splitter.push(out.text):
                        self.timeline.mark("first_sentence")
                        await sentences.put(sentence)
            for sentence in splitter.flush():
                self.timeline.mark("first_sentence")
                await sentences.put(sentence)
        finally:
            await sentences.put(None)

    async def _speak(self, sentences: asyncio.Queue[str | None]) -> None:
        agent = self.host.agent
        loop = asyncio.get_running_loop()
        index = 0
        while (sentence := await sentences.get()) is not None:
            index += 1
            chunks = agent.tts.synthesize(sentence)
            while (chunk := await loop.run_in_executor(agent.tts_pool, next, chunks, None)) is not None:
                self.timeline.mark("tts_first_audio")
                self.sample_rate = agent.tts.sample_rate
                self.audio_samples += len(chunk)
                self._emit(ev.AgentAudio(self.turn, chunk, agent.tts.sample_rate, sentence, index))
