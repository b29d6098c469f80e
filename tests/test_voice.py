"""The voice pipeline end to end through the embedding API: real Silero, faster-whisper, piper and engine.

Audio is fed faster than real time: endpointing counts media time, so decisions are the same.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import numpy as np
import pytest

from agent import events as ev
from agent.sentences import SentenceSplitter
from agent.turns import Endpointer, Signal, TurnConfig, transcript_end_ms
from tests.helpers import ManualClock, converse, espeak, heard_prefix, of, silence, similarity, trim, utterance

QUESTION = "Hello, how are you today?"


# ---- pieces -----------------------------------------------------------------------------------


def test_endpointer_signals_in_media_time():
    ep = Endpointer(TurnConfig(min_speech_ms=64, pause_ms=96, end_ms=192, max_turn_s=60), frame_ms=32)
    probs = [0.9] * 1 + [0.0] * 3 + [0.9] * 4 + [0.0] * 3 + [0.9] * 2 + [0.0] * 6
    signals = [(i, s) for i, p in enumerate(probs) if (s := ep.push(p)) is not None]
    # a 1-frame blip starts nothing; speech starts at its 2nd frame; a 3-frame gap is a pause, not an end
    assert signals == [(5, Signal.SPEECH_START), (10, Signal.PAUSE), (11, Signal.RESUME), (15, Signal.PAUSE), (18, Signal.END_OF_TURN)]


def test_endpointer_caps_long_turns():
    ep = Endpointer(TurnConfig(min_speech_ms=32, max_turn_s=0.32), frame_ms=32)
    signals = [s for _ in range(20) if (s := ep.push(1.0)) is not None]
    assert signals[:2] == [Signal.SPEECH_START, Signal.CAPPED]


def test_the_pause_transcript_moves_the_end_of_turn():
    cfg = TurnConfig(end_ms=600, question_end_ms=300, unfinished_end_ms=1200)
    assert transcript_end_ms("What do you like to do?", cfg) == 300
    assert transcript_end_ms("Tell me about your weekend.", cfg) == 600
    for fragment in ["I was thinking about", "My favorite food is.", "On Sunday, I usually", "On Sunday I usually.", "Well, um.", ""]:
        assert transcript_end_ms(fragment, cfg) == 1200, fragment
    assert transcript_end_ms("I was thinking about", TurnConfig(unfinished_end_ms=0)) == TurnConfig().end_ms
    ep = Endpointer(cfg, frame_ms=32)
    for p in [1.0] * 10 + [0.0] * 12:  # 384 ms of silence: paused, not ended at 600 ms
        assert ep.push(p) is not Signal.END_OF_TURN
    assert ep.set_end(300) is True  # already past a question's 300 ms
    assert ep.set_end(1200) is False and ep.push(0.0) is None


def test_sentence_splitter_waits_for_proof_of_an_end():
    s = SentenceSplitter()
    assert s.push("It costs 3.") == []
    assert s.push("5 dollars. Nice") == ["It costs 3.5 dollars."]
    assert s.push("! Really?\nYes") == ["Nice!", "Really?"]
    assert s.flush() == ["Yes"] and s.flush() == []


def test_a_long_first_sentence_is_cut_at_a_clause_and_no_chunk_runs_on():
    s = SentenceSplitter(clause_words=4, first_max_words=8, max_words=8)
    assert s.push("Well, I think") == []  # a comma after one word is not worth a chunk
    assert s.push(" that dogs are great, because") == ["Well, I think that dogs are great,"]
    assert s.push(" they are loyal, and fun. ") == ["because they are loyal, and fun."]  # clauses only open a reply
    assert s.push("one two three four five six seven eight nine") == ["one two three four five six seven eight"]
    assert s.flush() == ["nine"]
    first = SentenceSplitter(first_max_words=3, max_words=5)
    assert first.push("a b c d e f g h i j") == ["a b c", "d e f g h"]  # the first chunk is the shortest


# ---- sessions ---------------------------------------------------------------------------------


async def test_a_spoken_question_gets_a_spoken_reply(voice_agent, piper_speech):
    async with voice_agent.session() as s:
        got = await converse(s, utterance(piper_speech(QUESTION)))
    [transcript] = of(got, ev.Transcript)
    assert similarity(transcript.text, QUESTION) >= 0.8, transcript.text
    audio = of(got, ev.AgentAudio)
    assert audio and sum(len(a.samples) for a in audio) > 0.3 * audio[0].sample_rate
    done = of(got, ev.ResponseDone)[-1]
    assert done.text.strip() and not done.interrupted
    assert "".join(e.text for e in of(got, ev.AgentText)) == done.text
    assert of(got, ev.DenoiseStep)
    metrics = of(got, ev.TurnMetrics)[-1].timeline
    stages = metrics["stages_ms"]
    assert all(stages[k] is not None for k in stages), stages
    assert stages["asr_final"] <= stages["llm_first_text"] <= stages["tts_first_audio"] <= stages["first_audio_sent"]
    assert metrics["server_voice_to_voice_ms"] == stages["first_audio_sent"]
    assert {e.turn for e in got if not isinstance(e, ev.HangUp)} == {1}
    assert [t["role"] for t in s.dialogue.turns] == ["user", "assistant"]
    assert s.dialogue.turns[1]["content"] == done.text.strip()


async def test_a_pause_starts_speculation_that_resuming_cancels(voice_agent, piper_speech):
    first, second = "I would like to know", "what time it is in Paris."
    audio = utterance(np.concatenate([trim(piper_speech(first)), silence(0.4), trim(piper_speech(second))]))
    async with voice_agent.session(speculation=True) as s:
        got = await converse(s, audio)
    actions = [e.action for e in of(got, ev.Speculation)]
    assert "cancelled" in actions and actions[-1] == "kept", (actions, [e for e in got if not isinstance(e, ev.DenoiseStep)])
    [transcript] = of(got, ev.Transcript)  # the cancelled attempt's transcript never went out
    assert similarity(transcript.text, f"{first} {second}") >= 0.7, transcript.text
    assert len(of(got, ev.SpeechStarted)) == 1 and s.stats["speculations_cancelled"] >= 1
    assert of(got, ev.TurnMetrics)[-1].timeline["speculative"] is True


async def test_without_speculation_the_reply_starts_at_the_endpoint(voice_agent, piper_speech):
    async with voice_agent.session(speculation=False) as s:
        got = await converse(s, utterance(piper_speech(QUESTION)))
    assert not of(got, ev.Speculation)
    assert of(got, ev.TurnMetrics)[-1].timeline["speculative"] is False


MARK = np.full(320, np.nan, dtype=np.float32)  # 20 ms the session refuses at once: an Error event marks "all before was heard"


def then_mark(audio: np.ndarray) -> np.ndarray:
    """`audio`, padded to whole 20 ms chunks, then MARK: `converse(..., until=ev.Error)` returns once the
    session has judged every frame before it (events are emitted in order, as the frames are heard)."""
    return np.concatenate([audio, np.zeros(-len(audio) % 320, np.float32), MARK])


async def a_reply_playing(s, piper_speech, clock: ManualClock) -> ev.AgentAudio:
    """Ask a question and return the reply's first audio; on a clock that stands still, it stays 'playing'."""
    s.clock = clock
    got = await converse(s, utterance(piper_speech("Tell me a joke.")), until=ev.AgentAudio)
    return got[-1]


async def test_barge_in_cancels_the_reply_and_history_keeps_what_was_heard(voice_agent, piper_speech):
    alone = dataclasses.replace(voice_agent.config.turns, continue_ms=0)  # the user answers the reply, not goes on with their turn
    async with voice_agent.session(echo_guard_ms=0, barge_in_ms=200, speculation=False, turns=alone) as s:
        first = await a_reply_playing(s, piper_speech, ManualClock())
        heard_s = 0.6 * len(first.samples) / first.sample_rate
        s.played(first.turn, heard_s)  # the listener heard 60 % of the first sentence, then talked over it
        later = await converse(s, np.concatenate([piper_speech("Stop, wait a moment please."), silence(1.2)]), until=ev.Interrupted)
    assert later[-1].turn == first.turn and s.stats["barge_ins"] == 1
    sent = [first] + [a for a in of(later, ev.AgentAudio) if a.turn == first.turn]
    expected = heard_prefix([(a.sentence, a.text, len(a.samples)) for a in sent], heard_s, first.sample_rate)
    assert expected, "the test's premise: some words were heard"
    [reply] = [t["content"] for t in s.dialogue.turns if t["role"] == "assistant"]
    assert reply == expected


async def test_a_speaker_who_goes_on_after_the_agent_began_is_answered_once_for_the_whole_turn(voice_agent, piper_speech):
    first, second = "I would like to book a table.", "For two people tonight."
    turns = dataclasses.replace(voice_agent.config.turns, continue_ms=3000)  # past any end-of-turn wait (2 s), then on
    async with voice_agent.session(echo_guard_ms=0, barge_in_ms=200, turns=turns) as s:
        s.clock = ManualClock()  # the reply to the first part stays 'playing'
        await converse(s, np.concatenate([silence(0.5), piper_speech(first), silence(2.1)]), until=ev.AgentAudio)
        got = await converse(s, np.concatenate([piper_speech(second), silence(1.2)]), until=ev.TurnContinued)
        got += await converse(s, silence(0), until=ev.TurnMetrics)
    assert of(got, ev.Interrupted) == [ev.Interrupted(1)] and of(got, ev.TurnContinued) == [ev.TurnContinued(2, 1)]
    [transcript] = of(got, ev.Transcript)
    assert similarity(transcript.text, f"{first} {second}") >= 0.7, transcript.text
    assert [t["role"] for t in s.dialogue.turns] == ["user", "assistant"] and s.dialogue.turns[0]["content"] == transcript.text


async def test_the_echo_guard_holds_barge_in_off_until_it_has_passed(voice_agent, piper_speech):
    """The agent's own voice leaking into the mic at the start of a reply is not the user interrupting."""
    clock = ManualClock()
    talk = then_mark(np.concatenate([piper_speech("Stop, wait a moment please."), silence(0.2)]))
    async with voice_agent.session(echo_guard_ms=500, barge_in_ms=200, speculation=False) as s:
        await a_reply_playing(s, piper_speech, clock)
        guarded = await converse(s, talk, until=ev.Error)
        clock.advance(0.6)  # past the guard; the reply (longer than that) still plays
        after = await converse(s, talk, until=ev.Error)
    assert not of(guarded, ev.Interrupted)
    assert of(after, ev.Interrupted) and s.stats["barge_ins"] == 1


@pytest.mark.parametrize("speculation", [False, True])
async def test_speech_over_the_reply_shorter_than_barge_in_ms_is_dropped(voice_agent, piper_speech, speculation):
    """A cough or an 'okay' over the reply is not a barge-in, and not a turn either: after it ends
    (its pause, its end-of-turn silence) the agent talks on and nothing is answered."""
    clock = ManualClock()
    okay = np.concatenate([trim(piper_speech("Okay.")), silence(1.5)])
    async with voice_agent.session(echo_guard_ms=0, barge_in_ms=3000, speculation=speculation) as s:
        first = await a_reply_playing(s, piper_speech, clock)
        history = [dict(t) for t in s.dialogue.turns]
        got = await converse(s, then_mark(np.concatenate([okay, okay])), until=ev.Error)
        assert s._reply.turn == first.turn and s._reply.audible(echo_guard_ms=None)  # still playing
        clock.advance(60)  # the reply plays out over silence: still nothing to answer
        got += await converse(s, then_mark(silence(0.5)), until=ev.Error)
    assert not of(got, ev.Interrupted) and s.stats["barge_ins"] == 0
    assert not of(got, ev.SpeechStarted) and not of(got, ev.Speculation) and not of(got, ev.Transcript)
    assert {e.turn for e in got} == {first.turn}
    assert s.stats["talked_over"] == 2 and s.stats["turns"] == 1
    assert [t for t in s.dialogue.turns if t["role"] == "user"] == [t for t in history if t["role"] == "user"]


@pytest.mark.parametrize("prompt,interrupts", [("added", False), ("vm-and", False), ("pls-hold-while-try", True), ("conf-onlyperson", True)])
async def test_real_speech_over_the_reply_at_the_default_settings(voice_agent, prompt, interrupts):
    """A real speaker (the Asterisk prompts) over a playing reply, past the echo guard, as the
    barge-in benchmark plays it: a sentence interrupts and is a turn; a short word is dropped."""
    from benchmarks.barge_in import trial
    from benchmarks.real_speech import load_prompts

    [p] = [p for p in load_prompts() if p.name == prompt]
    got = await trial(voice_agent, p.name, "", p.at(16000), voice_agent.config.barge_in_ms)
    assert (got.interrupted, got.answered) == (interrupts, interrupts)


async def test_in_push_to_talk_speech_over_the_reply_is_a_turn_at_the_commit(voice_agent, piper_speech):
    """The user's commit says what a turn is: short speech over the reply is not dropped."""
    async with voice_agent.session(echo_guard_ms=0, barge_in_ms=3000, speculation=False) as s:
        first = await a_reply_playing(s, piper_speech, ManualClock())
        s.update(push_to_talk=True)
        got = await converse(s, then_mark(trim(piper_speech("Okay."))), until=ev.Error)
        await s.commit(16000)
        got += await converse(s, np.zeros(0, np.float32), until=ev.Transcript)
    [started] = of(got, ev.SpeechStarted)
    assert started.turn == first.turn + 1 and of(got, ev.Interrupted)[0].turn == first.turn
    assert of(got, ev.Transcript)[0].text.strip()


@pytest.mark.parametrize("barge_in_ms", [0, 320])
async def test_a_barge_in_opens_one_turn_where_the_speech_began_once_it_is_barge_in_ms_long(voice_agent, piper_speech, barge_in_ms):
    """The turn's speech start is where the speech began (not where it became a barge-in), and the
    interruption comes at the 32 ms frame where the run of speech reaches barge_in_ms (at the
    speech start itself when that is already long enough)."""
    async with voice_agent.session(echo_guard_ms=0, barge_in_ms=barge_in_ms, speculation=False) as s:
        first = await a_reply_playing(s, piper_speech, ManualClock())
        before_ms = s.listener.media_ms
        speech = np.concatenate([silence(0.1), trim(piper_speech("Wait a moment please."))])
        interrupted_at = None
        for i in range(0, len(speech), 320):
            await s.send_audio(speech[i : i + 320], 16000)
            if interrupted_at is None and s.stats["barge_ins"]:
                interrupted_at = s.listener.media_ms
        got = await converse(s, then_mark(silence(0.1)), until=ev.Error)
    [started] = of(got, ev.SpeechStarted)
    assert started.turn == first.turn + 1 and [e.turn for e in of(got, ev.Interrupted)] == [first.turn]
    min_speech_ms = s.config.turns.min_speech_ms
    began_ms = started.audio_ms - min_speech_ms  # the start is confirmed after min_speech_ms of speech
    assert before_ms + 100 - 32 <= began_ms <= before_ms + 100 + 100  # after the 0.1 s of silence, at the words
    assert interrupted_at - started.audio_ms == max(barge_in_ms - min_speech_ms, 0)  # 320: a whole number of frames


async def test_speech_as_long_as_a_barge_in_inside_the_echo_guard_is_a_turn_at_its_end(voice_agent, piper_speech):
    """A client that sends audio faster than real time asks its next question while the reply's echo
    guard still runs: too long for a backchannel, it is answered once it ends."""
    async with voice_agent.session(echo_guard_ms=60_000, barge_in_ms=200, speculation=False) as s:
        first = await a_reply_playing(s, piper_speech, ManualClock())
        got = await converse(s, utterance(piper_speech("What time is it in Paris?")), until=ev.Transcript)
    [started] = of(got, ev.SpeechStarted)
    assert started.turn == first.turn + 1 and [e.turn for e in of(got, ev.Interrupted)] == [first.turn]
    assert similarity(of(got, ev.Transcript)[0].text, "What time is it in Paris?") >= 0.7


async def test_speech_that_outlasts_the_reply_is_a_turn(voice_agent, piper_speech):
    """Talking over the reply's last words without interrupting it: once the reply has played out,
    the speech is the next turn, and it is answered."""
    clock = ManualClock()
    async with voice_agent.session(echo_guard_ms=0, barge_in_ms=3000, speculation=False) as s:
        first = await a_reply_playing(s, piper_speech, clock)
        half = then_mark(trim(piper_speech("Thanks, and what about")))
        got = await converse(s, half, until=ev.Error)
        assert not of(got, ev.SpeechStarted)
        clock.advance(60)  # the reply has played out while the user was talking
        got = await converse(s, np.concatenate([silence(0.3), piper_speech("tomorrow morning?"), silence(1.2)]))
    [started] = of(got, ev.SpeechStarted)
    assert started.turn == first.turn + 1 and not of(got, ev.Interrupted)
    [transcript] = of(got, ev.Transcript)
    assert similarity(transcript.text, "Thanks, and what about tomorrow morning?") >= 0.7, transcript.text
    assert of(got, ev.ResponseDone)[-1].turn == first.turn + 1


async def test_speech_while_a_reply_is_silent_between_sentences_is_a_turn(voice_agent, piper_speech, monkeypatch):
    """A reply still being produced whose audio has all played is silent: speech then is the user's
    turn, however short, not talk over the agent's voice (which would be dropped)."""
    gate = threading.Event()  # holds the reply's second sentence in TTS
    synthesize = voice_agent.tts.synthesize

    def held(text, *args, **kwargs):
        if text.startswith("Second"):
            gate.wait(60)
        yield from synthesize(text, *args, **kwargs)

    monkeypatch.setattr(voice_agent.tts, "synthesize", held)
    clock = ManualClock()
    try:
        async with voice_agent.session(greeting="First, a sentence. Second, another one.", echo_guard_ms=0, barge_in_ms=3000, speculation=False) as s:
            s.clock = clock
            await converse(s, silence(0.1), until=ev.AgentAudio)
            clock.advance(60)  # the first sentence has played; the second is not produced yet
            assert not s._reply.done and not s._reply.audible(echo_guard_ms=None, while_generating=False)
            got = await converse(s, np.concatenate([silence(0.3), trim(piper_speech("Okay.")), silence(1.5)]), until=ev.Transcript)
    finally:
        gate.set()
    [started] = of(got, ev.SpeechStarted)
    assert started.turn == 1 and s.stats["talked_over"] == 0
    assert similarity(of(got, ev.Transcript)[0].text, "Okay.") >= 0.7


async def test_two_sessions_at_once_keep_their_own_state(voice_agent, piper_speech):
    questions = ["Do you like dogs?", "Where do you live?"]

    async def one(q: str):
        async with voice_agent.session() as s:
            got = await converse(s, utterance(piper_speech(q)))
            return got, s.dialogue.turns

    results = await asyncio.gather(*(one(q) for q in questions))
    for q, (got, history) in zip(questions, results):
        [t] = of(got, ev.Transcript)
        assert similarity(t.text, q) >= 0.8 and history[0]["content"] == t.text
        assert of(got, ev.AgentAudio)


async def test_prefix_reuse_keeps_the_sessions_prompt_until_it_closes(voice_agent, piper_speech):
    async with voice_agent.session(reuse_prefix=True) as s:
        got = await converse(s, utterance(piper_speech(QUESTION)))
        assert of(got, ev.AgentAudio)
        kept = voice_agent.engine._prefixes[s.conversation]  # the turn's prompt (and more) is kept
        prompt = voice_agent.engine.encode_prompt(s.dialogue.turns[:1])
        assert kept.ids[: len(prompt)] == prompt
    assert s.conversation not in voice_agent.engine._prefixes


@pytest.mark.parametrize("rate", [8000, 16000, 44100, 48000])
async def test_common_sample_rates_are_accepted(rate, voice_agent):
    speech = espeak("What is your name?", rate)
    async with voice_agent.session() as s:
        got = await converse(s, utterance(speech, rate), rate=rate, until=ev.Transcript)
    assert similarity(got[-1].text, "What is your name?") >= 0.75, got[-1].text


async def test_bad_audio_gives_error_events_and_the_session_goes_on(voice_agent, piper_speech):
    async with voice_agent.session() as s:
        for samples, rate in [
            (np.array([np.nan] * 320, dtype=np.float32), 16000),
            (np.zeros(320, dtype=np.int32), 16000),
            (np.zeros((320, 2), dtype=np.float32), 16000),
            (np.zeros(320, dtype=np.float32), 12345),
        ]:
            await s.send_audio(samples, rate)
        await s.send_audio(np.zeros(0, dtype=np.float32), 16000)  # empty: nothing to do, not an error
        got = await converse(s, utterance(piper_speech(QUESTION)), until=ev.Transcript)
    errors = of(got, ev.Error)
    assert [e.code for e in errors] == ["bad_audio"] * 4
    assert "NaN" in errors[0].message and "unsupported sample rate" in errors[3].message
    assert similarity(got[-1].text, QUESTION) >= 0.8


async def test_an_overlong_turn_is_cut_and_said_so(voice_agent, piper_speech):
    async with voice_agent.session(turns=TurnConfig(max_turn_s=1.0)) as s:
        got = await converse(s, utterance(piper_speech("This is a rather long sentence that keeps going on and on for a while.")), until=ev.Transcript)
    assert any(e.code == "turn_too_long" for e in of(got, ev.Error))


async def test_greeting_idle_hang_up_and_call_limit(voice_agent):
    async with voice_agent.session(greeting="Hello! How can I help?", idle_timeout_s=1.0) as s:
        greeting = await converse(s, silence(0.1), until=ev.ResponseDone)
        assert s.dialogue.turns == [{"role": "assistant", "content": "Hello! How can I help?"}]
        got = await converse(s, silence(1.5), until=ev.HangUp)
    assert of(greeting, ev.AgentAudio)[0].turn == 0 and got[-1].reason == "idle"
    async with voice_agent.session(max_call_s=0.5) as s:
        got = await converse(s, silence(1.0), until=ev.HangUp)
    assert got[-1].reason == "max_duration"


async def test_live_settings_are_checked(voice_agent):
    async with voice_agent.session() as s:
        s.update(threshold=0.7, end_ms=500, echo_guard_ms=100)
        assert s.config.decode.threshold == 0.7 and s.listener.config.end_ms == 500 and s.config.echo_guard_ms == 100
        with pytest.raises(ValueError, match="unknown setting"):
            s.update(volume=11)
        with pytest.raises(ValueError, match="threshold"):
            s.update(threshold=2.0)


async def test_flush_stops_a_reply_that_is_still_playing(voice_agent, piper_speech):
    """The interrupt button works after generation ended too: the audio may still be playing."""
    async with voice_agent.session() as s:
        got = await converse(s, utterance(piper_speech("Tell me a joke.")), until=ev.ResponseDone)
        assert of(got, ev.AgentAudio)
        s.flush()
        later = await converse(s, silence(0.1), until=ev.Interrupted)
    assert later[-1].turn == got[-1].turn and s.stats["barge_ins"] == 1


async def test_one_big_chunk_is_the_same_as_many_small_ones(voice_agent, piper_speech):
    async with voice_agent.session() as s:
        got = await converse(s, utterance(piper_speech(QUESTION)), chunk_ms=3000, until=ev.Transcript)
    assert similarity(got[-1].text, QUESTION) >= 0.8


async def test_a_question_ends_the_turn_before_the_plain_endpoint(voice_agent, piper_speech):
    """end_ms is 5 s here, and only 0.8 s of silence follows: the '?' in the pause transcript ends the turn."""
    turns = TurnConfig(end_ms=5000, question_end_ms=300)
    async with voice_agent.session(turns=turns) as s:
        speech = np.concatenate([silence(0.5), trim(piper_speech("What is your name?")), silence(0.8)])
        got = await converse(s, speech, until=ev.TurnMetrics)
    assert of(got, ev.SpeechStopped) and of(got, ev.Transcript)[0].text.endswith("?")
    assert of(got, ev.TurnMetrics)[-1].timeline["speculative"] is True


@pytest.mark.parametrize("field", ["torch_threads", "asr_threads", "tts_threads", "max_sessions"])
def test_agent_config_refuses_a_count_below_one(field):
    from agent import AgentConfig

    with pytest.raises(ValueError, match=f"AgentConfig.{field} must be a positive integer, got 0"):
        AgentConfig(**{field: 0})


@pytest.mark.parametrize("reuse, exact, kept", [(None, True, True), (None, False, False), (True, False, True), (False, True, False)])
def test_prefix_reuse_is_chosen_where_it_is_exact_unless_set(voice_agent, monkeypatch, reuse, exact, kept):
    """By default a session reuses its prompt's cache only on a model where that changes nothing (turn blocks)."""
    monkeypatch.setattr(type(voice_agent.engine), "exact_prefix_reuse", property(lambda self: exact))
    s = voice_agent.session(reuse_prefix=reuse)
    _, conversation = s.engine_request(type("R", (), {"turn": 1})())
    assert conversation == (s.conversation if kept else None)
