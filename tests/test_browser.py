"""The browser client in a real headless Chromium against the real server, over WebRTC and WebSocket.

Chromium's fake microphone plays a WAV (silence, a spoken question, silence) once; the page is
driven like a person would: open it, press the button. Plus, without a browser: the same WebRTC
call from an aiortc caller (interrupt included), the signaling endpoint's refusals over plain
HTTP, and the paced reply track.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
import wave
from pathlib import Path

import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError

from agent.transports.webrtc import FRAME, RATE, ReplyTrack
from audio.codec import to_int16
from tests.helpers import missing, silence
from tests.servers import http, live

WAIT = 120.0  # a whole turn on 2 busy cores; only a hang fails it
QUESTION = "What is your name?"
OFFER = "/v1/webrtc/offer"


def browser_paths() -> tuple[str, str]:
    """Debian's chromium and chromium-driver (.ci/run installs them); skip only where they cannot be had."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        missing("no headless browser: needs Chromium and chromedriver (apt-get install chromium chromium-driver)")
    return chromium, driver


@pytest.fixture(scope="module")
def srv(voice_agent):
    with live(voice_agent, max_sessions=2, open_timeout_s=5.0) as s:
        yield s


@pytest.fixture(scope="module")
def question_wav(piper_speech, tmp_path_factory) -> Path:
    """1.5 s of silence (the fake mic starts before the call connects), the question, 3 s of silence."""
    rate = 48000
    audio = np.concatenate([silence(1.5, rate), piper_speech(QUESTION, rate), silence(3.0, rate)])
    path = tmp_path_factory.mktemp("browser") / "question.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(to_int16(audio).astype("<i2").tobytes())
    return path


@pytest.fixture
def browser(question_wav):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = browser_paths()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",  # root in CI
        "--disable-dev-shm-usage",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={question_wav}%noloop",
        "--autoplay-policy=no-user-gesture-required",
        "--window-size=1100,1000",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def voice(driver) -> dict:
    """The page's `window.voice` record of the call (what the test asserts on)."""
    return driver.execute_script("const v = window.voice; return {transport: v.transport, transcripts: v.transcripts, replies: v.replies, turns: v.turns, errors: v.errors, denoiseSteps: v.denoiseSteps};")


def wait_for(driver, what: str, check) -> dict:
    deadline = time.monotonic() + WAIT
    while True:
        v = voice(driver)
        if check(v):
            return v
        if time.monotonic() > deadline:
            status = driver.find_element("id", "status").text
            pytest.fail(f"timed out waiting for {what}; status line: {status!r}; page state: {json.dumps(v)[:2000]}")
        time.sleep(0.2)


def first_turn_heard(v: dict) -> bool:
    return any(t["timeline"]["turn"] >= 1 and t["heardMs"] is not None for t in v["turns"])


@pytest.mark.parametrize("transport", ["webrtc", "websocket"])
def test_a_spoken_question_in_the_browser(srv, browser, transport, tmp_path):
    browser.get(srv.url("/", "http"))
    browser.find_element("css selector", f"#transport option[value='{transport}']").click()
    browser.find_element("id", "talk").click()

    v = wait_for(browser, "a transcript, a reply and the reply heard", lambda v: v["transcripts"] and v["replies"].get("1") and first_turn_heard(v))
    assert v["transport"] == {"webrtc": "WebRTC", "websocket": "WebSocket"}[transport]
    assert "name" in v["transcripts"][0].lower(), v["transcripts"]
    assert v["replies"]["1"].strip() and v["denoiseSteps"] > 0  # the page asked for response.denoise.step
    assert not v["errors"]

    # The conversation and the waterfall as a person sees them.
    assert "name" in browser.find_element("css selector", "#turns li[data-turn='1'] .user").text.lower()
    assert browser.find_element("css selector", "#turns li[data-turn='1'] .agent .committed").text.strip()
    assert "denoising step" in browser.find_element("css selector", "#turns li[data-turn='1'] .agent .decoding").text
    stages = [e.get_attribute("data-stage") for e in browser.find_elements("css selector", "#waterfall .lane")]
    assert {"endpoint", "asr_final", "llm_first_text", "tts_first_audio", "first_audio_sent", "heard"} <= set(stages), stages
    assert browser.find_element("id", "v2v").text.isdigit()
    assert browser.find_elements("css selector", "#history li")

    # Reply audio really arrived: on the WebRTC track (bytes and decoded energy), or as WebSocket deltas.
    stats = browser.execute_async_script("window.voice.audioStats().then(arguments[arguments.length - 1]);")
    assert stats["bytes"] > 0
    if transport == "webrtc":
        assert stats["energy"] > 0, stats

    browser.save_screenshot(str(tmp_path / f"{transport}.png"))
    if transport == "webrtc" and os.environ.get("VOICE_AGENT_SCREENSHOT"):  # docs/screenshot.png for the README
        browser.save_screenshot(os.environ["VOICE_AGENT_SCREENSHOT"])
    browser.set_window_size(390, 844)  # a phone: one column, nothing wider than the screen
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    browser.save_screenshot(str(tmp_path / f"{transport}-phone.png"))
    browser.find_element("id", "talk").click()  # hang up: the session ends on the server too
    asyncio.run(srv.wait_idle())


# ---- the same call from aiortc (no browser needed): events, reply audio, interrupt ------------


async def aiortc_call(srv, wav: Path) -> dict:
    """Call the agent with the WAV as the mic; once the reply is done and being heard, interrupt its playback."""
    from aiortc.contrib.media import MediaPlayer

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    seen: list[dict] = []
    got = {"loud_frames": 0}
    done, heard, interrupted = asyncio.Event(), asyncio.Event(), asyncio.Event()
    channel = pc.createDataChannel("events")

    async def listen(track) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                if np.abs((await track.recv()).to_ndarray()).max() > 300:
                    got["loud_frames"] += 1
                    heard.set()

    def on_message(text: str) -> None:
        msg = json.loads(text)
        seen.append(msg)
        if msg["type"] == "session.created":
            channel.send(json.dumps({"type": "session.update", "session": {"denoise_steps": True}}))
        elif msg["type"] == "response.done" and msg["turn"] == 1:
            done.set()
        elif msg["type"] == "response.interrupted":
            interrupted.set()

    pc.on("track", lambda track: asyncio.ensure_future(listen(track)))
    channel.on("message", on_message)
    pc.addTrack(MediaPlayer(str(wav)).audio)
    await pc.setLocalDescription(await pc.createOffer())
    status, _, text = await asyncio.to_thread(http, srv, OFFER, json.dumps({"type": "offer", "sdp": pc.localDescription.sdp}).encode())
    assert status == 200, text
    answer = json.loads(text)
    await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
    try:
        await asyncio.wait_for(asyncio.gather(done.wait(), heard.wait()), WAIT)
        channel.send(json.dumps({"type": "response.cancel"}))  # the reply is still playing (paced in real time)
        await asyncio.wait_for(interrupted.wait(), WAIT)
    finally:
        await pc.close()
    return {"events": seen, **got}


def test_a_continued_turn_leaves_the_conversation_on_the_page(srv, browser):
    """After `turn.continued` the page shows the joined turn only (the view the page's handler calls)."""
    browser.get(srv.url("/", "http"))
    turns = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        import('./views.js').then(({ Conversation }) => {
          const list = document.createElement('ol');
          const c = new Conversation(list);
          c.userState(1, 'Please enter your password.', false);
          c.text(1, 'Okay, go ahead.');
          c.userState(2, 'Please enter your password. Followed by the pound key.', false);
          c.remove(1);
          c.remove(7);  // a turn the page never showed
          done([...list.children].map((li) => [li.dataset.turn, li.textContent]));
        }, (e) => done(String(e)));""")
    assert turns == [["2", "Please enter your password. Followed by the pound key."]]


def test_webrtc_call_from_aiortc(srv, question_wav):
    out = asyncio.run(aiortc_call(srv, question_wav))
    types = [e["type"] for e in out["events"]]
    assert types[0] == "session.created" and out["events"][0]["session"]["transport"] == "webrtc"
    assert "session.updated" in types and "response.denoise.step" in types
    transcript = next(e["transcript"] for e in out["events"] if e["type"].endswith("transcription.completed"))
    assert "name" in transcript.lower()
    assert "response.output_audio.delta" not in types and "response.output_audio_transcript.delta" in types  # the voice is on the track
    assert out["loud_frames"] > 0
    assert types.index("response.interrupted") > types.index("response.done")
    asyncio.run(srv.wait_idle())


# ---- signaling refusals over plain HTTP ------------------------------------------------------


def offer(audio: bool = True, channel: bool = True) -> str:
    """A real offer from aiortc, as a browser would post it (nobody will answer on this side)."""

    async def make() -> str:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        if audio:
            pc.addTrack(AudioStreamTrack())
        if channel:
            pc.createDataChannel("events")
        await pc.setLocalDescription(await pc.createOffer())
        await pc.close()
        return pc.localDescription.sdp

    return asyncio.run(make())


def post_offer(srv, body: object) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, text = http(srv, OFFER, data=data, headers={"Content-Type": "application/json"})
    return status, json.loads(text)


def test_signaling_refuses_bad_offers(srv):
    status, body = post_offer(srv, b"{not json")
    assert status == 400 and "JSON" in body["error"]
    status, body = post_offer(srv, {"type": "answer", "sdp": "v=0"})
    assert status == 400 and "offer" in body["error"]
    status, body = post_offer(srv, {"type": "offer", "sdp": "hello"})
    assert status == 400 and "malformed SDP" in body["error"]
    status, body = post_offer(srv, {"type": "offer", "sdp": "v=0\r\nm=audio x\r\n"})
    assert status == 400 and "malformed SDP" in body["error"]

    sdp = offer(audio=False)
    status, body = post_offer(srv, {"type": "offer", "sdp": sdp})
    assert status == 400 and "no microphone" in body["error"]
    sdp = offer(channel=False)
    status, body = post_offer(srv, {"type": "offer", "sdp": sdp})
    assert status == 400 and "no data channel" in body["error"]
    assert srv.idle()


def test_signaling_answers_once_per_offer(srv):
    sdp = offer()
    status, body = post_offer(srv, {"type": "offer", "sdp": sdp})
    assert status == 200 and body["type"] == "answer" and "m=audio" in body["sdp"] and "m=application" in body["sdp"]
    status, body = post_offer(srv, {"type": "offer", "sdp": sdp})
    assert status == 409 and "already answered" in body["error"]
    # Nobody connects: the call is dropped after open_timeout_s and leaves nothing behind.
    deadline = time.monotonic() + WAIT
    while not srv.in_loop(lambda: srv.app.state.webrtc.idle):
        assert time.monotonic() < deadline, "the unconnected call was never dropped"
        time.sleep(0.1)
    assert srv.idle()


# ---- the reply track -------------------------------------------------------------------------


def test_reply_track_plays_in_order_and_clears():
    played: list[tuple[int, float]] = []

    async def run() -> None:
        track = ReplyTrack(lambda turn, seconds: played.append((turn, seconds)))
        idle = await track.recv()
        assert idle.samples == FRAME and idle.sample_rate == RATE and not idle.to_ndarray().any()  # silence when idle
        track.push(1, np.full(FRAME * 3 // 2, 1000, np.int16))  # 30 ms
        a, b, c = [await track.recv() for _ in range(3)]
        assert [f.pts for f in (a, b, c)] == [FRAME, 2 * FRAME, 3 * FRAME]  # a continuous 48 kHz clock
        assert (a.to_ndarray() == 1000).all() and (b.to_ndarray()[0, : FRAME // 2] == 1000).all()
        assert not b.to_ndarray()[0, FRAME // 2 :].any() and not c.to_ndarray().any()
        assert played == [(1, 0.03)]
        track.push(2, np.full(RATE, 1000, np.int16))  # a second of turn 2, cut after one frame
        await track.recv()
        track.clear()
        assert not (await track.recv()).to_ndarray().any()
        assert track.played_s(2) == FRAME / RATE and played == [(1, 0.03)]
        track.stop()

    asyncio.run(run())
