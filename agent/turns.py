"""Endpointing: speech start, short pause, resume and end of turn, decided over VAD frames in media time."""

from __future__ import annotations

import dataclasses
import enum
import re


@dataclasses.dataclass
class TurnConfig:
    vad_threshold: float = 0.5
    min_speech_ms: int = 160  # speech this long starts a turn (shorter blips are ignored)
    pause_ms: int = 200  # silence this long: a short pause, where speculative work starts
    end_ms: int = 500  # silence this long: end of turn (no speculation, or a transcript that reads as a statement)
    # With speculation, the transcript taken at the pause moves the end (0 disables either rule):
    question_end_ms: int = 300  # it ends in "?": the user asked and is waiting
    unfinished_end_ms: int = 2000  # it stops mid-phrase ("I was thinking about", "my favorite food is"): a thinking pause
    # The end-of-turn model (audio.turn_model), asked at each pause, moves the end too (0 disables either rule).
    # Off by default: on the project's speech sets it answers sooner at the median but misjudges some
    # finished turns as unfinished, which costs their wait (README, Performance).
    turn_model: bool = False
    complete_end_ms: int = 200  # it hears a finished turn and the transcript reads as finished: answer now
    incomplete_end_ms: int = 2000  # it hears a speaker who is not done: keep listening this long
    # Speech that starts this soon after the end of a turn, while the reply to it has not finished
    # playing, continues that turn (the speaker had only paused): the reply is cut, and the two parts
    # are answered as one (0 disables).
    continue_ms: int = 2000
    max_turn_s: float = 30.0  # longer turns are cut here (and the session says so)
    push_to_talk: bool = False  # silence never ends a turn: the client does (Session.commit)


class Signal(enum.Enum):
    SPEECH_START = "speech_start"
    PAUSE = "pause"
    RESUME = "resume"
    END_OF_TURN = "end_of_turn"
    CAPPED = "capped"  # end of turn forced by max_turn_s


# Words a finished English sentence rarely ends on: the speaker is mid-phrase.
_CONTINUES = set(
    "a an the and or but so because if then than that which who whose to of in on at by for from with about as into "
    "is are was were be am my your his her our their its i we you he she they it um uh like just very really "
    "usually always often sometimes never also still even".split()
)


COMPLETE = 0.5  # the turn model's probability above which a turn is finished (Pipecat's threshold)
SURE = 0.8  # ... and above which it may end the turn sooner than the transcript's rule


def reads_question(text: str) -> bool:
    return text.strip().endswith("?")


def ends_mid_phrase(text: str) -> bool:
    """The last word is one a sentence rarely ends on, or the words trail off in a comma, colon or dash."""
    text = text.strip()
    words = re.findall(r"[\w']+", text.lower())
    return not words or words[-1] in _CONTINUES or bool(re.search(r"[,;:\-]$", text))


def reads_unfinished(text: str) -> bool:
    """The words stop mid-phrase, or Whisper gave them no final punctuation."""
    return ends_mid_phrase(text) or not re.search(r"[.!?]$", text.strip())


def transcript_end_ms(text: str, config: TurnConfig) -> int:
    """The end-of-turn silence a pause transcript calls for (Whisper punctuates what it hears)."""
    if reads_question(text) and config.question_end_ms:
        return config.question_end_ms
    if config.unfinished_end_ms and reads_unfinished(text):
        return config.unfinished_end_ms
    return config.end_ms


def end_of_turn_ms(text: str | None, complete: float | None, config: TurnConfig, transcribing: bool = False) -> int:
    """The end-of-turn silence for a pause, from what is known of it so far: its transcript (None: not
    yet, or no speculation) and the turn model's probability that the turn is complete (None: not yet,
    or off).

    While the pause's transcript is on its way (`transcribing`), the words may yet stop mid-phrase, so
    the end waits for them, up to `unfinished_end_ms`: on a busy CPU the transcript comes after `end_ms`,
    and ending on silence alone would then answer half a sentence. Waiting costs the reply nothing,
    since the speculative reply needs those words before it can say anything.

    The model hears what words cannot (a voice that stays up, a drawn-out "and…"): when it hears a
    speaker who is not done, the end moves later, unless the words are a question (Whisper's "?" is
    strong evidence, and the model misjudges some questions): then the plain `end_ms`. It ends a turn
    sooner than the transcript's rule only when the words do not stop mid-phrase: alone, a falling
    voice at a phrase boundary ("I would like to know") would cut the speaker off. Punctuation missing
    from the words does not hold a sure model back: Whisper leaves some finished sentences bare.
    """
    if text is not None:
        rule = transcript_end_ms(text, config)
    else:
        rule = max(config.end_ms, config.unfinished_end_ms) if transcribing else config.end_ms
    if complete is None:
        return rule
    question = text is not None and reads_question(text)
    if complete > COMPLETE:
        agreed = complete >= SURE and text is not None and (question or not ends_mid_phrase(text)) and config.complete_end_ms
        return min(rule, config.complete_end_ms) if agreed else rule
    if question and config.incomplete_end_ms:
        return max(rule, config.end_ms)  # a question heard as unfinished: they disagree, the plain end
    return max(rule, config.incomplete_end_ms)


class Endpointer:
    """Feed one speech probability per frame; get the turn signals it implies.

    Everything counts frames of audio, never wall-clock time, so the result depends only on the
    audio: tests and benchmarks replay it at any speed with the same decisions.
    """

    def __init__(self, config: TurnConfig, frame_ms: float) -> None:
        self.config = config
        self.frame_ms = frame_ms
        self.in_speech = False  # inside a turn (speech started and not ended)
        self.speech_frames = 0  # speech frames in the current run (for start and barge-in)
        self.silence_frames = 0  # silent frames since the last speech frame
        self.turn_frames = 0
        self.paused = False
        self.end_ms: float = config.end_ms  # the current turn's end-of-turn silence (see `set_end`)

    def set_end(self, ms: float) -> bool:
        """Move this pause's end-of-turn silence; True if the silence so far already reaches it."""
        if self.config.push_to_talk:
            return False
        self.end_ms = ms
        return self.in_speech and self.paused and self.silence_frames >= self._frames(ms)

    def _frames(self, ms: float) -> int:
        return max(1, round(ms / self.frame_ms))

    @property
    def speech_ms(self) -> float:
        """Length of the current uninterrupted run of speech."""
        return self.speech_frames * self.frame_ms

    def push(self, prob: float) -> Signal | None:
        cfg = self.config
        speech = prob >= cfg.vad_threshold
        if speech:
            self.speech_frames += 1
            self.silence_frames = 0
        else:
            self.silence_frames += 1
            if self.silence_frames >= self._frames(cfg.pause_ms):
                self.speech_frames = 0  # a pause ends a run of speech; short gaps inside words do not
        if not self.in_speech:
            if speech and self.speech_frames >= self._frames(cfg.min_speech_ms):
                self.in_speech, self.paused, self.turn_frames, self.end_ms = True, False, self.speech_frames, cfg.end_ms
                return Signal.SPEECH_START
            return None
        self.turn_frames += 1
        if self.turn_frames >= self._frames(cfg.max_turn_s * 1000):
            self.end()
            return Signal.CAPPED
        if speech:
            if self.paused:
                self.paused, self.end_ms = False, cfg.end_ms
                return Signal.RESUME
            return None
        if self.silence_frames >= self._frames(self.end_ms) and not cfg.push_to_talk:
            self.end()
            return Signal.END_OF_TURN
        if not self.paused and self.silence_frames >= self._frames(cfg.pause_ms):
            self.paused = True
            return Signal.PAUSE
        return None

    def end(self) -> None:
        self.in_speech, self.paused, self.speech_frames, self.turn_frames = False, False, 0, 0
        self.end_ms = self.config.end_ms
