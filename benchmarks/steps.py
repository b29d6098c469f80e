"""Per-step latency: `python -m benchmarks.steps [--model DIR | --shape llada-8b] --json OUT`.

What one denoising step costs a model shape, by cache and batch, under the engine benchmark's fixed
conditions (a ~210-token prompt: a 3-turn history plus a user turn; a 256-token canvas; blocks of
32). A step is the model forward plus the block's logits and confidences, which is what
`decoding.Runner` spends on it besides bookkeeping:

- `full`: the whole sequence: every step of the reference vanilla, and the first step of each block
  with a cache;
- `prefix`: the current block and everything after it against the cached prefix (mean over the 8 blocks);
- `dual`: the current block alone against the cached prefix and suffix.

For a block-causal model (`LLaDAConfig.block_causal`) the steps are those its exact cache makes:
`full` under its block mask; `block_start` the previous block and this one against the prefix
(the first step of each block); `dual` (= `prefix`) the block alone against the prefix only.

`--shape llada-8b` (or dream-7b, fast-dllm-v2-7b, sdar-4b: use `--block-size 4` for SDAR's
attention blocks) builds that checkpoint's shape with random weights on the device (no checkpoint
needed): a step costs the same whatever the weights, while tokens/s would say nothing (random
weights commit one token per step).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dllm_engine.config import ConfigError, LLaDAConfig
from dllm_engine.decoding import attention_blocks, block_causal_keys, predict
from dllm_engine.loading import DTYPE_CHOICES, device_of, load_model, resolve_dtype
from dllm_engine.model import DiffusionLM, KVCache
from dllm_engine.options import model_path

from .common import machine

# Shape fields of real checkpoints' config.json (LLaDA-8B-Base and -Instruct share them), and the
# switches their family's model_type implies (config.FAMILIES).
_QWEN25_7B = dict(
    d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, mlp_hidden_size=18944, vocab_size=152064, max_sequence_length=32768,
    rope_theta=1000000.0, rms_norm_eps=1e-6, include_qkv_bias=True, shift_logits=True,
)
SHAPES = {
    "llada-8b": dict(
        d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288, vocab_size=126464,
        embedding_size=126464, max_sequence_length=4096, rope_theta=500000.0, mask_token_id=126336, eos_token_id=126081, pad_token_id=126081,
    ),
    "dream-7b": dict(_QWEN25_7B, mask_token_id=151666, eos_token_id=151643, pad_token_id=151643),
    "fast-dllm-v2-7b": dict(_QWEN25_7B, block_causal=True, attention_block=32, mask_token_id=151665, eos_token_id=151645, pad_token_id=151643),
    "sdar-4b": dict(
        d_model=2560, n_layers=36, n_heads=32, n_kv_heads=8, head_size=128, mlp_hidden_size=9728, vocab_size=151936, max_sequence_length=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6, qk_norm=True, weight_tying=True, block_causal=True, attention_block=4,
        mask_token_id=151669, eos_token_id=151645, pad_token_id=151643,
    ),
}


def random_model(cfg: LLaDAConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> DiffusionLM:
    """A model of this shape with N(0, 0.02) weights made on the device itself (8B in bf16: 16 GB,
    never on the host)."""
    with torch.device("meta"):
        model = DiffusionLM(cfg).to(dtype)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:  # RMSNorm gains
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


class StepTimer:
    """Times the three kinds of step for `batch` sequences of `prompt_len` + `canvas` tokens."""

    def __init__(self, model: DiffusionLM, batch: int, prompt_len: int, canvas: int, block: int, seed: int = 0) -> None:
        cfg = model.config
        p = next(model.parameters())
        self.model, self.device, self.block, self.prompt_len = model, p.device, block, prompt_len
        self.length = prompt_len + canvas
        self.cache = KVCache(cfg, batch, self.length, p.dtype, p.device)
        gen = torch.Generator().manual_seed(seed)
        prompt = torch.randint(3, cfg.vocab_size, (batch, prompt_len), generator=gen)
        self.ids = torch.cat([prompt, torch.full((batch, canvas), cfg.mask_token_id or 0)], 1).to(p.device)
        # Random ids: the prompt is one block, or one a token (an AR checkpoint), or fixed blocks cover it all.
        self.blocks = attention_blocks(self.ids[0, :prompt_len], canvas, block, causal_prompt=cfg.causal_prompt, attention_block=cfg.attention_block)
        self.slots = torch.arange(batch, device=p.device)
        self.key_valid = torch.ones(batch, self.length, dtype=torch.bool, device=p.device)
        self.no_sampling = torch.zeros(batch, device=p.device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def keys(self, start: int, end: int) -> torch.Tensor:
        """What queries [start, end) may attend: every key, or under a block-causal model's mask
        (the prompt is block 0) the keys of their own and earlier blocks, none after `end`."""
        if not self.model.config.block_causal:
            return self.key_valid
        mask = block_causal_keys(torch.arange(start, end, device=self.device), self.blocks, end)
        return mask.expand(self.ids.shape[0], -1, -1)

    @torch.inference_mode()
    def step(self, start: int, end: int, block_start: int) -> None:
        """One step whose queries are positions [start, end) and whose block starts at block_start."""
        n = self.ids.shape[0]
        pos = torch.arange(start, end, device=self.device).expand(n, -1)
        # Contiguous as decoding.Runner builds them (compiled layers would compile a strided copy apart).
        hidden = self.model(self.ids[:, start:end].contiguous(), pos, self.keys(start, end), self.cache, self.slots)
        at = block_start - start
        predict(self.model.logits(hidden[:, at : at + self.block]), self.no_sampling, [None] * n)

    def ms(self, start: int, end: int, block_start: int, repeats: int) -> float:
        """Median wall time of the step in ms, after one warm-up."""
        self.step(start, end, block_start)
        times = []
        for _ in range(repeats):
            self._sync()
            t0 = time.perf_counter()
            self.step(start, end, block_start)
            self._sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def measure(self, repeats: int) -> dict[str, float]:
        blocks = range(self.prompt_len, self.length, self.block)
        if self.model.config.block_causal:
            dual = statistics.mean(self.ms(b, b + self.block, b, repeats) for b in blocks)
            return {
                "full_ms": self.ms(0, self.length, self.prompt_len, repeats),
                # the previous block and this one (the first block's start is the prompt and it)
                "block_start_ms": statistics.mean(self.ms(b - self.block, b + self.block, b, repeats) for b in blocks[1:])
                if len(blocks) > 1 else self.ms(0, self.prompt_len + self.block, self.prompt_len, repeats),
                "prefix_ms": dual,
                "dual_ms": dual,
            }
        return {
            "full_ms": self.ms(0, self.length, self.prompt_len, repeats),
            "prefix_ms": statistics.mean(self.ms(b, self.length, b, repeats) for b in blocks),
            "dual_ms": statistics.mean(self.ms(b, b + self.block, b, repeats) for b in blocks),
        }


def run(args: argparse.Namespace) -> dict:
    device = device_of(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.shape:
        cfg = LLaDAConfig(**SHAPES[args.shape])
        model, name = random_model(cfg, device, resolve_dtype(args.dtype, device)), f"{args.shape} (random weights)"
        if args.dtype == "int8":
            model.quantize_int8()
    else:
        model_dir = model_path(args)
        model, _ = load_model(model_dir, device=device, dtype=args.dtype)
        name = str(model_dir)
    if args.compile:
        model.compile_layers()  # each batch size's first (warm-up) step compiles
    if args.cuda_graphs:
        model.use_cuda_graphs()  # each kind of step is captured at its warm-up
    n_params = model.n_params
    report: dict = {
        "model": name, "parameters": n_params, "device": str(device), "dtype": model.weight_format,
        "threads": torch.get_num_threads(), "compiled": model.compiled, "cuda_graphs": model.graphed, "machine": machine(),
        "conditions": {"prompt_tokens": args.prompt_tokens, "canvas": args.canvas, "block_size": args.block_size, "repeats": args.repeats},
        "runs": [],
    }
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    for batch in tqdm(args.batches, desc="batches", unit="batch"):
        timer = StepTimer(model, batch, args.prompt_tokens, args.canvas, args.block_size)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        row = {"batch": batch, **{k: round(v, 2) for k, v in timer.measure(args.repeats).items()}, "kv_cache_mb": round(timer.cache.nbytes() / 2**20, 1)}
        if device.type == "cuda":
            row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        report["runs"].append(row)
        del timer
    print(f"{name}: {n_params / 1e6:.1f}M parameters, {report['dtype']} on {device} ({report['threads']} threads"
          + (", compiled layers" if model.compiled else "") + (", CUDA graphs" if model.graphed else "") + ")")
    start = "block_start_ms" in report["runs"][0]
    print(f"{'batch':>6}{'full ms':>10}" + (f"{'block start ms':>16}" if start else "") + f"{'prefix ms':>11}{'dual ms':>9}")
    for r in report["runs"]:
        print(f"{r['batch']:>6}{r['full_ms']:>10.1f}" + (f"{r['block_start_ms']:>16.1f}" if start else "") + f"{r['prefix_ms']:>11.1f}{r['dual_ms']:>9.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.steps", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="model directory or named model (smollm2) (default: the shipped model)")
    src.add_argument("--shape", choices=sorted(SHAPES), help="random weights of a real checkpoint's shape instead of a model directory")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="auto: bf16 on GPUs and bf16-capable CPUs; int8: int8 linear layers, a CPU only (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="batch sizes (default: %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=210, help="prompt length (default: %(default)s)")
    p.add_argument("--canvas", type=int, default=256, help="new-token canvas (default: %(default)s)")
    p.add_argument("--block-size", type=int, default=32, help="decoding block (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model's layers (compiles during each batch size's warm-up step)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the steps from CUDA graphs (captured during each kind's warm-up step; a GPU only)")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per step kind and block (default: %(default)s)")
    p.add_argument("--json", type=Path, help="write the report here")
    args = p.parse_args(argv)
    if args.canvas % args.block_size or min(args.batches + [args.prompt_tokens, args.canvas, args.block_size, args.repeats]) < 1:
        p.error("sizes must be >= 1 and --canvas a multiple of --block-size")
    if args.threads < 0:
        p.error(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except ConfigError as e:  # a device torch does not have, a missing or broken model directory
        p.error(str(e))


if __name__ == "__main__":
    main()
