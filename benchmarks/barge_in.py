"""Barge-in on real speech: recordings of a real person played over the agent's reply.

    python -m benchmarks.real_speech --out runs/real-speech        # the set (Asterisk prompts)
    python -m benchmarks.barge_in --speech-dir runs/real-speech --barge-in-ms 300,500

Each trial opens a session whose reply is playing (a long greeting, on a clock that stands still
past the echo guard, so the reply is audible for the whole trial), plays one recording over it, and
notes whether the session interrupted the reply and after how much of the speaker's speech (media
time from the speech start the VAD confirmed). Two kinds of recording:

- *sentences*: the set's utterances (`--speech-dir`): each should interrupt;
- *single words*: one-word prompts of the same speaker ("oh", "no", "hello", numbers, days), the
  nearest thing to a backchannel on the registries (no package ships "mm-hm" or "yeah"): a short
  word over the reply should not interrupt it, nor be answered.

Nothing but the VAD and the session's rules run per trial (the reply is the greeting: no ASR or
LLM), so the figures are the turn-taking rules' own, at any machine speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from agent import Agent, AgentConfig
from agent import events as ev
from agent.clock import Clock

from .common import machine
from .latency import RATE, BenchError, load_speech
from .real_speech import load_prompts

log = logging.getLogger(__name__)

GREETING = ("Let me tell you about the three kinds of clouds you can see from a hill on a long summer afternoon, "
            "and what each of them says about the weather tomorrow.")
CHUNK = RATE // 50  # 20 ms
AFTER_S = 1.5  # silence after each recording: past the end-of-turn wait, so a dropped turn is seen to stay dropped


class StoppedClock(Clock):
    """Wall time that moves only when told: the reply stays 'playing' however long a trial takes."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def monotonic(self) -> float:
        return self.now


@dataclass
class Trial:
    name: str
    kind: str  # sentence | word
    interrupted: bool
    after_ms: float | None  # speech (media ms from the confirmed speech start) before the interruption
    answered: bool  # a turn was opened (the words would be transcribed and answered)


def single_words(limit: int) -> list[tuple[str, np.ndarray]]:
    """One-word prompts, one per word, spelled letters left out (the VAD does not hear most of them)."""
    seen, out = set(), []
    for p in load_prompts():
        word = p.text.strip(".!? ").lower()
        if len(word.split()) != 1 or p.name.startswith(("letters/", "phonetic/")) or word in seen:
            continue
        seen.add(word)
        out.append((p.name, p.at(RATE)))
    return out[:limit]


async def trial(agent, name: str, kind: str, audio: np.ndarray, barge_in_ms: int) -> Trial:  # noqa: ANN001 (Agent)
    clock = StoppedClock()
    async with agent.session(greeting=GREETING, barge_in_ms=barge_in_ms, speculation=True) as s:
        s.clock = clock
        events = s.events()
        while not isinstance(await anext(events), ev.AgentAudio):  # the reply's first audio is out: it plays
            pass
        clock.now += (s.config.echo_guard_ms + 100) / 1000
        samples = np.concatenate([audio, np.zeros(int(AFTER_S * RATE), np.float32)])
        interrupted_at = None
        for i in range(0, len(samples), CHUNK):
            await s.send_audio(samples[i : i + CHUNK], RATE)
            if interrupted_at is None and s.stats["barge_ins"]:
                interrupted_at = s.listener.media_ms
        turns = s.stats["turns"]
    started = [e.audio_ms async for e in events if isinstance(e, ev.SpeechStarted)]
    after_ms = interrupted_at - started[0] if interrupted_at is not None and started else None
    return Trial(name, kind, interrupted_at is not None, after_ms, turns > 0)


def summarize(trials: list[Trial]) -> dict:
    out = {}
    for kind in ("sentence", "word"):
        ts = [t for t in trials if t.kind == kind]
        after = [t.after_ms for t in ts if t.after_ms is not None]
        out[kind] = {
            "n": len(ts),
            "interrupted": sum(t.interrupted for t in ts),
            "interrupted_rate": sum(t.interrupted for t in ts) / max(len(ts), 1),
            "answered": sum(t.answered for t in ts),
            "after_ms_p50": float(np.percentile(after, 50)) if after else None,
            "after_ms_p90": float(np.percentile(after, 90)) if after else None,
        }
    return out


async def bench(args: argparse.Namespace, agent=None) -> dict:  # noqa: ANN001 (Agent)
    sentences = [(u.text, u.audio) for u in load_speech(args.speech_dir)]
    words = single_words(args.words)
    agent = agent or Agent.load(AgentConfig(model=args.model) if args.model else AgentConfig())
    report = {"machine": machine(), "speech_dir": str(args.speech_dir), "echo_guard_ms": agent.config.echo_guard_ms, "runs": []}
    for barge_in_ms in args.barge_in_ms:
        trials = []
        cases = [(n, "sentence", a) for n, a in sentences] + [(n, "word", a) for n, a in words]
        for name, kind, audio in tqdm(cases, desc=f"barge_in_ms {barge_in_ms}", disable=args.no_progress):
            trials.append(await trial(agent, name, kind, audio, barge_in_ms))
        report["runs"].append({"barge_in_ms": barge_in_ms, **summarize(trials), "trials": [t.__dict__ for t in trials]})
    return report


def print_table(report: dict) -> None:
    print(f"{'barge_in_ms':>11} | sentences interrupted | after p50 / p90 ms | single words interrupted | words answered")
    for r in report["runs"]:
        s, w = r["sentence"], r["word"]
        print(f"{r['barge_in_ms']:>11} | {s['interrupted']:>3}/{s['n']:<3} ({s['interrupted_rate']:6.1%})   | "
              f"{s['after_ms_p50'] or 0:7.0f} / {s['after_ms_p90'] or 0:<7.0f}  | {w['interrupted']:>3}/{w['n']:<3} ({w['interrupted_rate']:6.1%})      | {w['answered']}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.barge_in", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speech-dir", type=Path, required=True, help="the sentences: WAVs + transcripts.tsv (python -m benchmarks.real_speech)")
    p.add_argument("--barge-in-ms", type=lambda t: [int(x) for x in t.split(",")], default=[AgentConfig.barge_in_ms],
                   help=f"comma-separated barge_in_ms values to run (default {AgentConfig.barge_in_ms}, the agent's)")
    p.add_argument("--words", type=int, default=60, help="how many single-word recordings (default 60)")
    p.add_argument("--model", type=Path, help="the agent's LLM (default: the agent's default; only its greeting speaks)")
    p.add_argument("--json", type=Path, help="write the report (with every trial) here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = asyncio.run(bench(args))
    except BenchError as e:
        raise SystemExit(f"error: {e}") from None
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
