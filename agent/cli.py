"""`voice-agent`: the voice agent's command line (text chat for now)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from dllm_engine.cli import add_decode_args, add_model_args, decode_params, default_model_path, setup_torch

from .dialogue import Dialogue


def cmd_chat(args: argparse.Namespace) -> None:
    """A text REPL over the same dialogue and engine the voice pipeline uses."""
    from dllm_engine.engine import Engine, RequestError

    setup_torch(args)
    params = decode_params(args)
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(args.model or default_model_path(), device=args.device, dtype=args.dtype, max_batch=1)
    dialogue = Dialogue(engine.tokenizer, args.system, args.max_history_tokens)
    print(f"model loaded in {time.perf_counter() - t0:.2f} s. Type a message; Ctrl-D or /quit to leave.", file=sys.stderr)

    async def reply() -> str:
        parts = []
        async for out in engine.stream(dialogue.prompt(), params):
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voice-agent", description="A low-latency streaming voice agent on a diffusion LLM.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("chat", help="text-only chat with the agent's model", description=cmd_chat.__doc__)
    add_model_args(c)
    add_decode_args(c, max_new_tokens=64)
    c.add_argument("--system", help="system prompt (if the model's chat template has a system role)")
    c.add_argument("--max-history-tokens", type=int, default=512, help="drop the oldest turns past this many prompt tokens (default: %(default)s)")
    c.set_defaults(func=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.func(args)


if __name__ == "__main__":
    main()
