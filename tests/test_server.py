"""The server over real sockets: uvicorn on a loopback port, real clients, the real agent: /health, the
page and /twiml, the command's help and refusals, Ctrl-C. Each endpoint's own promises are in
test_realtime.py, test_twilio.py, test_transports.py (WebRTC), test_server_security.py and
test_reliability.py.

Each server runs in its own thread and event loop (as `voice-agent serve` does in its process);
clients run in the test's own loop. No assertion depends on how fast anything is.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from cli.voice_agent import build_parser
from cli.voice_agent import main as cli_main
from tests.servers import WAIT, close_code, http, start_msg, until


def test_health_static_and_twiml(srv):
    status, ctype, body = http(srv, "/health")
    health = json.loads(body)
    assert status == 200 and ctype.startswith("application/json")
    assert health["status"] == "ok" and health["models"]["loaded"] is True
    assert health["sessions"] == {"active": 0, "max": 3} and health["agent_sample_rate"] > 0
    assert health["limits"]["max_frame_bytes"] == 1 << 20 and health["auth_required"] is False

    status, ctype, body = http(srv, "/")
    assert status == 200 and ctype.startswith("text/html") and "<html" in body

    status, ctype, body = http(srv, "/twiml", data=b"CallSid=CA1&From=%2B15550001")
    assert status == 200 and ctype.startswith("application/xml")
    assert f'<Connect><Stream url="ws://127.0.0.1:{srv.port}/twilio/stream"></Stream></Connect>' in body


def test_cli_serve_help_and_refusals(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--host", "--port", "--model", "--token", "--public-url", "--ssl-certfile", "--ssl-keyfile", "--max-sessions", "--allow-origin", "--compile", "TWILIO_AUTH_TOKEN"):
        assert flag in out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--threads", "0"])  # torch would fail later, with a traceback
    assert "--threads: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-sessions", "0"])
    assert "--max-sessions: must be >= 1, got 0" in capsys.readouterr().err
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0"])
    assert args.port == 8000
    with pytest.raises(SystemExit, match="--token"):
        args.func(args)  # refused before any model loads
    args = build_parser().parse_args(["serve", "--ssl-certfile", "cert.pem"])
    with pytest.raises(SystemExit, match="ssl-keyfile"):
        args.func(args)
    # what the model loader refuses: one line, no traceback
    with pytest.raises(SystemExit, match="error: model directory .*nowhere does not exist"):
        cli_main(["chat", "--model", "/nowhere"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="error: CUDA graphs need the model on a CUDA device"):
            cli_main(["chat", "--cuda-graphs"])


def test_ctrl_c_on_voice_agent_serve_closes_sessions_with_1001(tiny_chat):
    """The real command in its own process: Ctrl-C (SIGINT) gives every client 1001, then it exits."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "cli.voice_agent", "serve", "--model", str(tiny_chat / "model"), "--dtype", "float32",
           "--block-size", "32", "--max-new-tokens", "32", "--port", str(port), "--max-sessions", "2"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"127.0.0.1:{port}"

    def wait_for_sessions(active: int) -> None:
        deadline = time.monotonic() + 3 * WAIT
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "no /health"
            try:
                with urllib.request.urlopen(f"http://{base}/health", timeout=5) as r:
                    if json.load(r)["sessions"] == {"active": active, "max": 2}:
                        return
            except OSError:
                pass
            time.sleep(0.2)

    try:
        wait_for_sessions(0)

        async def run():
            rt = await connect(f"ws://{base}/v1/realtime")
            await until(rt, "session.created")
            tw = await connect(f"ws://{base}/twilio/stream")
            await tw.send(start_msg())
            await asyncio.to_thread(wait_for_sessions, 2)  # both sessions open before the signal
            proc.send_signal(signal.SIGINT)
            last = None
            try:
                while True:
                    last = json.loads(await asyncio.wait_for(rt.recv(), WAIT))
            except ConnectionClosed as e:
                assert e.rcvd.code == 1001
            assert last["type"] == "error" and last["error"]["code"] == "server_shutdown"
            assert await close_code(tw) == 1001

        asyncio.run(run())
        out, _ = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, out
        assert "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
