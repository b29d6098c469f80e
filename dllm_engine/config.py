"""Model configuration in LLaDA's own `config.json` field names.

The same file describes a real LLaDA-8B checkpoint and the project's small default model, so one
loader serves both. Fields LLaDA writes but this implementation has no use for are accepted and
ignored; fields that would change the maths in a way we do not implement are refused by name.

Checkpoints of other families (Dream, Fast-dLLM v2, SDAR, and Llama/Qwen AR models) keep their own
Hugging Face config.json: `from_dict` translates it (`HF_FIELDS`) and adds what their model type
implies but does not write down (`FAMILIES`): biases, q/k norms, the attention layout and whether
logits are shifted. The model is the same; only these switches differ.
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
    # With block_causal: blocks of this size on absolute positions (Fast-dLLM v2's bd_size, SDAR's
    # block_size), as those models were trained: the prompt's last partial block is decoded together
    # with the first reply tokens, and a decoding window must divide it.
    attention_block: int | None = None
    # With block_causal: the prompt is token-causal (each token a block of its own), as an
    # autoregressive checkpoint was trained; only the reply is decoded in blocks.
    causal_prompt: bool = False
    # Position i-1 predicts token i (Dream, Fast-dLLM v2, AR checkpoints): the AR head is reused.
    shift_logits: bool = False
    qk_norm: bool = False  # per-head RMSNorm of queries and keys before RoPE (Qwen3, SDAR)
    head_size: int | None = None  # set where it is not d_model / n_heads (Qwen3's `head_dim`)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.mlp_hidden_size is None:
            self.mlp_hidden_size = self.mlp_ratio * self.d_model
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        if self.head_size is None and self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head dim {self.head_dim} must be even for rotary embeddings")
        if isinstance(self.eos_token_id, list) and not (self.eos_token_id and all(isinstance(t, int) for t in self.eos_token_id)):
            raise ConfigError(f"eos_token_id={self.eos_token_id!r} must be an id or a non-empty list of ids")
        for layout in ("turn_blocks", "causal_prompt", "attention_block"):
            if getattr(self, layout) and not self.block_causal:
                raise ConfigError(f"{layout} needs block_causal (a bidirectional model has no blocks)")
        if sum(map(bool, (self.turn_blocks, self.causal_prompt, self.attention_block))) > 1:
            raise ConfigError("turn_blocks, causal_prompt and attention_block are different prompt layouts: choose one")
        if self.attention_block is not None and self.attention_block < 1:
            raise ConfigError(f"attention_block must be >= 1, got {self.attention_block}")
        if self.embedding_size < self.vocab_size:
            raise ConfigError(f"embedding_size={self.embedding_size} < vocab_size={self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.head_size or self.d_model // self.n_heads

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
        if model_type in FAMILIES:
            raw = from_hf(raw)
        elif model_type != "llada":
            raise ConfigError(f"model_type {model_type!r} is not supported (supported: 'llada', {', '.join(map(repr, FAMILIES))})")
        for key, allowed in cls._REQUIRED.items():
            if key in raw and raw[key] not in allowed:
                raise ConfigError(f"config {key}={raw[key]!r} is not supported (supported: {allowed})")
        if raw.get("include_bias"):
            raise ConfigError("linear biases beyond q/k/v (include_bias) are not supported")
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


def uses_hf_names(raw: dict[str, Any]) -> bool:
    """Whether a checkpoint with this config.json names its weights as transformers does
    (`model.layers.{i}.self_attn.q_proj`) rather than as LLaDA does."""
    return raw.get("model_type", "llada") in FAMILIES


# What each Hugging Face model type implies beyond its config.json's fields. AR checkpoints become
# block-diffusion models with a token-causal prompt and shifted logits: at block size 1 they are
# the AR model itself.
_AR = dict(block_causal=True, causal_prompt=True, shift_logits=True)
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": _AR,
    "qwen2": dict(_AR, include_qkv_bias=True),
    "qwen3": dict(_AR, qk_norm=True),
    "Dream": dict(include_qkv_bias=True, shift_logits=True),
    "Fast_dLLM_Qwen": dict(include_qkv_bias=True, block_causal=True, shift_logits=True, attention_block=32),
    "sdar": dict(qk_norm=True, block_causal=True, attention_block=4),
}
# transformers' config.json keys and ours.
HF_FIELDS = {
    "hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads", "intermediate_size": "mlp_hidden_size", "vocab_size": "vocab_size",
    "max_position_embeddings": "max_sequence_length", "rms_norm_eps": "rms_norm_eps", "rope_theta": "rope_theta",
    "tie_word_embeddings": "weight_tying", "head_dim": "head_size", "bd_size": "attention_block", "block_size": "attention_block",
    **{k: k for k in ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id")},
}


def from_hf(raw: dict[str, Any]) -> dict[str, Any]:
    """A Hugging Face config.json (Llama, Qwen2, Qwen3 and their dLLM descendants) in our fields;
    refuses by name what would change the maths (other activations, scaled RoPE, sliding windows)."""
    model_type = raw["model_type"]
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in raw]
    if missing:
        raise ConfigError(f"config.json lacks required field(s): {', '.join(missing)}")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config hidden_act={raw['hidden_act']!r} is not supported (only 'silu')")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"config rope type {rope.get('rope_type', rope.get('type'))!r} is not supported (only 'default')")
    if raw.get("use_sliding_window") or set(raw.get("layer_types") or ["full_attention"]) != {"full_attention"}:
        raise ConfigError("config use_sliding_window=true is not supported")
    if raw.get("mlp_bias") or (model_type != "qwen2" and raw.get("attention_bias")):
        raise ConfigError(f"{model_type}: biases beyond q/k/v (attention_bias on o_proj, mlp_bias) are not supported")
    out = {ours: raw[theirs] for theirs, ours in HF_FIELDS.items() if raw.get(theirs) is not None}
    if "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    out.setdefault("weight_tying", False)
    if "attention_block" not in FAMILIES[model_type]:  # `block_size` means something else elsewhere
        out.pop("attention_block", None)
    if out.get("head_size") == out["d_model"] // out["n_heads"]:
        out.pop("head_size")
    return {**FAMILIES[model_type], **out}
