"""The end-of-turn model (Smart Turn v3.2) and the sessions that ask it: its input against Pipecat's own
feature code, its verdicts, the combined end-of-turn rule, turns ended sooner and kept open on
synthesized and real speech, bad model files."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util

import numpy as np
import pytest

from agent import events as ev
from agent.turns import TurnConfig, end_of_turn_ms
from audio.turn_model import SAMPLE_RATE, WINDOW_S, TurnModel, TurnModelError, default_model_path
from tests.helpers import WAIT, settle, silence, trim

FINISHED = "I would like to book a table for two."
UNFINISHED = "So I was thinking that maybe we could"


def pipecat_features(audio: np.ndarray) -> np.ndarray:
    """Pipecat's own Whisper features for Smart Turn (numpy, next to the model in its wheel), on the
    model's documented input: the last 8 s, zero-padded at the start."""
    path = default_model_path().parent.parent / "_whisper_features.py"
    spec = importlib.util.spec_from_file_location("pipecat_whisper_features", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    n = WINDOW_S * SAMPLE_RATE
    return module.compute_whisper_log_mel_features(np.pad(audio[-n:], (max(0, n - len(audio)), 0)), do_normalize=True)


@pytest.fixture(scope="module")
def turn_model(voice_agent) -> TurnModel:
    assert voice_agent.turn_model is not None  # loaded by default (sessions turn it on)
    return voice_agent.turn_model


@pytest.mark.parametrize("seconds", [3, 11])  # padded at the start; cut to its last 8 s
def test_its_input_is_what_pipecat_feeds_it(turn_model, piper_speech, seconds):
    speech = piper_speech("Hello there, I would like to book a table for two people tonight, please.")
    audio = np.resize(speech, seconds * SAMPLE_RATE).astype(np.float32)
    ours = turn_model.input_features(audio)
    assert ours.shape == (1, 80, 800) and ours.dtype == np.float32
    np.testing.assert_allclose(ours[0], pipecat_features(audio), atol=1e-4)


def test_it_hears_a_finished_sentence_and_an_unfinished_one(turn_model, piper_speech):
    finished = np.concatenate([silence(0.2), piper_speech(FINISHED), silence(0.2)])
    unfinished = np.concatenate([silence(0.2), piper_speech(UNFINISHED), silence(0.2)])
    assert turn_model(finished) > 0.5 > turn_model(unfinished)


def test_the_end_of_turn_rule():
    cfg = TurnConfig(end_ms=500, question_end_ms=300, unfinished_end_ms=1200, complete_end_ms=200, incomplete_end_ms=2000)
    assert end_of_turn_ms(None, None, cfg) == 500  # nothing known yet
    assert end_of_turn_ms(None, None, cfg, transcribing=True) == 1200  # ... but the pause's words are on their way
    assert end_of_turn_ms(None, 0.9, cfg, transcribing=True) == 1200
    assert end_of_turn_ms(None, None, dataclasses.replace(cfg, unfinished_end_ms=0), transcribing=True) == 500  # 0: off
    assert end_of_turn_ms("Tell me a joke.", None, cfg) == 500  # the transcript alone, as before
    assert end_of_turn_ms("Tell me a joke.", 0.9, cfg) == 200  # both hear a finished turn: now
    assert end_of_turn_ms("What time is it?", 0.9, cfg) == 200
    assert end_of_turn_ms("Tell me a joke.", 0.7, cfg) == 500  # finished, but not sure: the transcript's rule
    assert end_of_turn_ms(None, 0.9, cfg) == 500  # the voice alone never cuts a speaker off sooner
    assert end_of_turn_ms("My favorite food is", 0.9, cfg) == 1200  # ... nor against words that stop mid-phrase
    assert end_of_turn_ms("I would like to know,", 0.9, cfg) == 1200
    assert end_of_turn_ms("You have left the conference", 0.9, cfg) == 200  # sure, and only the full stop is missing
    assert end_of_turn_ms("You have left the conference", 0.7, cfg) == 1200  # not sure: the transcript's rule
    assert end_of_turn_ms("Tell me a joke.", 0.2, cfg) == 2000  # the voice is not done: keep listening
    assert end_of_turn_ms(None, 0.2, cfg) == 2000
    assert end_of_turn_ms("What do you like to do on the weekend?", 0.05, cfg) == 500  # a question: they disagree
    assert end_of_turn_ms("What time is it?", 0.2, TurnConfig(incomplete_end_ms=0, question_end_ms=300)) == 300  # 0: off
    assert end_of_turn_ms("Tell me a joke.", 0.9, TurnConfig(complete_end_ms=0, end_ms=500)) == 500


# ---- sessions ---------------------------------------------------------------------------------


async def feed(session, audio: np.ndarray, rate: int = 16000) -> None:
    step = rate // 50
    for i in range(0, len(audio), step):
        await session.send_audio(audio[i : i + step], rate)
        await asyncio.sleep(0)


async def settled(session) -> None:
    """Until the pause's verdict and speculative transcript (where there is one) have been applied."""
    async def done() -> None:
        while session._judging or (session._reply is not None and not session._reply.done and not session._reply.user_text):
            await asyncio.sleep(0.01)
    await asyncio.wait_for(done(), WAIT)


def stopped(events: list[ev.Event]) -> list[ev.SpeechStopped]:
    return [e for e in events if isinstance(e, ev.SpeechStopped)]


async def run_session(agent, audio_parts: list[np.ndarray], rate: int = 16000, until: type | None = None, **settings) -> list[ev.Event]:
    """Feed each part and let its pause be judged and transcribed before the next (as if each took
    that long in real time); the session's events until then, or until an `until` event."""
    got: list[ev.Event] = []
    async with agent.session(**settings) as s:
        async def collect() -> None:
            async for e in s.events():
                got.append(e)
                if until is not None and isinstance(e, until):
                    return

        reader = asyncio.create_task(collect())
        for part in audio_parts:
            await feed(s, part, rate)
            await settled(s)
        await settle()  # what the last transcript or verdict decided reaches the reader
        if until is not None:
            await asyncio.wait_for(reader, WAIT)
        reader.cancel()
    return got


@pytest.mark.parametrize("turn_model", [True, False])
async def test_a_finished_sentence_ends_the_turn_sooner_when_the_model_agrees(voice_agent, piper_speech, turn_model):
    turns = TurnConfig(turn_model=turn_model)
    speech = np.concatenate([silence(0.5), trim(piper_speech(FINISHED))])
    got = await run_session(voice_agent, [speech, silence(0.3)], speculation=True, turns=turns)
    # 300 ms of silence: past complete_end_ms (200), short of a statement's end_ms (500)
    assert bool(stopped(got)) is turn_model, [type(e).__name__ for e in got]


@pytest.mark.parametrize("turn_model", [True, False])
async def test_a_mid_phrase_pause_keeps_the_turn_open_when_the_model_hears_more_coming(voice_agent, piper_speech, turn_model):
    turns = TurnConfig(turn_model=turn_model)
    speech = np.concatenate([silence(0.5), trim(piper_speech(UNFINISHED))])
    got = await run_session(voice_agent, [speech, silence(0.3), silence(1.5)], speculation=False, turns=turns)
    # 1.8 s of silence: past end_ms (500), short of incomplete_end_ms (2000)
    assert bool(stopped(got)) is not turn_model


@pytest.fixture(scope="module")
def pin_prompt():
    """A real speaker (Asterisk's prompts): "Please enter your personal identification number followed by
    the pound, or hash key." (8 kHz)."""
    from benchmarks.real_speech import load_prompts

    return next(p for p in load_prompts() if p.name == "confbridge-pin")


async def test_real_speech_with_a_long_pause_mid_sentence_is_one_turn(voice_agent, pin_prompt):
    """A real speaker (Asterisk's prompts) with a 1.5 s pause inside the sentence, the model on and off."""
    from benchmarks.real_speech import longest_inner_pause, stretch

    prompt = pin_prompt  # "…followed by the pound, [1.5 s] or hash key."
    gap = longest_inner_pause(prompt)
    spoken = stretch(prompt, gap, 1.5).astype(np.float32) / 32768
    cut = gap[0] + int(0.5 * prompt.rate)  # the first part, and 500 ms of its pause: judged and transcribed
    parts = [np.concatenate([silence(0.5, 8000), spoken[:cut]]), spoken[cut:], silence(2.5, 8000)]  # past incomplete_end_ms
    with_model = await run_session(voice_agent, parts, rate=8000, speculation=True, turns=TurnConfig(turn_model=True))
    without = await run_session(voice_agent, parts, rate=8000, speculation=True, turns=TurnConfig(turn_model=False))
    assert len(stopped(with_model)) == 1 and len(stopped(without)) == 2, (with_model, without)


async def test_turn_metrics_report_the_verdict(voice_agent, piper_speech):
    speech = np.concatenate([silence(0.5), trim(piper_speech(FINISHED))])
    got = await run_session(voice_agent, [speech, silence(0.3)], until=ev.TurnMetrics, speculation=True, turns=TurnConfig(turn_model=True))
    verdict = [e for e in got if isinstance(e, ev.TurnMetrics)][-1].timeline["turn_model"]
    assert verdict["complete"] > 0.5 and verdict["ms"] > 0


def test_a_missing_or_corrupt_model_file_is_a_clear_error(tmp_path):
    from audio.vad import default_model_path as silero

    with pytest.raises(TurnModelError, match="no such file"):
        TurnModel(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(TurnModelError, match="junk.onnx: not an ONNX model"):
        TurnModel(tmp_path / "junk.onnx")
    with pytest.raises(TurnModelError, match="expected one input 'input_features'"):
        TurnModel(silero())


def test_without_the_model_file_the_server_starts_unless_sessions_need_it(monkeypatch, tmp_path):
    from agent.voice_agent import AgentConfig, load_turn_model
    from audio import turn_model

    def missing():
        raise TurnModelError("the end-of-turn model ships in the pipecat-ai wheel")

    monkeypatch.setattr(turn_model, "default_model_path", missing)
    assert load_turn_model(AgentConfig()) is None  # optional: sessions simply cannot turn it on
    with pytest.raises(TurnModelError, match="pipecat-ai"):
        load_turn_model(AgentConfig(turns=TurnConfig(turn_model=True)))  # on for every session: required
    with pytest.raises(TurnModelError, match="no such file"):
        load_turn_model(AgentConfig(turn_model_path=tmp_path / "named.onnx"))  # named: required


def test_a_server_without_the_model_refuses_to_turn_it_on(voice_agent):
    from agent.voice_agent import Agent

    agent = Agent(voice_agent.config, voice_agent.engine, voice_agent.asr, voice_agent.tts, voice_agent.vad_session)
    try:
        session = agent.session()
        assert session.live_settings()["turn_model"] is False
        with pytest.raises(ValueError, match="without an end-of-turn model"):
            session.update(turn_model=True)
    finally:
        for pool in (agent.asr_pool, agent.tts_pool, agent.turn_pool):
            pool.shutdown()


def test_resampled_real_speech_is_what_the_model_hears(turn_model, pin_prompt):
    """8 kHz phone audio reaches the model at its 16 kHz (the session resamples before anything else)."""
    prompt = pin_prompt
    audio = prompt.at(SAMPLE_RATE)
    assert turn_model(np.concatenate([silence(0.2), audio, silence(0.2)])) > 0.5
