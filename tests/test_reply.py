"""A reply's bookkeeping of what was heard, on a manual clock: the history keeps whole sentences heard,
then the share of the next one's words the heard audio covers; the echo guard and 'still playing'
follow the clock, never the machine's speed."""

from __future__ import annotations

import pytest

from tests.helpers import ManualClock, spoken_reply

SENTENCES = ["One two three four five.", "Six seven eight nine."]


@pytest.mark.parametrize("heard_s, history", [
    (None, "One two three four five. Six seven eight nine."),  # no report: what was sent was heard
    (0.0, ""),
    (0.05, "One two"),  # half of five words, rounded down
    (0.1, "One two three four five."),
    (0.15, "One two three four five. Six seven"),
    (5.0, "One two three four five. Six seven eight nine."),  # never more than was sent
])
def test_the_history_keeps_the_words_the_heard_audio_covers(heard_s, history):
    reply, _ = spoken_reply(ManualClock(), SENTENCES, [0.1, 0.1])
    if heard_s is not None:
        reply.played(heard_s)
    assert reply.heard_text() == history
    assert reply.host.dialogue.turns == [{"role": "assistant", "content": history}]


def test_audio_sent_after_a_played_report_does_not_count_as_heard():
    reply, audio = spoken_reply(ManualClock(), SENTENCES[:1], [0.1])
    reply.played(0.1)
    reply.sent(audio[0].__class__(1, audio[0].samples, audio[0].sample_rate, SENTENCES[1], 2))
    assert reply.recorded["content"] == SENTENCES[0]


@pytest.mark.parametrize("done, seconds, guard_ms, audible", [
    (False, 0.0, 300, False),  # the echo guard runs on the clock
    (False, 0.299, 300, False),
    (False, 0.301, 300, True),
    (False, 0.301, None, True),
    (True, 0.25, 250, True),  # at exactly the guard the agent is audible again
    (True, 1.0, 1001, False),  # 1000 ms in: a guard counts whole milliseconds
    (True, 1.999, 0, True),  # a finished reply is audible until its audio has played ...
    (True, 2.0, 0, False),  # ... exactly
    (True, 2.001, 0, False),
])
def test_audible_follows_the_clock(done, seconds, guard_ms, audible):
    clock = ManualClock()
    reply, _ = spoken_reply(clock, SENTENCES, [1.0, 1.0], done=done)
    clock.advance(seconds)
    assert reply.audible(echo_guard_ms=guard_ms) is audible


def test_an_unconfirmed_or_interrupted_reply_is_never_audible():
    reply, _ = spoken_reply(ManualClock(), SENTENCES, [1.0, 1.0], done=False)
    reply.timeline.interrupted = True
    assert not reply.audible(echo_guard_ms=None)
    reply, _ = spoken_reply(ManualClock(), SENTENCES, [1.0, 1.0], done=False)
    reply.confirmed = False
    assert not reply.audible(echo_guard_ms=None)


def test_a_sentence_sent_in_chunks_counts_as_one():
    """Piper may cut a sentence into several chunks: they add up to one sentence's audio."""
    import numpy as np

    from agent import events as ev

    reply, _ = spoken_reply(ManualClock(), [], [])
    rate = 48000
    for text, index, seconds in ((SENTENCES[0], 1, 0.04), (SENTENCES[0], 1, 0.06), (SENTENCES[1], 2, 0.1)):
        reply.sent(ev.AgentAudio(1, np.full(round(seconds * rate), 0.1, np.float32), rate, text, index))
    assert [(s.index, s.samples) for s in reply.spoken] == [(1, round(0.1 * rate)), (2, round(0.1 * rate))]
    reply.played(0.05)
    assert reply.heard_text() == "One two"  # half of the first sentence's two chunks
    reply.played(0.15)
    assert reply.heard_text() == "One two three four five. Six seven"


def test_the_first_audio_is_marked_on_the_sessions_clock():
    clock = ManualClock(start=5000.0)
    reply, _ = spoken_reply(clock, SENTENCES, [0.1, 0.1])
    assert reply.timeline.marks["first_audio_sent"] == 5000.0


@pytest.mark.parametrize("turn, user_text, confirmed, recorded", [
    (1, "hi", True, True),
    (0, "", True, True),  # the greeting has no user turn before it
    (1, "", True, False),  # nothing was heard from the user: no exchange to record
    (1, "hi", False, False),  # a speculation is recorded only once confirmed
])
def test_what_goes_into_the_history(turn, user_text, confirmed, recorded):
    from agent.metrics import TurnTimeline
    from agent.reply import Reply
    from tests.helpers import ReplyHost

    clock = ManualClock()
    reply = Reply(turn, TurnTimeline(turn, clock=clock), ReplyHost(clock), confirmed=confirmed, user_text=user_text, sample_rate=48000)
    reply.record()
    reply.record()  # at most once
    assert reply.host.dialogue.turns == ([{"role": "assistant", "content": ""}] if recorded else [])
