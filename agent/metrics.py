"""THE per-turn latency timeline (shared/DESIGN.md), used by every transport, the browser and the benchmarks."""

from __future__ import annotations

import dataclasses

from .clock import SYSTEM, Clock

# In pipeline order. Times are the session clock's monotonic seconds on the server.
STAGES = (
    "speech_end",  # arrival of the audio in which the VAD saw the user stop
    "endpoint",  # end-of-turn decision
    "asr_final",
    "llm_first_text",
    "first_sentence",
    "tts_first_audio",
    "first_audio_sent",  # the transport took the first reply audio of the turn
)


@dataclasses.dataclass(frozen=True)
class TurnVerdict:
    """The end-of-turn model's answer at the pause that ended the turn."""

    complete: float  # probability that the speaker had finished
    ms: float  # its time, from the pause to the answer (queueing included)


@dataclasses.dataclass
class TurnTimeline:
    turn: int
    marks: dict[str, float] = dataclasses.field(default_factory=dict)
    speculative: bool = False  # the kept reply was started at a short pause, before the endpoint
    interrupted: bool = False
    turn_model: TurnVerdict | None = None  # None: not asked, or its answer came after the end of turn
    clock: Clock = dataclasses.field(default=SYSTEM, repr=False, compare=False)  # the session's: a test drives it

    def mark(self, stage: str, t: float | None = None) -> None:
        """Record the first time a stage is reached (later calls do not move it)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        self.marks.setdefault(stage, self.clock.monotonic() if t is None else t)

    @property
    def server_voice_to_voice_ms(self) -> float | None:
        """First reply audio sent − speech end seen by the server's VAD."""
        if "speech_end" in self.marks and "first_audio_sent" in self.marks:
            return (self.marks["first_audio_sent"] - self.marks["speech_end"]) * 1000
        return None

    def to_dict(self) -> dict:
        """Each stage in ms after speech end (None where not reached), plus the headline figure."""
        t0 = self.marks.get("speech_end")
        rel = {s: (None if s not in self.marks or t0 is None else round((self.marks[s] - t0) * 1000, 1)) for s in STAGES}
        v2v = self.server_voice_to_voice_ms
        return {
            "turn": self.turn,
            "stages_ms": rel,
            "server_voice_to_voice_ms": None if v2v is None else round(v2v, 1),
            "speculative": self.speculative,
            "interrupted": self.interrupted,
            "turn_model": None if self.turn_model is None else {"complete": round(self.turn_model.complete, 3), "ms": round(self.turn_model.ms, 1)},
        }
