"""A set of real human speech for the latency benchmark (`--speech-dir`) and the turn-taking tests.

    python -m benchmarks.real_speech --out runs/real-speech
    voice-agent bench --speech-dir runs/real-speech --callers 1

The recordings are Asterisk's core English prompts (Debian `asterisk-core-sounds-en-wav` and its
transcripts in `asterisk-core-sounds-en`; recorded by Allison Smith, CC-BY-SA-3.0): a real person,
8 kHz telephone audio, with transcripts. Two kinds of utterance are written:

- *plain*: a prompt as recorded (one or more sentences, the speaker's own short pauses);
- *paused*: a one-sentence prompt whose longest pause inside the sentence is stretched to `--pause-s`
  (1.5 s) by repeating that pause's own background, so the words, their prosody and the noise floor
  stay the speaker's; only the pause is longer, as when a person stops to think mid-sentence. No
  package on the registries this project may use ships conversational speech with long natural
  pauses (the search is in the issue notes), so the length of these pauses is made, not found.

Each file is named after its prompt; transcripts.tsv marks the paused ones (`paused`), which the
benchmark counts towards its premature-endpoint rate.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import re
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SOUNDS = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
INSTALL = "apt-get install asterisk-core-sounds-en-wav asterisk-core-sounds-en"
FRAME_S = 0.01
QUIET_DB = -40.0  # a frame this far below the prompt's loudest frame is a pause
MIN_GAP_S = 0.08  # shorter dips are inside words


@dataclass(frozen=True)
class Prompt:
    name: str
    text: str
    audio: np.ndarray  # int16, 8 kHz
    rate: int

    def gaps(self) -> list[tuple[int, int]]:
        """Pauses between its first and last sound, as (start, end) sample indices."""
        hop = int(self.rate * FRAME_S)
        frames = self.audio[: len(self.audio) // hop * hop].astype(np.float32).reshape(-1, hop)
        db = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-9)
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


def build(out: Path, plain: int = 60, paused: int = 24, pause_s: float = 1.5, words: tuple[int, int] = (4, 20)) -> tuple[int, int]:
    """Write the set; returns (plain, paused) counts written. Prompts of `words` words (a spoken turn,
    not an IVR menu), each text once."""
    out.mkdir(parents=True, exist_ok=True)
    by_text = {p.text.lower().strip(".!? "): p for p in reversed(load_prompts()) if words[0] <= len(p.text.split()) <= words[1]}
    prompts = sorted(by_text.values(), key=lambda p: p.name)
    # Paused: one sentence, with a pause inside it.
    candidates = [(p, gap) for p in prompts if one_sentence(p.text) and (gap := longest_inner_pause(p))]
    chosen = candidates[:paused]
    rest = [p for p in prompts if p.name not in {c.name for c, _ in chosen}][:plain]
    lines = ["# Asterisk core English prompts (Allison Smith, CC-BY-SA-3.0); `paused`: a pause inside the sentence stretched to "
             f"{pause_s:g} s (python -m benchmarks.real_speech)"]
    for p, audio, mark in [(p, p.audio, "") for p in rest] + [(p, stretch(p, g, pause_s), "\tpaused") for p, g in chosen]:
        name = p.name.replace("/", "-") + ("-paused" if mark else "") + ".wav"
        with wave.open(str(out / name), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(p.rate)
            w.writeframes(audio.astype(np.int16).tobytes())
        lines.append(f"{name}\t{p.text}{mark}")
    (out / "transcripts.tsv").write_text("\n".join(lines) + "\n")
    return len(rest), len(chosen)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder to write the WAVs and transcripts.tsv into")
    ap.add_argument("--plain", type=int, default=60, help="prompts as recorded (default 60)")
    ap.add_argument("--paused", type=int, default=24, help="one-sentence prompts with a pause stretched inside (default 24)")
    ap.add_argument("--pause-s", type=float, default=1.5, help="length of the stretched pause, seconds (default 1.5)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    plain, paused = build(args.out, args.plain, args.paused, args.pause_s)
    log.info("wrote %d plain and %d paused utterances to %s", plain, paused, args.out)


if __name__ == "__main__":
    main()
