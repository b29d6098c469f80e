"""The soak benchmark: one short real run with both kinds of churn, its accounting, and its bad-input messages.

The run streams in real time against a server started on loopback with the tiny chat model; it
checks the report's structure and that its counts add up, never how fast anything was.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

import pytest

from audio.codec import trim
from benchmarks import soak
from benchmarks.latency import AUDIBLE, Utterance
from tests.helpers import PAIRS

CHURN = 0.5


def plan_with_both_churns(seed: int) -> bool:
    """Slot 0 hangs up first and then stays; slot 1 starts with a call that never reads."""
    first = list(itertools.islice(soak.call_plan(seed, CHURN, 0), 2))
    return first == ["hangup", "stay"] and next(soak.call_plan(seed, CHURN, 1)) == "never_read"


SEED = next(s for s in range(1000) if plan_with_both_churns(s))


def test_the_plan_depends_on_the_seed_alone() -> None:
    a = list(itertools.islice(soak.call_plan(SEED, CHURN, 1), 50))
    assert a == list(itertools.islice(soak.call_plan(SEED, CHURN, 1), 50))
    assert set(a) == set(soak.KINDS)
    assert set(itertools.islice(soak.call_plan(SEED, 0.0, 0), 50)) == {"stay"}


@pytest.fixture(scope="module")
def trained_questions(piper_speech) -> list[Utterance]:
    """The questions the tiny chat model was trained on: it answers them in words (others can get only "??")."""
    return [Utterance(q, trim(piper_speech(q, 16000), AUDIBLE)) for q, _ in PAIRS]


def test_short_soak_with_churn(voice_agent, trained_questions, tmp_path: Path) -> None:
    """One question per staying call: later turns of the tiny model, with history and batched, can be inaudible."""
    out = tmp_path / "soak.json"
    args = soak.build_parser().parse_args(
        ["--callers", "2", "--minutes", "0.6", "--sample-s", "5", "--churn", str(CHURN), "--seed", str(SEED), "--turns", "1", "--timeout", "60", "--json", str(out)]
    )
    report = asyncio.run(soak.soak(args, voice_agent, trained_questions))
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))

    assert report["config"]["callers"] == 2 and report["config"]["max_sessions"] == 2
    times = [s["t_s"] for s in report["samples"]]
    assert len(times) >= 3 and times == sorted(times)
    keys = {"t_s", "rss_mb", "threads", "py_threads", "fds", "server_tasks", "engine_requests", "sessions", "connections", "client_tasks"}
    assert all(keys <= set(s) for s in report["samples"] + [report["idle"], report["end"]])

    calls, kinds = report["calls"], report["kinds"]
    story = "\n".join(f"{c['slot']} {c['kind']} {c['outcome']} {c['close_code']} {c['turns']}" for c in calls)  # shown when an assertion fails
    assert {c["slot"] for c in calls} == {0, 1}
    assert [c["kind"] for c in calls if c["slot"] == 0][:2] == ["hangup", "stay"], story
    assert [c["kind"] for c in calls if c["slot"] == 1][0] == "never_read", story
    for kind in soak.KINDS:  # the counts are the records'
        mine = [c for c in calls if c["kind"] == kind]
        assert kinds[kind]["calls"] == len(mine)
        assert kinds[kind]["turns_answered"] + kinds[kind]["turns_unanswered"] == sum(len(c["turns"]) for c in mine)
    assert all(c["outcome"] in ("done", "cut") for c in calls), story

    hangup = next(c for c in calls if c["kind"] == "hangup")
    assert hangup["outcome"] == "done" and hangup["turns"][0]["answered"] and hangup["turns"][0]["caller_v2v_ms"] is not None, story
    stalled = next(c for c in calls if c["kind"] == "never_read")
    assert stalled["outcome"] == "done" and stalled["close_code"] == 1008, story  # the server gave up on it
    assert kinds["never_read"]["close_codes"]["1008"] >= 1
    staying = [c for c in calls if c["kind"] == "stay" and c["outcome"] == "done"]
    assert staying and kinds["stay"]["turns_unanswered"] == 0 and kinds["stay"]["failed_calls"] == 0, story

    end = report["end"]
    assert report["idle_reached"] and end["sessions"] == 0 and end["connections"] == 0 and end["engine_requests"] == 0
    assert set(report["checks"]) == {"rss_slope_below_1_mb_per_min", "staying_callers_all_answered", "never_readers_closed_1008",
                                     "hub_idle_at_end", "threads_back_to_idle", "server_tasks_back_to_idle"}
    assert report["checks"]["staying_callers_all_answered"] and report["checks"]["never_readers_closed_1008"] and report["checks"]["hub_idle_at_end"]
    assert report["rss"]["samples_in_fit"] >= 2 and report["rss"]["slope_mb_per_min_second_half"] is not None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--callers", "0"], "--callers must be at least 1"),
        (["--minutes", "0"], "--minutes must be above 0"),
        (["--minutes", "-1"], "--minutes must be above 0"),
        (["--churn", "1.5"], "--churn is a fraction"),
        (["--callers", "4", "--max-sessions", "2"], "--max-sessions (2) must be at least --callers (4)"),
    ],
)
def test_bad_input_is_one_line(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as e:
        soak.run(soak.build_parser().parse_args(argv))
    assert str(e.value).startswith(f"error: {message}") and "\n" not in str(e.value)
