"""A session's rules (agent/session.py) on the real Session, Listener, Reply and Dialogue, with the models
replaced by stand-ins that answer at once: a VAD that hears loud frames as speech, an ASR and an engine
that return scripted text, a TTS that speaks 0.1 s per word. The clock is the test's.

So every rule runs in milliseconds and is checked exactly: a turn and its speculation, speech that
resumes, barge-in and what the history keeps, talk-over that stays short, the echo guard, the live
settings, the limits, bad audio. tests/test_voice.py runs the same pipeline on the real models.
"""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from agent import events as ev
from agent.turns import TurnConfig
from agent.voice_agent import Agent, AgentConfig
from audio.vad import FRAME
from dllm_engine.decoding import Output, Stats
from tests.helpers import LOUD, QUIET, LoudnessVAD, ManualClock, of, settle

TURNS = TurnConfig(min_speech_ms=64, pause_ms=96, end_ms=192, question_end_ms=0, unfinished_end_ms=0)  # 2, 3 and 6 frames of 32 ms


class ScriptedEngine:
    """The engine as a session uses it: each request gets the next scripted reply (the last one again once
    they run out), word by word."""

    max_new_tokens = 48
    max_prompt_tokens = None
    exact_prefix_reuse = True

    def __init__(self, tokenizer, replies: list[str]) -> None:  # noqa: ANN001
        self.tokenizer = tokenizer  # a real one: the session renders and counts its prompts
        self.replies = replies
        self.requests: list[tuple[str, str | None]] = []
        self.forgotten: list[str] = []

    async def stream(self, prompt, params, request_id=None, step_events=False, conversation=None):  # noqa: ANN001, ANN201
        self.requests.append((request_id, conversation))
        words = (self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]).split(" ")
        for i, word in enumerate(words):
            await asyncio.sleep(0)
            yield Output(request_id, text=word if i == 0 else " " + word)
        yield Output(request_id, finished=True, finish_reason="stop", stats=Stats(len(prompt), 0, len(words), len(words), 1, 0.0, 0.0, 0.0))

    def forget(self, conversation: str) -> None:
        self.forgotten.append(conversation)


class ScriptedASR:
    def __init__(self, *texts: str) -> None:
        self.texts = list(texts)

    def transcribe(self, audio: np.ndarray) -> str:
        return self.texts.pop(0) if len(self.texts) > 1 else self.texts[0]


class WordTTS:
    """0.1 s of audio per word, one chunk per word."""

    sample_rate = 16000

    def synthesize(self, sentence: str):  # noqa: ANN201
        for _ in sentence.split():
            yield np.full(1600, 0.1, np.float32)


@dataclasses.dataclass
class Call:
    """A session, what it has emitted so far, and its clock."""

    session: object
    events: list[ev.Event]
    clock: ManualClock
    engine: ScriptedEngine

    async def say(self, *runs: tuple[float, int]) -> None:
        """Send frames: (level, count) runs of 32 ms, one frame per chunk as a live caller would."""
        for level, n in runs:
            for _ in range(n):
                await self.session.send_audio(np.full(FRAME, level, np.float32), 16000)
                await asyncio.sleep(0)

    async def until_true(self, condition) -> None:  # noqa: ANN001
        for _ in range(5000):
            if condition():
                return
            await asyncio.sleep(0.001)
        raise AssertionError("the condition never held")

    async def until(self, kind: type, count: int = 1) -> list:
        """Wait (the stand-ins run on threads) until `count` events of `kind` have come; a test's bound, not a timing."""
        for _ in range(5000):
            if len(of(self.events, kind)) >= count:
                return of(self.events, kind)
            await asyncio.sleep(0.001)
        raise AssertionError(f"no {count} {kind.__name__} in {self.events}")


@pytest.fixture
def call(random_model):
    """Yields a function that opens a session: call(replies, transcripts, **config overrides) → Call."""
    opened: list[tuple[Agent, object, asyncio.Task]] = []

    async def open_call(replies: list[str], transcripts: tuple[str, ...] = ("Hello there.",), turn_model=None, **overrides: object) -> Call:  # noqa: ANN001
        engine = ScriptedEngine(random_model[1], list(replies))
        config = AgentConfig(**{"turns": TURNS, "echo_guard_ms": 0, "barge_in_ms": 96, **overrides})
        agent = Agent(config, engine, ScriptedASR(*transcripts), WordTTS(), None, turn_model)
        session = agent.session()
        session.listener.vad = LoudnessVAD()
        session.clock = clock = ManualClock()
        await session.__aenter__()
        events: list[ev.Event] = []

        async def collect() -> None:
            async for e in session.events():
                events.append(e)

        opened.append((agent, session, asyncio.create_task(collect())))
        return Call(session, events, clock, engine)

    yield open_call
    for agent, session, task in opened:
        task.cancel()
        agent.asr_pool.shutdown(wait=False)
        agent.tts_pool.shutdown(wait=False)
        agent.turn_pool.shutdown(wait=False)


def kinds(events: list[ev.Event]) -> list[str]:
    return [type(e).__name__ for e in events if not isinstance(e, (ev.AgentAudio, ev.DenoiseStep))]


# ---- a turn ----------------------------------------------------------------------------------


async def test_a_turn_starts_speculatively_at_the_pause_and_is_kept_at_its_end(call):
    c = await call(["Sure, I can help."])
    await c.say((QUIET, 5), (LOUD, 6), (QUIET, 3))  # speech, then a pause: the reply starts, held back
    await c.until(ev.Speculation)
    await c.say((QUIET, 3))  # the end of the turn: the speculation is kept
    await c.until(ev.TurnMetrics)
    assert kinds(c.events) == ["SpeechStarted", "Speculation", "SpeechStopped", "Speculation", "Transcript", "AgentText", "AgentText",
                               "AgentText", "AgentText", "ResponseDone", "TurnMetrics"]
    assert [s.action for s in of(c.events, ev.Speculation)] == ["started", "kept"]
    started, stopped = of(c.events, ev.SpeechStarted)[0], of(c.events, ev.SpeechStopped)[0]
    assert (started.turn, started.audio_ms, stopped.audio_ms) == (1, int(7 * 32), int(11 * 32))  # confirmed on its 2nd loud frame; the last loud one
    assert of(c.events, ev.Transcript)[0].text == "Hello there."
    assert of(c.events, ev.ResponseDone)[0] == ev.ResponseDone(1, "Sure, I can help.")
    assert [a.sentence for a in of(c.events, ev.AgentAudio)] == [1] * 4  # one sentence, a chunk per word
    timeline = of(c.events, ev.TurnMetrics)[0].timeline
    assert timeline["speculative"] is True and timeline["turn"] == 1
    assert c.session.dialogue.turns == [{"role": "user", "content": "Hello there."}, {"role": "assistant", "content": "Sure, I can help."}]
    assert dict(c.session.stats) == {"turns": 1, "speculations_started": 1, "speculations_kept": 1}
    assert c.engine.requests == [(f"{c.session.conversation}-1-0", c.session.conversation)]


async def test_speech_that_resumes_after_the_pause_discards_the_speculation(call):
    c = await call(["Now I know."], ("Hello", "Hello there, friend."))
    await c.say((LOUD, 4), (QUIET, 3))
    await c.until(ev.Speculation)
    await c.say((LOUD, 4), (QUIET, 6))  # the speaker goes on: the reply to half a turn is dropped
    await c.until(ev.TurnMetrics)
    assert [s.action for s in of(c.events, ev.Speculation)] == ["started", "cancelled", "started", "kept"]
    assert [d.text for d in of(c.events, ev.ResponseDone)] == ["Now I know."]
    assert [t.text for t in of(c.events, ev.Transcript)] == ["Hello there, friend."]
    assert c.session.stats["speculations_cancelled"] == 1 and c.session.stats["turns"] == 1


async def test_without_speculation_the_reply_starts_at_the_end_of_the_turn(call):
    c = await call(["Hi."], speculation=False)
    await c.say((LOUD, 4), (QUIET, 6))
    await c.until(ev.TurnMetrics)
    assert of(c.events, ev.Speculation) == [] and of(c.events, ev.TurnMetrics)[0].timeline["speculative"] is False


async def test_a_greeting_is_turn_0_and_needs_no_user(call):
    c = await call(["unused"], greeting="Hello! How can I help?")
    await c.until(ev.ResponseDone)
    assert of(c.events, ev.ResponseDone)[0] == ev.ResponseDone(0, "Hello! How can I help?")
    assert c.session.dialogue.turns == [{"role": "assistant", "content": "Hello! How can I help?"}]
    assert c.engine.requests == []  # fixed text: nothing to generate


# ---- when a turn ends: the pause's transcript and the end-of-turn model -------------------------


def stopped(c: Call) -> bool:
    return bool(of(c.events, ev.SpeechStopped))


async def test_a_question_at_the_pause_ends_the_turn_sooner_and_words_that_trail_off_later(call):
    c = await call(["It is noon."], ("What time is it?",), turns=dataclasses.replace(TURNS, question_end_ms=96, unfinished_end_ms=320))
    await c.say((LOUD, 4), (QUIET, 3))  # a pause of 96 ms; its transcript asks: that is the end
    await c.until(ev.SpeechStopped)
    c = await call(["Go on."], ("I was thinking about",), turns=dataclasses.replace(TURNS, question_end_ms=96, unfinished_end_ms=320))
    await c.say((LOUD, 4), (QUIET, 3))
    await c.until_true(lambda: c.session._pause_text is not None)
    await c.say((QUIET, 6))  # 288 ms: past end_ms, short of the 320 ms a trailing phrase gets
    assert not stopped(c)
    await c.say((QUIET, 1))
    assert stopped(c)


class TurnModel:
    """The end-of-turn model's stand-in: a fixed probability that the speaker is done (or a failure)."""

    def __init__(self, complete: float | Exception) -> None:
        self.complete, self.heard = complete, []

    def __call__(self, audio: np.ndarray) -> float:
        self.heard.append(len(audio))
        if isinstance(self.complete, Exception):
            raise self.complete
        return self.complete


MODEL_TURNS = dataclasses.replace(TURNS, turn_model=True, complete_end_ms=96, incomplete_end_ms=320)


async def test_a_sure_turn_model_ends_a_finished_sentence_at_the_pause(call):
    model = TurnModel(0.95)
    c = await call(["Hi."], ("Hello there.",), turn_model=model, turns=MODEL_TURNS)
    await c.say((LOUD, 4), (QUIET, 3))
    await c.until(ev.TurnMetrics)  # no more audio needed: the verdict and the words agree at 96 ms
    assert of(c.events, ev.TurnMetrics)[0].timeline["turn_model"]["complete"] == 0.95
    assert model.heard == [(4 + 3) * FRAME]  # the turn's audio up to the pause: its speech and the silence so far


async def test_an_unsure_turn_model_keeps_listening(call):
    c = await call(["Hi."], ("Hello there.",), turn_model=TurnModel(0.1), turns=MODEL_TURNS)
    await c.say((LOUD, 4), (QUIET, 3))
    await c.until_true(lambda: c.session._verdict is not None and c.session._pause_text is not None)
    await c.say((QUIET, 6))
    assert not stopped(c)
    await c.say((QUIET, 1))
    await c.until(ev.TurnMetrics)
    assert of(c.events, ev.TurnMetrics)[0].timeline["turn_model"]["complete"] == 0.1


async def test_a_failing_turn_model_leaves_the_transcript_rule_in_charge(call):
    c = await call(["Hi."], ("Hello there.",), turn_model=TurnModel(RuntimeError("broken")), turns=MODEL_TURNS)
    await c.say((LOUD, 4), (QUIET, 6))
    await c.until(ev.TurnMetrics)
    assert of(c.events, ev.TurnMetrics)[0].timeline["turn_model"] is None


async def test_the_turn_model_is_not_asked_when_off(call):
    model = TurnModel(0.95)
    c = await call(["Hi."], turn_model=model)
    await c.say((LOUD, 4), (QUIET, 6))
    await c.until(ev.TurnMetrics)
    assert model.heard == []


# ---- speech over the agent's voice ------------------------------------------------------------


async def speaking(c: Call) -> None:
    """A first turn whose reply has been generated and sent, and is playing now (its audio ahead of the clock)."""
    await c.say((LOUD, 4), (QUIET, 6))
    await c.until(ev.ResponseDone)
    assert c.session._reply.audible(echo_guard_ms=None)


async def test_speech_over_the_reply_as_long_as_barge_in_ms_interrupts_it(call):
    c = await call(["One two three four five six seven eight.", "Okay."], ("Hi.", "Wait."))
    await speaking(c)
    c.clock.advance(0.2)  # two of its eight words have played
    c.session.played(1, 0.2)
    await c.say((LOUD, 3))  # 96 ms of speech: a barge-in
    await c.until(ev.Interrupted)
    assert of(c.events, ev.Interrupted) == [ev.Interrupted(1)] and c.session.stats["barge_ins"] == 1
    assert [s.turn for s in of(c.events, ev.SpeechStarted)] == [1, 2]
    assert c.session.dialogue.turns[-1] == {"role": "assistant", "content": "One two"}  # what was heard
    await c.say((QUIET, 6))
    await c.until(ev.ResponseDone, 2)
    assert of(c.events, ev.ResponseDone)[-1] == ev.ResponseDone(2, "Okay.")


async def test_shorter_speech_over_the_reply_is_dropped_and_the_agent_talks_on(call):
    c = await call(["One two three four five six seven eight."])
    await speaking(c)
    await c.say((LOUD, 2), (QUIET, 6))  # 64 ms: a backchannel ("mhm"), short of barge_in_ms
    assert of(c.events, ev.Interrupted) == [] and len(of(c.events, ev.SpeechStarted)) == 1
    assert c.session.stats["talked_over"] == 1 and c.session._reply.audible(echo_guard_ms=None)


async def test_the_echo_guard_holds_off_a_barge_in_at_the_start_of_the_reply(call):
    c = await call(["One two three four five six seven eight."], echo_guard_ms=500)
    await speaking(c)
    await c.say((LOUD, 4))  # the agent's own voice coming back, in its first 500 ms
    assert of(c.events, ev.Interrupted) == []
    c.clock.advance(0.5)
    await c.say((LOUD, 1))  # past the guard, the same speech interrupts
    assert of(c.events, ev.Interrupted) == [ev.Interrupted(1)]


async def test_flush_interrupts_a_reply_that_is_playing_and_nothing_else(call):
    c = await call(["One two three."])
    c.session.flush()  # nothing to stop
    await speaking(c)
    c.session.flush()
    c.session.flush()  # once is enough
    await settle()
    assert of(c.events, ev.Interrupted) == [ev.Interrupted(1)]
    assert of(c.events, ev.ResponseDone) == [ev.ResponseDone(1, "One two three.")]  # it had finished generating: no second done


async def test_played_reports_only_touch_their_own_turn(call):
    c = await call(["One two three four."])
    await speaking(c)
    c.session.played(7, 0.0)  # another turn: ignored
    assert c.session.dialogue.turns[-1]["content"] == "One two three four."
    c.session.played(1, 0.2)
    assert c.session.dialogue.turns[-1]["content"] == "One two"


# ---- settings, limits, bad input --------------------------------------------------------------


async def test_update_is_all_or_nothing_and_reaches_the_listener(call):
    c = await call(["Hi."])
    c.session.update("Be terse.", end_ms=400, barge_in_ms=300, threshold=0.8)
    assert c.session.instructions == "Be terse." and c.session.listener.config.end_ms == 400
    live = c.session.live_settings()
    assert (live["end_ms"], live["barge_in_ms"], live["threshold"]) == (400, 300, 0.8)
    with pytest.raises(ValueError, match="pause_ms must be"):
        c.session.update("Be loud.", end_ms=600, pause_ms=1)
    assert c.session.instructions == "Be terse." and c.session.live_settings()["end_ms"] == 400
    with pytest.raises(ValueError, match="^turn_model: this server runs without an end-of-turn model$"):
        c.session.update(turn_model=True)
    c.session.update(None, speculation=False)  # None leaves the instructions as they are
    assert c.session.instructions == "Be terse."
    c.session.update("")
    assert c.session.instructions == ""


async def test_an_idle_caller_is_hung_up_and_the_session_ignores_audio_after(call):
    c = await call(["Hi."], idle_timeout_s=0.32)
    await c.say((QUIET, 9))
    assert of(c.events, ev.HangUp) == []
    await c.say((QUIET, 1))  # 10 frames: 320 ms without speech
    assert of(c.events, ev.HangUp) == [ev.HangUp(0, "idle")] and c.session.closed
    await c.say((LOUD, 10))
    assert of(c.events, ev.SpeechStarted) == []


async def test_a_call_past_its_length_is_hung_up(call):
    c = await call(["Hi."], max_call_s=0.32)
    await c.say((LOUD, 9))
    assert of(c.events, ev.HangUp) == []
    await c.say((LOUD, 1))
    assert of(c.events, ev.HangUp)[0].reason == "max_duration"


async def test_a_turn_past_its_length_is_cut_and_answered(call):
    c = await call(["Long."], turns=dataclasses.replace(TURNS, max_turn_s=0.32))
    await c.say((LOUD, 12))
    await c.until(ev.ResponseDone)
    [error] = of(c.events, ev.Error)
    assert (error.turn, error.code, error.message) == (1, "turn_too_long", "turn cut at 0.32 s of speech")


async def test_bad_audio_is_an_error_event_and_the_session_goes_on(call):
    c = await call(["Hi."])
    await c.session.send_audio(np.zeros(100, np.float32), 12345)
    await settle()
    [error] = of(c.events, ev.Error)
    assert error.code == "bad_audio" and "12345" in error.message
    await c.say((LOUD, 4), (QUIET, 6))
    await c.until(ev.ResponseDone)


async def test_push_to_talk_waits_for_the_commit(call):
    c = await call(["Hi."], turns=dataclasses.replace(TURNS, push_to_talk=True))
    await c.say((LOUD, 4), (QUIET, 20))
    assert of(c.events, ev.SpeechStopped) == []
    await c.session.commit(16000)
    await c.until(ev.ResponseDone)
    assert c.session.listener.config.push_to_talk is True  # the commit's own silence did not change the setting


async def test_closing_the_session_forgets_its_conversation_once(call):
    c = await call(["Hi."])
    await c.session.close()
    await c.session.close()
    await settle()
    assert c.engine.forgotten == [c.session.conversation] and of(c.events, ev.HangUp) == [ev.HangUp(0, "closed")]
