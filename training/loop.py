"""Train the default model (`dllm train --config CONFIG [--resume] [--minutes M]`) and export it (`dllm export`).

An optional first phase (`pretrain_steps`) trains on plain utterances; the learning rate warms up
linearly then follows a cosine to `min_lr_ratio * lr` at `max_steps`.

Run directory (`out_dir`):
  checkpoint.pt   model + optimizer + step + data position + RNG states (atomic; resumes exactly)
  best.pt         model weights with the lowest eval loss so far
  model/          the exported model (HF layout, bf16, tokenizer copied) written when the run ends
  metrics.jsonl   one line per log / eval event
`dllm export --run DIR --out DIR [--last]` exports best (default) or last weights at any time.

Resuming: `--resume` continues from `out_dir/checkpoint.pt` if there is one (else starts fresh);
without it an existing checkpoint is an error, so nothing is overwritten by accident.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dllm_engine.config import ConfigError, LLaDAConfig, read_json
from dllm_engine.convert import TOKENIZER_FILES
from dllm_engine.loading import device_of, load_model, save_model
from dllm_engine.model import DiffusionLM
from dllm_engine.tokenizer import Tokenizer

from .batches import Batches, collate, encode_chat, encode_utterances, iter_batches, read_jsonl, repeat_sources, with_history
from .config import TrainConfig
from .lora import LoRA
from .data import DataError
from .objective import diffusion_loss, eval_loss, prompt_gain

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
ADAPTER = "adapter/lora.safetensors"  # in a folder of its own: not one of the model's weight files


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to lr, then a cosine down to min_lr_ratio * lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def init_model(cfg: LLaDAConfig, std: float, seed: int) -> DiffusionLM:
    """GPT-2 style init: N(0, std) everywhere, residual output projections scaled by 1/sqrt(2 L)."""
    torch.manual_seed(seed)
    model = DiffusionLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                continue  # RMSNorm gains stay 1
            residual_out = ".blocks." in name and name.endswith(("attn_out.weight", "ff_out.weight"))
            p.normal_(0.0, std / math.sqrt(2 * cfg.n_layers) if residual_out else std)
    return model


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and not n.endswith("wte.weight")]
    rest = [p for n, p in model.named_parameters() if not (p.ndim == 2 and not n.endswith("wte.weight"))]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConfigError(f"cannot read checkpoint {path}: {e}") from None


def load_init(path: Path) -> dict:
    """Weights to start from: a run's checkpoint/best .pt, or a HF-layout model directory (the
    shipped model, an export), as {"model", "model_config", "step"}."""
    if not path.is_dir():
        return load_checkpoint(path)
    model, _ = load_model(path, dtype="float32")
    return {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config), "step": f"exported {path.name}"}


def check_shape(ckpt_model: dict[str, Any], model_cfg: LLaDAConfig, path: Path, ignore: tuple[str, ...] = ()) -> None:
    """Refuse to resume a checkpoint whose model differs from the config's (names the fields).
    A field the checkpoint predates has its default."""
    want = dataclasses.asdict(model_cfg)
    got = {f.name: f.default for f in dataclasses.fields(LLaDAConfig)} | ckpt_model
    diff = [f"{k}: checkpoint {got.get(k)!r} vs config {want[k]!r}" for k in sorted(want) if k not in ignore and got.get(k) != want[k]]
    if diff:
        raise ConfigError(f"{path} was trained with a different model shape ({'; '.join(diff)}); use another out_dir or the matching config")


def trained_for(trained: dict) -> dict:
    """What a run's model was trained to decode (`loading.generation_defaults`): its reply region and
    prompt length, and a block-diffusion objective's policy at its smallest block (drafts for `verify`,
    else confidence `threshold`)."""
    decoding = {}
    if trained.get("block_sizes"):
        decoding = {"policy": "verify" if trained.get("drafting_ar_weight") is not None else "threshold", "block_size": min(trained["block_sizes"])}
    return {"max_new_tokens": trained.get("reply_len"), "max_prompt_tokens": trained.get("max_prompt_tokens"), **decoding}


def export(run_dir: str | Path, out_dir: str | Path, which: str = "best", dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the run's best (or last) weights as a HF-layout model dir with the tokenizer files, and
    a generation_config.json with the reply region (`max_new_tokens`) and prompt length
    (`max_prompt_tokens`) it was trained on: on a longer canvas the model does not fill the rest
    with EOS, and after a longer history it loses the thread (the agent trims its history to it);
    and the decoding it was trained for (`trained_for`), which programs use unless told otherwise."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    ckpt_path = run_dir / CHECKPOINT
    if not ckpt_path.exists():
        raise ConfigError(f"no {CHECKPOINT} in {run_dir}")
    ckpt = load_checkpoint(ckpt_path)
    if which == "best" and (run_dir / BEST).exists():
        best = load_checkpoint(run_dir / BEST)
        if best.get("model_config") == ckpt["model_config"]:
            ckpt = {**ckpt, **{k: best[k] for k in ("model", "lora") if k in best}}
    trained = ckpt.get("train_config", {})
    if "lora" in ckpt:  # the base weights with the adapters merged in, and the adapters alone
        model, _ = load_model(trained["init_from"], dtype=torch.float32)
        lora = LoRA(model, trained["lora_rank"], trained["lora_alpha"])
        lora.load_state_dict(ckpt["lora"])
        lora.merge()
    else:
        model, lora = DiffusionLM(LLaDAConfig(**ckpt["model_config"])), None
        model.load_state_dict(ckpt["model"])
    save_model(model, out_dir, dtype=dtype)  # (it clears the directory's old weights)
    if lora is not None:
        (out_dir / ADAPTER).parent.mkdir(exist_ok=True)
        lora.save(out_dir / ADAPTER, dtype)
    # an adapted checkpoint keeps its own generation defaults (its stop ids), with what it was trained for over them
    base = Path(trained["init_from"]) / "generation_config.json" if "lora" in ckpt else None
    generation = {**(read_json(base) if base and base.exists() else {}), **{k: v for k, v in trained_for(trained).items() if v}}
    if generation:
        (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tok_dir = Path(ckpt["tokenizer_dir"])
    for name in TOKENIZER_FILES:
        src = run_dir / "tokenizer" / name
        if src.exists() or (tok_dir / name).exists():
            shutil.copyfile(src if src.exists() else tok_dir / name, out_dir / name)
    return out_dir


class _Stop:
    """Set by SIGTERM/SIGINT: the loop checkpoints and exits at the next step."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:  # noqa: ANN001
        self.requested = True


def train(cfg: TrainConfig, resume: bool = False, minutes: float | None = None, steps: int | None = None, progress: bool | None = None, log=print) -> dict:
    """Train (or continue) the run in cfg.out_dir; returns a summary dict.

    `minutes` / `steps` end this invocation early (with a checkpoint); the schedule still runs to
    cfg.max_steps over later `resume=True` calls.
    """
    device = device_of(cfg.device)
    out, data_dir = Path(cfg.out_dir), Path(cfg.data_dir)
    source = cfg.model_source()
    tok_dir = source or data_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        raise DataError(f"{tok_dir}/tokenizer.json not found (run `dllm prepare-data --out {data_dir}` first)")
    model_cfg = LLaDAConfig.from_dict(read_json(source / "config.json")) if source else cfg.model_config(tok_dir)
    ckpt_path = out / CHECKPOINT
    ckpt = None
    if ckpt_path.exists():
        if not resume:
            raise ConfigError(f"{ckpt_path} exists: pass --resume to continue it, or choose another out_dir")
        ckpt = load_checkpoint(ckpt_path)
        check_shape(ckpt["model_config"], model_cfg, ckpt_path)  # before anything is written
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tok = Tokenizer(tok_dir, model_cfg)
    sp = tok.special

    t0 = time.perf_counter()
    train_examples = repeat_sources([ex for name in cfg.train_files for ex in read_jsonl(data_dir / name)], cfg.source_repeats)
    train_examples = with_history(train_examples, cfg.history_copies, cfg.history_turns, cfg.seed)
    pad_to = max(cfg.block_sizes) if cfg.pad_to_block else None
    train_rows, dropped = encode_chat(tok, train_examples, cfg.reply_len, cfg.max_prompt_tokens, pad_to)
    eval_all, _ = encode_chat(tok, read_jsonl(data_dir / cfg.eval_file), cfg.reply_len, cfg.max_prompt_tokens, pad_to)
    if not train_rows:
        raise DataError(f"{data_dir}/{', '.join(cfg.train_files)}: no example fits reply_len={cfg.reply_len} / max_prompt_tokens={cfg.max_prompt_tokens}")
    stride = max(1, len(eval_all) // cfg.eval_examples) if cfg.eval_examples else 1
    eval_rows = sorted(eval_all[::stride][: cfg.eval_examples or None], key=len)
    eval_batches = list(iter_batches(eval_rows, 32, sp.pad, device))
    stream = Batches(train_rows, cfg.batch_tokens, cfg.max_batch_size, cfg.bucket_step, cfg.seed)
    pre_stream = None
    if cfg.pretrain_steps > 0:
        pre_rows = encode_utterances(tok, data_dir / "utterances.txt", cfg.pretrain_max_tokens)
        pre_stream = Batches(pre_rows, cfg.batch_tokens, cfg.max_batch_size, cfg.bucket_step, cfg.seed + 1)
    log(f"data: {len(train_rows)} train rows ({dropped} dropped as too long), {len(eval_rows)} eval rows, encoded in {time.perf_counter() - t0:.1f} s")

    model = init_model(model_cfg, cfg.init_std, cfg.seed)
    if cfg.init_from and (ckpt is None or cfg.lora_rank):  # a LoRA checkpoint holds the adapters, not the weights they adapt
        src = load_init(Path(cfg.init_from))
        # The same weights serve any attention pattern: a bidirectional model may go on block-causal.
        check_shape(src["model_config"], model_cfg, Path(cfg.init_from), ignore=("block_causal", "turn_blocks", "end_of_turn_token_id"))
        model.load_state_dict(src["model"])
        log(f"initialized from {cfg.init_from} (step {src.get('step')})")
    lora = None
    if cfg.lora_rank:
        model.requires_grad_(False)
        lora = LoRA(model, cfg.lora_rank, cfg.lora_alpha)
    model.to(device)
    trained = lora if lora is not None else model  # what the optimizer, checkpoints and best.pt hold
    opt = make_optimizer(trained, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, best, tokens_seen, elapsed_before = 0, math.inf, 0, 0.0
    if ckpt is not None:
        trained.load_state_dict(ckpt["lora" if lora is not None else "model"])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["rng"]["mask"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        stream.load_state_dict(ckpt["data"])
        if pre_stream is not None and ckpt.get("pretrain_data"):
            pre_stream.load_state_dict(ckpt["pretrain_data"])
        step, best, tokens_seen, elapsed_before = ckpt["step"], ckpt["best"], ckpt["tokens"], ckpt["train_seconds"]
        log(f"resumed {ckpt_path} at step {step} ({tokens_seen / 1e6:.1f}M tokens, best eval {best:.4f})")
    n_params = sum(p.numel() for p in model.parameters())
    if lora is not None:
        log(f"LoRA rank {cfg.lora_rank} on {len(lora.layers)} layers: {sum(p.numel() for p in lora.parameters()) / 1e6:.2f}M trained parameters")
    autocast = cfg.use_autocast()
    shape = {k: getattr(model_cfg, k) for k in ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "vocab_size")}
    log(f"model: {n_params / 1e6:.2f}M parameters {shape}; bf16 autocast {'on' if autocast else 'off'}; on {device} ({torch.get_num_threads()} CPU threads)")

    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer").mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).exists():
            shutil.copyfile(tok_dir / name, out / "tokenizer" / name)
    (out / "config.json").write_text(json.dumps({**dataclasses.asdict(cfg), "model_config": dataclasses.asdict(model_cfg)}, indent=2) + "\n")
    metrics = open(out / "metrics.jsonl", "a")

    def save() -> None:
        atomic_save(
            {
                "lora" if lora is not None else "model": trained.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "best": best,
                "tokens": tokens_seen,
                "train_seconds": elapsed_before + time.perf_counter() - t_start,
                "data": stream.state_dict(),
                "pretrain_data": pre_stream.state_dict() if pre_stream else None,
                "rng": {"mask": gen.get_state(), "torch": torch.get_rng_state(), "python": random.getstate()},
                "model_config": dataclasses.asdict(model_cfg),
                "train_config": dataclasses.asdict(cfg),
                "tokenizer_dir": str(tok_dir),
            },
            ckpt_path,
        )

    def evaluate() -> dict[str, float]:
        nonlocal best
        ev = eval_loss(model, eval_batches, sp.mask, cfg.eval_ratios, sp.eos, autocast=autocast)
        ev.update(prompt_gain(model, eval_rows, sp.mask, sp.eos, sp.pad, autocast=autocast, own=ev.get("reply_loss@1")))
        if ev["loss"] < best:
            best = ev["loss"]
            atomic_save({"lora" if lora is not None else "model": trained.state_dict(), "step": step, "eval": ev, "model_config": dataclasses.asdict(model_cfg)}, out / BEST)
        metrics.write(json.dumps({"step": step, "tokens": tokens_seen, "eval": ev}) + "\n")
        metrics.flush()
        return ev

    limit_min = minutes if minutes is not None else cfg.max_minutes
    stop = _Stop()
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)} if _main_thread() else {}
    show_bar = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not show_bar, dynamic_ncols=True, desc="train")
    t_start = last_ckpt = last_log = time.perf_counter()
    log_loss, log_n, log_tokens = 0.0, 0, 0
    reason = "max_steps"
    stop_step = cfg.max_steps if steps is None else min(cfg.max_steps, step + steps)
    model.train()
    try:
        while step < stop_step:
            if stop.requested:
                reason = "signal"
                break
            if limit_min and time.perf_counter() - t_start > limit_min * 60:
                reason = "minutes"
                break
            src = pre_stream if pre_stream is not None and step < cfg.pretrain_steps else stream
            batch = collate(next(src), sp.pad, device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                block = cfg.block_sizes[int(torch.randint(len(cfg.block_sizes), (1,), generator=gen))] if cfg.block_sizes else None
                certainty = cfg.certainty_weight if step >= cfg.certainty_from_step else 0.0
                loss = diffusion_loss(model, batch, sp.mask, cfg.eps, gen, block, sp.eos, cfg.loss_weighting, certainty, cfg.complementary_masks, cfg.drafting_ar_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(trained.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            n_tok = int(batch["key_valid"].sum())
            tokens_seen += n_tok
            log_loss, log_n, log_tokens = log_loss + loss.item(), log_n + 1, log_tokens + n_tok
            now = time.perf_counter()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{log_tokens / max(now - last_log, 1e-9):.0f}", refresh=False)
            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                rec = {"step": step, "loss": log_loss / log_n, "lr": lr_at(step - 1, cfg), "tok_s": log_tokens / (now - last_log), "tokens": tokens_seen, "elapsed_min": (elapsed_before + now - t_start) / 60}
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                if not show_bar:
                    log(f"step {step} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | {rec['tok_s']:.0f} tok/s | {tokens_seen / 1e6:.2f}M tokens | {rec['elapsed_min']:.1f} min")
                log_loss, log_n, log_tokens, last_log = 0.0, 0, 0, time.perf_counter()
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                ev = evaluate()
                log(f"eval step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in ev.items()) + f" | best {best:.4f}")
                last_log = time.perf_counter()
            if time.perf_counter() - last_ckpt > cfg.checkpoint_minutes * 60:
                save()
                last_ckpt = time.perf_counter()
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    save()
    metrics.close()
    if reason == "max_steps" and step < cfg.max_steps:
        reason = "steps"
    log(f"stopped at step {step} ({reason}); checkpoint {ckpt_path}")
    if step >= cfg.max_steps:
        export(out, out / "model")
        log(f"exported the best weights to {out / 'model'}")
    return {"step": step, "best": best, "tokens": tokens_seen, "reason": reason, "out_dir": str(out)}


def _main_thread() -> bool:
    """Signal handlers can only be set from the main thread."""
    return threading.current_thread() is threading.main_thread()
