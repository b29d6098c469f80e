"""Checkpoint families in their own layout: Dream (bidirectional, shifted logits), Fast-dLLM v2
(blocks of bd_size on absolute positions, shifted), SDAR (blocks of block_size, unshifted) and
Llama/Qwen AR checkpoints (token-causal prompt, shifted: a block-diffusion model whose block size 1
is the AR model).

Each is a tiny random checkpoint written by transformers itself (its names, its config.json, the
family's model_type), loaded by the project's loader; with them the project's own LLaDA-layout
one. References: transformers' model under an explicit attention mask built here, transformers'
greedy `generate`, and Fast-dLLM's plain `generate` (`fastdllm_generate`, written here: the whole
canvas every step, vanilla or threshold) with Dream's shift and each family's windows spelled out.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from dllm_engine.config import ConfigError
from dllm_engine.decoding import (
    CACHES,
    POLICIES,
    DecodeParams,
    Runner,
    Sequence,
    attention_blocks,
    block_causal_keys,
)
from dllm_engine.engine import Engine, RequestError
from dllm_engine.loading import load_model
from dllm_engine.model import KVCache
from tests.helpers import edit_json, hf_checkpoint, prompt_ids, run_to_end

CPU = torch.device("cpu")
BLOCK = 4  # the tiny Fast-dLLM v2 and SDAR checkpoints' attention block

# name: (architecture, config.json edits, which keys a query sees)
FAMILIES = {
    "llama": ("llama", {}, "causal"),
    "qwen2": ("qwen2", {}, "causal"),
    "qwen3": ("qwen3", {}, "causal"),
    "dream": ("qwen2", {"model_type": "Dream", "mask_token_id": 2}, "bidirectional"),
    "fast-dllm-v2": ("qwen2", {"model_type": "Fast_dLLM_Qwen", "bd_size": BLOCK}, "blocks"),
    "sdar": ("qwen3", {"model_type": "sdar", "block_size": BLOCK}, "blocks"),
}


def visible(rule: str, t: int) -> torch.Tensor:
    """(t, t): may query i see key j."""
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    return {"causal": j <= i, "bidirectional": torch.ones(t, t, dtype=torch.bool), "blocks": j // BLOCK <= i // BLOCK}[rule]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (directory, transformers model); built on first use."""
    made: dict = {}

    def get(name: str):
        if name not in made:
            arch, edits, _ = FAMILIES[name]
            made[name] = hf_checkpoint(tmp_path_factory.mktemp(name), arch, edits, tied=name == "llama")
        return made[name]

    return get


@pytest.fixture(scope="module")
def loaded(checkpoints, random_model):
    """name -> (model, tokenizer); "llada" is the project's own (LLaDA's config.json, bidirectional)."""
    cache: dict = {"llada": random_model}

    def get(name: str):
        if name not in cache:
            cache[name] = load_model(checkpoints(name)[0], dtype="float32")
        return cache[name]

    return get


@torch.inference_mode()
@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers_under_the_familys_mask(checkpoints, loaded, name):
    _, hf = checkpoints(name)
    model, _ = loaded(name)
    rule = FAMILIES[name][2]
    t = 14
    ids = torch.randint(3, model.config.vocab_size, (2, t), generator=torch.Generator().manual_seed(0))
    mask = visible(rule, t)
    additive = torch.zeros(2, 1, t, t).masked_fill(~mask, torch.finfo(torch.float32).min)
    want = hf(input_ids=ids, attention_mask=additive, position_ids=torch.arange(t).expand(2, t)).logits
    got = model.logits(model(ids, key_valid=mask.expand(2, t, t)))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # The masks differ between families, and the engine lays out the family's own.
    if rule != "bidirectional":
        cfg = model.config
        blocks = attention_blocks(ids[0, :5], t - 5, 1, causal_prompt=cfg.causal_prompt, attention_block=cfg.attention_block)
        assert torch.equal(block_causal_keys(torch.arange(t), blocks, t), mask)


def test_configs_give_each_family_its_switches(loaded):
    got = {name: loaded(name)[0].config for name in FAMILIES}
    assert [n for n, c in got.items() if c.shift_logits] == ["llama", "qwen2", "qwen3", "dream", "fast-dllm-v2"]
    assert [n for n, c in got.items() if c.include_qkv_bias] == ["qwen2", "dream", "fast-dllm-v2"]
    assert [n for n, c in got.items() if c.qk_norm] == ["qwen3", "sdar"]
    assert [n for n, c in got.items() if c.causal_prompt] == ["llama", "qwen2", "qwen3"]
    assert {n: c.attention_block for n, c in got.items() if c.attention_block} == {"fast-dllm-v2": BLOCK, "sdar": BLOCK}
    assert not got["dream"].block_causal and got["llama"].weight_tying and got["qwen3"].head_dim == 24


# Read at https://github.com/NVlabs/Fast-dLLM/blob/f6b35ec3f1b16e1b3d3357938046559ae2d350fa/llada/generate.py
# and https://github.com/NVlabs/Fast-dLLM/blob/4e9aeecc4c87fe0c0c9b1e206bd1a6abddf7176e/dream/model/generation_utils_block.py


def fastdllm_generate(
    model, prompt: list[int], mask_id: int, new: int, block: int, rule: str = "bidirectional", *,
    threshold: float | None = None, shift: bool = False, aligned: bool = False,
) -> tuple[list[int], list[int]]:
    """Fast-dLLM's plain `generate` in llada/generate.py (with its `get_transfer_index`) at
    temperature 0, remasking 'low_confidence', steps = `new`: the whole canvas every step, no cache.

    Per block, steps until it has no mask. x0 = argmax; confidence = softmax probability of x0 at the
    block's masked positions, -inf elsewhere. Without `threshold` commit `num_transfer_tokens` (steps =
    tokens: one a step, the most confident); with it the most confident and every other one not below
    it (Fast-dLLM drops those `< threshold`). `shift` is Dream's, from generation_utils_block.py:
    position j is predicted from j-1, logits = cat(logits[:1], logits[:-1]). Dream's own block loop
    there is followed no further (its block start commits the block's first position, and it has
    only cached variants). For the block-causal families `rule` and `aligned` lay out their trained
    attention and windows (see `visible`), which Fast-dLLM's code does not have.
    Returns the reply's tokens and how many each step committed.
    """
    n = len(prompt)
    first = n // block * block if aligned else n
    total = (-(-n // block) * block if aligned else n) + new
    x = torch.tensor([prompt + [mask_id] * (total - n)])
    keys = visible(rule, total)
    if rule == "causal":  # a token-causal prompt, then the reply's windows: bidirectional inside
        blk = torch.cat([torch.arange(n), n + torch.arange(total - n) // block])
        keys = blk[None, :] <= blk[:, None]
    counts = []
    for start in range(first, total, block):
        while (x[0, start : start + block] == mask_id).any():
            logits = model.logits(model(x, key_valid=keys[None]))[0].float()
            if shift:
                logits = torch.cat([logits[:1], logits[:-1]])
            conf, x0 = logits.double().softmax(-1).max(-1)
            masked = x[0] == mask_id
            masked[start + block :] = False  # nothing before the block is masked
            conf = torch.where(masked, conf, -torch.inf)
            commit = torch.zeros_like(masked)
            commit[conf.argmax()] = True
            if threshold is not None:
                commit |= masked & (conf >= threshold)
            assert mask_id not in x0[commit], "Fast-dLLM would commit its mask token here (it stays masked); the engine never predicts it"
            x[0, commit] = x0[commit]
            counts.append(int(commit.sum()))
    return x[0, n:].tolist(), counts


def decode(model, tok, prompt: list[int], **params) -> tuple[list[int], list[int]]:
    """The engine's reply and how many tokens each step committed; a step that commits nothing
    fails here rather than hanging the test."""
    params = DecodeParams(**{"early_stop": False, "policy": "vanilla", **params})
    seq = Sequence.for_model("s", prompt, params, tok, CPU, model.config)
    seq.slot = 0
    runner = Runner(model, tok, KVCache(model.config, 1, 256, torch.float32, "cpu"))
    counts: list[int] = []
    finished = False
    while not finished:
        out = runner.step([seq], {"s"})[0]
        counts.append(len(out.step.positions))
        assert counts[-1], "a step committed nothing"
        finished = out.finished
    return seq.ids[seq.prompt_len :].tolist(), counts


# name, decoding window, a threshold low enough that some steps commit several tokens: these tiny
# random models are rarely more than 4% sure of a token (0.9, Fast-dLLM's default, commits one a step).
FASTDLLM_CASES = [("llada", 4, 0.035), ("dream", 4, 0.025), ("fast-dllm-v2", 2, 0.025), ("sdar", 4, 0.035), ("qwen2", 4, 0.025)]


@torch.inference_mode()
@pytest.mark.parametrize("name,window,low", FASTDLLM_CASES)
@pytest.mark.parametrize("threshold", [None, 0.9, "low"], ids=["vanilla", "threshold-0.9", "threshold-low"])
def test_decoding_is_fastdllm_generate(loaded, name, window, low, threshold):
    """Token for token and step for step. A bidirectional model (LLaDA, Dream) only without a cache:
    there the caches are Fast-dLLM's approximation; a block-causal one with every cache (exact)."""
    model, tok = loaded(name)
    cfg = model.config
    prompt = prompt_ids(tok, "tell me about your weekend")
    assert len(prompt) % (cfg.attention_block or window), "the prompt should end inside a block"
    tau = low if threshold == "low" else threshold
    rule = FAMILIES[name][2] if name in FAMILIES else "bidirectional"
    want = fastdllm_generate(model, prompt, tok.special.mask, 12, window, rule, threshold=tau, shift=cfg.shift_logits, aligned=cfg.attention_block is not None)
    if threshold == 0.9:
        assert set(want[1]) == {1}, "nothing reaches 0.9: the at-least-one rule commits every step"
    if threshold == "low":
        assert max(want[1]) > 1 and min(want[1]) == 1, "some steps should commit several tokens, some one"
    policy = {"policy": "vanilla"} if tau is None else {"policy": "threshold", "threshold": tau}
    for cache in CACHES if cfg.block_causal else ("none",):
        assert decode(model, tok, prompt, cache=cache, block_size=window, max_new_tokens=12, **policy) == want, cache


@torch.inference_mode()
@pytest.mark.parametrize("name,window", [("fast-dllm-v2", 2), ("fast-dllm-v2", 4), ("sdar", 2), ("sdar", 4), ("qwen3", 4), ("llama", 3)])
@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "verify"])  # verify has a cache of its own: tests/test_verify.py
def test_every_cache_is_exact_for_block_causal_families(loaded, name, window, policy):
    model, tok = loaded(name)
    prompt = prompt_ids(tok, "what do you like to do?")
    kw = dict(policy=policy, threshold=0.3, block_size=window, max_new_tokens=12)
    want = decode(model, tok, prompt, cache="none", **kw)
    assert decode(model, tok, prompt, cache="prefix", **kw) == want
    assert decode(model, tok, prompt, cache="dual", **kw) == want
    if policy == "threshold":  # nothing reaches 1.0 but the one most confident token: vanilla
        assert decode(model, tok, prompt, cache="dual", **dict(kw, threshold=1.0)) == decode(model, tok, prompt, cache="dual", **dict(kw, policy="vanilla"))


@torch.inference_mode()
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_an_ar_checkpoint_at_block_size_1_decodes_as_greedy_generate(checkpoints, loaded, name):
    _, hf = checkpoints(name)
    model, tok = loaded(name)
    prompt = prompt_ids(tok, "hello there, how are you today?")
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=1)[0, len(prompt) :].tolist()
    assert len(set(want)) > 2 and tok.special.mask not in want  # a reply worth comparing; the engine never predicts its mask
    for cache in ("none", "dual"):
        assert decode(model, tok, prompt, cache=cache, block_size=1, max_new_tokens=10)[0] == want


@torch.inference_mode()
def test_dream_decodes_with_every_cache_and_batched_rows_equal_single(loaded):
    """Bidirectional: the caches are Fast-dLLM's approximation, so only that they run, stream in order
    and batch exactly."""
    model, tok = loaded("dream")
    runner = Runner(model, tok, KVCache(model.config, 3, 256, torch.float32, "cpu"))
    make = lambda cache: Sequence.for_model(cache, prompt_ids(tok, "hi"), DecodeParams(cache=cache, block_size=4, max_new_tokens=8, early_stop=False), tok, CPU, model.config)  # noqa: E731
    alone = []
    for cache in ("none", "prefix", "dual"):
        s = make(cache)
        run_to_end(runner, [s])
        alone.append(s.ids.tolist())
        assert tok.special.mask not in alone[-1]
    together = [make(c) for c in ("none", "prefix", "dual")]
    run_to_end(runner, together)
    assert [s.ids.tolist() for s in together] == alone


def test_the_engine_streams_a_fixed_block_family_from_the_prompts_tail(loaded):
    model, tok = loaded("fast-dllm-v2")
    engine = Engine(model, tok, max_batch=1, max_len=256)
    try:
        messages = [{"role": "user", "content": "hello there"}]
        n = len(engine.encode_prompt(messages))
        params = DecodeParams(threshold=0.5, block_size=2, max_new_tokens=8, early_stop=False)
        text, out = asyncio.run(engine.generate(messages, params))
        assert out.finish_reason == "length" and out.stats.new_tokens == -(-n // 2) * 2 + 8 - n
        with pytest.raises(RequestError, match="block_size 3 does not divide the model's attention block of 4"):
            asyncio.run(engine.generate(messages, DecodeParams(block_size=3, max_new_tokens=6)))
    finally:
        engine.close()


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda d: edit_json(d / "config.json", model_type="dream2"), "model_type 'dream2' is not supported"),
        (lambda d: edit_json(d / "config.json", mask_token_id=5000), "mask token id 5000 is outside the vocabulary of 384"),
        (lambda d: edit_json(d / "config.json", rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}), "rope type 'llama3'"),
        (lambda d: edit_json(d / "config.json", hidden_act="gelu"), "hidden_act='gelu'"),
        (lambda d: edit_json(d / "config.json", hidden_size=...), "lacks required field.*hidden_size"),
        (lambda d: _drop(d, "model.layers.1.self_attn.k_norm.weight"), r"lacks weight.*blocks\.1\.k_norm\.weight"),
        (lambda d: _drop(d, "model.layers.0.self_attn.q_proj.bias"), r"unexpected weight 'model\.layers\.0\.self_attn\.q_proj\.bias'"),
    ],
    ids=["model_type", "mask", "rope", "act", "field", "missing", "unexpected"],
)
def test_bad_checkpoints_are_one_line_errors(tmp_path, change, match):
    d, _ = hf_checkpoint(tmp_path / "m", "qwen3", {"model_type": "sdar", "block_size": BLOCK})
    if "bias" in match:  # a Qwen2 bias in an SDAR (Qwen3) checkpoint
        _add(d, "model.layers.0.self_attn.q_proj.bias", torch.zeros(96))
    else:
        change(d)
    with pytest.raises(ConfigError, match=match) as e:
        load_model(d)
    assert "\n" not in str(e.value)


def _drop(d, name: str) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / "model.safetensors"))
    state.pop(name)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})


def _add(d, name: str, value: torch.Tensor) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / "model.safetensors"))
    state[name] = value
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_stop_ids_come_from_generation_config_too(checkpoints, tmp_path):
    d, _ = hf_checkpoint(tmp_path / "m", "qwen2")
    edit_json(d / "generation_config.json", eos_token_id=[3, 1])
    _, tok = load_model(d, dtype="float32")
    assert tok.special.eos == 1 and tok.special.stop == {1, 3}


@pytest.mark.parametrize("shape,billions", [("dream-7b", 7.6), ("fast-dllm-v2-7b", 7.6), ("sdar-4b", 4.0)])
def test_benchmark_shapes_are_the_checkpoints_sizes(shape, billions):
    from benchmarks.steps import SHAPES
    from dllm_engine.config import LLaDAConfig
    from dllm_engine.model import DiffusionLM

    with torch.device("meta"):
        n = sum(p.numel() for p in DiffusionLM(LLaDAConfig(**SHAPES[shape])).parameters())
    assert abs(n / 1e9 - billions) < 0.1


@pytest.mark.parametrize("layout", [dict(attention_block=4), dict(causal_prompt=True)], ids=["fixed-blocks", "causal-prompt"])
def test_the_step_benchmark_times_every_layout(layout):
    from benchmarks.steps import StepTimer, random_model
    from tests.helpers import tiny_config

    cfg = tiny_config(mask_token_id=1, block_causal=True, shift_logits=True, **layout)
    timer = StepTimer(random_model(cfg, CPU, torch.float32), batch=2, prompt_len=10, canvas=8, block=4)
    assert set(timer.measure(1)) == {"full_ms", "block_start_ms", "prefix_ms", "dual_ms"}
