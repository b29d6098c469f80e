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
import threading

import numpy as np
import pytest

from agent import events as ev
from agent.clock import SYSTEM
from agent.turns import TurnConfig
from agent.voice_agent import Agent, AgentConfig
from audio.vad import FRAME
from dllm_engine.decoding import SPOKEN, DecodeParams, Output, Stats, StepInfo
from tests.helpers import LOUD, QUIET, LoudnessVAD, ManualClock, eventually, of, settle

VAD_SESSION = object()  # stands for the onnxruntime session: every session's listener is handed it (tests then swap in LoudnessVAD)
TURNS = TurnConfig(min_speech_ms=64, pause_ms=96, end_ms=192, question_end_ms=0, unfinished_end_ms=0, continue_ms=0)  # 2, 3 and 6 frames of 32 ms; continuing a turn: its own tests


class ScriptedEngine:
    """The engine as a session uses it: each request gets the next scripted reply (the last one again once
    they run out), word by word, with a denoising step per word when asked; `gate` holds the words back."""

    max_new_tokens = 48
    max_prompt_tokens = None

    def __init__(self, tokenizer, replies: list[str], exact_prefix_reuse: bool = True) -> None:  # noqa: ANN001
        self.tokenizer = tokenizer  # a real one: the session renders and counts its prompts
        self.replies = replies
        self.exact_prefix_reuse = exact_prefix_reuse
        self.requests: list[tuple[str, str | None]] = []
        self.prompts: list[str] = []
        self.params: list[object] = []
        self.forgotten: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def stream(self, prompt, params, request_id=None, step_events=False, conversation=None):  # noqa: ANN001, ANN201
        self.requests.append((request_id, conversation))
        self.prompts.append(self.tokenizer.decode(prompt))
        self.params.append(params)
        words = (self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]).split(" ")
        if words == ["!fail"]:
            raise RuntimeError("the engine failed")
        for i, word in enumerate(words):
            await self.gate.wait()
            await asyncio.sleep(0)
            step = StepInfo(0, i, [2 * params.block_size + i], [STEP_TOKEN], len(words) - 1 - i) if step_events else None
            yield Output(request_id, text=word if i == 0 else " " + word, step=step)
        yield Output(request_id, finished=True, finish_reason="stop", stats=Stats(len(prompt), 0, len(words), len(words), 1, 0.0, 0.0, 0.0))

    def forget(self, conversation: str) -> None:
        self.forgotten.append(conversation)


STEP_TOKEN = 7


class ScriptedASR:
    """Scripted transcripts (the last one again once they run out; "!fail" raises); `gate` holds each back until set."""

    def __init__(self, *texts: str) -> None:
        self.texts = list(texts)
        self.gate = threading.Event()
        self.gate.set()
        self.heard: list[tuple[int, str]] = []  # (samples, thread) of each call

    def transcribe(self, audio: np.ndarray) -> str:
        self.heard.append((len(audio), threading.current_thread().name))
        self.gate.wait(10)
        text = self.texts.pop(0) if len(self.texts) > 1 else self.texts[0]
        if text == "!fail":
            raise RuntimeError("the transcriber failed")
        return text


class WordTTS:
    """0.1 s of audio per word, one chunk per word; a sentence in `held` waits for its event."""

    sample_rate = 16000

    def __init__(self) -> None:
        self.held: dict[str, threading.Event] = {}
        self.threads: list[str] = []

    def synthesize(self, sentence: str):  # noqa: ANN201
        self.threads.append(threading.current_thread().name)
        if sentence in self.held:
            self.held[sentence].wait(10)
        for _ in sentence.split():
            yield np.full(1600, 0.1, np.float32)


@dataclasses.dataclass
class Call:
    """A session, what it has emitted so far, and its clock."""

    session: object
    events: list[ev.Event]
    clock: ManualClock
    engine: ScriptedEngine
    agent: Agent

    async def say(self, *runs: tuple[float, int], tick: float = 0.0) -> None:
        """Send frames: (level, count) runs of 32 ms, one frame per chunk as a live caller would, the
        clock moved on by `tick` seconds before each (0: the frames all arrive at once)."""
        for level, n in runs:
            for _ in range(n):
                self.clock.advance(tick)
                await self.session.send_audio(np.full(FRAME, level, np.float32), 16000)
                await asyncio.sleep(0)

    async def until_true(self, condition) -> None:  # noqa: ANN001
        await eventually(condition, "the condition never held")

    async def until(self, kind: type, count: int = 1) -> list:
        """Wait (the stand-ins run on threads) until `count` events of `kind` have come; a test's bound, not a timing."""
        await eventually(lambda: len(of(self.events, kind)) >= count, f"no {count} {kind.__name__} in {self.events}")
        return of(self.events, kind)


@pytest.fixture
def call(random_model):
    """Yields a function that opens a session: call(replies, transcripts, **config overrides) → Call."""
    opened: list[tuple[Agent, object, asyncio.Task]] = []

    async def open_call(replies: list[str], transcripts: tuple[str, ...] = ("Hello there.",), turn_model=None, exact_prefix_reuse: bool = True,  # noqa: ANN001
                        **overrides: object) -> Call:
        engine = ScriptedEngine(random_model[1], list(replies), exact_prefix_reuse)
        config = AgentConfig(**{"turns": TURNS, "echo_guard_ms": 0, "barge_in_ms": 96, **overrides})
        agent = Agent(config, engine, ScriptedASR(*transcripts), WordTTS(), VAD_SESSION, turn_model)
        session = agent.session()
        session.listener.vad = LoudnessVAD()
        session.clock = clock = ManualClock()
        await session.__aenter__()
        events: list[ev.Event] = []

        async def collect() -> None:
            async for e in session.events():
                events.append(e)

        opened.append((agent, session, asyncio.create_task(collect())))
        return Call(session, events, clock, engine, agent)

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
    c = await call(["Sure, I can help."], system_prompt="Be brief.")
    await c.say((QUIET, 5), (LOUD, 6), (QUIET, 3))  # speech, then a pause: the reply starts, held back
    await c.until_true(lambda: c.session._reply is not None and c.session._reply.done)
    assert of(c.events, ev.Speculation) == [ev.Speculation(1, "started")] and not of(c.events, ev.AgentText)  # nothing shown yet
    await c.say((QUIET, 3))  # the end of the turn: the speculation is kept, and what it held back is released
    await c.until(ev.TurnMetrics)
    tok, bs = c.engine.tokenizer, c.engine.params[0].block_size
    words = ["Sure,", " I", " can", " help."]
    replied = [e for i, w in enumerate(words) for e in (ev.DenoiseStep(1, 0, i, bs, [i], [tok.decode([STEP_TOKEN])], 3 - i), ev.AgentText(1, w))]
    spoken = [e for e in c.events if not isinstance(e, (ev.AgentAudio, ev.TurnMetrics))]
    assert spoken == [  # confirmed on the 2nd loud frame; stopped at the last loud one; the pause's audio: 7 frames of pre-roll and 7 more
        ev.SpeechStarted(1, 7 * 32), ev.Speculation(1, "started"), ev.SpeechStopped(1, 11 * 32), ev.Speculation(1, "kept"),
        ev.Transcript(1, "Hello there.", 14 * FRAME / 16000), *replied, ev.ResponseDone(1, "Sure, I can help."),
    ]
    assert [(a.turn, a.sentence, a.text, len(a.samples), a.sample_rate) for a in of(c.events, ev.AgentAudio)] == [(1, 1, "Sure, I can help.", 1600, 16000)] * 4
    [metrics] = of(c.events, ev.TurnMetrics)
    assert (metrics.turn, metrics.timeline["turn"], metrics.timeline["speculative"], metrics.timeline["interrupted"], metrics.timeline["turn_model"]) == (
        1, 1, True, False, None)
    assert metrics.timeline["stages_ms"]["endpoint"] is not None  # counted from the arrival of the last loud frame
    assert c.engine.prompts[0].endswith(c.engine.tokenizer.decode(c.engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there."}])))  # the pending user turn went with it
    assert c.engine.params[0] == c.agent.config.decode
    assert [(n, thread.split("_")[0]) for n, thread in c.agent.asr.heard] == [(14 * FRAME, "asr")]
    assert c.session.dialogue.turns == [{"role": "user", "content": "Hello there."}, {"role": "assistant", "content": "Sure, I can help."}]
    assert dict(c.session.stats) == {"turns": 1, "speculations_started": 1, "speculations_kept": 1}
    assert c.engine.requests == [(f"{c.session.conversation}-1-0", c.session.conversation)]


async def test_a_turns_timeline_counts_from_the_arrival_of_its_last_loud_frame_on_the_sessions_clock(call):
    c = await call(["Sure."])
    await c.say((LOUD, 6), (QUIET, 3), tick=0.032)  # the pause, 96 ms after the last loud frame: the speculative reply runs
    await c.until_true(lambda: c.session._reply is not None and c.session._reply.done)
    await c.say((QUIET, 3), tick=0.032)  # the end of the turn: the reply is kept and its audio taken
    [metrics] = await c.until(ev.TurnMetrics)
    assert metrics.timeline["stages_ms"] == {
        "speech_end": 0.0, "endpoint": 192.0, "asr_final": 96.0, "llm_first_text": 96.0, "first_sentence": 96.0, "tts_first_audio": 96.0, "first_audio_sent": 192.0}
    assert metrics.timeline["server_voice_to_voice_ms"] == 192.0


async def test_speech_that_resumes_after_the_pause_discards_the_speculation(call):
    c = await call(["Now I know."], ("Hello", "Hello there, friend."))
    await c.say((LOUD, 4), (QUIET, 3))
    await c.until(ev.Speculation)
    await c.say((LOUD, 4), (QUIET, 6))  # the speaker goes on: the reply to half a turn is dropped
    await c.until(ev.TurnMetrics)
    assert of(c.events, ev.Speculation) == [ev.Speculation(1, a) for a in ("started", "cancelled", "started", "kept")]
    assert [d.text for d in of(c.events, ev.ResponseDone)] == ["Now I know."]
    assert [t.text for t in of(c.events, ev.Transcript)] == ["Hello there, friend."]
    assert c.session.stats["speculations_cancelled"] == 1 and c.session.stats["turns"] == 1


async def test_without_speculation_the_reply_starts_at_the_end_of_the_turn(call):
    c = await call(["Hi."], speculation=False)
    await c.say((LOUD, 4), (QUIET, 6))
    await c.until(ev.TurnMetrics)
    assert {t.split("_")[0] for t in c.agent.tts.threads} == {"tts"}  # inside the TTS's thread budget
    assert of(c.events, ev.Speculation) == [] and of(c.events, ev.TurnMetrics)[0].timeline["speculative"] is False
    assert c.engine.prompts[0].count("Hello there.") == 1  # the user's turn is in the history already, not pending too
    assert c.session.dialogue.turns[0] == {"role": "user", "content": "Hello there."}


async def test_a_greeting_is_turn_0_and_needs_no_user(call):
    c = await call(["unused"], greeting="Hello! How can I help?")
    await c.until(ev.ResponseDone)
    assert of(c.events, ev.ResponseDone)[0] == ev.ResponseDone(0, "Hello! How can I help?")
    assert of(c.events, ev.AgentText) == [ev.AgentText(0, "Hello! How can I help?")]
    assert (await c.until(ev.TurnMetrics))[0].timeline["turn"] == 0
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


LATE = dataclasses.replace(TURNS, unfinished_end_ms=320)  # 10 frames: the end waits this long for a late transcript


@pytest.mark.parametrize("transcript,stops_at", [("Tell me a joke.", 0), ("I was thinking about", 4)])
async def test_the_end_of_a_turn_waits_for_a_late_pause_transcript(call, transcript, stops_at):
    """On a busy CPU the transcript comes after end_ms of silence: the words it brings still decide."""
    c = await call(["Go on."], (transcript,), turns=LATE)
    c.agent.asr.gate.clear()
    await c.say((LOUD, 4), (QUIET, 3 + 3))  # 192 ms of silence: end_ms, but the transcript is late
    await settle()
    assert not stopped(c)
    c.agent.asr.gate.set()
    await c.until_true(lambda: c.session._pause_text is not None)
    await settle()
    assert stopped(c) == (stops_at == 0)  # a statement: the silence so far is enough
    if stops_at:
        await c.say((QUIET, stops_at - 1))  # 288 ms in all: short of the 320 ms a trailing phrase gets
        assert not stopped(c)
        await c.say((QUIET, 1))
        assert stopped(c)
    assert of(c.events, ev.Transcript)[0].text == transcript  # the speculation was kept
    await c.until(ev.ResponseDone)
    assert c.session.dialogue.turns == [{"role": "user", "content": transcript}, {"role": "assistant", "content": "Go on."}]


async def test_without_a_transcript_to_wait_for_the_end_is_end_ms(call):
    c = await call(["Hi."], ("!fail",), turns=LATE)
    c.agent.asr.gate.clear()
    await c.say((LOUD, 4), (QUIET, 6))
    await settle()
    assert not stopped(c)
    c.agent.asr.gate.set()  # the transcription fails: nothing more to wait for
    await c.until_true(lambda: stopped(c))
    assert of(c.events, ev.Error)[0].code == "reply_failed"
    c = await call(["Hi."], turns=dataclasses.replace(LATE, push_to_talk=True))
    c.agent.asr.gate.clear()
    await c.say((LOUD, 4))
    await c.session.commit(16000)  # the client ends the turn: its silence does, transcript or not
    await settle()
    assert stopped(c)
    c.agent.asr.gate.set()
    await c.until(ev.ResponseDone)
    c = await call(["Hi."], turns=LATE, speculation=False)
    await c.say((LOUD, 4), (QUIET, 6))  # no speculation: no transcript at the pause to wait for
    await settle()
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
    assert of(c.events, ev.SpeechStarted)[1] == ev.SpeechStarted(2, c.session.listener.media_ms - 32)  # its speech start (2nd loud frame), not the barge-in
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


# ---- a turn that goes on after the agent took its pause for the end ----------------------------

CONTINUING = dataclasses.replace(TURNS, continue_ms=640)  # 20 frames


async def test_speech_soon_after_a_turns_end_continues_it_and_both_parts_are_answered_as_one(call):
    c = await call(["One two three four five six seven eight.", "Press pound."], ("Please enter your password.", "Followed by the pound key."),
                   turns=CONTINUING)
    await speaking(c)  # the speaker paused; the agent took it for the end and is answering the first part
    c.clock.advance(0.2)
    c.session.played(1, 0.2)
    await c.say((QUIET, 4), (LOUD, 3))  # they go on: 320 ms after their turn's end, a barge-in
    await c.until(ev.TurnContinued)
    assert of(c.events, ev.Interrupted) == [ev.Interrupted(1)] and of(c.events, ev.TurnContinued) == [ev.TurnContinued(2, 1)]
    assert c.session.dialogue.turns == []  # the first part and the reply it got are out of the history
    await c.say((QUIET, 6))
    await c.until(ev.ResponseDone, 2)
    assert of(c.events, ev.Transcript)[-1].text == "Please enter your password. Followed by the pound key."
    assert "One two" not in c.engine.prompts[-1] and "Please enter your password. Followed by the pound key." in c.engine.prompts[-1]
    assert c.session.dialogue.turns == [
        {"role": "user", "content": "Please enter your password. Followed by the pound key."}, {"role": "assistant", "content": "Press pound."}]
    assert c.session.stats["turns_continued"] == 1
    c.clock.advance(10.0)  # the reply has played out
    await c.say((QUIET, 30), (LOUD, 3), (QUIET, 6))  # a later turn of its own carries nothing
    await c.until(ev.ResponseDone, 3)
    assert of(c.events, ev.Transcript)[-1].text == "Followed by the pound key."


async def test_a_turn_that_goes_on_before_its_reply_is_heard_stops_that_reply_at_once(call):
    c = await call(["Slow reply.", "Fast reply."], ("My number is", "five five five."), turns=CONTINUING)
    c.engine.gate.clear()  # turn 1's reply is still being generated: nothing audible yet
    await c.say((LOUD, 4), (QUIET, 6))
    await c.until_true(lambda: bool(c.engine.requests))
    await c.say((LOUD, 2))  # the speaker goes on: the reply to half a sentence stops now, not when it would start playing
    assert of(c.events, ev.Interrupted) == [ev.Interrupted(1)] and of(c.events, ev.TurnContinued) == [ev.TurnContinued(2, 1)]
    c.engine.gate.set()
    await c.say((LOUD, 2), (QUIET, 6))
    await c.until(ev.ResponseDone, 2)
    assert of(c.events, ev.ResponseDone) == [ev.ResponseDone(1, "", interrupted=True), ev.ResponseDone(2, "Fast reply.")]
    assert c.session.dialogue.turns[0] == {"role": "user", "content": "My number is five five five."} and len(c.session.dialogue.turns) == 2


@pytest.mark.parametrize("setting", ["later", "played out", "off"])
async def test_speech_later_than_continue_ms_after_a_reply_that_played_out_or_with_it_off_is_a_turn_of_its_own(call, setting):
    turns = dataclasses.replace(TURNS, continue_ms=0) if setting == "off" else CONTINUING
    c = await call(["One two three four five six seven eight.", "Okay."], ("Hi.", "Wait."), turns=turns)
    await speaking(c)
    if setting == "later":
        await c.say((QUIET, 20))  # 640 ms after the end of turn 1 (its speech started at the 2nd of the loud frames below)
    if setting == "played out":
        c.clock.advance(1.0)  # its eight words have played
    await c.say((LOUD, 3), (QUIET, 6))
    await c.until(ev.ResponseDone, 2)
    assert of(c.events, ev.TurnContinued) == [] and of(c.events, ev.Transcript)[-1].text == "Wait."
    assert c.session.dialogue.turns[0] == {"role": "user", "content": "Hi."} and len(c.session.dialogue.turns) == 4


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
    assert (error.turn, error.code) == (0, "bad_audio") and "12345" in error.message
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


# ---- more than one turn, and replies cut mid-way -----------------------------------------------


async def test_the_second_turns_prompt_holds_the_first_exchange_and_the_counts_add_up(call):
    c = await call(["One two three four five six seven eight.", "Fine, one two three four.", "Good."], ("Hi.", "Wait.", "Thanks."))
    await speaking(c)
    await c.say((LOUD, 2), (QUIET, 6))  # a backchannel: dropped
    await c.say((LOUD, 2), (QUIET, 6))  # and another
    await c.say((LOUD, 3))  # a barge-in: turn 2
    await c.say((QUIET, 6))
    await c.until(ev.ResponseDone, 2)
    await c.say((LOUD, 3))  # turn 3 barges in on turn 2's reply
    await c.say((QUIET, 6))
    await c.until(ev.ResponseDone, 3)
    assert [e.turn for e in of(c.events, ev.SpeechStarted)] == [1, 2, 3]
    assert dict(c.session.stats) == {"turns": 3, "speculations_started": 3, "speculations_kept": 3, "talked_over": 2, "barge_ins": 2}
    assert "One two three four five six seven eight." in c.engine.prompts[1] and "Hi." in c.engine.prompts[1]
    assert c.engine.requests[2][0] == f"{c.session.conversation}-3-2"
    assert of(c.events, ev.Interrupted) == [ev.Interrupted(1), ev.Interrupted(2)]


async def test_a_reply_stopped_mid_way_ends_interrupted_and_none_of_its_later_audio_leaves(call):
    c = await call(["First part. Second part."])
    c.agent.tts.held["Second part."] = held = threading.Event()
    await c.say((LOUD, 4), (QUIET, 6))
    await c.until(ev.AgentAudio, 2)  # the first sentence is out; the second waits in the TTS
    c.session.flush()
    held.set()
    await c.until(ev.ResponseDone)
    await settle()
    assert of(c.events, ev.Interrupted) == [ev.Interrupted(1)]
    assert of(c.events, ev.ResponseDone) == [ev.ResponseDone(1, "First part. Second part.", interrupted=True)]
    assert {a.text for a in of(c.events, ev.AgentAudio)} == {"First part."}
    assert c.session.stats["barge_ins"] == 1 and c.session._reply.task.done()


async def test_audio_queued_before_an_interruption_never_leaves_the_session(random_model):
    """Events are read by the transport at its pace: what was produced but not yet read is dropped at the interruption."""
    engine = ScriptedEngine(random_model[1], ["One. Two."])
    agent = Agent(AgentConfig(turns=TURNS), engine, ScriptedASR("Hi."), WordTTS(), None)
    agent.tts.held["Two."] = held = threading.Event()
    async with agent.session() as s:
        s.listener.vad, s.clock = LoudnessVAD(), ManualClock()
        for level, n in ((LOUD, 4), (QUIET, 6)):
            for _ in range(n):
                await s.send_audio(np.full(FRAME, level, np.float32), 16000)
        await eventually(lambda: any(isinstance(e, ev.AgentAudio) for e in s._queue._queue), "no audio was produced")
        s._interrupt()  # nothing has been read yet
        held.set()
        await s.close()
        read = [e async for e in s.events()]
    assert of(read, ev.AgentAudio) == [] and of(read, ev.Interrupted) == [ev.Interrupted(1)]
    agent.asr_pool.shutdown(wait=False)
    agent.tts_pool.shutdown(wait=False)


async def test_hanging_up_mid_reply_cancels_it(call):
    c = await call(["One two three."])
    c.engine.gate.clear()  # the engine is slow
    await c.say((LOUD, 4), (QUIET, 6))
    await c.until_true(lambda: c.session._reply is not None and c.engine.requests)
    assert c.agent.sessions == 1
    await c.session.close()
    c.engine.gate.set()
    await c.until(ev.HangUp)
    await c.until_true(lambda: c.session._reply.task.done())
    assert c.session._reply.task.cancelled() and of(c.events, ev.ResponseDone) == [] and c.agent.sessions == 0
    await c.session.close()
    assert c.agent.sessions == 0


async def test_an_idle_timeout_does_not_count_while_the_agent_is_replying(call):
    c = await call(["Hi."], idle_timeout_s=0.32)
    c.engine.gate.clear()
    await c.say((LOUD, 4), (QUIET, 6))
    await c.until_true(lambda: bool(c.engine.requests))
    await c.say((QUIET, 12))  # past the idle timeout, but the reply is still being generated
    assert of(c.events, ev.HangUp) == []
    c.engine.gate.set()
    await c.until(ev.ResponseDone)
    await c.say((QUIET, 10))  # idle counts from the end of the reply
    assert of(c.events, ev.HangUp) == [ev.HangUp(1, "idle")]


@pytest.mark.parametrize("reuse,exact,conversation", [(None, True, True), (None, False, False), (True, False, True), (False, True, False)])
async def test_prefix_reuse_follows_the_setting_or_else_whether_the_engine_reuses_exactly(call, reuse, exact, conversation):
    c = await call(["Hi."], exact_prefix_reuse=exact, reuse_prefix=reuse)
    await c.say((LOUD, 4), (QUIET, 6))
    await c.until(ev.ResponseDone)
    assert c.engine.requests[0][1] == (c.session.conversation if conversation else None)


async def test_without_speculation_a_resumed_pause_touches_no_earlier_reply(call):
    c = await call(["Hi."], speculation=False)
    await c.say((LOUD, 4), (QUIET, 6))
    await c.until(ev.ResponseDone)
    c.clock.advance(10)
    await c.say((LOUD, 4), (QUIET, 3), (LOUD, 4), (QUIET, 6))  # turn 2 pauses and goes on
    await c.until(ev.ResponseDone, 2)
    assert of(c.events, ev.Speculation) == [] and "speculations_cancelled" not in c.session.stats


async def test_a_reply_that_has_played_out_is_neither_flushed_nor_talked_over(call):
    c = await call(["One two."])
    await speaking(c)
    c.clock.advance(0.2)  # its two words have played
    c.session.flush()
    await c.say((QUIET, 4))
    await settle()
    assert of(c.events, ev.Interrupted) == [] and len(of(c.events, ev.SpeechStarted)) == 1
    await c.say((LOUD, 4), (QUIET, 6))  # the caller's next turn is an ordinary one
    await c.until(ev.ResponseDone, 2)
    assert of(c.events, ev.SpeechStarted)[1] == ev.SpeechStarted(2, c.session.listener.media_ms - 8 * 32)


async def test_after_a_dropped_backchannel_the_next_turn_starts_where_its_speech_does(call):
    c = await call(["One two three four five six seven eight.", "Yes."])
    await speaking(c)
    await c.say((LOUD, 2), (QUIET, 6))  # dropped
    c.clock.advance(10)  # the reply has played out
    await c.say((QUIET, 2), (LOUD, 4), (QUIET, 6))
    await c.until(ev.ResponseDone, 2)
    assert of(c.events, ev.SpeechStarted)[1] == ev.SpeechStarted(2, c.session.listener.media_ms - 8 * 32)


async def test_speech_held_off_by_the_echo_guard_is_a_turn_at_its_end_when_it_was_long_enough(call):
    c = await call(["One two three four five six seven eight.", "Yes?"], echo_guard_ms=500)
    await speaking(c)
    await c.say((LOUD, 3), (QUIET, 6))  # exactly barge_in_ms of speech, inside the guard, then its end
    await c.until(ev.ResponseDone, 2)
    assert of(c.events, ev.Interrupted) == [ev.Interrupted(1)] and [e.turn for e in of(c.events, ev.SpeechStarted)] == [1, 2]


async def test_a_barge_in_at_the_speech_start_itself_opens_one_turn(call):
    c = await call(["One two three four five six seven eight.", "Yes?"], barge_in_ms=0)
    await speaking(c)
    await c.say((LOUD, 4), (QUIET, 6))
    await c.until(ev.ResponseDone, 2)
    assert of(c.events, ev.Interrupted) == [ev.Interrupted(1)] and [e.turn for e in of(c.events, ev.SpeechStarted)] == [1, 2]


async def test_talking_over_the_agent_past_the_calls_length_hangs_up(call):
    c = await call(["One two three four five six seven eight."], max_call_s=0.96)  # 30 frames
    await speaking(c)  # 10 frames
    await c.say((LOUD, 2), (QUIET, 17))
    assert of(c.events, ev.HangUp) == []
    await c.say((LOUD, 1))  # the 30th frame, while talking over the reply
    await settle()
    assert of(c.events, ev.HangUp) == [ev.HangUp(1, "max_duration")]


async def test_a_commit_right_after_speech_ends_the_turn(call):
    c = await call(["Hi."], turns=dataclasses.replace(TURNS, push_to_talk=True))
    await c.say((LOUD, 4))
    await c.session.commit(16000)
    await c.until(ev.ResponseDone)


class GatedTurnModel:
    """The end-of-turn model's stand-in: each call waits for its own release."""

    def __init__(self) -> None:
        self.calls: list[tuple[threading.Event, list[float]]] = []
        self.threads: list[str] = []

    def __call__(self, audio: np.ndarray) -> float:
        self.threads.append(threading.current_thread().name)
        release, answer = threading.Event(), []
        self.calls.append((release, answer))
        release.wait(10)
        return answer[0]

    def answer(self, call: int, complete: float) -> None:
        release, answer = self.calls[call]
        answer.append(complete)
        release.set()


async def test_a_verdict_for_an_earlier_pause_is_ignored_and_the_model_runs_on_its_own_thread(call):
    model = GatedTurnModel()
    c = await call(["Hi."], ("Hello there.",), turn_model=model, turns=MODEL_TURNS)
    await c.say((LOUD, 4), (QUIET, 3))  # pause 1: the model is asked
    await c.until_true(lambda: len(model.calls) == 1)
    await c.say((LOUD, 2), (QUIET, 3))  # the speaker went on, and paused again
    model.answer(0, 0.95)  # pause 1's answer, late: "done"
    await c.until_true(lambda: len(model.calls) == 2)
    await settle()
    assert not stopped(c)  # it was about the earlier pause
    c.clock.advance(0.25)
    model.answer(1, 0.95)
    await c.until(ev.TurnMetrics)
    verdict = of(c.events, ev.TurnMetrics)[0].timeline["turn_model"]
    assert verdict == {"complete": 0.95, "ms": 250.0}  # from the pause to the answer, on the session's clock
    assert all(name.startswith("turn") for name in model.threads) and c.session._judging == set()


async def test_hanging_up_while_the_model_is_asked_cancels_the_question(call):
    model = GatedTurnModel()
    c = await call(["Hi."], turn_model=model, turns=MODEL_TURNS)
    await c.say((LOUD, 4), (QUIET, 3))
    await c.until_true(lambda: len(model.calls) == 1)
    [task] = c.session._judging
    await c.session.close()
    model.answer(0, 0.95)
    await c.until_true(task.done)
    assert task.cancelled() and not stopped(c)


async def test_a_transcript_for_a_dropped_speculation_moves_nothing(call):
    c = await call(["Hi."], ("What?", "Hello there."), turns=dataclasses.replace(TURNS, question_end_ms=96))
    asr = c.agent.asr
    asr.gate.clear()
    await c.say((LOUD, 4), (QUIET, 3))  # pause 1: its transcript ("What?") is on its way
    await c.say((LOUD, 2), (QUIET, 3))  # the speaker went on: pause 1's speculation is dropped; pause 2 starts another
    asr.gate.set()
    await c.until_true(lambda: c.session._pause_text is not None)
    await settle()
    assert c.session._pause_text == "Hello there." and not stopped(c)  # a question's early end came from a dropped pause


async def test_speech_while_a_reply_is_silent_between_sentences_is_a_barge_in(call):
    c = await call(["First part. Second part."], ("Hi.", "Okay."))
    c.agent.tts.held["Second part."] = held = threading.Event()
    await c.say((LOUD, 4), (QUIET, 6))
    await c.until(ev.AgentAudio, 2)
    c.clock.advance(0.2)  # the first sentence has played; the second is still being synthesized
    await c.say((LOUD, 3))  # as long as a barge-in: it interrupts, the reply is still the agent's turn
    await settle()
    assert of(c.events, ev.Interrupted) == [ev.Interrupted(1)]
    held.set()


async def test_a_short_reply_over_a_reply_silent_between_sentences_is_a_turn(call):
    c = await call(["First part. Second part.", "Yes."], ("Hi.", "Okay."))
    c.agent.tts.held["Second part."] = held = threading.Event()
    await c.say((LOUD, 4), (QUIET, 6))
    await c.until(ev.AgentAudio, 2)
    c.clock.advance(0.2)  # nothing is sounding: "Okay." is said into the gap
    await c.say((LOUD, 2), (QUIET, 6))
    await c.until_true(lambda: len(of(c.events, ev.SpeechStarted)) == 2)
    assert c.session.stats["talked_over"] == 0
    held.set()


async def test_a_new_turn_while_the_last_reply_is_still_silent_stops_that_reply(call):
    c = await call(["Slow reply.", "Fast reply."])
    c.engine.gate.clear()  # turn 1's reply is still being generated: nothing audible yet
    await c.say((LOUD, 4), (QUIET, 6))
    await c.until_true(lambda: bool(c.engine.requests))
    await c.say((LOUD, 4), (QUIET, 3))  # turn 2 pauses: its speculation replaces turn 1's reply
    await c.until(ev.Interrupted)
    c.engine.gate.set()
    await c.say((QUIET, 3))
    await c.until(ev.ResponseDone, 2)
    assert of(c.events, ev.Interrupted) == [ev.Interrupted(1)]
    assert of(c.events, ev.ResponseDone) == [ev.ResponseDone(1, "", interrupted=True), ev.ResponseDone(2, "Fast reply.")]


async def test_idle_time_counts_again_after_a_reply_was_stopped(call):
    c = await call(["First part. Second part."], idle_timeout_s=0.32)
    c.agent.tts.held["Second part."] = held = threading.Event()
    await c.say((LOUD, 4), (QUIET, 6))
    await c.until(ev.AgentAudio, 2)
    c.session.flush()
    held.set()
    await c.say((QUIET, 10))
    assert of(c.events, ev.HangUp) == [ev.HangUp(1, "idle")]


async def test_a_failed_reply_is_an_error_event_and_the_next_turn_is_answered(call):
    c = await call(["!fail", "Back again."])
    await c.say((LOUD, 4), (QUIET, 6))
    await c.until(ev.ResponseDone)
    assert of(c.events, ev.Error) == [ev.Error(1, "reply_failed", "the engine failed")]
    assert of(c.events, ev.ResponseDone) == [ev.ResponseDone(1, "")]
    c.clock.advance(10)
    await c.say((LOUD, 4), (QUIET, 6))
    await c.until(ev.ResponseDone, 2)
    assert of(c.events, ev.ResponseDone)[1] == ev.ResponseDone(2, "Back again.")


async def test_an_empty_transcript_gets_no_reply_and_idle_time_still_counts(call):
    c = await call(["unused"], ("",), idle_timeout_s=0.64, speculation=False)
    await c.say((LOUD, 4), (QUIET, 6))
    await c.until(ev.Transcript)
    await c.until_true(lambda: c.session._reply.done)
    assert c.engine.requests == [] and of(c.events, ev.ResponseDone) == [] and c.session.dialogue.turns == []
    await c.say((QUIET, 20))
    assert of(c.events, ev.HangUp) == [ev.HangUp(1, "idle")]


async def test_sessions_are_told_apart_and_counted(call):
    c1 = await call(["Hi."])
    c2 = await call(["Hi."])
    assert isinstance(c1.session.conversation, str) and c1.session.conversation != c2.session.conversation
    assert c1.session.clock is not SYSTEM  # the tests' own; a session starts on the system clock:
    agent = c1.agent
    async with agent.session() as s:
        assert s.clock is SYSTEM and s.listener.vad.session is agent.vad_session and agent.sessions == 2
    assert agent.sessions == 1


async def test_each_dropped_speculation_is_counted(call):
    c = await call(["Done."])
    for _ in range(2):
        await c.say((LOUD, 4), (QUIET, 3))
        await c.until_true(lambda: c.session._reply is not None and not c.session._reply.discarded)
        await c.say((LOUD, 1))  # the speaker goes on
    await c.say((QUIET, 6))
    await c.until(ev.ResponseDone)
    assert c.session.stats["speculations_cancelled"] == 2


def test_the_agent_decodes_as_its_model_directory_says_unless_told(random_model, tmp_path):
    """AgentConfig(decode=None): the spoken defaults with the policy and block size the model's
    generation_config.json names (a converted AR checkpoint: one token per forward); a decode given wins."""
    (tmp_path / "generation_config.json").write_text('{"policy": "vanilla", "block_size": 1}')
    spoken = Agent(AgentConfig(model=tmp_path, turns=TURNS), ScriptedEngine(random_model[1], []), ScriptedASR(), WordTTS(), None)
    told = DecodeParams(policy="threshold", block_size=8, max_new_tokens=20)
    chosen = Agent(AgentConfig(model=tmp_path, turns=TURNS, decode=told), ScriptedEngine(random_model[1], []), ScriptedASR(), WordTTS(), None)
    for agent in (spoken, chosen):
        for pool in (agent.asr_pool, agent.tts_pool, agent.turn_pool):
            pool.shutdown(wait=False)
    assert spoken.config.decode == dataclasses.replace(SPOKEN, policy="vanilla", block_size=1, max_new_tokens=ScriptedEngine.max_new_tokens)
    assert chosen.config.decode == told
