"""audio/: codec, resampling, framing, Silero VAD, faster-whisper and piper, on real models."""

from __future__ import annotations

import numpy as np
import pytest

from audio import codec
from audio.asr import Transcriber
from audio.codec import AudioError, Framer, Resampler, to_float32
from audio.tts import speakable
from audio.vad import FRAME, SileroVAD, load_session
from tests.helpers import espeak, silence, similarity


# ---- codec ------------------------------------------------------------------------------------


def g711_ulaw_decode(code: int) -> int:
    """ITU-T G.711 μ-law decoding, from its definition: complemented byte = sign, 3-bit segment,
    4-bit step; magnitude ((step << 3) + 0x84 << segment) - 0x84 (16-bit scale)."""
    c = ~code & 0xFF
    magnitude = (((c & 0x0F) << 3) + 0x84 << ((c >> 4) & 0x07)) - 0x84
    return -magnitude if c & 0x80 else magnitude


def g711_ulaw_encode(sample: int) -> int:
    """ITU-T G.711 μ-law encoding on the 14-bit scale (Sun's reference g711.c, as the stdlib's audioop did):
    the segment is the first whose upper end holds |x| + 33, the step its next 4 bits."""
    x = sample >> 2
    mask = 0x7F if x < 0 else 0xFF
    x = min(abs(x), 8159) + 0x21
    segment = next((s for s, end in enumerate((0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)) if x <= end), 8)
    return (0x7F if segment == 8 else (segment << 4) | ((x >> (segment + 1)) & 0x0F)) ^ mask


# Hand-checked against the G.711 tables: (code, decoded value); segment ends and both zeros.
G711_PAIRS = [(0xFF, 0), (0x7F, 0), (0xFE, 8), (0x7E, -8), (0xF0, 120), (0xEF, 132), (0xE0, 372), (0xDF, 396),
              (0xD0, 876), (0xC0, 1884), (0xB0, 3900), (0xA0, 7932), (0x90, 15996), (0x8F, 16764), (0x80, 32124),
              (0x00, -32124), (0x10, -15996), (0x70, -120), (0x6F, -132)]


def g711_alaw_decode(code: int) -> int:
    """ITU-T G.711 A-law decoding, from its definition: even bits inverted (0x55), sign, 3-bit
    segment, 4-bit step; segment 0 is linear, the others double per segment (16-bit scale)."""
    a = code ^ 0x55
    segment, step = (a >> 4) & 0x07, (a & 0x0F) << 4
    magnitude = step + 8 if segment == 0 else (step + 0x108) << (segment - 1)
    return magnitude if a & 0x80 else -magnitude


def g711_alaw_encode(sample: int) -> int:
    """ITU-T G.711 A-law encoding on the 13-bit scale (Sun's reference g711.c)."""
    x = sample >> 3
    mask, x = (0xD5, x) if x >= 0 else (0x55, -x - 1)
    segment = next((s for s, end in enumerate((0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)) if x <= end), 8)
    if segment == 8:
        return 0x7F ^ mask
    return ((segment << 4) | ((x >> (1 if segment < 2 else segment)) & 0x0F)) ^ mask


# Hand-checked against the A-law table: (code, decoded value).
G711_ALAW_PAIRS = [(0xD5, 8), (0x55, -8), (0xD4, 24), (0xC5, 264), (0xF5, 528), (0xAA, 32256), (0x2A, -32256)]


def test_the_g711_reference_matches_hand_checked_values():
    assert [(c, g711_ulaw_decode(c)) for c, _ in G711_PAIRS] == G711_PAIRS
    assert [g711_ulaw_encode(v) for v in (0, 8, -8, 32124, -32124, 32767, -32768)] == [0xFF, 0xFE, 0x7E, 0x80, 0x00, 0x80, 0x00]
    assert [(c, g711_alaw_decode(c)) for c, _ in G711_ALAW_PAIRS] == G711_ALAW_PAIRS
    assert [g711_alaw_encode(v) for v in (0, 8, -8, 32767, -32768)] == [0xD5, 0xD5, 0x55, 0xAA, 0x2A]


G711 = {
    "ulaw": (codec.ulaw_encode, codec.ulaw_decode, g711_ulaw_encode, g711_ulaw_decode),
    "alaw": (codec.alaw_encode, codec.alaw_decode, g711_alaw_encode, g711_alaw_decode),
}


@pytest.mark.parametrize("law", G711)
def test_g711_matches_the_reference_for_every_sample(law):
    """The codec against a reference written separately from it (no stdlib G.711 after Python 3.12)."""
    encode, decode, ref_encode, ref_decode = G711[law]
    every_byte = bytes(range(256))
    assert decode(every_byte).tolist() == [ref_decode(c) for c in every_byte]
    x = np.arange(-32768, 32768, dtype=np.int16)
    assert encode(x) == bytes(ref_encode(int(v)) for v in x)


@pytest.mark.parametrize("law", G711)
def test_g711_round_trip_keeps_the_signal(law):
    encode, decode = G711[law][:2]
    t = np.arange(8000) / 8000
    x = (np.sin(2 * np.pi * 440 * t) * 12000).astype(np.int16)
    y = decode(encode(x))
    assert len(encode(x)) == len(x)
    snr = 10 * np.log10(np.sum(x.astype(float) ** 2) / np.sum((x.astype(float) - y) ** 2))
    assert snr > 30  # G.711 keeps ~35-38 dB SNR on a loud tone


@pytest.mark.parametrize(
    "samples, rate, message",
    [
        (np.array([0.0, np.nan], dtype=np.float32), 16000, "NaN"),
        (np.array([0.0, np.inf]), 16000, "NaN or infinite"),
        (np.zeros((100, 2), dtype=np.float32), 16000, "mono"),
        (np.zeros(100, dtype=np.int32), 16000, "int16 or float"),
        (np.zeros(100, dtype=np.float32), 12345, "unsupported sample rate"),
    ],
)
def test_bad_audio_is_refused_with_a_reason(samples, rate, message):
    with pytest.raises(AudioError, match=message):
        to_float32(samples, rate)


def test_int16_and_column_vectors_are_accepted():
    x = to_float32(np.array([[16384], [-32768]], dtype=np.int16), 8000)
    assert x.dtype == np.float32 and x.tolist() == [0.5, -1.0]


def test_streaming_resampler_matches_the_expected_length_and_tone():
    t = np.arange(48000) / 48000
    tone = np.sin(2 * np.pi * 300 * t).astype(np.float32)
    rs = Resampler(48000, 16000)
    out = np.concatenate([rs(tone[i : i + 960]) for i in range(0, len(tone), 960)] + [rs(np.zeros(0, np.float32), last=True)])
    assert abs(len(out) - 16000) <= 2
    spectrum = np.abs(np.fft.rfft(out[:16000]))
    assert abs(np.argmax(spectrum) - 300) <= 1  # 1 Hz bins over one second


def test_framer_cuts_exact_frames_and_keeps_the_rest():
    f = Framer(4)
    frames = f.push(np.arange(6, dtype=np.float32)) + f.push(np.arange(6, 9, dtype=np.float32))
    assert [fr.tolist() for fr in frames] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_supported_rates_include_phone_and_browser_rates():
    assert {8000, 16000, 44100, 48000} <= set(codec.SUPPORTED_RATES)


# ---- VAD --------------------------------------------------------------------------------------


def test_silero_tells_speech_from_silence(piper_speech):
    vad = SileroVAD(load_session())
    audio = np.concatenate([silence(1.0), piper_speech("The quick brown fox jumps over the lazy dog."), silence(1.0)])
    probs = np.array([vad(audio[i : i + FRAME]) for i in range(0, len(audio) - FRAME + 1, FRAME)])
    lead = int(1.0 * 16000 / FRAME) - 2
    assert probs[:lead].max() < 0.3
    assert probs.max() > 0.9
    assert (probs > 0.5).sum() * FRAME / 16000 > 1.0  # over a second of the sentence is speech
    with pytest.raises(ValueError, match="512"):
        vad(np.zeros(100, dtype=np.float32))


# ---- ASR and TTS ------------------------------------------------------------------------------


@pytest.mark.parametrize("voice", ["piper", "espeak"])
def test_whisper_transcribes_two_different_voices(voice, voice_agent, piper_speech):
    text = "What do you like to do on the weekend?"
    audio = piper_speech(text) if voice == "piper" else espeak(text)
    heard = voice_agent.asr.transcribe(np.concatenate([silence(0.3), audio, silence(0.3)]))
    assert similarity(heard, text) >= 0.8, heard


def test_whisper_short_window_and_faster_whispers_own_path_agree(voice_agent, piper_speech):
    """The agent pads turns to a 15 s window; 30 s (or a turn too long for the window) is faster-whisper's path."""
    full = Transcriber(voice_agent.asr.path, threads=1, window_s=30)
    text = "I was thinking about going to the beach tomorrow."
    short_turn = np.concatenate([silence(0.3), piper_speech(text), silence(0.3)])
    long_turn = np.concatenate([short_turn, silence(15.0), short_turn])  # does not fit 15 s
    assert similarity(voice_agent.asr.transcribe(short_turn), text) >= 0.8
    assert similarity(full.transcribe(short_turn), text) >= 0.8
    assert similarity(voice_agent.asr.transcribe(long_turn), f"{text} {text}") >= 0.8
    with pytest.raises(ValueError, match="window_s"):
        Transcriber(voice_agent.asr.path, window_s=0.5)


def test_whisper_says_nothing_about_silence(voice_agent):
    assert voice_agent.asr.transcribe(silence(2.0)) == ""
    assert voice_agent.asr.transcribe(silence(0.05)) == ""


def test_piper_streams_one_chunk_per_sentence(voice_agent):
    chunks = list(voice_agent.tts.synthesize("Hello there. How are you today? I am fine."))
    assert len(chunks) == 3
    assert all(c.dtype == np.float32 and len(c) > 0.2 * voice_agent.tts.sample_rate for c in chunks)
    for c in chunks:  # each starts within 10 ms of its first audible sample
        assert np.flatnonzero(np.abs(c) > 0.01)[0] <= 0.01 * voice_agent.tts.sample_rate


def test_trim_keeps_a_margin_and_can_leave_the_tail():
    x = np.concatenate([np.zeros(100), np.ones(10), np.zeros(100)]).astype(np.float32)
    assert len(codec.trim(x, 0.5)) == 10
    assert len(codec.trim(x, 0.5, margin=5)) == 20
    assert len(codec.trim(x, 0.5, margin=5, tail=False)) == 115
    assert len(codec.trim(np.zeros(50, np.float32), 0.5)) == 50  # nothing loud: kept whole


def test_tts_handles_unusual_characters(voice_agent):
    assert speakable("hi 😀\x00 there\n\n!") == "hi there !"
    assert list(voice_agent.tts.synthesize("😀😀 \x07")) == []
    audio = list(voice_agent.tts.synthesize("Ünïcödé — “quotes” & 100% ½…"))
    assert audio and np.isfinite(np.concatenate(audio)).all()
