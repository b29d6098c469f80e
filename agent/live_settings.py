"""The settings a running session may change, with their types and bounds, checked in one place.

Every way in — the Realtime `session.update` (WebSocket and WebRTC data channel), `Session.update`
from Python, the latency benchmark's `--set` — goes through `check`, so a value that is not a
finite number inside its documented range is refused with a message naming the setting and the
range, before anything changes. The README's live-settings table lists the same bounds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TypeVar

C = TypeVar("C")


@dataclasses.dataclass(frozen=True)
class Live:
    kind: type  # bool, int or float
    low: float = 0
    high: float = 0
    doc: str = ""

    def describe(self) -> str:
        if self.kind is bool:
            return "true or false"
        return f"{'a whole number' if self.kind is int else 'a number'} in [{self.low:g}, {self.high:g}]"


DECODE = {
    "threshold": Live(float, 0.01, 1.0, "confidence a masked position needs to be committed in a step"),
    "block_size": Live(int, 1, 256, "tokens decoded in parallel per block"),
    "max_new_tokens": Live(int, 1, 1024, "reply length cap, in tokens"),
}
TURNS = {
    "end_ms": Live(int, 40, 10_000, "silence that ends a turn (no speculation, or a statement)"),
    "question_end_ms": Live(int, 0, 10_000, "silence that ends a turn whose pause transcript ends in '?' (0: off)"),
    "unfinished_end_ms": Live(int, 0, 10_000, "silence that ends a turn whose pause transcript stops mid-phrase or has not come yet (0: off)"),
    "turn_model": Live(bool, doc="ask the end-of-turn model at each pause (the server must have loaded it)"),
    "complete_end_ms": Live(int, 0, 10_000, "silence that ends a turn the end-of-turn model hears as finished (0: off)"),
    "incomplete_end_ms": Live(int, 0, 10_000, "silence that ends a turn the end-of-turn model hears as unfinished (0: off)"),
    "continue_ms": Live(int, 0, 10_000, "speech this soon after a turn's end, while its reply plays, continues that turn: answered as one (0: off)"),
    "pause_ms": Live(int, 20, 5_000, "silence that starts speculative ASR and reply"),
    "min_speech_ms": Live(int, 20, 5_000, "speech that starts a turn"),
    "vad_threshold": Live(float, 0.01, 0.99, "Silero speech probability that counts as speech"),
    "push_to_talk": Live(bool, doc="silence never ends a turn; the client ends it (input_audio_buffer.commit)"),
}
SESSION = {
    "echo_guard_ms": Live(int, 0, 10_000, "no barge-in during the first ms of agent speech"),
    "barge_in_ms": Live(int, 0, 10_000, "user speech this long over the agent's voice interrupts it; shorter is dropped"),
    "speculation": Live(bool, doc="start ASR and the reply at a short pause"),
}
SETTINGS: dict[str, Live] = {**DECODE, **TURNS, **SESSION}


def check(values: Mapping[str, object]) -> dict[str, bool | int | float]:
    """`values` as the session's typed settings; ValueError (nothing applied) for any bad one.

    Accepts JSON's types: a whole float (3.0) for an integer setting, an int for a float one.
    """
    unknown = sorted(set(values) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown setting(s): {', '.join(unknown)} (known: {', '.join(SETTINGS)})")
    return {key: _coerce(key, value) for key, value in values.items()}


def apply(config: C, values: Mapping[str, object]) -> C:
    """An agent config (voice_agent.AgentConfig) with `values` checked and applied: decoding, turns, session."""
    values = check(values)
    decode = {k: values.pop(k) for k in DECODE if k in values}
    turns = {k: values.pop(k) for k in TURNS if k in values}
    return dataclasses.replace(
        config,
        decode=dataclasses.replace(config.decode, **decode),  # validates the decoding as a whole
        turns=dataclasses.replace(config.turns, **turns),
        **values,
    )


def _coerce(key: str, value: object) -> bool | int | float:
    spec = SETTINGS[key]
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {_show(value)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        ok = False
    elif isinstance(value, int):  # compared as an int: a huge one never becomes a float (OverflowError)
        ok = spec.low <= value <= spec.high
    else:
        ok = math.isfinite(value) and spec.low <= value <= spec.high and (spec.kind is float or value.is_integer())
    if not ok:
        raise ValueError(f"{key} must be {spec.describe()}, got {_show(value)}")
    return spec.kind(value)


def _show(value: object) -> str:
    """A short rendering for an error message (a hostile value can be huge)."""
    if isinstance(value, (str, list, dict)):
        return type(value).__name__
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        return "a huge integer"
    return text if len(text) <= 40 else text[:37] + "..."
