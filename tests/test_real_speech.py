"""The real-speech set (benchmarks/real_speech.py): Asterisk's recorded prompts, with long pauses made inside them."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import latency
from benchmarks.real_speech import build, hesitation_point, insert_pause, load_prompts, transcribe_before_pause, whisper_words, words_of


@pytest.fixture(scope="module")
def whisper():
    from faster_whisper import WhisperModel

    from audio.asr import default_model_path

    return WhisperModel(str(default_model_path()), device="cpu", compute_type="int8")


@pytest.fixture(scope="module")
def asr():
    from audio.asr import Transcriber

    return Transcriber()


@pytest.fixture(scope="module")
def leave_message():
    """ "Press 5 to leave a message" (8 kHz)."""
    return next(p for p in load_prompts() if p.name == "vm-leavemsg")


def test_a_pause_inserted_is_the_prompts_own_quiet_and_nothing_else_moves(leave_message):
    p = leave_message
    at = len(p.audio) // 2
    out = insert_pause(p, at, 1.5)
    assert len(out) == len(p.audio) + int(1.5 * p.rate)
    assert np.array_equal(out[:at], p.audio[:at]) and np.array_equal(out[at + int(1.5 * p.rate) :], p.audio[at:])
    inserted = out[at : at + int(1.5 * p.rate)].astype(np.float64)
    windows = np.lib.stride_tricks.sliding_window_view(p.audio.astype(np.float64) ** 2, int(0.1 * p.rate)).mean(axis=1)
    assert np.mean(inserted**2) <= windows.min() + 1e-9


def test_a_hesitation_goes_right_after_a_function_word_mid_phrase(leave_message, whisper, asr):
    """The words before the cut end on "to" (heard by the agent's own transcriber, not the one that
    placed the cut), and the phrase goes on after it."""
    p = leave_message
    at = hesitation_point(p, whisper_words(p, whisper), lambda audio: transcribe_before_pause(whisper, audio))
    assert at is not None
    before = words_of(asr.transcribe(np.concatenate([p.at(16000, slice(None, at)), np.zeros(3200, np.float32)])))
    assert before[-1] == "to", before
    after = words_of(asr.transcribe(p.at(16000, slice(at, None))))
    assert "message" in after, after


def test_no_hesitation_where_whisper_heard_other_words(leave_message):
    other = [(w, 0.1 * i, 0.1 * i + 0.08) for i, w in enumerate("please hold while we try to connect you".split())]
    assert hesitation_point(leave_message, other, lambda audio: "press 5 to") is None


def test_the_set_marks_each_kind_of_pause_for_the_benchmark(tmp_path):
    assert build(tmp_path, plain=1, paused=1, hesitation=1) == (1, 1, 1)
    speech = latency.load_speech(tmp_path)
    assert sorted(u.paused for u in speech) == ["", "hesitation", "paused"]
    plain = next(u for u in speech if not u.paused)
    assert all(len(u.audio) > len(plain.audio) // 4 for u in speech)


def test_pieces_the_pbx_splices_between_others_are_not_turns(tmp_path):
    plain, paused, _ = build(tmp_path, plain=500, paused=500, hesitation=0)
    texts = [line.split("\t")[1] for line in (tmp_path / "transcripts.tsv").read_text().splitlines()[1:]]
    assert len(texts) == plain + paused > 100
    assert "Please check the number and dial again." in texts
    for piece in ("To leave the conference...", "...has joined the conference.", "If this is correct, press...", "I have a caller waiting, who introduces themselves as:"):
        assert piece not in texts
