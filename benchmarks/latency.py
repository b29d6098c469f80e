"""Voice-to-voice latency, measured from the caller's side: `voice-agent bench` / `python -m benchmarks.latency`.

Callers stream prepared speech in real time (20 ms frames) and keep streaming silence after
speaking, as a phone line does; they never commit a turn: endpointing is the server's alone.
The true end of each utterance is known from the audio itself (it is trimmed), so:

    caller voice-to-voice = first audible reply audio (> -40 dBFS) of the turn − true end of speech

next to the server's own timeline for the same turn (`turn.metrics`). Utterances with 300-700 ms
pauses measure the premature-endpoint rate (and how many of those the server then answered as one
turn, `turn.continued`); transcripts give the ASR word error rate. The same
load runs against a baseline configuration (no speculation, vanilla decoding, 800 ms endpointing)
so every gain shows as a ratio.

Transports (--transport):
  ws      the Realtime-style WebSocket (/v1/realtime), pcm16 16 kHz in binary frames
  webrtc  a WebRTC peer on aiortc (POST /v1/webrtc/offer): Opus 48 kHz both ways, events on the
          data channel; reply audio counts when it leaves aiortc's jitter buffer, as in a browser
  twilio  Twilio Media Streams (/twilio/stream), μ-law 8 kHz; the protocol carries no turn ids,
          transcripts or server timelines, so only caller figures (no WER, no server stages)
  inproc  sessions of the embedding API in this process: no network at all

Server: --url ws://HOST:PORT (a running `voice-agent serve`; its --token via --token) or, by
default, one the benchmark starts in this process on a free loopback port with the same models.
Against --url the baseline is set per session with session.update (speculation off, end_ms 800, no turn model,
threshold 1.0 = one token per step; the server's KV-cache mode cannot be changed remotely).

Speech (--speech-dir DIR): WAV files, 16-bit PCM, mono, 8000-48000 Hz, plus DIR/transcripts.tsv
with one line per WAV:   FILE.wav<TAB>what is said[<TAB>KIND]
KIND (a lower-case word, e.g. `paused`) marks an utterance with a pause inside it: it counts towards
the premature-endpoint rate, which is also reported per kind; blank lines and lines starting with #
are ignored. Leading and trailing audio
below -40 dBFS is trimmed: the last sample above it is the true end of speech. Without
--speech-dir, the question set is synthesized with the agent's piper voice before the run.

Output: a table, --json OUT (every figure and every turn; rewritten after each run so partial
results survive), --report OUT.html (self-contained charts). A turn without an audible reply
within --timeout seconds counts as failed and the run goes on.

Examples:
  voice-agent bench --callers 1,2,4,8 --json latency.json --report latency.html
  voice-agent bench --url ws://127.0.0.1:8000 --transport twilio --speech-dir my-speech/
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import functools
import json
import logging
import os
import re
import time
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from agent import events as ev
from agent import live_settings
from agent.turns import COMPLETE
from audio.codec import AudioError, resample, to_float32, trim
from dllm_engine.loading import DTYPE_CHOICES
from dllm_engine.options import positive_int

from . import report as html_report
from .common import machine
from .lines import NETWORK_LINES, BenchError, Line, LineError, LocalServer, Target, base_url, check_reachable, inproc_line

log = logging.getLogger(__name__)

RATE = 16000
FRAME_S = 0.02
FRAME_MS = 20
AUDIBLE_DBFS = -40.0
AUDIBLE = 10 ** (AUDIBLE_DBFS / 20)  # the same level as an amplitude: what trimming keeps
AFTER_REPLY_S = 1.0  # the caller listens this long after the reply has played before speaking again
PREMATURE_SLACK_MS = 250  # a speech_stopped this far before the true end is premature (VAD tails are shorter, pauses longer)
TRANSCRIPTS = "transcripts.tsv"
BASELINE_END_MS = 800  # the baseline's endpointing silence
BASELINE_LIVE = {"speculation": False, "end_ms": BASELINE_END_MS, "turn_model": False, "threshold": 1.0}  # the baseline as session.update settings
SILENCE = np.zeros(int(RATE * FRAME_S), dtype=np.float32)

QUESTIONS = [
    "Hello, how are you doing today?",
    "What do you like to do on the weekend?",
    "Do you have any pets at home?",
    "What is your favorite kind of music?",
    "Tell me about your weekend.",
    "Where would you like to travel next year?",
    "What did you have for dinner last night?",
    "Do you like watching movies?",
    "How was your day at work?",
    "What are you reading these days?",
]
# (first half, second half): spoken with a 300-700 ms pause between them.
PAUSED = [
    ("I was thinking about", "going to the beach tomorrow."),
    ("My favorite food is", "probably pizza with mushrooms."),
    ("Last summer we went", "hiking in the mountains."),
    ("I would like to know", "what you think about dogs."),
    ("On Sunday I usually", "visit my parents for lunch."),
]


@dataclasses.dataclass
class Utterance:
    text: str
    audio: np.ndarray  # 16 kHz float32, trimmed: speech starts at 0 and ends at the last sample
    paused: str = ""  # the kind of pause inside it ("" for none)


@dataclasses.dataclass
class TurnResult:
    caller: int
    text: str
    paused: str
    server_turn: int | None = None
    transcript: str | None = None
    caller_v2v_ms: float | None = None
    server: dict | None = None  # the server's timeline for the turn
    premature: bool = False  # the server decided the turn had ended before the speaker had
    continued: bool = False  # ... and then joined the rest to that turn (turn.continued): answered as one
    send_lag_ms: float = 0.0  # how far the caller fell behind real time while speaking (an overloaded bench machine)
    failed: str | None = None


# ---- speech, prepared before the run ---------------------------------------------------------


def prepare_speech(tts, seed: int = 0) -> list[Utterance]:  # noqa: ANN001 (audio.tts.Synthesizer)
    """Synthesize the question set (and paused utterances) before the run, never during it."""
    rng = np.random.default_rng(seed)

    def say(text: str) -> np.ndarray:
        return trim(resample(np.concatenate(list(tts.synthesize(text))), tts.sample_rate, RATE), AUDIBLE)

    plain = [Utterance(q, say(q)) for q in QUESTIONS]
    paused = []
    for a, b in PAUSED:
        gap = np.zeros(int(rng.uniform(0.3, 0.7) * RATE), dtype=np.float32)
        paused.append(Utterance(f"{a} {b}", np.concatenate([say(a), gap, say(b)]), paused="paused"))
    return [u for pair in zip(plain, paused + paused) for u in pair] + plain[len(paused) * 2 :]


def load_speech(folder: Path) -> list[Utterance]:
    """WAV files plus transcripts.tsv (the format is in the module doc); each problem names its file."""
    if not folder.is_dir():
        raise BenchError(f"--speech-dir {folder}: not a directory")
    index = folder / TRANSCRIPTS
    if not index.is_file():
        raise BenchError(f"{index} is missing: --speech-dir needs one line per WAV: FILE.wav<TAB>transcript[<TAB>KIND of pause]")
    entries = _read_transcripts(index)
    wavs = sorted(p.name for p in folder.glob("*.wav"))
    if not wavs:
        raise BenchError(f"{folder}: no .wav files")
    if missing := [w for w in wavs if w not in entries]:
        raise BenchError(f"{index}: no transcript for {', '.join(missing)}")
    if absent := [n for n in entries if n not in wavs]:
        raise BenchError(f"{index} lists {', '.join(absent)}, not found in {folder}")
    return [Utterance(text, trim(read_wav(folder / name), AUDIBLE), paused) for name, (text, paused) in entries.items()]


def _read_transcripts(path: Path) -> dict[str, tuple[str, str]]:
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        cols = [c.strip() for c in line.split("\t")]
        if len(cols) not in (2, 3) or not cols[1] or not all(re.fullmatch(r"[a-z][a-z-]*", c) for c in cols[2:]):
            raise BenchError(f"{path}:{n}: expected FILE.wav<TAB>transcript[<TAB>KIND of pause, a lower-case word], got {line!r}")
        out[cols[0]] = (cols[1], "".join(cols[2:]))
    return out


def read_wav(path: Path) -> np.ndarray:
    """A 16-bit PCM mono WAV at a supported rate, as 16 kHz float32."""
    try:
        with wave.open(str(path)) as w:
            width, channels, rate, data = w.getsampwidth(), w.getnchannels(), w.getframerate(), w.readframes(w.getnframes())
    except (wave.Error, EOFError) as e:
        raise BenchError(f"{path}: not a PCM WAV file ({e}); convert it, e.g. `sox IN -b 16 -c 1 -e signed-integer OUT.wav`") from None
    if width != 2 or channels != 1:
        raise BenchError(f"{path}: {8 * width}-bit with {channels} channel(s); need 16-bit PCM mono")
    try:
        audio = to_float32(np.frombuffer(data, dtype="<i2").astype(np.int16), rate)
    except AudioError as e:
        raise BenchError(f"{path}: {e}") from None
    if not (np.abs(audio) > AUDIBLE).any():
        raise BenchError(f"{path}: no audio above {AUDIBLE_DBFS:g} dBFS")
    return resample(audio, rate, RATE)


# ---- what is measured ------------------------------------------------------------------------


def word_error_rate(refs: list[str], hyps: list[str]) -> float:
    """Word-level Levenshtein distance over all turns / reference words."""
    errors = words = 0
    for ref, hyp in zip(refs, hyps):
        r, h = re.findall(r"[a-z0-9']+", ref.lower()), re.findall(r"[a-z0-9']+", hyp.lower())
        row = list(range(len(h) + 1))
        for i, rw in enumerate(r, 1):
            prev, row[0] = row[0], i
            for j, hw in enumerate(h, 1):
                prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (rw != hw))
        errors += row[-1]
        words += len(r)
    return errors / max(words, 1)


def first_audible_s(samples: np.ndarray, rate: int) -> float | None:
    """Offset of the first 20 ms window above -40 dBFS (leading silence in reply audio does not count)."""
    win = max(1, int(rate * FRAME_S))
    n = len(samples) // win
    if n == 0:
        return None
    rms = np.sqrt(np.mean(samples[: n * win].reshape(n, win) ** 2, axis=1) + 1e-12)
    loud = np.flatnonzero(20 * np.log10(rms) > AUDIBLE_DBFS)
    return None if loud.size == 0 else loud[0] * win / rate


@dataclasses.dataclass
class Probe:
    """What a caller hears of the turn of the utterance it is speaking, filled in as events arrive."""

    began_ms: int  # media time (audio sent on this line) at which the utterance starts
    speech_end: float | None = None  # monotonic time the last speech sample was spoken; None while speaking
    turn: int | None = None  # the server's turn id, from its speech_started
    first_audible: float | None = None  # when the first audible reply sample plays at the caller
    playback_end: float = 0.0  # when the reply audio received so far has finished playing
    early_audio: bool = False  # audible reply audio arrived while the caller was still speaking
    done: bool = False  # the turn's last event (turn.metrics) arrived
    replied: bool = False  # the server finished a reply with words in it (its audio may still be on the way)
    transcript: str | None = None
    server: dict | None = None
    stops_ms: list[int] = dataclasses.field(default_factory=list)  # media times of the server's speech_stopped
    continued: bool = False  # the server said a turn of this utterance continues the one before (turn.continued)

    def hear(self, samples: np.ndarray, rate: int, now: float) -> None:
        """Reply audio plays from its arrival or from the end of the audio before it, whichever is later."""
        start = max(now, self.playback_end)
        self.playback_end = start + len(samples) / rate
        offset = first_audible_s(samples, rate)
        if offset is None:
            return
        if self.speech_end is None:
            self.early_audio = True
        elif self.first_audible is None:
            self.first_audible = start + offset


class Listener:
    """Routes a line's events to the probe of the utterance being spoken."""

    def __init__(self, turn_ids: bool, audio_behind: bool = False) -> None:
        self.turn_ids = turn_ids
        self.audio_behind = audio_behind  # media paced in real time arrives after the turn's last event
        self.probe: Probe | None = None
        self.ended: str | None = None  # why the server ended the line

    def on(self, e: ev.Event, now: float) -> None:
        p = self.probe
        if isinstance(e, ev.HangUp):
            self.ended = e.reason
        elif p is None:
            return
        elif isinstance(e, ev.SpeechStarted):
            if p.turn is not None:  # the server ended a turn inside this utterance: follow the new one
                p.done, p.replied, p.transcript, p.server = False, False, None, None
            p.turn = e.turn
        elif isinstance(e, ev.SpeechStopped):
            p.stops_ms.append(e.audio_ms)
        elif self.turn_ids and e.turn != p.turn:
            return  # a turn the server ended early, or one before this utterance
        elif isinstance(e, ev.AgentAudio):
            p.hear(e.samples, e.sample_rate, now)
        elif isinstance(e, ev.Transcript):
            p.transcript = e.text
        elif isinstance(e, ev.TurnContinued):
            p.continued = True
        elif isinstance(e, ev.ResponseDone):
            p.replied = bool(e.text.strip()) and not e.interrupted
        elif isinstance(e, ev.TurnMetrics):
            p.server, p.done = e.timeline, True

    def finished(self, p: Probe, now: float) -> bool:
        """The reply has played and a second has passed; without turn events, its audio stopped a second ago."""
        if self.turn_ids and not p.done:
            return False
        if p.first_audible is None:  # the turn is over and nothing audible came, or it is still on its way
            return self.turn_ids and not (self.audio_behind and p.replied)
        return now > p.playback_end + AFTER_REPLY_S


class Caller:
    """One caller on one line: speaks in real time and never commits; listens in the background."""

    def __init__(self, line: Line, index: int, timeout: float) -> None:
        self.line, self.index, self.timeout = line, index, timeout
        self.listener = Listener(line.turn_ids, line.audio_behind)
        self.clock = time.monotonic()  # when the audio sent so far has been spoken
        self.sent_ms = 0
        self.lag = 0.0

    async def receive(self) -> None:
        async for e in self.line.events():
            self.listener.on(e, time.monotonic())

    async def send(self, frame: np.ndarray) -> None:
        """As a microphone does: a frame goes out once its last sample has been spoken."""
        self.clock += FRAME_S
        await asyncio.sleep(max(0.0, self.clock - time.monotonic()))
        await self.line.send(frame)
        self.sent_ms += FRAME_MS
        self.lag = max(self.lag, time.monotonic() - self.clock)

    async def speak(self, u: Utterance) -> TurnResult:
        step = int(RATE * FRAME_S)
        pad = -len(u.audio) % step
        audio = np.pad(u.audio, (0, pad))
        p = self.listener.probe = Probe(self.sent_ms)
        self.lag = 0.0
        for i in range(0, len(audio), step):
            await self.send(audio[i : i + step])
        p.speech_end = self.clock - pad / RATE
        end_ms = self.sent_ms - pad * 1000 / RATE
        res = TurnResult(self.index, u.text, u.paused, send_lag_ms=round(self.lag * 1000, 1))
        res.failed = await self.wait_reply(p)
        res.server_turn, res.transcript, res.server = p.turn, p.transcript, p.server
        res.premature = p.early_audio or any(p.began_ms <= s < end_ms - PREMATURE_SLACK_MS for s in p.stops_ms)
        res.continued = res.premature and p.continued
        if p.first_audible is not None:
            res.caller_v2v_ms = round((p.first_audible - p.speech_end) * 1000, 1)
        elif res.failed is None:
            res.failed = "the reply had no audible audio"
        return res

    async def wait_reply(self, p: Probe) -> str | None:
        """Stream silence until the reply has played + 1 s; returns why the turn failed, if it did."""
        while not self.listener.finished(p, time.monotonic()):
            if self.listener.ended:
                raise LineError(f"the server ended the session ({self.listener.ended})")
            if p.first_audible is None and time.monotonic() > p.speech_end + self.timeout:
                unheard = self.line.turn_ids and p.turn is None
                return f"no reply within {self.timeout:g} s" + (" (the server never detected speech)" if unheard else "")
            if p.first_audible is not None and time.monotonic() > p.playback_end + self.timeout:
                return f"the reply did not end within {self.timeout:g} s of its last audio"
            await self.send(SILENCE)
        return None


async def run_caller(target: Target, index: int, utterances: list[Utterance], start_delay: float, timeout: float, progress: tqdm) -> list[TurnResult]:
    """One caller's turns; a line that fails fails its remaining turns (kept, with the reason), not the run."""
    results: list[TurnResult] = []
    await asyncio.sleep(start_delay)
    try:
        async with target() as line:
            caller = Caller(line, index, timeout)
            listener = asyncio.create_task(caller.receive())
            try:
                for u in utterances:
                    results.append(await caller.speak(u))
                    progress.update(1)
            finally:
                await line.close()
                await listener
    except LineError as e:
        log.warning("caller %d: %s", index, e)
        for u in utterances[len(results) :]:
            results.append(TurnResult(index, u.text, u.paused, failed=str(e)))
            progress.update(1)
    return results


def summarize(results: list[TurnResult], wall_s: float, cpu_s: float) -> dict:
    v2v = np.array([r.caller_v2v_ms for r in results if r.caller_v2v_ms is not None])
    server = np.array([r.server["server_voice_to_voice_ms"] for r in results if r.server and r.server.get("server_voice_to_voice_ms") is not None])
    paused = [r for r in results if r.paused]
    heard = [r for r in results if r.transcript is not None]

    def pct(a: np.ndarray, q: float) -> float | None:
        return None if a.size == 0 else round(float(np.percentile(a, q)), 1)

    out = {
        "turns": len(results),
        "failed": sum(r.failed is not None for r in results),
        "caller_v2v_ms": {"p50": pct(v2v, 50), "p90": pct(v2v, 90), **({"p99": pct(v2v, 99)} if v2v.size >= 100 else {})},
        "server_v2v_ms": {"p50": pct(server, 50), "p90": pct(server, 90)},
        "premature_endpoint_rate": None if not paused else round(sum(r.premature for r in paused) / len(paused), 3),
        "paused_utterances": len(paused),
        "premature_by_pause": {k: {"premature": sum(r.premature for r in paused if r.paused == k), "utterances": sum(r.paused == k for r in paused)} for k in sorted({r.paused for r in paused})},
        "premature_all_rate": None if not results else round(sum(r.premature for r in results) / len(results), 3),
        "premature_continued": {"continued": sum(r.continued for r in results), "premature": sum(r.premature for r in results)},
        "asr_wer": None if not heard else round(word_error_rate([r.text for r in heard], [r.transcript for r in heard]), 3),
        "cpu_util": round(cpu_s / wall_s / (os.cpu_count() or 1), 3),
        "max_send_lag_ms": max((r.send_lag_ms for r in results), default=0.0),
    }
    stages = [r.server["stages_ms"] for r in results if r.server]
    if stages:
        out["server_stages_p50_ms"] = {k: pct(np.array([s[k] for s in stages if s[k] is not None]), 50) for k in stages[0]}
    verdicts = [r.server["turn_model"] for r in results if r.server and r.server.get("turn_model")]
    decision = np.array([v["ms"] for v in verdicts])
    out["turn_model"] = {"decisions": len(verdicts), "complete": sum(v["complete"] > COMPLETE for v in verdicts), "p50_ms": pct(decision, 50), "p90_ms": pct(decision, 90)}
    return out


def baseline_overrides(agent) -> dict:  # noqa: ANN001 (Agent)
    return dict(
        speculation=False,
        decode=dataclasses.replace(agent.config.decode, policy="vanilla", cache="none"),
        turns=dataclasses.replace(agent.config.turns, end_ms=BASELINE_END_MS, turn_model=False),
    )


def configured(agent, baseline: bool):  # noqa: ANN001, ANN201 (Agent)
    """The agent, or for the baseline a view of it with the baseline config that shares its loaded models."""
    if not baseline:
        return agent
    view = copy.copy(agent)
    view.config = dataclasses.replace(agent.config, **baseline_overrides(agent))
    return view


@asynccontextmanager
async def open_target(args: argparse.Namespace, agent, baseline: bool, max_sessions: int) -> AsyncIterator[Target]:  # noqa: ANN001 (Agent)
    """Where callers connect for one configuration: sessions here, the --url server, or a server started here."""
    ours = dict(args.set)
    if args.transport == "inproc":
        yield functools.partial(inproc_line, configured(agent, baseline), {} if baseline else ours)
    elif args.url:
        yield functools.partial(NETWORK_LINES[args.transport], args.url, args.token, BASELINE_LIVE if baseline else ours)
    else:
        with LocalServer(configured(agent, baseline), max_sessions) as server:
            yield functools.partial(NETWORK_LINES[args.transport], server.url, None, {} if baseline else ours)


async def run_load(target: Target, utterances: list[Utterance], callers: int, turns: int, timeout: float, label: str) -> dict:
    """K callers at once, uniformly staggered over 2 s, each starting at a different point of the speech pool."""
    per = [[utterances[(c * 3 + i) % len(utterances)] for i in range(turns)] for c in range(callers)]
    with tqdm(total=callers * turns, desc=f"{label} K={callers}", unit="turn") as bar:
        t0, c0 = time.monotonic(), sum(os.times()[:2])
        tasks = [run_caller(target, c, per[c], c * 2.0 / callers, timeout, bar) for c in range(callers)]
        results = [r for rs in await asyncio.gather(*tasks) for r in rs]
        wall, cpu = time.monotonic() - t0, sum(os.times()[:2]) - c0
    summary = summarize(results, wall, cpu)
    summary.update(config=label, callers=callers, results=[dataclasses.asdict(r) for r in results])
    return summary


def _levels(text: str) -> list[int]:
    try:
        levels = [int(k) for k in text.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated caller counts >= 1, e.g. 1,2,4,8; got {text!r}")
    return levels


def setting_arg(text: str) -> tuple[str, int | float | bool]:
    """KEY=VALUE as a live setting, checked against its type and bounds now, not after minutes of set-up."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. end_ms=500), got {text!r}")
    low = value.lower()
    try:
        parsed = low == "true" if low in ("true", "false") else json.loads(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{key}: expected a number or true/false, got {value!r}") from None
    try:
        return key, live_settings.check({key: parsed})[key]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_args(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("target")
    t.add_argument("--transport", choices=("ws", "webrtc", "twilio", "inproc"), default="ws", help="how callers reach the agent (default: %(default)s; see above)")
    t.add_argument("--url", help="a running server, ws://HOST:PORT (default: start one in this process on a free loopback port)")
    t.add_argument("--token", default=os.environ.get("VOICE_AGENT_TOKEN"), help="the --url server's token (default: $VOICE_AGENT_TOKEN)")
    t.add_argument("--model", type=Path, help="dLLM directory or named model (smollm2) for the agent loaded here (default: the shipped model); not with --url")
    t.add_argument("--asr-window", type=float, default=15.0, metavar="SECONDS", help="the agent's Whisper window, as `serve --asr-window` (default: %(default)s); not with --url")
    t.add_argument("--threads", type=positive_int, help="the agent's torch threads, as `serve --threads` (default: AgentConfig's); not with --url")
    t.add_argument("--compile", action="store_true", help="compile the agent's dLLM layers, as `serve --compile`; not with --url")
    t.add_argument("--dtype", choices=DTYPE_CHOICES, help="the agent's dLLM weights, as `serve --dtype` (default: auto); not with --url")
    t.add_argument("--voice", type=Path, help="piper voice .onnx that synthesizes the questions (default: the agent's voice)")
    t.add_argument("--speech-dir", type=Path, help="WAVs + transcripts.tsv to speak instead of synthesized questions (format above)")
    load = p.add_argument_group("load")
    load.add_argument("--callers", type=_levels, default=[1], metavar="K[,K...]", help="concurrency levels (default: 1; the issue's sweep: 1,2,4,8)")
    load.add_argument("--turns", type=int, default=10, help="turns per caller (default: %(default)s)")
    load.add_argument("--set", type=setting_arg, action="append", default=[], metavar="KEY=VALUE",
                      help="a live session setting for our configuration (session.update), e.g. end_ms=500, block_size=4; repeatable")
    load.add_argument("--no-baseline", action="store_true", help="skip the baseline configuration (no speculation, vanilla decoding, 800 ms endpointing)")
    load.add_argument("--timeout", type=float, default=20.0, help="seconds from the end of speech to the first audible reply before a turn fails (default: %(default)s)")
    out = p.add_argument_group("output")
    out.add_argument("--json", type=Path, help="write the figures (and every turn) here")
    out.add_argument("--report", type=Path, help="write a self-contained HTML report with charts here")


def print_table(runs: list[dict]) -> None:
    print(f"{'config':<10} {'K':>2} {'turns':>5} {'fail':>4} {'caller p50':>10} {'p90':>7} {'server p50':>10} {'premature':>9} {'(all)':>5} {'WER':>6} {'CPU':>5} {'turn ms p50/p90':>15}")
    for r in runs:
        c, s = r["caller_v2v_ms"], r["server_v2v_ms"]
        print(
            f"{r['config']:<10} {r['callers']:>2} {r['turns']:>5} {r['failed']:>4} {c['p50'] or float('nan'):>10.0f} {c['p90'] or float('nan'):>7.0f} "
            f"{s['p50'] or float('nan'):>10.0f} {r['premature_endpoint_rate'] if r['premature_endpoint_rate'] is not None else float('nan'):>9.2f} "
            f"{r['premature_all_rate'] if r['premature_all_rate'] is not None else float('nan'):>5.2f} "
            f"{r['asr_wer'] if r['asr_wer'] is not None else float('nan'):>6.3f} {r['cpu_util']:>5.2f} {_turn_ms(r.get('turn_model')):>15}"
        )
    for r in runs:
        if len(kinds := r.get("premature_by_pause") or {}) > 1:
            print(f"{r['config']:<10} {r['callers']:>2} premature by kind of pause: " + ", ".join(f"{k} {v['premature']}/{v['utterances']}" for k, v in kinds.items()))
        if (c := r.get("premature_continued")) and c["premature"]:
            print(f"{r['config']:<10} {r['callers']:>2} premature ends the speaker then continued (turn.continued): {c['continued']}/{c['premature']}")


def _turn_ms(t: dict | None) -> str:
    return "-" if not t or not t["decisions"] else f"{t['p50_ms']:.0f}/{t['p90_ms']:.0f}"


def headline(report: dict) -> None:
    """The ratios and the load limit, from the runs so far."""
    ours = {r["callers"]: r for r in report["runs"] if r["config"] == "ours"}
    base = {r["callers"]: r for r in report["runs"] if r["config"] == "baseline"}
    report["speedup_caller_p50"] = {k: round(base[k]["caller_v2v_ms"]["p50"] / ours[k]["caller_v2v_ms"]["p50"], 2) for k in ours if k in base and ours[k]["caller_v2v_ms"]["p50"] and base[k]["caller_v2v_ms"]["p50"]}
    fits = [k for k, r in ours.items() if r["caller_v2v_ms"]["p90"] is not None and r["caller_v2v_ms"]["p90"] <= 1200]
    report["max_callers_p90_under_1200ms"] = max(fits) if fits else 0


def save(report: dict, args: argparse.Namespace) -> None:
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.report:
        html_report.write(report, args.report)


def configs(args: argparse.Namespace) -> list[str]:
    if args.no_baseline:
        return ["ours"]
    if args.url and args.transport == "twilio":
        log.warning("no baseline over Twilio against --url: the protocol cannot change a session's settings")
        return ["ours"]
    return ["ours", "baseline"]


def describe(args: argparse.Namespace) -> dict:
    """What was measured, so a figure is never read without its setup."""
    if args.transport == "inproc":
        where, cpu = "in-process sessions", "this process: callers + agent"
    elif args.url:
        where, cpu = args.url, "this process: callers only (the server's CPU is not measured)"
    else:
        where, cpu = "server started in this process", "this process: callers + server"
    baseline = BASELINE_LIVE if args.url else {"speculation": False, "decode": "vanilla, no KV cache", "end_ms": BASELINE_END_MS, "turn_model": False}
    return {"transport": args.transport, "server": where, "settings": dict(args.set), "cpu_scope": cpu, "baseline": baseline, "speech": str(args.speech_dir or "synthesized")}


async def bench(args: argparse.Namespace, agent=None, utterances: list[Utterance] | None = None) -> dict:  # noqa: ANN001 (Agent)
    """Every configuration × concurrency level; `agent` is None against --url."""
    report: dict = {
        "machine": machine(), **describe(args), "runs": [],
        **({"asr_window_s": agent.config.asr_window_s, "torch_threads": agent.config.torch_threads, "compiled": agent.config.compile,
            "llm": agent.model_names()["llm"], "dtype": agent.engine.model.weight_format} if agent else {}),
    }
    if args.url:
        report["server_health"] = check_reachable(args.url)
    if utterances is None:
        utterances = prepare_speech(agent.tts if agent and not args.voice else _synthesizer(args.voice))
    for label in configs(args):
        async with open_target(args, agent, label == "baseline", max(args.callers)) as target:
            for k in args.callers:
                report["runs"].append(await run_load(target, utterances, k, args.turns, args.timeout, label))
                headline(report)
                save(report, args)  # after every run: an interrupted benchmark keeps what it measured
    print_table(report["runs"])
    for path in (args.json, args.report):
        if path:
            print(f"wrote {path}")
    return report


def _synthesizer(voice: Path | None):  # noqa: ANN202 (audio.tts.Synthesizer)
    from audio.tts import Synthesizer

    return Synthesizer(voice)


def run(args: argparse.Namespace) -> dict:
    """Check the inputs, load only what this run needs, benchmark. Bad input: one line, exit status 1."""
    from agent.voice_agent import Agent, AgentConfig

    try:
        if args.set and args.transport == "twilio":
            raise BenchError("--set needs session.update, which Twilio's protocol does not have")
        if args.url:
            if args.transport == "inproc":
                raise BenchError("--transport inproc runs sessions in this process: it takes no --url")
            if args.model or args.threads or args.compile or args.dtype:
                raise BenchError("--model, --threads, --compile and --dtype set up the agent loaded here; against --url the server's own answers")
            args.url = base_url(args.url)
            check_reachable(args.url)
        utterances = load_speech(args.speech_dir) if args.speech_dir else None
        agent = None if args.url else Agent.load(AgentConfig(
            model=args.model, asr_window_s=args.asr_window, max_sessions=max(args.callers), compile=args.compile,
            **({"torch_threads": args.threads} if args.threads else {}), **({"dtype": args.dtype} if args.dtype else {}),
        ))
        try:
            return asyncio.run(bench(args, agent, utterances))
        finally:
            if agent:
                agent.close()
    except BenchError as e:
        raise SystemExit(f"error: {e}") from None


def build_parser(prog: str = "python -m benchmarks.latency") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    """`python -m benchmarks.latency`: the same as `voice-agent bench`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run(args)


if __name__ == "__main__":
    main()
