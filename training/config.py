"""Training configs: `TrainConfig`, read from a TOML file that may `extends` another.

`source_repeats` weights corpora (an example's `source` from `dllm prepare-data`; 0 leaves one out); `device` says
where to train (`cuda` when a GPU is there).
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import torch

from dllm_engine.config import ConfigError, LLaDAConfig
from dllm_engine.loading import cpu_has_bf16
from dllm_engine.tokenizer import Tokenizer

LOSS_WEIGHTINGS = ("elbo", "mean")
MODEL_KEYS = {f.name for f in dataclasses.fields(LLaDAConfig)} - {"mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id", "end_of_turn_token_id"}
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
    certainty_from_step: int = 0  # a second stage: the plain objective first, certainty forcing from this step
    # Block-diffusion masking (see `diffusion_loss`): block sizes drawn per batch; [] = plain LLaDA SFT.
    block_sizes: list[int] = dataclasses.field(default_factory=list)
    # Fast-dLLM v2's complementary masks (block-causal models): a second noisy copy of each reply
    # masked where the first is not, so every token is scored in every step
    complementary_masks: bool = False
    # Drafts for self-speculation (`policy="verify"`, TiDAR): the clean reply token-causal, as verify
    # decodes it, and this multiple of the causal (AR) cross-entropy of every reply token added, so
    # the predictions verify commits stay the model's own. None: not trained for verify.
    drafting_ar_weight: float | None = None
    # pad each reply region only to the end of the largest block holding its end of turn, not to
    # reply_len: a block-causal model never decodes past that block, so the rest is compute for nothing
    pad_to_block: bool = False
    init_std: float = 0.02
    # start from another run's checkpoint/best .pt or a model directory (same shape), not from random.
    # A model directory with no [model] table: its own config and tokenizer are the run's (an AR
    # checkpoint converted by `dllm convert`), and data_dir needs no tokenizer of its own.
    init_from: str = ""
    # LoRA: train rank-`lora_rank` adapters of every linear layer of the blocks (training/lora.py)
    # instead of the weights; the run's export writes them (adapter/lora.safetensors) beside the merged model
    lora_rank: int = 0
    lora_alpha: float = 32.0
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
        if not isinstance(cfg.certainty_from_step, int) or cfg.certainty_from_step < 0:
            raise ConfigError(f"certainty_from_step must be a whole number >= 0, got {cfg.certainty_from_step!r}")
        if cfg.drafting_ar_weight is not None and not (isinstance(cfg.drafting_ar_weight, (int, float)) and cfg.drafting_ar_weight >= 0):
            raise ConfigError(f"drafting_ar_weight must be a number >= 0 (or left out), got {cfg.drafting_ar_weight!r}")
        if cfg.loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {cfg.loss_weighting!r}")
        try:
            torch.device(cfg.device)  # whether this machine has it is train()'s question: a GPU config parses anywhere
        except RuntimeError as e:
            raise ConfigError(f"device {cfg.device!r}: {e}") from None
        if cfg.lora_rank < 0 or (cfg.lora_rank and not cfg.init_from):
            raise ConfigError(f"lora_rank must be >= 0, and adapters need weights to adapt (init_from), got {cfg.lora_rank} and {cfg.init_from!r}")
        if cfg.pad_to_block and not cfg.block_sizes:
            raise ConfigError("pad_to_block pads to the largest of block_sizes: give block_sizes")
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
        return torch.cuda.is_bf16_supported() if torch.device(self.device).type == "cuda" else cpu_has_bf16()

    def model_source(self) -> Path | None:
        """The model directory whose own config and tokenizer the run uses (see `init_from`), else None."""
        return Path(self.init_from) if self.init_from and not self.model and Path(self.init_from).is_dir() else None

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
