"""A set of real human speech for the latency benchmark (`--speech-dir`) and the turn-taking tests.

    python -m benchmarks.real_speech --out runs/real-speech
    voice-agent bench --speech-dir runs/real-speech --callers 1

The recordings are Asterisk's core English prompts (Debian `asterisk-core-sounds-en-wav` and its
transcripts in `asterisk-core-sounds-en`; recorded by Allison Smith, CC-BY-SA-3.0): a real person,
8 kHz telephone audio, with transcripts. Three kinds of utterance are written:

- *plain*: a prompt as recorded (one or more sentences, the speaker's own short pauses);
- *paused*: a one-sentence prompt whose longest pause inside the sentence is stretched to `--pause-s`
  (1.5 s) by repeating that pause's own background, so the words, their prosody and the noise floor
  stay the speaker's; only the pause is longer;
- *hesitation*: a one-sentence prompt with `--pause-s` of its own background inserted after a
  function word in its middle ("press 5 to … leave a message"), where the words so far cannot end a
  sentence: a thinking pause, which a listener waits through. The word boundary comes from Whisper's
  word timestamps, the cut from the quietest 10 ms around it.

The two kinds differ in what a listener may do. After *paused*'s first part the words are often a
sentence already ("Please enter your password … followed by the pound key"): the speaker adds an
afterthought where a person, too, could have taken the turn. Inside *hesitation*'s phrase nobody can.
No package on the registries this project may use ships conversational speech with long natural
pauses (the search is in the issue notes), so these pauses are made, not found.

Each file is named after its prompt; transcripts.tsv marks the kind of pause (`paused`, `hesitation`),
which the benchmark counts towards its premature-endpoint rate, and reports per kind.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import gzip
import logging
import re
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from audio.codec import resample, to_float32

log = logging.getLogger(__name__)

SOUNDS = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
INSTALL = "apt-get install asterisk-core-sounds-en-wav asterisk-core-sounds-en"
FRAME_S = 0.01
QUIET_DB = -40.0  # a frame this far below the prompt's loudest frame is a pause
MIN_GAP_S = 0.08  # shorter dips are inside words
# Words a sentence cannot end on: a pause right after one is inside a phrase.
HESITATE_AFTER = frozenset("a an the my your his her our their its this these those of to for from with into at by and or but".split())


@dataclass(frozen=True)
class Prompt:
    name: str
    text: str
    audio: np.ndarray  # int16, 8 kHz
    rate: int

    def at(self, rate: int, part: slice = slice(None)) -> np.ndarray:
        """Float32 audio resampled to `rate` (of the samples `part`): what the agent's models take."""
        return resample(to_float32(self.audio[part], self.rate), self.rate, rate)

    def frame_energy(self) -> np.ndarray:
        """Mean square of each FRAME_S frame."""
        hop = int(self.rate * FRAME_S)
        return np.mean(self.audio[: len(self.audio) // hop * hop].astype(np.float32).reshape(-1, hop) ** 2, axis=1)

    def gaps(self) -> list[tuple[int, int]]:
        """Pauses between its first and last sound, as (start, end) sample indices."""
        hop = int(self.rate * FRAME_S)
        db = 10 * np.log10(self.frame_energy() + 1e-9)
        loud = np.flatnonzero(db > db.max() + QUIET_DB)
        quiet = np.ones(len(db), dtype=bool)
        quiet[loud] = False
        out, start = [], None
        for i in range(loud[0], loud[-1] + 1):
            if quiet[i] and start is None:
                start = i
            elif not quiet[i] and start is not None:
                if (i - start) * FRAME_S >= MIN_GAP_S:
                    out.append((start * hop, i * hop))
                start = None
        return out


def load_prompts() -> list[Prompt]:
    """Every spoken prompt (tones and bracketed descriptions left out), in name order."""
    if not TRANSCRIPTS.exists() or not SOUNDS.is_dir():
        raise FileNotFoundError(f"the Asterisk prompts are not installed: {INSTALL}")
    prompts = []
    for line in gzip.open(TRANSCRIPTS, "rt", encoding="utf-8"):
        name, sep, text = line.partition(":")
        path = SOUNDS / f"{name.strip()}.wav"
        text = text.strip()
        if not sep or line.startswith(";") or "[" in text or not path.exists():
            continue
        with wave.open(str(path)) as w:
            audio = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
            prompts.append(Prompt(name.strip(), text, audio, w.getframerate()))
    return sorted(prompts, key=lambda p: p.name)


def fragment(text: str) -> bool:
    """A piece the PBX splices between others (the transcript marks it: "...has joined the
    conference.", "To leave the conference...", "who introduces themselves as:"), not a whole turn."""
    text = text.strip()
    return text.startswith(("...", "…")) or text.endswith(("...", "…", ":"))


def one_sentence(text: str) -> bool:
    """One sentence, mid-phrase pauses possible: no sentence end before the last word."""
    return len(re.findall(r"[.!?]", text.rstrip(".!? "))) == 0


def longest_inner_pause(p: Prompt) -> tuple[int, int] | None:
    """Its longest pause after the first 0.6 s (past the first words, not a breath at the start)."""
    gaps = [g for g in p.gaps() if g[0] > 0.6 * p.rate]
    return max(gaps, key=lambda g: g[1] - g[0]) if gaps else None


def stretch(p: Prompt, gap: tuple[int, int], seconds: float) -> np.ndarray:
    """The prompt with the pause `gap` made `seconds` long out of its own background."""
    start, end = gap
    quiet = p.audio[start:end]
    reps = int(np.ceil(seconds * p.rate / len(quiet)))
    longer = np.tile(quiet, reps)[: int(seconds * p.rate)]
    return np.concatenate([p.audio[:start], longer, p.audio[end:]])


def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def hesitation_point(p: Prompt, words: list[tuple[str, float, float]], transcribe: Callable[[np.ndarray], str]) -> int | None:
    """Where a thinking pause goes: right after a word of HESITATE_AFTER with two words or more on
    either side (the one nearest the middle first), as a sample index.

    `words` are Whisper's (word, start s, end s), trusted only when they are the prompt's own words;
    its word timings are rough (often inside the next word), so the cut is the quiet 10 ms frame near
    the word's end after which `transcribe` (16 kHz audio → text) hears the sentence end on that word.
    Both come from greedy decoding at temperature 0 (Whisper's fallback samples): the set is rebuilt
    the same every time."""
    text = words_of(p.text)
    if difflib.SequenceMatcher(None, text, [w for w, _, _ in words]).ratio() < 0.9:
        return None
    middle = (words[0][1] + words[-1][2]) / 2
    hop, energy = int(p.rate * FRAME_S), p.frame_energy()
    for i in sorted((i for i in range(1, len(words) - 2) if words[i][0] in HESITATE_AFTER), key=lambda i: abs(words[i][2] - middle)):
        lo, hi = int(words[i][1] / FRAME_S), min(int(words[i + 1][2] / FRAME_S), len(energy) - 1)
        dips = [f for f in range(lo + 1, hi) if energy[f] <= energy[f - 1] and energy[f] <= energy[f + 1]]
        for f in sorted(dips, key=lambda f: abs(f * FRAME_S - words[i][2]))[:6]:
            at = f * hop + hop // 2
            heard = words_of(transcribe(p.at(16000, slice(None, at))))
            if heard and heard[-1] == words[i][0] and difflib.SequenceMatcher(None, heard, [w for w, _, _ in words[: i + 1]]).ratio() >= 0.8:
                return at
    return None


def insert_pause(p: Prompt, at: int, seconds: float) -> np.ndarray:
    """The prompt with `seconds` of its own background (its quietest 100 ms, repeated) at sample `at`."""
    n = int(0.1 * p.rate)
    energy = np.convolve(p.audio.astype(np.float32) ** 2, np.ones(n), "valid")
    start = int(np.argmin(energy))
    quiet = p.audio[start : start + n]
    return np.concatenate([p.audio[:at], np.tile(quiet, int(np.ceil(seconds * p.rate / n)))[: int(seconds * p.rate)], p.audio[at:]])


def whisper_words(p: Prompt, model) -> list[tuple[str, float, float]]:  # noqa: ANN001 (faster_whisper.WhisperModel)
    segments, _ = model.transcribe(p.at(16000), language="en", beam_size=1, temperature=0.0, word_timestamps=True, condition_on_previous_text=False)
    return [(w, word.start, word.end) for s in segments for word in s.words for w in words_of(word.word)[:1]]


def transcribe_before_pause(model, audio: np.ndarray) -> str:  # noqa: ANN001 (faster_whisper.WhisperModel)
    """What Whisper hears of 16 kHz `audio` followed by the half second of pause the agent would hear."""
    segments, _ = model.transcribe(np.concatenate([audio, np.zeros(16000 // 2, np.float32)]), language="en", beam_size=1, temperature=0.0, condition_on_previous_text=False)
    return " ".join(s.text for s in segments)


def build(out: Path, plain: int = 60, paused: int = 24, hesitation: int = 24, pause_s: float = 1.5, words: tuple[int, int] = (4, 20)) -> tuple[int, int, int]:
    """Write the set; returns the (plain, paused, hesitation) counts written. Whole prompts of `words`
    words (a spoken turn, not an IVR menu), each text once."""
    out.mkdir(parents=True, exist_ok=True)
    by_text = {p.text.lower().strip(".!? "): p for p in reversed(load_prompts()) if words[0] <= len(p.text.split()) <= words[1] and not fragment(p.text)}
    prompts = sorted(by_text.values(), key=lambda p: p.name)
    # Paused: one sentence, with a pause inside it.
    candidates = [(p, gap) for p in prompts if one_sentence(p.text) and (gap := longest_inner_pause(p))]
    chosen = candidates[:paused]
    rest = [p for p in prompts if p.name not in {c.name for c, _ in chosen}][:plain]
    used = {p.name for p in rest} | {p.name for p, _ in chosen}
    hesitant = []
    if hesitation:
        from faster_whisper import WhisperModel

        from audio.asr import default_model_path

        model = WhisperModel(str(default_model_path()), device="cpu", compute_type="int8")
        for p in tqdm([p for p in prompts if p.name not in used and one_sentence(p.text)], desc="hesitations", unit="prompt"):
            if len(hesitant) == hesitation:
                break
            if (at := hesitation_point(p, whisper_words(p, model), functools.partial(transcribe_before_pause, model))) is not None:
                hesitant.append((p, at))
    lines = ["# Asterisk core English prompts (Allison Smith, CC-BY-SA-3.0); a pause inside the sentence, "
             f"{pause_s:g} s: `paused` (its longest pause stretched), `hesitation` (inserted after a function word) (python -m benchmarks.real_speech)"]
    entries = [(p, p.audio, "") for p in rest] + [(p, stretch(p, g, pause_s), "paused") for p, g in chosen]
    entries += [(p, insert_pause(p, at, pause_s), "hesitation") for p, at in hesitant]
    for p, audio, mark in entries:
        name = p.name.replace("/", "-") + (f"-{mark}" if mark else "") + ".wav"
        with wave.open(str(out / name), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(p.rate)
            w.writeframes(audio.astype(np.int16).tobytes())
        lines.append(f"{name}\t{p.text}" + (f"\t{mark}" if mark else ""))
    (out / "transcripts.tsv").write_text("\n".join(lines) + "\n")
    return len(rest), len(chosen), len(hesitant)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder to write the WAVs and transcripts.tsv into")
    ap.add_argument("--plain", type=int, default=60, help="prompts as recorded (default 60)")
    ap.add_argument("--paused", type=int, default=24, help="one-sentence prompts with a pause stretched inside (default 24)")
    ap.add_argument("--hesitation", type=int, default=24, help="one-sentence prompts with a pause inserted after a function word mid-phrase (default 24)")
    ap.add_argument("--pause-s", type=float, default=1.5, help="length of either kind of pause, seconds (default 1.5)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    counts = build(args.out, args.plain, args.paused, args.hesitation, args.pause_s)
    log.info("wrote %d plain, %d paused and %d hesitation utterances to %s", *counts, args.out)


if __name__ == "__main__":
    main()
