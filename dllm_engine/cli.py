"""`dllm`: generate text, benchmark the engine, prepare (and distill) data and train the default model."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import ConfigError
from .data import DataError
from .decoding import CACHES, POLICIES, DecodeParams

if TYPE_CHECKING:
    from .engine import Engine

DEFAULT_MODEL_DIR = Path(__file__).parent / "models" / "default"


def default_model_path() -> Path:
    """The model shipped inside the package; a clear error while none is shipped."""
    if (DEFAULT_MODEL_DIR / "config.json").exists():
        return DEFAULT_MODEL_DIR
    raise SystemExit(f"no default model is shipped in {DEFAULT_MODEL_DIR} yet: pass --model PATH (a LLaDA-layout directory)")


def positive_int(text: str) -> int:
    """argparse type for counts such as --threads: torch would otherwise fail later with a traceback."""
    value = int(text)  # a ValueError reads "invalid positive_int value: 'x'"
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_model_args(p: argparse.ArgumentParser, threads_default: str = "torch's choice") -> None:
    p.add_argument("--model", type=Path, help="model directory (HF layout); default: the shipped model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1 ... (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="weights/compute dtype; auto = bf16 where the hardware has it (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, help=f"torch intra-op threads (default: {threads_default})")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block: fused kernels, faster on some machines (measure), after a start-up compile (about a minute the first time, less once inductor has them on disk)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay decoding steps from CUDA graphs (a GPU only): a large model's batch-1 step is bound by launching its kernels")


def engine_from_args(args: argparse.Namespace, max_batch: int = 1) -> Engine:
    """The engine that `add_model_args`' options describe."""
    from .engine import Engine

    return Engine.from_pretrained(
        args.model or default_model_path(), device=args.device, dtype=args.dtype, max_batch=max_batch, compile=args.compile, cuda_graphs=args.cuda_graphs
    )


def add_decode_args(p: argparse.ArgumentParser, fallback_max_new_tokens: int = DecodeParams.fallback_max_new_tokens, block_size: int | None = None) -> None:
    d = DecodeParams(block_size=block_size or DecodeParams.block_size, fallback_max_new_tokens=fallback_max_new_tokens)
    p.add_argument("--policy", choices=POLICIES, default=d.policy, help="commit policy (default: %(default)s)")
    p.add_argument("--cache", choices=CACHES, default=d.cache, help="KV cache mode (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=d.threshold, help="confidence threshold tau for 'threshold' (default: %(default)s)")
    p.add_argument("--factor", type=float, default=d.factor, help="f for the 'factor' policy (default: %(default)s)")
    p.add_argument("--block-size", type=int, default=d.block_size, help="tokens per block (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, help=f"cap on reply length (default: the model's, from its generation_config.json, else {fallback_max_new_tokens})")
    p.set_defaults(fallback_max_new_tokens=fallback_max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy and deterministic (default: %(default)s)")
    p.add_argument("--seed", type=int, help="sampling seed (reproducible with temperature > 0)")
    p.add_argument("--no-early-stop", action="store_true", help="decode the whole canvas like the LLaDA reference")


def decode_params(args: argparse.Namespace) -> DecodeParams:
    try:
        return DecodeParams(
            policy=args.policy,
            cache=args.cache,
            threshold=args.threshold,
            factor=args.factor,
            block_size=args.block_size,
            max_new_tokens=args.max_new_tokens,
            fallback_max_new_tokens=args.fallback_max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
            early_stop=not args.no_early_stop,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def setup_torch(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def cmd_generate(args: argparse.Namespace) -> None:
    from .engine import RequestError

    setup_torch(args)
    params = decode_params(args)
    t0 = time.perf_counter()
    engine = engine_from_args(args)
    load_s = time.perf_counter() - t0
    prompt = args.prompt if args.raw else [{"role": "user", "content": args.prompt}]

    async def run() -> None:
        last = None
        async for out in engine.stream(prompt, params, step_events=args.show_steps):
            if out.step and args.show_steps:
                print(f"\n[block {out.step.block} step {out.step.step}: +{len(out.step.positions)}, {out.step.masked_left} masked]", file=sys.stderr)
            print(out.text, end="", flush=True)
            last = out
        print()
        s = last.stats
        print(
            f"load {load_s:.2f} s | {s.new_tokens} tokens in {s.total_ms:.0f} ms ({s.new_tokens / max(s.total_ms, 1e-9) * 1e3:.0f} tok/s), "
            f"{s.forwards} forwards, first text {s.first_text_ms or 0:.0f} ms, finish: {last.finish_reason}",
            file=sys.stderr,
        )

    try:
        asyncio.run(run())
    except RequestError as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        engine.close()


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import main as bench_main

    setup_torch(args)
    bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    from . import bench, data, distill, train

    parser = argparse.ArgumentParser(prog="dllm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream a reply to a prompt", description="Stream a reply to one prompt to the terminal.")
    g.add_argument("prompt", help="the user's message (rendered with the model's chat template unless --raw)")
    g.add_argument("--raw", action="store_true", help="feed the prompt as raw text, without the chat template")
    g.add_argument("--show-steps", action="store_true", help="print each denoising step's commits to stderr")
    add_model_args(g)
    add_decode_args(g)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="engine benchmark (see also python -m benchmarks.engine)", description=bench.__doc__)
    add_model_args(b)
    bench.add_args(b)
    b.set_defaults(func=cmd_bench)

    data.add_parser(sub)
    distill.add_parser(sub)
    train.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ConfigError, DataError) as e:  # a missing model directory, a malformed data file: no traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
