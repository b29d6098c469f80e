"""Voice-to-voice latency, measured from the caller's side: `voice-agent bench` / `python -m benchmarks.latency`.

Callers stream prepared speech in real time (20 ms frames) into sessions of the embedding API and
keep streaming silence after speaking, as a phone line does. The true end of each utterance is
known from the audio itself (it was synthesized and trimmed), so:

    caller voice-to-voice = first audible reply audio (> -40 dBFS) of the turn − true end of speech

next to the server's own timeline for the same turn. Endpointing is the server's alone. Utterances
with inserted 300-700 ms pauses measure the premature-endpoint rate; transcripts give the ASR word
error rate. The same load runs against a baseline configuration (no speculation, vanilla decoding,
800 ms endpointing) so every gain shows as a ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from audio.codec import resample

from . import events as ev

log = logging.getLogger(__name__)

RATE = 16000
FRAME_S = 0.02
AUDIBLE_DBFS = -40.0

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
    paused: bool = False


@dataclasses.dataclass
class TurnResult:
    caller: int
    text: str
    paused: bool
    transcript: str | None = None
    caller_v2v_ms: float | None = None
    server: dict | None = None  # the server's timeline for the turn
    premature: bool = False  # the server decided the turn had ended before the speaker had
    failed: str | None = None


def _trim(audio: np.ndarray, level: float = 0.01) -> np.ndarray:
    loud = np.flatnonzero(np.abs(audio) > level)
    return audio[loud[0] : loud[-1] + 1] if loud.size else audio


def prepare_speech(tts, n: int, seed: int = 0) -> list[Utterance]:
    """Synthesize the question set (and paused utterances) before the run, never during it."""
    rng = np.random.default_rng(seed)

    def say(text: str) -> np.ndarray:
        return _trim(resample(np.concatenate(list(tts.synthesize(text))), tts.sample_rate, RATE))

    plain = [Utterance(q, say(q)) for q in QUESTIONS]
    paused = []
    for a, b in PAUSED:
        gap = np.zeros(int(rng.uniform(0.3, 0.7) * RATE), dtype=np.float32)
        paused.append(Utterance(f"{a} {b}", np.concatenate([say(a), gap, say(b)]), paused=True))
    pool = [u for pair in zip(plain, paused + paused) for u in pair] + plain[len(paused) * 2 :]
    return [pool[i % len(pool)] for i in range(n)]


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


async def run_caller(agent, caller: int, utterances: list[Utterance], start_delay: float, overrides: dict, timeout: float, progress) -> list[TurnResult]:
    """One caller: speak, keep streaming silence until the reply has played + 1 s, repeat."""
    results: list[TurnResult] = []
    silence = np.zeros(int(RATE * FRAME_S), dtype=np.float32)
    await asyncio.sleep(start_delay)
    async with agent.session(**overrides) as s:
        state = {"turns": [], "audio": {}, "done": {}, "transcripts": {}, "metrics": {}, "stopped": []}

        async def listen() -> None:
            async for e in s.events():
                now = time.monotonic()
                if isinstance(e, ev.SpeechStarted):
                    state["turns"].append((now, e.turn))
                elif isinstance(e, ev.SpeechStopped):
                    state["stopped"].append((now, e.turn))
                elif isinstance(e, ev.Transcript):
                    state["transcripts"][e.turn] = e.text
                elif isinstance(e, ev.AgentAudio):
                    first, total = state["audio"].get(e.turn, (None, 0.0))
                    if first is None and (off := first_audible_s(e.samples, e.sample_rate)) is not None:
                        first = now + off
                    state["audio"][e.turn] = (first, total + len(e.samples) / e.sample_rate)
                elif isinstance(e, ev.ResponseDone):
                    state["done"][e.turn] = now
                elif isinstance(e, ev.TurnMetrics):
                    state["metrics"][e.turn] = e.timeline

        listener = asyncio.create_task(listen())
        clock = time.monotonic()

        async def send(frame: np.ndarray) -> None:
            nonlocal clock
            await s.send_audio(frame, RATE)
            clock += FRAME_S
            await asyncio.sleep(max(0.0, clock - time.monotonic()))

        step = int(RATE * FRAME_S)
        for u in utterances:
            res = TurnResult(caller, u.text, u.paused)
            began = time.monotonic()
            for i in range(0, len(u.audio), step):
                await send(np.pad(u.audio[i : i + step], (0, max(0, step - len(u.audio[i : i + step])))))
            speech_end = time.monotonic()  # the last speech sample was just handed over
            premature = [t for t, _ in state["stopped"] if began < t < speech_end]
            res.premature = bool(premature)
            turn_ids: list[int] = []
            deadline = speech_end + timeout
            # Keep the line open until this utterance's reply has played, plus a second.
            while time.monotonic() < deadline:
                await send(silence)
                turn_ids = [t for when, t in state["turns"] if when >= began]
                if not turn_ids:
                    continue
                turn = turn_ids[-1]
                done = state["done"].get(turn)
                first, total = state["audio"].get(turn, (None, 0.0))
                if done is not None and (first is None or time.monotonic() > first + total + 1.0):
                    break
            else:
                res.failed = f"no reply within {timeout:g} s"
            if turn_ids:
                turn = turn_ids[-1]
                first, _ = state["audio"].get(turn, (None, 0.0))
                res.transcript = state["transcripts"].get(turn)
                res.server = state["metrics"].get(turn)
                if first is not None:
                    res.caller_v2v_ms = (first - speech_end) * 1000
                elif not res.failed:
                    res.failed = "the reply had no audible audio"
            elif not res.failed:
                res.failed = "the server never heard speech"
            results.append(res)
            progress.update(1)
        await s.close()
        await listener
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
        "asr_wer": None if not heard else round(word_error_rate([r.text for r in heard], [r.transcript for r in heard]), 3),
        "cpu_util": round(cpu_s / wall_s / (os.cpu_count() or 1), 3),
    }
    stages = [r.server["stages_ms"] for r in results if r.server]
    if stages:
        out["server_stages_p50_ms"] = {k: pct(np.array([s[k] for s in stages if s[k] is not None]), 50) for k in stages[0]}
    return out


def baseline_overrides(agent) -> dict:
    from dllm_engine.decoding import DecodeParams

    d = agent.config.decode
    return dict(
        speculation=False,
        decode=DecodeParams(policy="vanilla", cache="none", block_size=d.block_size, max_new_tokens=d.max_new_tokens),
        turns=dataclasses.replace(agent.config.turns, end_ms=800),
    )


async def run_load(agent, utterances: list[Utterance], callers: int, turns: int, overrides: dict, timeout: float, label: str) -> dict:
    per = [utterances[(c * 3) % len(utterances) :] + utterances[: (c * 3) % len(utterances)] for c in range(callers)]
    with tqdm(total=callers * turns, desc=f"{label} K={callers}", unit="turn") as bar:
        t0, c0 = time.monotonic(), sum(os.times()[:2])
        tasks = [run_caller(agent, c, per[c][:turns], start_delay=c * 2.0 / callers, overrides=overrides, timeout=timeout, progress=bar) for c in range(callers)]
        results = [r for rs in await asyncio.gather(*tasks) for r in rs]
        wall, cpu = time.monotonic() - t0, sum(os.times()[:2]) - c0
    summary = summarize(results, wall, cpu)
    summary.update(config=label, callers=callers, results=[dataclasses.asdict(r) for r in results])
    return summary


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--callers", default="1", help="comma-separated concurrency levels (default: %(default)s; the issue's sweep: 1,2,4,8)")
    p.add_argument("--turns", type=int, default=10, help="turns per caller (default: %(default)s)")
    p.add_argument("--no-baseline", action="store_true", help="skip the baseline configuration (no speculation, vanilla, 800 ms endpointing)")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds a turn may take before it counts as failed (default: %(default)s)")
    p.add_argument("--json", type=Path, help="write the figures (and every turn) here")


def print_table(runs: list[dict]) -> None:
    print(f"{'config':<10} {'K':>2} {'turns':>5} {'fail':>4} {'caller p50':>10} {'p90':>7} {'server p50':>10} {'premature':>9} {'WER':>6} {'CPU':>5}")
    for r in runs:
        c, s = r["caller_v2v_ms"], r["server_v2v_ms"]
        print(
            f"{r['config']:<10} {r['callers']:>2} {r['turns']:>5} {r['failed']:>4} {c['p50'] or float('nan'):>10.0f} {c['p90'] or float('nan'):>7.0f} "
            f"{s['p50'] or float('nan'):>10.0f} {r['premature_endpoint_rate'] if r['premature_endpoint_rate'] is not None else float('nan'):>9.2f} "
            f"{r['asr_wer'] if r['asr_wer'] is not None else float('nan'):>6.3f} {r['cpu_util']:>5.2f}"
        )


async def bench(agent, args: argparse.Namespace) -> dict:
    levels = [int(k) for k in str(args.callers).split(",")]
    utterances = prepare_speech(agent.tts, args.turns)
    configs = [("ours", {})] + ([] if args.no_baseline else [("baseline", baseline_overrides(agent))])
    runs = []
    for label, overrides in configs:
        for k in levels:
            runs.append(await run_load(agent, utterances, k, args.turns, overrides, args.timeout, label))
    report = {"machine": machine(), "runs": runs}
    ours = {r["callers"]: r for r in runs if r["config"] == "ours"}
    base = {r["callers"]: r for r in runs if r["config"] == "baseline"}
    report["speedup_caller_p50"] = {k: round(base[k]["caller_v2v_ms"]["p50"] / ours[k]["caller_v2v_ms"]["p50"], 2) for k in ours if k in base and ours[k]["caller_v2v_ms"]["p50"] and base[k]["caller_v2v_ms"]["p50"]}
    fits = [k for k, r in ours.items() if r["caller_v2v_ms"]["p90"] is not None and r["caller_v2v_ms"]["p90"] <= 1200]
    report["max_callers_p90_under_1200ms"] = max(fits) if fits else 0
    print_table(runs)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return report


def machine() -> dict:
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


def main(argv: list[str] | None = None) -> None:
    """`python -m benchmarks.latency`: load the agent in-process and run the caller load."""
    from .voice_agent import Agent, AgentConfig

    p = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="dLLM directory (default: the shipped model)")
    add_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    agent = Agent.load(AgentConfig(model=args.model))
    try:
        asyncio.run(bench(agent, args))
    finally:
        agent.close()
