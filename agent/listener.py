"""The caller's side of a session: audio in → resample once → 32 ms frames → Silero VAD → endpointer.

`Listener.hear` turns a chunk of caller audio into one `Heard` per frame, in media time (the audio
received, never the wall clock), so a recording replayed at any speed gives the same turns. It
knows nothing of replies: the session decides what a pause or an end of turn means for the agent.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses

import numpy as np

from audio.codec import Framer, Resampler, to_float32
from audio.vad import FRAME, SAMPLE_RATE, SileroVAD

from .turns import Endpointer, Signal, TurnConfig

FRAME_MS = FRAME * 1000 / SAMPLE_RATE
PRE_ROLL_FRAMES = 10  # audio kept from before the speech start was confirmed
VAD_INLINE_FRAMES = 8  # chunks up to this many frames are scored on the event loop, larger ones off it


@dataclasses.dataclass(frozen=True, slots=True)
class Heard:
    """What one frame of caller audio meant."""

    signal: Signal | None
    media_ms: int  # audio received so far, this frame included
    in_speech: bool  # inside a user turn
    speech_ms: float  # the current uninterrupted run of speech (barge-in)
    idle_ms: float  # since the last speech frame (or the last `reset_idle`)
    arrival: float  # monotonic time the chunk holding this frame arrived
    audio: np.ndarray | None = None  # the turn's audio so far, at a PAUSE, END_OF_TURN or CAPPED


class Listener:
    def __init__(self, vad_session, config: TurnConfig) -> None:  # noqa: ANN001 (onnxruntime.InferenceSession)
        self.vad = SileroVAD(vad_session)
        self.endpointer = Endpointer(config, FRAME_MS)
        self.framer = Framer(FRAME)
        self._resampler: Resampler | None = None
        self._pre_roll: collections.deque[np.ndarray] = collections.deque(maxlen=PRE_ROLL_FRAMES)
        self._turn_audio: list[np.ndarray] = []
        self._frames = 0
        self._last_speech_frame = 0
        self.speech_end: tuple[int, float] | None = None  # (media ms, arrival) of the last speech frame

    @property
    def config(self) -> TurnConfig:
        return self.endpointer.config

    @config.setter
    def config(self, config: TurnConfig) -> None:
        self.endpointer.config = config

    @property
    def media_ms(self) -> int:
        return int(self._frames * FRAME_MS)

    async def hear(self, samples: np.ndarray, sample_rate: int, arrival: float) -> list[Heard]:
        """Frame, score and endpoint a chunk (int16 or float, mono); AudioError for bad audio."""
        audio = to_float32(samples, sample_rate)
        if self._resampler is None or self._resampler.in_rate != sample_rate:
            self._resampler = Resampler(sample_rate, SAMPLE_RATE)
        frames = self.framer.push(self._resampler(audio))
        if len(frames) > VAD_INLINE_FRAMES:  # a big chunk: keep the event loop (and others' pacing) free
            probs = await asyncio.to_thread(lambda: [self.vad(f) for f in frames])
        else:
            probs = [self.vad(f) for f in frames]
        return [self._step(frame, prob, arrival) for frame, prob in zip(frames, probs)]

    def _step(self, frame: np.ndarray, prob: float, arrival: float) -> Heard:
        self._frames += 1
        (self._turn_audio if self.endpointer.in_speech else self._pre_roll).append(frame)
        if prob >= self.config.vad_threshold:
            self._last_speech_frame = self._frames
            self.speech_end = (self.media_ms, arrival)
        signal = self.endpointer.push(prob)
        audio = None
        if signal is Signal.SPEECH_START:
            self._turn_audio = list(self._pre_roll)
            self._pre_roll.clear()
        elif signal in (Signal.PAUSE, Signal.END_OF_TURN, Signal.CAPPED):
            audio = self._take_turn_audio(keep=signal is Signal.PAUSE)
        idle_ms = (self._frames - self._last_speech_frame) * FRAME_MS
        return Heard(signal, self.media_ms, self.endpointer.in_speech, self.endpointer.speech_ms, idle_ms, arrival, audio)

    def move_end(self, ms: float) -> bool:
        """Move this pause's end-of-turn silence; True if the silence so far reaches it: the turn ends now."""
        if not self.endpointer.set_end(ms):
            return False
        self.endpointer.end()
        self._turn_audio = []
        return True

    def reset_idle(self) -> None:
        """Idle time counts from now (the agent just finished talking)."""
        self._last_speech_frame = max(self._last_speech_frame, self._frames)

    def _take_turn_audio(self, keep: bool) -> np.ndarray | None:
        audio = np.concatenate(self._turn_audio) if self._turn_audio else None
        if not keep:
            self._turn_audio = []
        return audio
