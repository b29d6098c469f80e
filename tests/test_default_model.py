"""The model shipped in the package loads by default and answers within its reply budget."""

from __future__ import annotations

import asyncio
import json

from dllm_engine.loading import DEFAULT_MODEL_DIR
from dllm_engine.options import default_model_path
from dllm_engine.decoding import DecodeParams
from dllm_engine.engine import Engine


def test_the_shipped_model_is_the_default_and_small():
    assert default_model_path() == DEFAULT_MODEL_DIR
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.glob("*.safetensors"))
    assert size < 60e6
    assert json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())["model_type"] == "llada"
    assert (DEFAULT_MODEL_DIR / "README.md").exists() and (DEFAULT_MODEL_DIR / "quality.json").exists()


def test_the_shipped_model_replies_and_stops():
    engine = Engine.from_pretrained(DEFAULT_MODEL_DIR, dtype="float32", max_batch=1)
    try:
        text, last = asyncio.run(engine.generate([{"role": "user", "content": "hi, how are you?"}], DecodeParams(block_size=8, max_new_tokens=48)))
    finally:
        engine.close()
    assert text.strip() and last.finish_reason == "stop"
