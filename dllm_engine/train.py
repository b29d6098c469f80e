"""Train the default model: `dllm train --config CONFIG [--resume] [--minutes M]`, `dllm export`.

Objective (LLaDA SFT, see `diffusion_loss`): a training row is the chat-template prompt (history
ending with the assistant header), never masked, followed by a reply region of `reply_len` tokens:
the reply, <|eot_id|>, then <|endoftext|> padding. Per row t ~ U(eps, 1); each reply-region token
is replaced by the mask token with probability t; the loss is the cross-entropy on masked tokens
weighted 1/t and normalized by the reply-region length, averaged over rows (`loss_weighting =
"mean"`: the plain mean CE over masked tokens). An optional first phase
(`pretrain_steps`) trains the same way on plain utterances (BOS, then utterance + EOS as the region).

`source_repeats` weights corpora (an example's `source` from `dllm prepare-data`; 0 leaves one out); `device` says
where to train (`cuda` trained the shipped stage 22 on an H200: `configs/default-stage22.toml`). Rows are bucketed by length
(right-padded within a batch, padded keys masked with `key_valid`), the learning rate warms up
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

import argparse
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import ConfigError, LLaDAConfig
from .data import DataError
from .loading import _cpu_has_bf16, save_model
from .model import DiffusionLM
from .tokenizer import Tokenizer

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
LOSS_WEIGHTINGS = ("elbo", "mean")
MODEL_KEYS = {f.name for f in dataclasses.fields(LLaDAConfig)} - {"mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id", "end_of_turn_token_id"}


# ---- configuration ------------------------------------------------------------------------------


PATH_KEYS = ("data_dir", "out_dir", "init_from")


def read_config_file(path: Path, extended_by: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A TOML config's keys over those of the config its `extends` names, so that a stage of a
    recipe states only what it changes. Tables (`[model]`, `[source_repeats]`) merge key by key;
    relative paths are relative to the file that sets them."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path} is not valid TOML: {e}") from None
    for key in PATH_KEYS:
        if isinstance(raw.get(key), str) and raw[key]:
            raw[key] = str((path.parent / raw[key]).resolve())
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"config {path}: extends must name a config file, got {base!r}")
    chain, base_path = extended_by + (path.resolve(),), (path.parent / base).resolve()
    if base_path in chain:
        raise ConfigError(f"config {path}: extends {base} in a cycle")
    merged = read_config_file(base_path, chain)
    for key, value in raw.items():
        both_tables = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = {**merged[key], **value} if both_tables else value
    return merged


@dataclasses.dataclass
class TrainConfig:
    """Top-level keys of the TOML file; the `[model]` table holds LLaDA config.json field names.
    `extends = "other.toml"` takes another config's keys first (`read_config_file`)."""

    data_dir: str
    out_dir: str
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    threads: int = 2  # torch intra-op threads (0: torch's default)
    device: str = "cpu"  # cpu, cuda, cuda:1 ... (checkpoints are written device-independent)
    autocast_bf16: str | bool = "auto"  # auto: only where the CPU has native bf16 (avx512_bf16/amx)
    # data
    reply_len: int = 64  # reply + <|eot_id|> + EOS padding; longer replies are cut at a sentence end or dropped
    max_prompt_tokens: int = 192  # older history turns are dropped (in user/assistant pairs) beyond this
    batch_tokens: int = 8192  # padded tokens per batch; batch size = batch_tokens // bucket length
    max_batch_size: int = 128
    # files of data_dir read as training examples (`distilled.jsonl` from `dllm distill`: teacher replies)
    train_files: list[str] = dataclasses.field(default_factory=lambda: ["train.jsonl"])
    # {"chatterbot" = 20}: examples of that corpus (or of any file under it, `chatterbot/food`) are
    # seen that many times per epoch. A small, strongly prompt-dependent corpus among open chit-chat.
    source_repeats: dict[str, int] = dataclasses.field(default_factory=dict)
    # Multi-turn copies (`with_history`): each example is seen `history_copies` more times, each after
    # 1..`history_turns` earlier exchanges drawn from the other examples. Teacher pairs are one turn
    # deep; a call's history is not, and a model that never saw one stops ending its replies after it.
    history_copies: int = 0
    history_turns: int = 3
    # the held-out file of data_dir that eval loss and best.pt follow: a model trained on teacher
    # replies is judged on teacher replies (`dllm distill --split eval` writes distilled-eval.jsonl)
    eval_file: str = "eval.jsonl"
    bucket_step: int = 16  # length buckets are multiples of this
    # optimisation
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 500
    max_steps: int = 100_000  # cosine horizon and the end of the run
    max_minutes: float = 0.0  # stop (checkpoint and exit) after this many minutes of one invocation; 0: no limit
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eps: float = 1e-3  # t ~ U(eps, 1)
    # "elbo": LLaDA's CE / t (an unbiased bound, but a row with t near eps weighs 1/eps: noisy small
    # batches); "mean": the plain mean CE over masked tokens (MaskGIT-style, low-variance).
    loss_weighting: str = "elbo"
    # Certainty forcing (dParallel, Chen et al. 2025): + weight x the entropy of every scored
    # position the model already predicts right. Threshold decoding commits only what is >= tau
    # confident, so a model that is right but unsure still decodes one token per forward.
    certainty_weight: float = 0.0
    # Block-diffusion masking (see `diffusion_loss`): block sizes drawn per batch; [] = plain LLaDA SFT.
    block_sizes: list[int] = dataclasses.field(default_factory=list)
    init_std: float = 0.02
    init_from: str = ""  # start from another run's checkpoint/best .pt or a model directory (same shape), not from random
    # optional pretraining on plain utterances (the first pretrain_steps steps of the schedule)
    pretrain_steps: int = 0
    pretrain_max_tokens: int = 96
    # evaluation and checkpoints
    eval_interval: int = 500  # steps
    eval_examples: int = 1000  # held-out examples used (an evenly spaced, fixed subset)
    eval_ratios: list[float] = dataclasses.field(default_factory=lambda: [0.25, 0.5, 0.75])
    checkpoint_minutes: float = 10.0
    log_interval: int = 50  # steps between log lines (the tqdm bar updates every step)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        missing = [k for k in ("data_dir", "out_dir") if k not in raw]
        if missing:
            raise ConfigError(f"config lacks required key(s): {', '.join(missing)}")
        model = raw.get("model", {})
        if not isinstance(model, dict):
            raise ConfigError("[model] must be a table of LLaDA config fields")
        bad = sorted(set(model) - MODEL_KEYS)
        if bad:
            raise ConfigError(f"unknown [model] key(s): {', '.join(bad)} (LLaDA field names: {', '.join(sorted(MODEL_KEYS))})")
        cfg = cls(**raw)
        for name in ("reply_len", "batch_tokens", "max_steps", "eval_interval", "log_interval", "bucket_step", "max_batch_size"):
            if getattr(cfg, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.history_copies < 0 or cfg.history_turns < 1:
            raise ConfigError(f"history_copies must be >= 0 and history_turns >= 1, got {cfg.history_copies} and {cfg.history_turns}")
        if not isinstance(cfg.source_repeats, dict) or any(not isinstance(n, int) or n < 0 for n in cfg.source_repeats.values()):
            raise ConfigError(f"source_repeats must map corpus names to counts >= 0, got {cfg.source_repeats!r}")
        if not cfg.train_files or not all(isinstance(n, str) and n for n in cfg.train_files):
            raise ConfigError(f"train_files must list file names in data_dir, got {cfg.train_files!r}")
        if not isinstance(cfg.eval_file, str) or not cfg.eval_file:
            raise ConfigError(f"eval_file must name a file in data_dir, got {cfg.eval_file!r}")
        if any(not isinstance(b, int) or b < 1 for b in cfg.block_sizes):
            raise ConfigError(f"block_sizes must be positive integers, got {cfg.block_sizes}")
        if not 0 < cfg.eps < 1:
            raise ConfigError(f"eps must be in (0, 1), got {cfg.eps}")
        if not cfg.certainty_weight >= 0:
            raise ConfigError(f"certainty_weight must be >= 0, got {cfg.certainty_weight}")
        if cfg.loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {cfg.loss_weighting!r}")
        try:
            torch.device(cfg.device)  # whether this machine has it is train()'s question: a GPU config parses anywhere
        except RuntimeError as e:
            raise ConfigError(f"device {cfg.device!r}: {e}") from None
        if cfg.autocast_bf16 not in ("auto", True, False):
            raise ConfigError(f"autocast_bf16 must be auto, true or false, got {cfg.autocast_bf16!r}")
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        raw = read_config_file(path)  # its errors name the file they are about
        try:
            return cls.from_dict(raw)
        except (TypeError, ConfigError) as e:
            raise ConfigError(f"config {path}: {e}") from None

    def use_autocast(self) -> bool:
        if self.autocast_bf16 != "auto":
            return bool(self.autocast_bf16)
        return torch.cuda.is_bf16_supported() if torch.device(self.device).type == "cuda" else _cpu_has_bf16()

    def model_config(self, tokenizer_dir: Path) -> LLaDAConfig:
        """The LLaDA config: `[model]` plus the vocabulary size and special ids of the tokenizer."""
        from tokenizers import Tokenizer as HFTokenizer

        n_vocab = HFTokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
        fields = dict(self.model)
        if fields.setdefault("vocab_size", n_vocab) < n_vocab:
            raise ConfigError(f"[model] vocab_size={fields['vocab_size']} is smaller than the tokenizer's {n_vocab} tokens")
        cfg = LLaDAConfig(**fields)
        tok = Tokenizer(tokenizer_dir, cfg)
        s = tok.special
        return dataclasses.replace(cfg, mask_token_id=s.mask, eos_token_id=s.eos, pad_token_id=s.pad, bos_token_id=s.bos, end_of_turn_token_id=s.end_of_turn)


# ---- data ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    prompt: Sequence[int]  # never masked
    region: Sequence[int]  # maskable: reply + eot + EOS padding (or an utterance + EOS)

    @classmethod
    def compact(cls, prompt: list[int], region: list[int]) -> "Row":
        """Stored as int32 arrays: 125k rows of Python int lists would take gigabytes."""
        return cls(np.asarray(prompt, dtype=np.int32), np.asarray(region, dtype=np.int32))

    def __len__(self) -> int:
        return len(self.prompt) + len(self.region)


def read_jsonl(path: Path) -> list[dict]:
    """Chat examples; an empty file or a malformed line is a DataError naming file and line."""
    if not path.exists():
        raise DataError(f"{path}: not found (run `dllm prepare-data` first)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: malformed JSON line: {e}") from None
            msgs = ex.get("messages") if isinstance(ex, dict) else None
            if (
                not isinstance(msgs, list)
                or not msgs
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)
                or not isinstance(ex.get("reply"), str)
            ):
                raise DataError(f"{path}:{n}: expected {{\"messages\": [{{\"role\": str, \"content\": str}}, ...], \"reply\": str}}")
            rows.append(ex)
    if not rows:
        raise DataError(f"{path}: no examples (the file is empty)")
    return rows


def repeat_sources(examples: list[dict], repeats: dict[str, int]) -> list[dict]:
    """Each example as many times as `repeats` says for its source (or a parent of it; 0: left out), else once."""
    def times(source: str) -> int:
        parts = source.split("/")
        return next((repeats[p] for p in ("/".join(parts[:k]) for k in range(len(parts), 0, -1)) if p in repeats), 1)

    return [ex for ex in examples for _ in range(times(ex.get("source", "")))]


def with_history(examples: list[dict], copies: int, turns: int, seed: int) -> list[dict]:
    """The examples, then `copies` more of each whose messages start with 1..`turns` exchanges
    (a user turn and its reply) drawn from the examples' own last turns: the model learns to answer
    the last turn after a history, as a voice call gives it. Deterministic in `seed`."""
    if not copies:
        return examples
    rng = random.Random(seed)
    exchanges = [(ex["messages"][-1]["content"], ex["reply"]) for ex in examples if ex["messages"][-1]["role"] == "user"]
    out = list(examples)
    for _ in range(copies):
        for ex in examples:
            history = [{"role": role, "content": text} for pair in rng.choices(exchanges, k=rng.randint(1, turns)) for role, text in zip(("user", "assistant"), pair)]
            out.append({**ex, "messages": history + ex["messages"]})
    return out


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def fit_reply(tok: Tokenizer, reply: str, budget: int) -> list[int] | None:
    """Reply token ids within `budget` tokens: whole, else cut after its last fitting sentence."""
    ids = tok.encode(reply)
    if len(ids) <= budget:
        return ids
    sentences = _SENTENCE_END.split(reply)
    for k in range(len(sentences) - 1, 0, -1):
        ids = tok.encode(" ".join(sentences[:k]))
        if len(ids) <= budget:
            return ids
    return None


def encode_chat(tok: Tokenizer, examples: list[dict], reply_len: int, max_prompt_tokens: int) -> tuple[list[Row], int]:
    """Rows for chat examples, and how many were dropped (reply or last user turn too long).

    Prompts over `max_prompt_tokens` lose their oldest user/assistant pairs. For speed each distinct
    message is tokenized once and prompts are assembled from the pieces; `_piece_ids` checks on a
    sample that this equals tokenizing the whole rendered template.
    """
    eot, eos = tok.special.end_of_turn, tok.special.eos
    if eot is None:
        raise ConfigError("the tokenizer has no end-of-turn token (<|eot_id|>)")
    piece, head, tail = _piece_ids(tok, examples)
    texts = list(dict.fromkeys(ex["reply"] for ex in examples))  # repeated sources: fit each reply once
    fitted = {text: ids if len(ids) <= reply_len - 1 else fit_reply(tok, text, reply_len - 1) for text, ids in zip(texts, _encode_batch(tok, texts))}
    rows, dropped = [], 0
    for ex in examples:
        reply = fitted[ex["reply"]]
        msgs = [piece[(m["role"], m["content"])] for m in ex["messages"]]
        while len(head) + sum(map(len, msgs)) + len(tail) > max_prompt_tokens and len(msgs) > 2:
            msgs = msgs[2:]  # drop the oldest user/assistant pair; the history still starts with the user
        prompt = head + [t for m in msgs for t in m] + tail
        if reply is None or len(prompt) > max_prompt_tokens:
            dropped += 1
            continue
        region = reply + [eot] + [eos] * (reply_len - 1 - len(reply))
        rows.append(Row.compact(prompt, region))
    return rows, dropped


def _piece_ids(tok: Tokenizer, examples: list[dict]) -> tuple[dict[tuple[str, str], list[int]], list[int], list[int]]:
    """Token ids of each distinct (role, content) message as the chat template renders it, and of
    what the template puts before the first message (BOS) and after the last (assistant header)."""
    one = tok.render_chat([{"role": "user", "content": "x"}], add_generation_prompt=False)
    both = tok.render_chat([{"role": "user", "content": "x"}], add_generation_prompt=True)
    bos_text = tok.bos_token if tok.bos_token and one.startswith(tok.bos_token) else ""
    head, tail = tok.encode(bos_text), tok.encode(both[len(one) :])
    keys = list(dict.fromkeys((m["role"], m["content"]) for ex in examples for m in ex["messages"]))
    texts = [tok.render_chat([{"role": r, "content": c}], add_generation_prompt=False)[len(bos_text) :] for r, c in keys]
    piece = dict(zip(keys, _encode_batch(tok, texts)))
    for ex in examples[:: max(1, len(examples) // 50)]:  # the assembly must equal the real template
        whole = tok.apply_chat_template(ex["messages"])
        if whole != head + [t for m in ex["messages"] for t in piece[(m["role"], m["content"])]] + tail:
            raise ConfigError("the chat template does not tokenize message by message; cannot assemble prompts")
    return piece, head, tail


def _encode_batch(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """`tok.encode` for many texts at once (the Rust tokenizer encodes them in parallel)."""
    return [e.ids for e in tok._tok.encode_batch(texts, add_special_tokens=False)]


def read_utterances(path: Path) -> list[str]:
    """utterances.txt's non-empty lines; a missing or empty file is a DataError."""
    if not path.exists():
        raise DataError(f"{path}: not found (run `dllm prepare-data` first)")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"{path}: no utterances (the file is empty)")
    return lines


def encode_utterances(tok: Tokenizer, path: Path, max_tokens: int) -> list[Row]:
    lines = read_utterances(path)
    bos = [tok.special.bos] if tok.special.bos is not None else []
    rows = []
    for ids in _encode_batch(tok, lines):
        rows.append(Row.compact(bos, ids[: max_tokens - 1] + [tok.special.eos]))
    return rows


class Batches:
    """Length-bucketed batches over `rows`, reshuffled every epoch from (seed, epoch) alone.

    Its position (epoch, index) is all that a checkpoint needs to continue the same sequence.
    """

    def __init__(self, rows: list[Row], batch_tokens: int, max_batch: int, bucket_step: int, seed: int) -> None:
        self.rows, self.seed = rows, seed
        self.batch_tokens, self.max_batch, self.bucket_step = batch_tokens, max_batch, bucket_step
        self.epoch, self.index = 0, 0
        self._plan: list[list[int]] | None = None

    def plan(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        buckets: dict[int, list[int]] = {}
        for i, r in enumerate(self.rows):
            buckets.setdefault(-(-len(r) // self.bucket_step) * self.bucket_step, []).append(i)
        batches = []
        for length, idx in sorted(buckets.items()):
            rng.shuffle(idx)
            size = max(1, min(self.max_batch, self.batch_tokens // length))
            batches += [idx[i : i + size] for i in range(0, len(idx), size)]
        rng.shuffle(batches)
        return batches

    def __next__(self) -> list[Row]:
        if self._plan is None:
            self._plan = self.plan(self.epoch)
        if self.index >= len(self._plan):
            self.epoch, self.index = self.epoch + 1, 0
            self._plan = self.plan(self.epoch)
        batch = self._plan[self.index]
        self.index += 1
        return [self.rows[i] for i in batch]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index, self._plan = state["epoch"], state["index"], None


def collate(rows: list[Row], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """ids (N, T) right-padded; region (N, T) marks maskable tokens; key_valid (N, T) real tokens."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    region = torch.zeros((len(rows), t), dtype=torch.bool)
    key_valid = torch.zeros((len(rows), t), dtype=torch.bool)
    for i, r in enumerate(rows):
        p, n = len(r.prompt), len(r)
        ids[i, :n] = torch.from_numpy(np.concatenate([r.prompt, r.region]).astype(np.int64))
        region[i, p:n] = True
        key_valid[i, :n] = True
    return {"ids": ids.to(device), "region": region.to(device), "key_valid": key_valid.to(device)}


# ---- objective ----------------------------------------------------------------------------------


def denoise_hidden(model: DiffusionLM, noisy: torch.Tensor, batch: dict[str, torch.Tensor], block_size: int | None = None) -> torch.Tensor:
    """Hidden states (N, T, d) for the partly masked `noisy` ids of a collated batch.

    A bidirectional model: one plain forward. A block-causal one (`LLaDAConfig.block_causal`):
    every reply block's loss in one forward (BD3-LM's vectorized training) over [prompt, clean
    reply, noisy reply], where the prompt sees itself (with `turn_blocks`, each turn itself and
    the turns before it), a clean block the prompt and the clean blocks up to it, and a noisy block
    the prompt, the clean blocks before it and itself: what decoding meets at each block. The noisy
    copy's states come back at the reply's positions. `block_size` None: the whole reply is one block.
    """
    ids, region, key_valid = batch["ids"], batch["region"], batch["key_valid"]
    if not model.config.block_causal:
        return model(noisy, key_valid=key_valid)
    n, t = ids.shape
    dev = ids.device
    start, length = region.long().argmax(1), region.sum(1)  # each row's reply span
    r = int(length.max())
    j = torch.arange(r, device=dev)
    src = (start[:, None] + j).clamp(max=t - 1)
    in_reply = j < length[:, None]
    block = block_size or t
    zeros = torch.zeros((n, r), dtype=torch.bool, device=dev)
    prompt = torch.cat([key_valid & ~region, zeros], 1)
    clean = torch.cat([region, zeros], 1)
    noise = torch.cat([torch.zeros_like(region), in_reply], 1)
    valid = torch.cat([key_valid, in_reply], 1)
    blk = torch.cat([(torch.arange(t, device=dev) - start[:, None]).clamp(min=0) // block, (j // block).expand(n, r)], 1)
    q, k = (lambda x: x[:, :, None]), (lambda x: x[:, None, :])
    before, same = k(blk) < q(blk), k(blk) == q(blk)
    if model.config.turn_blocks:  # a prompt position sees the turns up to its own
        ends = (ids == model.config.end_of_turn_token_id) & ~region
        turn = torch.cat([ends.cumsum(1) - ends.long(), zeros.long()], 1)
        sees_prompt = k(prompt) & (~q(prompt) | (k(turn) <= q(turn)))
    else:
        sees_prompt = k(prompt)
    sees = sees_prompt | (k(clean) & ~q(prompt) & (before | (same & q(clean)))) | (k(noise) & q(noise) & same)
    attn = (sees | ~q(valid)) & k(valid)  # padding queries see every real key: no empty softmax row
    pos = torch.cat([torch.arange(t, device=dev).expand(n, t), src], 1)
    hidden = model(torch.cat([ids, noisy.gather(1, src)], 1), pos, attn)
    return hidden[:, :t].masked_scatter(region[..., None], hidden[:, t:][in_reply])


def diffusion_loss(
    model: DiffusionLM,
    batch: dict[str, torch.Tensor],
    mask_id: int,
    eps: float,
    gen: torch.Generator,
    block_size: int | None = None,
    eos_id: int | None = None,
    weighting: str = "elbo",
    certainty: float = 0.0,
) -> torch.Tensor:
    """LLaDA SFT loss: mask each region token w.p. t ~ U(eps, 1); CE on masked tokens / t / region length.
    With `weighting="mean"`, the mean CE over all masked tokens of the batch instead.

    A block-causal model is scored on every block at once with `block_size` its attention blocks
    (`denoise_hidden`), each token masked w.p. t. For a bidirectional one, with `block_size`, the
    noise is the one semi-autoregressive decoding meets instead: per row a
    block-aligned window of the region up to the block holding the first EOS is drawn; tokens
    before it are clean, tokens after it fully masked, and inside it each token is masked w.p. t.
    The loss covers the window's masked tokens (weighted 1/t, normalized by the block size). A small
    model learns the distribution it is decoded from much faster than the whole-reply one.

    `certainty` > 0 adds that multiple of the predictive entropy at each scored position whose
    argmax is already the target (TrainConfig.certainty_weight), weighted like its cross-entropy.
    """
    ids, region = batch["ids"], batch["region"]
    n = ids.shape[0]
    dev = ids.device  # random draws come from the CPU generator: the same masks on any device
    t = (eps + (1 - eps) * torch.rand(n, 1, generator=gen)).to(dev)
    coin = torch.rand(ids.shape, generator=gen).to(dev) < t
    if block_size is None or model.config.block_causal:
        masked = region & coin
        scored, norm = masked, region.sum(1, keepdim=True)
    else:
        at = torch.cumsum(region, 1) - 1  # position within the region
        eos = region & (ids == eos_id)
        first_eos = torch.where(eos.any(1), torch.where(eos, at, ids.shape[1]).min(1).values, region.sum(1) - 1)
        n_blocks = first_eos // block_size + 1
        start = (torch.rand(n, generator=gen).to(dev) * n_blocks).long().clamp(max=n_blocks - 1)[:, None] * block_size
        window = region & (at >= start) & (at < start + block_size)
        masked = (window & coin) | (region & (at >= start + block_size))
        scored, norm = window & coin, torch.full((n, 1), block_size, device=dev)
    noisy = torch.where(masked, mask_id, ids)
    hidden = denoise_hidden(model, noisy, batch, block_size)
    logp = model.logits(hidden[scored]).float().log_softmax(-1)
    ce = F.nll_loss(logp, ids[scored], reduction="none")  # = cross_entropy, with logp kept for the entropy
    if certainty:
        right = logp.argmax(-1) == ids[scored]
        ce = ce + certainty * right * -(logp.exp() * logp).sum(-1)
    if weighting == "mean":
        return ce.sum() / max(ce.numel(), 1)
    weight = (1 / t / norm).expand_as(ids)[scored]
    return (ce * weight).sum() / n


@torch.no_grad()
def eval_loss(model: DiffusionLM, batches: list[dict[str, torch.Tensor]], mask_id: int, ratios: list[float], eos_id: int, seed: int = 1234, autocast: bool = False) -> dict[str, float]:
    """Mean CE per masked token at fixed mask ratios (same masks every call).

    `loss@r` averages over all masked region tokens (EOS padding included, as trained);
    `reply_loss@r` over masked reply tokens only (the reply and its end of turn, not the padding).
    A block-causal model sees the reply as one block here, the nearest to a bidirectional one's view.
    """
    was_training = model.training
    model.eval()
    out = {}
    for r in ratios:
        gen = torch.Generator().manual_seed(seed)
        tot = tot_reply = 0.0
        cnt = cnt_reply = 0
        for b in batches:
            ids, region = b["ids"], b["region"]
            masked = region & (torch.rand(ids.shape, generator=gen).to(ids.device) < r)
            with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
                hidden = denoise_hidden(model, torch.where(masked, mask_id, ids), b)
                ce = F.cross_entropy(model.logits(hidden[masked]).float(), ids[masked], reduction="none")
            reply = ids[masked] != eos_id
            tot, cnt = tot + ce.sum().item(), cnt + ce.numel()
            tot_reply, cnt_reply = tot_reply + ce[reply].sum().item(), cnt_reply + int(reply.sum())
        out[f"loss@{r:g}"] = tot / max(cnt, 1)
        out[f"reply_loss@{r:g}"] = tot_reply / max(cnt_reply, 1)
    out["loss"] = sum(out[f"loss@{r:g}"] for r in ratios) / len(ratios)
    model.train(was_training)
    return out


def prompt_gain(model: DiffusionLM, rows: list[Row], mask_id: int, eos_id: int, pad_id: int, autocast: bool = False, own: float | None = None) -> dict[str, float]:
    """How much the prompt helps: the fully masked reply loss with each row's own prompt, with
    another row's (a fixed shuffle), and their difference. 0 means the model ignores the prompt.

    `own`: the first of these when the caller has it already (`eval_loss` at ratio 1.0 over the
    same rows sorted by length, in batches of 32: the same batches, the same value)."""
    regions = [r.region for r in rows]
    random.Random(0).shuffle(regions)
    swapped = [Row(r.prompt, region) for r, region in zip(rows, regions)]
    device = next(model.parameters()).device

    def fully_masked(rs: list[Row]) -> float:
        return eval_loss(model, list(iter_batches(sorted(rs, key=len), 32, pad_id, device)), mask_id, [1.0], eos_id, autocast=autocast)["reply_loss@1"]

    own = fully_masked(rows) if own is None else own
    other = fully_masked(swapped)
    return {"reply_loss@1": own, "reply_loss@1_other_prompt": other, "prompt_gain": other - own}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to lr, then a cosine down to min_lr_ratio * lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- model, checkpoints, export -----------------------------------------------------------------


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


def make_optimizer(model: DiffusionLM, cfg: TrainConfig) -> torch.optim.AdamW:
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
    from .loading import load_model

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


def export(run_dir: str | Path, out_dir: str | Path, which: str = "best", dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the run's best (or last) weights as a HF-layout model dir with the tokenizer files, and
    a generation_config.json with the reply region (`max_new_tokens`) and prompt length
    (`max_prompt_tokens`) it was trained on: on a longer canvas the model does not fill the rest
    with EOS, and after a longer history it loses the thread (the agent trims its history to it)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    ckpt_path = run_dir / CHECKPOINT
    if not ckpt_path.exists():
        raise ConfigError(f"no {CHECKPOINT} in {run_dir}")
    ckpt = load_checkpoint(ckpt_path)
    state = ckpt["model"]
    if which == "best" and (run_dir / BEST).exists():
        best = load_checkpoint(run_dir / BEST)
        if best.get("model_config") == ckpt["model_config"]:
            state = best["model"]
    model = DiffusionLM(LLaDAConfig(**ckpt["model_config"]))
    model.load_state_dict(state)
    save_model(model, out_dir, dtype=dtype)
    trained = ckpt.get("train_config", {})
    limits = {"max_new_tokens": trained.get("reply_len"), "max_prompt_tokens": trained.get("max_prompt_tokens")}
    if any(limits.values()):
        (out_dir / "generation_config.json").write_text(json.dumps({k: v for k, v in limits.items() if v}, indent=2) + "\n")
    tok_dir = Path(ckpt["tokenizer_dir"])
    for name in TOKENIZER_FILES:
        src = run_dir / "tokenizer" / name
        shutil.copyfile(src if src.exists() else tok_dir / name, out_dir / name)
    return out_dir


# ---- the training loop --------------------------------------------------------------------------


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
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {cfg.device!r}: CUDA is not available on this machine")
    out, data_dir = Path(cfg.out_dir), Path(cfg.data_dir)
    tok_dir = data_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        raise DataError(f"{tok_dir}/tokenizer.json not found (run `dllm prepare-data --out {data_dir}` first)")
    model_cfg = cfg.model_config(tok_dir)
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
    train_rows, dropped = encode_chat(tok, train_examples, cfg.reply_len, cfg.max_prompt_tokens)
    eval_all, _ = encode_chat(tok, read_jsonl(data_dir / cfg.eval_file), cfg.reply_len, cfg.max_prompt_tokens)
    if not train_rows:
        raise DataError(f"{data_dir}/{', '.join(cfg.train_files)}: no example fits reply_len={cfg.reply_len} / max_prompt_tokens={cfg.max_prompt_tokens}")
    stride = max(1, len(eval_all) // cfg.eval_examples) if cfg.eval_examples else 1
    eval_rows = sorted(eval_all[::stride][: cfg.eval_examples or None], key=len)
    device = torch.device(cfg.device)
    eval_batches = list(iter_batches(eval_rows, 32, sp.pad, device))
    stream = Batches(train_rows, cfg.batch_tokens, cfg.max_batch_size, cfg.bucket_step, cfg.seed)
    pre_stream = None
    if cfg.pretrain_steps > 0:
        pre_rows = encode_utterances(tok, data_dir / "utterances.txt", cfg.pretrain_max_tokens)
        pre_stream = Batches(pre_rows, cfg.batch_tokens, cfg.max_batch_size, cfg.bucket_step, cfg.seed + 1)
    log(f"data: {len(train_rows)} train rows ({dropped} dropped as too long), {len(eval_rows)} eval rows, encoded in {time.perf_counter() - t0:.1f} s")

    model = init_model(model_cfg, cfg.init_std, cfg.seed)
    if cfg.init_from and ckpt is None:
        src = load_init(Path(cfg.init_from))
        # The same weights serve any attention pattern: a bidirectional model may go on block-causal.
        check_shape(src["model_config"], model_cfg, Path(cfg.init_from), ignore=("block_causal", "turn_blocks", "end_of_turn_token_id"))
        model.load_state_dict(src["model"])
        log(f"initialized from {cfg.init_from} (step {src.get('step')})")
    model.to(device)
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, best, tokens_seen, elapsed_before = 0, math.inf, 0, 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
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
    autocast = cfg.use_autocast()
    shape = {k: getattr(model_cfg, k) for k in ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "vocab_size")}
    log(f"model: {n_params / 1e6:.2f}M parameters {shape}; bf16 autocast {'on' if autocast else 'off'}; on {device} ({torch.get_num_threads()} CPU threads)")

    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer").mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tok_dir / name, out / "tokenizer" / name)
    (out / "config.json").write_text(json.dumps({**dataclasses.asdict(cfg), "model_config": dataclasses.asdict(model_cfg)}, indent=2) + "\n")
    metrics = open(out / "metrics.jsonl", "a")

    def save() -> None:
        atomic_save(
            {
                "model": model.state_dict(),
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
            atomic_save({"model": model.state_dict(), "step": step, "eval": ev, "model_config": dataclasses.asdict(model_cfg)}, out / BEST)
        metrics.write(json.dumps({"step": step, "tokens": tokens_seen, "eval": ev}) + "\n")
        metrics.flush()
        return ev

    limit_min = minutes if minutes is not None else cfg.max_minutes
    stop = _Stop()
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)} if _main_thread() else {}
    show_bar = sys.stderr.isatty() if progress is None else progress
    from tqdm import tqdm

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
                loss = diffusion_loss(model, batch, sp.mask, cfg.eps, gen, block, sp.eos, cfg.loss_weighting, cfg.certainty_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
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
    import threading

    return threading.current_thread() is threading.main_thread()


# ---- a tiny model for tests ---------------------------------------------------------------------

TINY_MODEL = dict(d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=128, max_sequence_length=256)


def tiny_model(out_dir: str | Path, pairs: list[tuple[str, str]], steps: int = 600, **overrides: Any) -> Path:
    """Train a tiny model on fixed (prompt, reply) pairs and export it; returns the model directory.

    Deterministic (fixed seed); about 8 s on 2 CPU cores for 600 steps, after which six short pairs
    are answered verbatim with greedy threshold/dual-cache decoding and end with <|eot_id|>.
    The pairs are both train and eval data; reply_len 32 (decode with block_size 32,
    max_new_tokens 32). `overrides` are TrainConfig keys (e.g. seed, lr, model).
    Layout under out_dir: data/ (corpus + tokenizer), run/ (checkpoints), model/ (the fp32 export).
    """
    from .bpe import train_tokenizer

    out_dir = Path(out_dir)
    data = out_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"messages": [{"role": "user", "content": q}], "reply": a}) for q, a in pairs]
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    (data / "eval.jsonl").write_text("\n".join(lines) + "\n")
    (data / "utterances.txt").write_text("\n".join(t for p in pairs for t in p) + "\n")
    train_tokenizer([t for p in pairs for t in p] * 4, 512, data / "tokenizer")
    raw = dict(
        data_dir=str(data),
        out_dir=str(out_dir / "run"),
        model=dict(TINY_MODEL),
        reply_len=32,
        batch_tokens=2048,
        max_batch_size=16,
        lr=3e-3,
        warmup_steps=20,
        max_steps=steps,
        eval_interval=max(1, steps // 4),
        log_interval=max(1, steps // 10),
        threads=0,
        autocast_bf16=False,
    )
    raw.update(overrides)
    cfg = TrainConfig.from_dict(raw)
    train(cfg, resume=True, progress=False, log=lambda *a: None)
    return export(cfg.out_dir, out_dir / "model", which="last", dtype=torch.float32)


# ---- command line -------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    t = subparsers.add_parser(
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
    t.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="tqdm bar (default: when stderr is a terminal; else log lines)")
    t.set_defaults(func=_cmd_train)

    e = subparsers.add_parser("export", help="export a training run's weights as a HF-layout model dir", description="Write bf16 safetensors + config.json + tokenizer files.")
    e.add_argument("--run", type=Path, required=True, help="the run's out_dir (holds checkpoint.pt)")
    e.add_argument("--out", type=Path, required=True, help="model directory to write")
    e.add_argument("--last", action="store_true", help="export the latest weights instead of the best by eval loss")
    e.set_defaults(func=_cmd_export)


def _cmd_train(args: argparse.Namespace) -> None:
    try:
        cfg = TrainConfig.load(args.config)
        train(cfg, resume=args.resume, minutes=args.minutes, steps=args.steps, progress=args.progress, log=lambda m: print(m, flush=True))
    except (ConfigError, DataError) as e:
        raise SystemExit(f"error: {e}") from None


def _cmd_export(args: argparse.Namespace) -> None:
    try:
        path = export(args.run, args.out, which="last" if args.last else "best")
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"exported {args.run} to {path}")


def iter_batches(rows: list[Row], size: int, pad_id: int, device: torch.device | str = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    """Fixed-order batches (for evaluation)."""
    for i in range(0, len(rows), size):
        yield collate(rows[i : i + size], pad_id, device)


def main(argv: list[str] | None = None) -> None:
    """`python -m dllm_engine.train --config C [--resume] [--minutes M]` (same as `dllm train`)."""
    parser = argparse.ArgumentParser(prog="python -m dllm_engine.train")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "export"):
        argv = ["train", *argv]
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
