"""`session.update` in its three shapes, checked and translated before anything changes.

- the current Realtime API: `type: "realtime"`, `instructions`, `output_modalities`, nested
  `audio.input` / `audio.output` (`format`, `turn_detection`, `voice`), `max_output_tokens`;
- the beta API: flat `modalities`, `input_audio_format` / `output_audio_format` (`pcm16`,
  `g711_ulaw`, `g711_alaw`), `turn_detection`, `voice`, `max_response_output_tokens`;
- this project's flat keys: the live settings, `input_sample_rate` / `output_sample_rate`,
  `denoise_steps`, `event_names`.

Values are as strict as the live settings (every number goes through `live_settings.check`, in
`Session.update`); Realtime keys the agent cannot honour (tools, tracing, ...) are accepted and
`session.updated` shows what the session really does. An update in neither Realtime shape keeps
refusing unknown keys: there they are typos of the project's own settings.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from audio.codec import SUPPORTED_RATES, alaw_decode, alaw_encode, resample, to_int16, ulaw_decode, ulaw_encode

from .. import live_settings
from ..listener import FRAME_MS, PRE_ROLL_FRAMES

DEFAULT_RATE = 24000  # the Realtime API's pcm16 rate, both ways, until session.update says otherwise
G711_RATE = 8000
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")
TURN_DETECTION_TYPES = ("server_vad", "semantic_vad")  # both are this agent's endpointer
PREFIX_PADDING_MS = round(PRE_ROLL_FRAMES * FRAME_MS)  # the audio kept before a speech start: fixed
CURRENT_KEYS = {"type", "instructions", "output_modalities", "audio", "max_output_tokens", "model", "tools", "tool_choice", "tracing",
                "truncation", "prompt", "include", "reasoning", "parallel_tool_calls", "object", "id", "expires_at"}
BETA_KEYS = {"modalities", "input_audio_format", "output_audio_format", "turn_detection", "voice", "max_response_output_tokens",
             "input_audio_transcription", "input_audio_noise_reduction", "temperature", "speed", "client_secret"}
PROJECT_KEYS = {"input_sample_rate", "output_sample_rate", "denoise_steps", "event_names"}


@dataclasses.dataclass(frozen=True)
class AudioFormat:
    """A Realtime audio format: pcm16 at `rate`, or G.711 (μ-law `pcmu`, A-law `pcma`) at 8 kHz."""

    codec: str = "pcm16"
    rate: int = DEFAULT_RATE

    def decode(self, data: bytes) -> np.ndarray:
        """Client bytes → int16 samples; ValueError for a torn pcm16 sample."""
        if self.codec == "pcmu":
            return ulaw_decode(data)
        if self.codec == "pcma":
            return alaw_decode(data)
        if len(data) % 2:
            raise ValueError(f"pcm16 audio has an even number of bytes, got {len(data)}")
        return np.frombuffer(data, dtype="<i2")

    def encode(self, samples: np.ndarray, rate: int) -> bytes:
        """Float samples at `rate` → client bytes in this format."""
        pcm = to_int16(resample(samples, rate, self.rate))
        if self.codec == "pcmu":
            return ulaw_encode(pcm)
        if self.codec == "pcma":
            return alaw_encode(pcm)
        return pcm.astype("<i2").tobytes()

    def current(self) -> dict:
        return {"type": "audio/pcm", "rate": self.rate} if self.codec == "pcm16" else {"type": f"audio/{self.codec}"}

    def beta(self) -> str:
        return {"pcm16": "pcm16", "pcmu": "g711_ulaw", "pcma": "g711_alaw"}[self.codec]


BETA_FORMATS = {"pcm16": "pcm16", "g711_ulaw": "pcmu", "g711_alaw": "pcma"}
CURRENT_FORMATS = {"audio/pcm": "pcm16", "audio/pcmu": "pcmu", "audio/pcma": "pcma"}


@dataclasses.dataclass
class Update:
    """One session.update, translated and checked; nothing of it applied yet."""

    live: dict = dataclasses.field(default_factory=dict)
    instructions: str | None = None  # None: unchanged
    input: AudioFormat | None = None
    output: AudioFormat | None = None
    text_only: bool | None = None
    denoise_steps: bool | None = None
    beta: bool | None = None  # event names: True beta, False current, None unchanged


@dataclasses.dataclass
class Context:
    """What a translation needs to know of the session it updates."""

    input: AudioFormat
    output: AudioFormat
    voice: str  # the installed piper voice
    default_max_tokens: int  # what "inf" means


def translate(cfg: dict, ctx: Context) -> Update:
    """`cfg` (a session.update's `session`) as an Update; ValueError names the first bad value."""
    shaped = bool(cfg.keys() & (CURRENT_KEYS | BETA_KEYS))
    u = Update()
    _session_type(cfg)
    if "instructions" in cfg:
        u.instructions = cfg["instructions"] if isinstance(cfg["instructions"], str) else _bad("instructions", "a string")
    for key in ("output_modalities", "modalities"):
        if key in cfg:
            u.text_only = _text_only(key, cfg[key])
    for key in ("max_output_tokens", "max_response_output_tokens"):
        if key in cfg:
            u.live["max_new_tokens"] = ctx.default_max_tokens if cfg[key] == "inf" else cfg[key]
    audio = _object(cfg, "audio")
    inp, out = _object(audio, "input", "audio.input"), _object(audio, "output", "audio.output")
    u.input = _format(inp.get("format"), "audio.input.format") if "format" in inp else None
    u.output = _format(out.get("format"), "audio.output.format") if "format" in out else None
    for where, value in (("audio.output.voice", out.get("voice")), ("voice", cfg.get("voice"))):
        if value is not None:
            _voice(where, value, ctx.voice)
    for where, holder in (("audio.input.turn_detection", inp), ("turn_detection", cfg)):
        if "turn_detection" in holder:
            u.live.update(_turn_detection(where, holder["turn_detection"]))
    _beta_formats(cfg, u, ctx)
    _project_keys(cfg, u, ctx)
    if "event_names" in cfg:
        names = cfg["event_names"]
        u.beta = names == "beta" if names in ("beta", "current") else _bad("event_names", '"current" or "beta"')
    elif "type" in cfg or cfg.keys() & BETA_KEYS:
        u.beta = "type" not in cfg
    # the live settings in any shape; beside Realtime keys, other keys are the API's (ignored), alone they are typos (refused)
    u.live.update({k: v for k, v in cfg.items() if k not in PROJECT_KEYS and (k in live_settings.SETTINGS or not shaped)})
    u.live = live_settings.check(u.live)
    return u


def _bad(what: str, expected: str) -> None:
    raise ValueError(f"{what} must be {expected}")


def _object(holder: dict, key: str, where: str | None = None) -> dict:
    value = holder.get(key, {})
    return value if isinstance(value, dict) else _bad(where or key, "an object")


def _session_type(cfg: dict) -> None:
    if "type" in cfg and cfg["type"] != "realtime":
        _bad("type", '"realtime" (this server has no transcription sessions)')


def _text_only(key: str, value: object) -> bool:
    if not (isinstance(value, list) and value and all(m in ("text", "audio") for m in value)):
        _bad(key, 'a list of "text" / "audio"')
    return "audio" not in value


def _format(value: object, where: str) -> AudioFormat:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str) or value["type"] not in CURRENT_FORMATS:
        _bad(where, 'an object with type "audio/pcm", "audio/pcmu" or "audio/pcma"')
    codec = CURRENT_FORMATS[value["type"]]
    if codec != "pcm16":
        return AudioFormat(codec, G711_RATE)
    rate = value.get("rate", DEFAULT_RATE)
    return AudioFormat("pcm16", _rate(f"{where}.rate", rate))


def _rate(where: str, rate: object) -> int:
    if isinstance(rate, bool) or not isinstance(rate, int) or rate not in SUPPORTED_RATES:
        _bad(where, f"one of {', '.join(map(str, SUPPORTED_RATES))}")
    return rate


def _voice(where: str, value: object, installed: str) -> None:
    """Only the installed voice speaks; the API's own names are accepted and answered with it."""
    name = value.get("id") if isinstance(value, dict) else value
    if name not in (installed, *OPENAI_VOICES):
        _bad(where, f'"{installed}" (the installed voice) or one of the Realtime API\'s names')


def _turn_detection(where: str, value: object) -> dict:
    """null: push-to-talk; server_vad / semantic_vad: the endpointer, with the numbers it shares."""
    if value is None:
        return {"push_to_talk": True}
    if not isinstance(value, dict) or value.get("type", "server_vad") not in TURN_DETECTION_TYPES:
        _bad(where, 'null or an object with type "server_vad" or "semantic_vad"')
    live = {"push_to_talk": False}
    if "silence_duration_ms" in value:
        live["end_ms"] = value["silence_duration_ms"]
    if "threshold" in value:
        live["vad_threshold"] = value["threshold"]
    return live


def _beta_formats(cfg: dict, u: Update, ctx: Context) -> None:
    for key, side in (("input_audio_format", "input"), ("output_audio_format", "output")):
        if key in cfg:
            codec = BETA_FORMATS.get(cfg[key]) if isinstance(cfg[key], str) else None
            if codec is None:
                _bad(key, '"pcm16", "g711_ulaw" or "g711_alaw"')
            now = getattr(u, side) or getattr(ctx, side)
            keep = codec == "pcm16" and now.codec == "pcm16"  # a pcm16 rate set before (input_sample_rate) stays
            setattr(u, side, now if keep else AudioFormat(codec, DEFAULT_RATE if codec == "pcm16" else G711_RATE))


def _project_keys(cfg: dict, u: Update, ctx: Context) -> None:
    for key, side in (("input_sample_rate", "input"), ("output_sample_rate", "output")):
        if key in cfg:
            fmt = getattr(u, side) or getattr(ctx, side)
            if fmt.codec != "pcm16":
                _bad(key, f"left out: the {side} audio is G.711, 8000 Hz")
            setattr(u, side, AudioFormat("pcm16", _rate(key, cfg[key])))
    if "denoise_steps" in cfg:
        u.denoise_steps = cfg["denoise_steps"] if isinstance(cfg["denoise_steps"], bool) else _bad("denoise_steps", "true or false")


@dataclasses.dataclass
class Effective:
    """What a session really does, for `session.created` / `session.updated`."""

    id: str
    model: str
    voice: str
    instructions: str
    input: AudioFormat
    output: AudioFormat
    text_only: bool
    beta: bool
    denoise_steps: bool
    agent_sample_rate: int
    live: dict  # Session.live_settings()


def describe(e: Effective) -> dict:
    """The session in the current API's shape, the beta's flat fields beside it, and the project's keys.

    Fields the agent does not honour say what it does instead (no tools, no noise reduction,
    whisper transcription always on, one voice)."""
    modalities = ["text"] if e.text_only else ["audio"]
    turn_detection = None if e.live["push_to_talk"] else {
        "type": "server_vad", "threshold": e.live["vad_threshold"], "silence_duration_ms": e.live["end_ms"],
        "prefix_padding_ms": PREFIX_PADDING_MS, "create_response": True, "interrupt_response": True, "idle_timeout_ms": None,
    }
    transcription = {"model": "whisper", "language": "en"}
    return {
        "id": e.id, "object": "realtime.session", "type": "realtime", "model": e.model, "instructions": e.instructions,
        "output_modalities": modalities, "max_output_tokens": e.live["max_new_tokens"], "tools": [], "tool_choice": "none", "tracing": None,
        "audio": {
            "input": {"format": e.input.current(), "turn_detection": turn_detection, "transcription": transcription, "noise_reduction": None},
            "output": {"format": e.output.current(), "voice": e.voice, "speed": 1.0},
        },
        # the beta API's names for the same
        "modalities": ["text"] if e.text_only else ["text", "audio"], "voice": e.voice, "turn_detection": turn_detection,
        "input_audio_format": e.input.beta(), "output_audio_format": e.output.beta(), "input_audio_transcription": transcription,
        "max_response_output_tokens": e.live["max_new_tokens"],
        # this project's
        "event_names": "beta" if e.beta else "current", "input_sample_rate": e.input.rate, "output_sample_rate": e.output.rate,
        "agent_sample_rate": e.agent_sample_rate, "denoise_steps": e.denoise_steps, **e.live,
    }
