"""The caller's side of a session (agent/listener.py): audio → 32 ms frames → VAD → endpointer, in media time.

The VAD is a stand-in that calls a frame speech when it is loud (the real Silero model is tested in
tests/test_voice.py on real speech): what is checked here is the listener's own work — framing and
resampling, the audio a turn keeps (its pre-roll, what a pause and an end hand over), the speech and
idle times the session's barge-in and idle rules read, and moving a turn's end.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from agent.listener import FRAME_MS, PRE_ROLL_FRAMES, VAD_INLINE_FRAMES, Listener
from agent.turns import Signal, TurnConfig
from audio.vad import FRAME, SileroVAD, load_session
from tests.helpers import LOUD, QUIET, LoudnessVAD


def listener(**turns: object) -> Listener:
    config = TurnConfig(**{"min_speech_ms": 64, "pause_ms": 96, "end_ms": 192, **turns})  # 2, 3 and 6 frames
    lis = Listener(None, config)
    lis.vad = LoudnessVAD()
    return lis


def frames(*runs: tuple[float, int]) -> list[np.ndarray]:
    """Frames of 16 kHz audio, each marked with its index (so the audio a turn keeps can be named)."""
    out = []
    for level, n in runs:
        for _ in range(n):
            out.append(np.full(FRAME, level + len(out) * 1e-4, np.float32))
    return out


async def hear_frames(lis: Listener, fs: list[np.ndarray], arrival: float = 0.0) -> list:
    heard = []
    for f in fs:
        heard += await lis.hear(f, 16000, arrival)
    return heard


async def test_a_turn_keeps_its_pre_roll_a_pause_hands_over_its_audio_so_far_and_the_end_all_of_it():
    lis = listener()
    fs = frames((QUIET, 12), (LOUD, 4), (QUIET, 6))
    heard = await hear_frames(lis, fs)
    signals = {i: h.signal for i, h in enumerate(heard) if h.signal}
    assert signals == {13: Signal.SPEECH_START, 18: Signal.PAUSE, 21: Signal.END_OF_TURN}
    first = 13 + 1 - PRE_ROLL_FRAMES  # the start is confirmed on the 2nd loud frame; the 10 frames up to it are kept
    np.testing.assert_array_equal(heard[18].audio, np.concatenate(fs[first:19]))
    np.testing.assert_array_equal(heard[21].audio, np.concatenate(fs[first:22]))
    assert [h.in_speech for h in heard[12:]] == [False] + [True] * 8 + [False]
    assert all(h.audio is None for i, h in enumerate(heard) if i not in (18, 21))
    # the next turn starts afresh: its audio holds nothing of the last one
    more = frames((LOUD, 2), (QUIET, 6))
    heard = await hear_frames(lis, more)
    np.testing.assert_array_equal(heard[-1].audio, np.concatenate(more))


async def test_media_time_speech_and_idle_are_counted_in_frames():
    lis = listener()
    fs = frames((LOUD, 5), (QUIET, 4))
    heard = await hear_frames(lis, fs[:5], arrival=7.0) + await hear_frames(lis, fs[5:], arrival=8.0)
    assert [h.media_ms for h in heard] == [int((i + 1) * FRAME_MS) for i in range(9)] and lis.media_ms == int(9 * FRAME_MS)
    assert [h.speech_ms for h in heard[:5]] == [FRAME_MS * n for n in range(1, 6)]
    assert heard[5].speech_ms == 5 * FRAME_MS and heard[7].speech_ms == 0  # a short gap keeps the run; a pause ends it
    assert [h.idle_ms for h in heard] == [0.0] * 5 + [FRAME_MS * n for n in range(1, 5)]
    assert lis.speech_end == (int(5 * FRAME_MS), 7.0)  # the last loud frame, and when its chunk arrived
    assert {h.arrival for h in heard[5:]} == {8.0}
    lis.reset_idle()  # the agent has just finished talking
    [h] = await lis.hear(frames((QUIET, 1))[0], 16000, 9.0)
    assert h.idle_ms == FRAME_MS


async def test_a_chunk_is_cut_into_whole_frames_and_the_rest_waits_for_the_next():
    lis = listener()
    audio = np.concatenate(frames((QUIET, 3)))
    assert len(await lis.hear(audio[: FRAME + 100], 16000, 0.0)) == 1
    assert len(await lis.hear(audio[FRAME + 100 :], 16000, 0.0)) == 2
    assert lis.media_ms == int(3 * FRAME_MS)


@pytest.mark.parametrize("rate", [8000, 48000])
async def test_audio_at_other_rates_and_as_int16_is_resampled_to_16khz(rate):
    lis = listener()
    second = (np.sin(np.arange(rate) / rate * 2 * np.pi * 200) * 8000).astype(np.int16)
    n = len(await lis.hear(second, rate, 0.0)) + len(await lis.hear(second, rate, 0.0))
    assert abs(n - 2000 / FRAME_MS) <= 2  # two seconds of frames, give or take the resampler's delay
    n16 = len(await lis.hear(np.zeros(16000, np.float32), 16000, 0.0))  # back to 16 kHz: no resampling at all
    assert n16 >= 31


async def test_small_chunks_are_scored_on_the_event_loop_and_big_ones_off_it():
    lis = listener()
    await lis.hear(np.concatenate(frames((QUIET, VAD_INLINE_FRAMES))), 16000, 0.0)
    assert set(lis.vad.threads) == {threading.current_thread().name}
    lis.vad.threads.clear()
    await lis.hear(np.concatenate(frames((QUIET, VAD_INLINE_FRAMES + 1))), 16000, 0.0)
    assert threading.current_thread().name not in lis.vad.threads and len(lis.vad.threads) == VAD_INLINE_FRAMES + 1


async def test_moving_the_end_of_a_paused_turn():
    lis = listener()
    heard = await hear_frames(lis, frames((LOUD, 3), (QUIET, 3)))
    assert heard[-1].signal is Signal.PAUSE
    assert lis.move_end(500) is False  # not reached: the turn goes on
    assert (await hear_frames(lis, frames((QUIET, 3))))[-1].signal is None  # the old end (192 ms) no longer ends it
    assert lis.move_end(64) is True  # the silence so far already reaches it: the turn ends now
    assert not lis.endpointer.in_speech and lis._turn_audio == []


async def test_a_turn_past_its_limit_is_capped_and_hands_over_its_audio():
    lis = listener(max_turn_s=0.32)  # 10 frames
    fs = frames((LOUD, 12))
    heard = await hear_frames(lis, fs)
    [capped] = [i for i, h in enumerate(heard) if h.signal is Signal.CAPPED]
    assert capped == 9 and len(heard[capped].audio) == 10 * FRAME and not heard[capped].in_speech  # 320 ms from its first loud frame


async def test_a_frame_exactly_at_the_threshold_is_speech():
    lis = listener(vad_threshold=0.9)  # LoudnessVAD scores a loud frame 0.9
    await hear_frames(lis, frames((LOUD, 3)), arrival=4.0)
    assert lis.speech_end == (int(3 * FRAME_MS), 4.0) and lis.endpointer.in_speech


async def test_the_listener_scores_with_silero_on_the_session_it_is_given():
    session = load_session()
    lis = Listener(session, TurnConfig())
    assert isinstance(lis.vad, SileroVAD) and lis.vad.session is session
    heard = await lis.hear(np.zeros(16000, np.float32), 16000, 0.0)  # a second of silence: no speech
    assert len(heard) == 31 and not any(h.in_speech or h.signal for h in heard) and lis.speech_end is None
