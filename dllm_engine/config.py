"""Model configuration in LLaDA's own `config.json` field names.

The same file describes a real LLaDA-8B checkpoint and the project's small default model, so one
loader serves both. Fields LLaDA writes but this implementation has no use for are accepted and
ignored; fields that would change the maths in a way we do not implement are refused by name.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """The checkpoint's config asks for something this engine does not implement."""


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from a checkpoint file, or a ConfigError naming the file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return raw


@dataclasses.dataclass
class LLaDAConfig:
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int | None = None
    mlp_hidden_size: int | None = None
    mlp_ratio: int = 4
    vocab_size: int = 4096
    embedding_size: int | None = None
    max_sequence_length: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    weight_tying: bool = False
    include_bias: bool = False
    include_qkv_bias: bool = False
    mask_token_id: int | None = None
    eos_token_id: int | list[int] | None = None  # HF checkpoints may list several; all stop generation
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    end_of_turn_token_id: int | None = None  # None: the tokenizer's <|eot_id|> (or the like)
    # The project's extension (LLaDA's own checkpoints are bidirectional): attention is causal across
    # blocks and bidirectional inside one. The prompt is the first block, then the canvas's decoding
    # blocks, of whatever size a request decodes with (trained with several). A block's keys and
    # values then depend only on it and what precedes it, so the prefix and dual caches are exact,
    # not Fast-dLLM's approximation, and a step never needs the masked suffix (Fast-dLLM v2, SDAR).
    block_causal: bool = False
    # With block_causal: the prompt is not one block but one per chat turn, each ending at the
    # end-of-turn token. A turn's keys and values then never see what is said after it,
    # so a conversation's next prompt reuses them exactly, as an autoregressive server's prefix cache
    # does (the engine's `conversation=`), and only the newest turns are computed.
    turn_blocks: bool = False

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.mlp_hidden_size is None:
            self.mlp_hidden_size = self.mlp_ratio * self.d_model
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head dim {self.head_dim} must be even for rotary embeddings")
        if isinstance(self.eos_token_id, list) and not (self.eos_token_id and all(isinstance(t, int) for t in self.eos_token_id)):
            raise ConfigError(f"eos_token_id={self.eos_token_id!r} must be an id or a non-empty list of ids")
        if self.turn_blocks and not self.block_causal:
            raise ConfigError("turn_blocks needs block_causal (a bidirectional prompt has no blocks)")
        if self.embedding_size < self.vocab_size:
            raise ConfigError(f"embedding_size={self.embedding_size} < vocab_size={self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    # LLaDA config values that select maths this implementation does not have.
    _REQUIRED = {
        "block_type": ("llama",),
        "activation_type": ("silu", "swiglu"),
        "layer_norm_type": ("rms",),
        "alibi": (False,),
        "rope": (True,),
        "multi_query_attention": (None, False),
        "attention_layer_norm": (False,),
        "input_emb_norm": (False,),
        "scale_logits": (False,),
        "block_group_size": (1,),
        "clip_qkv": (None,),  # OLMo-style clamping of q/k/v activations
    }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "LLaDAConfig":
        model_type = raw.get("model_type", "llada")
        if model_type != "llada":
            raise ConfigError(f"model_type {model_type!r} is not supported (only 'llada')")
        for key, allowed in cls._REQUIRED.items():
            if key in raw and raw[key] not in allowed:
                raise ConfigError(f"config {key}={raw[key]!r} is not supported (supported: {allowed})")
        if raw.get("include_bias") or raw.get("include_qkv_bias"):
            raise ConfigError("linear biases (include_bias / include_qkv_bias) are not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in raw.items() if k in names}
        missing = [k for k in ("d_model", "n_layers", "n_heads", "vocab_size") if k not in raw]
        if missing:
            raise ConfigError(f"config.json lacks required field(s): {', '.join(missing)}")
        return cls(**known)

    @classmethod
    def from_file(cls, path: str | Path) -> "LLaDAConfig":
        return cls.from_dict(read_json(path))

    def to_dict(self) -> dict[str, Any]:
        """A config.json that LLaDA's own code would also read."""
        d = dataclasses.asdict(self)
        d.update(
            model_type="llada",
            architectures=["LLaDAModelLM"],
            block_type="llama",
            activation_type="silu",
            layer_norm_type="rms",
            alibi=False,
            rope=True,
            rope_full_precision=True,
            attention_layer_norm=False,
            input_emb_norm=False,
            scale_logits=False,
            block_group_size=1,
        )
        return {k: v for k, v in d.items() if v is not None}
