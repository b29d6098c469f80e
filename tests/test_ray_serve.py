"""The voice agent on a local Ray cluster (deploy/ray_app.py): two session replicas and one engine
replica behind the Serve proxy; WebSocket and Twilio callers each hear a reply."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import ray
import yaml
from ray import serve
from websockets.asyncio.client import connect

from audio.codec import resample
from audio.tts import Synthesizer
from tests.helpers import silence
from tests.servers import MULAW, RT, WAIT, free_socket, media_msgs, recv_json, send_rt_audio

TOKEN = "s3cret"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
SMALL = {"num_cpus": 0.5}  # three replicas on two cores
# The proxy may route all three callers and a Twilio attempt still closing to one replica: room for them all,
# so that the test is about routing and tokens, not about the busy limit (tests/test_server_security.py has that).
MAX_SESSIONS = 4


@pytest.fixture(scope="module")
def cluster(tiny_chat, tmp_path_factory):
    """deploy/serve.yaml, as `serve run` deploys it, on a one-machine cluster: the tiny model, a token,
    two session replicas, and resources small enough for three replicas on two cores."""
    with free_socket() as sock:
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)  # for the workers
    config = yaml.safe_load((root / "deploy" / "serve.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    apps = {a["name"]: a for a in config["applications"]}
    model, decode = str(tiny_chat / "model"), {"block_size": 32, "max_new_tokens": 32}
    apps["llm"]["args"].update(model=model, dtype="float32", max_batch=4, decode=decode)
    apps["voice"]["args"].update(llm_url=f"http://127.0.0.1:{port}/llm/v1", settings={"token": TOKEN, "max_sessions": MAX_SESSIONS},
                                 agent={"model": model, "dtype": "float32", "decode": decode, "asr_threads": 1, "tts_threads": 1})
    apps["voice"]["deployments"][0].pop("autoscaling_config")
    apps["voice"]["deployments"][0]["num_replicas"] = 2
    for app in apps.values():
        app["deployments"][0]["ray_actor_options"] = SMALL
    path = tmp_path_factory.mktemp("serve") / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        subprocess.run([str(Path(sys.executable).parent / "serve"), "run", "--non-blocking", "--address", context.address_info["address"], str(path)],
                       check=True, timeout=3 * WAIT, cwd=root)
        deadline = time.monotonic() + 5 * WAIT
        while (status := {n: a.status for n, a in serve.status().applications.items()}) != {"llm": "RUNNING", "voice": "RUNNING"}:
            assert time.monotonic() < deadline and "DEPLOY_FAILED" not in status.values(), status
            time.sleep(1)
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def speech():
    tts = Synthesizer(threads=1)
    spoken = np.concatenate(list(tts.synthesize("Hello, how are you today?")))

    def at(rate: int) -> np.ndarray:
        return np.concatenate([silence(0.5, rate), resample(spoken, tts.sample_rate, rate), silence(1.5, rate)])

    return at


def twiml(port: int, call_sid: str) -> tuple[str, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/twiml", data=f"CallSid={call_sid}".encode(), headers=BEARER)
    with urllib.request.urlopen(req, timeout=WAIT) as r:
        return r.headers["x-replica"], re.search(r'<Parameter name="token" value="([^"]+)"/>', r.read().decode()).group(1)


async def websocket_caller(port: int, audio: np.ndarray) -> str:
    async with connect(f"ws://127.0.0.1:{port}/v1/realtime", additional_headers=BEARER) as ws:
        assert (await recv_json(ws))["type"] == "session.created"
        await send_rt_audio(ws, audio, 24000)
        while (msg := await recv_json(ws, 3 * WAIT))["type"] != RT.audio_delta:
            assert msg["type"] != "error", msg
        return ws.response.headers["x-replica"]


async def twilio_caller(port: int, audio_8k: np.ndarray) -> tuple[str, str]:
    """/twiml, then its stream, retried until they land on different replicas; the stream hears a reply."""
    for attempt in range(20):
        call_sid = f"CA{attempt:032d}"
        webhook_replica, token = twiml(port, call_sid)
        async with connect(f"ws://127.0.0.1:{port}/twilio/stream") as ws:
            stream_replica = ws.response.headers["x-replica"]
            start = {"streamSid": "MZ1", "callSid": call_sid, "tracks": ["inbound"], "mediaFormat": MULAW, "customParameters": {"token": token}}
            await ws.send(json.dumps({"event": "start", "streamSid": "MZ1", "start": start}))
            if stream_replica == webhook_replica:
                await ws.send(json.dumps({"event": "stop"}))
                continue
            for msg in media_msgs(audio_8k):
                await ws.send(msg)
            while (msg := await recv_json(ws, 3 * WAIT))["event"] != "media":
                pass
            assert base64.b64decode(msg["media"]["payload"])
            return webhook_replica, stream_replica
    raise AssertionError("/twiml and its stream always landed on the same replica")


def test_two_websocket_callers_and_a_twilio_caller_through_the_serve_proxy(cluster, speech):
    async def run():
        callers = await asyncio.gather(websocket_caller(cluster, speech(24000)), websocket_caller(cluster, speech(24000)))
        # Then the phone call, on idle replicas: the proxy prefers the replica with fewer ongoing
        # requests, so while the callers load one, /twiml and its stream may never land apart.
        return *callers, await twilio_caller(cluster, speech(8000))

    ws1, ws2, (webhook, stream) = asyncio.run(run())
    assert webhook != stream  # the stream token minted by one replica was accepted by the other
    assert len({ws1, ws2, webhook, stream}) == 2  # the two session replicas, nothing else
