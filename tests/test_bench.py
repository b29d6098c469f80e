"""The latency benchmark: its measuring functions, one short real run over the WebSocket, and its bad-input messages.

The run streams in real time against a server started on loopback with the tiny chat model; it
checks the report's structure, never how fast anything was.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import socket
import wave
from pathlib import Path

import numpy as np
import pytest

from benchmarks import latency as bench
from benchmarks import lines as bench_lines
from benchmarks.latency import first_audible_s, word_error_rate
from benchmarks.lines import LineError, LocalServer, webrtc_line


def test_word_error_rate_counts_substitutions_insertions_deletions() -> None:
    assert word_error_rate(["hello there"], ["Hello, there!"]) == 0.0
    assert word_error_rate(["a b c d"], ["a x c"]) == 0.5  # one substitution, one deletion
    assert word_error_rate(["a b", "c d"], ["a b e", "c d"]) == 0.25  # one insertion over four words
    assert word_error_rate([], []) == 0.0


def test_first_audible_skips_leading_silence_and_quiet_audio() -> None:
    rate = 16000
    quiet = np.full(rate // 2, 0.005, dtype=np.float32)  # about -46 dBFS: not audible
    tone = 0.3 * np.sin(np.linspace(0, 400 * np.pi, rate // 2)).astype(np.float32)
    assert first_audible_s(np.concatenate([np.zeros(rate // 4, np.float32), tone]), rate) == pytest.approx(0.25, abs=0.02)
    assert first_audible_s(quiet, rate) is None
    assert first_audible_s(np.zeros(10, np.float32), rate) is None  # shorter than one 20 ms window


def test_a_turn_the_server_ends_inside_an_utterance_is_followed_by_the_next():
    """A premature endpoint mid-utterance: the reply to the fragment (heard while still speaking) must
    not count as the utterance's reply; the caller waits for the turn the rest of its speech opened."""
    from agent import events as ev

    listener = bench.Listener(turn_ids=True)
    p = listener.probe = bench.Probe(began_ms=0)
    loud = 0.3 * np.ones(1600, dtype=np.float32)
    for e in (ev.SpeechStarted(1, 100), ev.SpeechStopped(1, 900), ev.AgentAudio(1, loud, 16000, "Hi.", 1),
              ev.ResponseDone(1, "Hi."), ev.TurnMetrics(1, {"turn": 1}), ev.SpeechStarted(2, 1300)):
        listener.on(e, now=1.0)
    p.speech_end = 2.0
    assert p.early_audio and p.turn == 2 and not listener.finished(p, now=2.5)  # still waiting for turn 2's reply
    for e in (ev.AgentAudio(2, loud, 16000, "Fine.", 1), ev.ResponseDone(2, "Fine."), ev.TurnMetrics(2, {"turn": 2})):
        listener.on(e, now=2.4)
    assert p.first_audible == pytest.approx(2.4) and p.server == {"turn": 2} and listener.finished(p, now=4.0)


def test_an_utterance_the_server_joined_after_a_premature_end_counts_as_continued():
    from agent import events as ev

    listener = bench.Listener(turn_ids=True)
    p = listener.probe = bench.Probe(began_ms=0)
    for e in (ev.SpeechStarted(1, 100), ev.SpeechStopped(1, 900), ev.SpeechStarted(2, 1300), bench_lines.decode_realtime(
            {"type": "turn.continued", "turn": 2, "previous": 1}), ev.TurnContinued(1, 0)):  # the last: another turn's, ignored
        listener.on(e, now=1.0)
    assert p.continued and p.turn == 2
    q = listener.probe = bench.Probe(began_ms=0)
    listener.on(ev.SpeechStarted(3, 100), now=1.0)
    assert not q.continued


@pytest.fixture
def steady_agent(voice_agent):
    """The voice agent with endpointing on silence alone: a turn ends after 1 s of it, never at a pause the
    speculative transcript reads as a question or the end-of-turn model hears as finished. The synthesized
    questions pause up to 0.7 s mid-sentence, and what Whisper makes of such a pause varies; these tests
    check the benchmark, so every turn must be answered."""
    saved = voice_agent.config
    voice_agent.config = dataclasses.replace(saved, turns=dataclasses.replace(saved.turns, end_ms=1000, question_end_ms=0, unfinished_end_ms=0, turn_model=False))
    yield voice_agent
    voice_agent.config = saved


def test_short_run_over_websocket(steady_agent, tmp_path: Path) -> None:
    out, html = tmp_path / "bench.json", tmp_path / "bench.html"
    args = bench.build_parser().parse_args(["--transport", "ws", "--callers", "1", "--turns", "2", "--no-baseline", "--timeout", "60", "--json", str(out), "--report", str(html)])
    report = asyncio.run(bench.bench(args, steady_agent))
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["transport"] == "ws" and report["server"] == "server started in this process"
    assert (report["llm"], report["dtype"]) == ("model", "float32")  # the agent's model, as loaded
    (run,) = report["runs"]
    assert run["config"] == "ours" and run["callers"] == 1 and run["turns"] == 2
    assert set(run["caller_v2v_ms"]) == {"p50", "p90"}  # p99 only with >= 100 turns
    assert {"server_v2v_ms", "premature_endpoint_rate", "asr_wer", "cpu_util", "failed"} <= set(run)
    assert run["paused_utterances"] == 1  # the synthesized pool alternates plain and paused questions
    assert run["premature_by_pause"] == {"paused": {"premature": int(run["premature_endpoint_rate"]), "utterances": 1}}
    premature = sum(t["premature"] for t in run["results"])
    assert run["premature_continued"] == {"continued": sum(t["continued"] for t in run["results"]), "premature": premature}
    assert len(run["results"]) == 2 and run["failed"] == 0, [{k: v for k, v in t.items() if k != "server"} for t in run["results"]]
    for turn in run["results"]:  # answered: the caller heard it, and the server's timeline is paired with it
        assert turn["failed"] is None and turn["caller_v2v_ms"] is not None
        assert turn["server"]["turn"] == turn["server_turn"]
    text = html.read_text()
    namespaces = re.compile(r'xmlns(:\w+)?="http[^"]*"')  # names, never fetched
    assert text.count("<svg") == 3 and "<script" not in text and "http" not in namespaces.sub("", text)


def test_short_run_as_a_twilio_call(steady_agent, tmp_path: Path) -> None:
    """μ-law 8 kHz both ways; the protocol carries no turn ids, transcripts or timelines: caller figures only."""
    args = bench.build_parser().parse_args(["--transport", "twilio", "--turns", "1", "--no-baseline", "--timeout", "60", "--json", str(tmp_path / "b.json")])
    report = asyncio.run(bench.bench(args, steady_agent))
    (run,) = report["runs"]
    (turn,) = run["results"]
    assert run["failed"] == 0 and turn["failed"] is None, turn
    assert turn["caller_v2v_ms"] is not None
    assert turn["server"] is None and turn["transcript"] is None and run["asr_wer"] is None


def test_short_run_as_a_webrtc_peer(steady_agent, tmp_path: Path) -> None:
    """Opus both ways on aiortc, events on the data channel: turn ids, transcripts and timelines as over the
    WebSocket; --set goes out as session.update on the data channel."""
    argv = ["--transport", "webrtc", "--turns", "1", "--no-baseline", "--timeout", "60", "--set", "speculation=false", "--json", str(tmp_path / "b.json")]
    report = asyncio.run(bench.bench(bench.build_parser().parse_args(argv), steady_agent))
    assert report["settings"] == {"speculation": False}
    (turn,) = report["runs"][0]["results"]
    assert report["runs"][0]["failed"] == 0 and turn["failed"] is None, turn
    assert turn["caller_v2v_ms"] is not None and turn["transcript"]
    assert turn["server"]["turn"] == turn["server_turn"] and turn["server"]["speculative"] is False


def test_a_webrtc_line_names_what_the_server_refused(voice_agent) -> None:
    """A refused offer and a refused session.update on the data channel: one LineError each, with the server's reason."""

    async def open_line(url: str, live: dict) -> None:
        async with webrtc_line(url, None, live):
            pass

    with LocalServer(voice_agent, max_sessions=0) as full:
        with pytest.raises(LineError, match="HTTP 503.*server busy"):
            asyncio.run(open_line(full.url, {}))
    with LocalServer(voice_agent, max_sessions=1) as server:
        with pytest.raises(LineError, match="refused the session.*block_size"):
            asyncio.run(open_line(server.url, {"block_size": 0}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def test_unreachable_server_is_one_clear_error() -> None:
    url = f"ws://127.0.0.1:{_free_port()}"
    with pytest.raises(SystemExit, match=f"error: cannot reach the server at {url}"):
        bench.main(["--url", url])


@pytest.mark.parametrize("threads", ["0", "-1", "two"])
def test_threads_must_be_a_positive_integer(threads: str, capsys) -> None:
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--threads", threads])
    err = capsys.readouterr().err
    assert "--threads" in err and ("must be >= 1" in err or "invalid positive_int value" in err)


@pytest.mark.parametrize("option", [["--model", "somewhere"], ["--threads", "2"], ["--compile"], ["--dtype", "int8"]])
def test_options_for_the_agent_loaded_here_are_refused_with_a_url(option: list[str]) -> None:
    with pytest.raises(SystemExit, match="set up the agent loaded here; against --url the server's own answers"):
        bench.main(["--url", "ws://127.0.0.1:1", *option])


def test_the_agent_loaded_here_takes_int8_weights(tiny_chat, tmp_path: Path) -> None:
    import torch

    out, threads = tmp_path / "bench.json", torch.get_num_threads()
    try:
        bench.main(["--model", str(tiny_chat / "model"), "--dtype", "int8", "--callers", "1", "--turns", "1", "--no-baseline", "--timeout", "60", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)  # the agent set its own: later tests (compiled graphs) guard on it
    report = json.loads(out.read_text())
    assert report["dtype"] == "int8" and report["runs"][0]["turns"] == 1


def _wav(path: Path, width: int = 2, channels: int = 1, rate: int = 16000) -> None:
    with wave.open(str(path), "wb") as w:
        w.setsampwidth(width)
        w.setnchannels(channels)
        w.setframerate(rate)
        w.writeframes((np.sin(np.arange(rate // 2) / 5) * 0.5 * (2 ** (8 * width - 1) - 1)).astype(f"<i{width}").repeat(channels).tobytes())


def test_wav_in_unsupported_format_names_the_file(tmp_path: Path) -> None:
    _wav(tmp_path / "stereo.wav", channels=2)
    (tmp_path / "transcripts.tsv").write_text("stereo.wav\thello\n")
    with pytest.raises(SystemExit, match=r"stereo\.wav: 16-bit with 2 channel\(s\); need 16-bit PCM mono"):
        bench.main(["--speech-dir", str(tmp_path)])
    (tmp_path / "stereo.wav").write_bytes(b"not a wav at all")
    with pytest.raises(SystemExit, match=r"stereo\.wav: not a PCM WAV file"):
        bench.main(["--speech-dir", str(tmp_path)])


@pytest.mark.parametrize("setting, why", [
    ("nonsense=1", "unknown setting.*nonsense"),
    ("end_ms=Infinity", "end_ms must be a whole number in"),
    ("block_size=1000000", "block_size must be a whole number in"),
    ("threshold=NaN", "threshold must be a number in"),
    ("speculation=maybe", "speculation: expected a number or true/false"),
])
def test_bad_settings_are_refused_at_parse_time(capsys, setting, why) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--set", setting])
    assert re.search(why, capsys.readouterr().err)


def test_bad_settings_are_named() -> None:
    with pytest.raises(SystemExit, match="Twilio"):
        bench.main(["--transport", "twilio", "--set", "end_ms=500"])
    with pytest.raises(SystemExit):  # argparse: not KEY=VALUE
        bench.main(["--set", "end_ms"])


def test_missing_transcripts_are_named(tmp_path: Path) -> None:
    _wav(tmp_path / "a.wav")
    _wav(tmp_path / "b.wav")
    with pytest.raises(SystemExit, match=r"transcripts\.tsv is missing"):
        bench.main(["--speech-dir", str(tmp_path)])
    (tmp_path / "transcripts.tsv").write_text("# name, text, paused\na.wav\thello there\tpaused\n")
    with pytest.raises(SystemExit, match=r"no transcript for b\.wav"):
        bench.main(["--speech-dir", str(tmp_path)])
    (tmp_path / "transcripts.tsv").write_text("a.wav\thello there\tpaused\nb.wav\tgood bye\n")
    speech = bench.load_speech(tmp_path)
    assert [(u.text, u.paused) for u in speech] == [("hello there", "paused"), ("good bye", "")]
    assert all(u.audio.dtype == np.float32 and len(u.audio) > 0 for u in speech)
    for bad in ("hello there\tPaused!", "hello there\tpaused\textra", "\tpaused"):
        (tmp_path / "transcripts.tsv").write_text(f"a.wav\t{bad}\nb.wav\tgood bye\n")
        with pytest.raises(bench.BenchError, match=r"transcripts.tsv:1: expected FILE.wav<TAB>transcript\[<TAB>KIND of pause"):
            bench.load_speech(tmp_path)
