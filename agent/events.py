"""Typed events a session yields to its transport; each carries the turn it belongs to.

`type` names follow the OpenAI Realtime API (its current names) where one fits; the Realtime
transport turns each into the API's messages.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np


@dataclasses.dataclass
class Event:
    type: ClassVar[str] = "event"
    turn: int | None


@dataclasses.dataclass
class SpeechStarted(Event):
    type: ClassVar[str] = "input_audio_buffer.speech_started"
    audio_ms: int  # media time into the session's input


@dataclasses.dataclass
class SpeechStopped(Event):
    type: ClassVar[str] = "input_audio_buffer.speech_stopped"
    audio_ms: int


@dataclasses.dataclass
class Speculation(Event):
    """A reply started at a short pause ("started"), kept at the end of turn, or dropped when the user went on."""

    type: ClassVar[str] = "turn.speculation"
    action: str  # started | kept | cancelled


@dataclasses.dataclass
class TurnContinued(Event):
    """The user went on after a pause the agent took for the end of their turn: this turn continues
    turn `previous`, whose words its Transcript carries; `previous` and the reply it cut short
    leave the history (the Realtime transport deletes both items)."""

    type: ClassVar[str] = "turn.continued"
    previous: int


@dataclasses.dataclass
class Transcript(Event):
    type: ClassVar[str] = "conversation.item.input_audio_transcription.completed"
    text: str
    audio_s: float  # the speech transcribed


@dataclasses.dataclass
class AgentText(Event):
    """Committed reply text, strictly in order (what the diffusion model has decided so far)."""

    type: ClassVar[str] = "response.output_audio_transcript.delta"
    text: str


@dataclasses.dataclass
class DenoiseStep(Event):
    """Which positions of the current block one denoising step committed (for visualization)."""

    type: ClassVar[str] = "response.denoise.step"
    block: int
    step: int
    block_size: int
    positions: list[int]  # offsets within the block
    tokens: list[str]
    masked_left: int


@dataclasses.dataclass
class AgentAudio(Event):
    type: ClassVar[str] = "response.output_audio.delta"
    samples: np.ndarray = dataclasses.field(repr=False)  # float32 mono
    sample_rate: int
    text: str  # the sentence this audio speaks
    sentence: int  # its index in the reply (piper may cut one sentence into several chunks)


@dataclasses.dataclass
class ResponseDone(Event):
    type: ClassVar[str] = "response.done"
    text: str  # the reply as generated
    interrupted: bool = False


@dataclasses.dataclass
class Interrupted(Event):
    """Barge-in: the transport must drop the agent audio it still holds and report what was played."""

    type: ClassVar[str] = "response.interrupted"


@dataclasses.dataclass
class TurnMetrics(Event):
    type: ClassVar[str] = "turn.metrics"
    timeline: dict  # see agent.metrics.TurnTimeline.to_dict


@dataclasses.dataclass
class Error(Event):
    type: ClassVar[str] = "error"
    code: str
    message: str


@dataclasses.dataclass
class HangUp(Event):
    type: ClassVar[str] = "session.hangup"
    reason: str  # idle | max_duration | closed
