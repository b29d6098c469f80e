"""Block-causal models (`LLaDAConfig.block_causal`): exact caches, and training that sees what
decoding sees. The reference here builds its attention mask by hand, independently of the engine."""

from __future__ import annotations

import asyncio

import pytest
import torch

from dllm_engine import train
from dllm_engine.config import ConfigError
from dllm_engine.decoding import DecodeParams, Runner, Sequence
from dllm_engine.engine import Engine
from dllm_engine.loading import load_model
from dllm_engine.model import KVCache
from tests.helpers import PAIRS, make_model_dir
from tests.test_decoding import prompt_ids, run_to_end

CPU = torch.device("cpu")


def block_mask(prompt_len: int, length: int, block: int) -> torch.Tensor:
    """(length, length): query i may see key j iff j's block is not after i's (the prompt is block 0)."""
    ids = [0 if i < prompt_len else 1 + (i - prompt_len) // block for i in range(length)]
    return torch.tensor([[ids[j] <= ids[i] for j in range(length)] for i in range(length)])


def reference(model, prompt: list[int], mask_id: int, gen_length: int, block: int) -> list[int]:
    """LLaDA's reference loop (whole canvas every step, one token per step) under the block mask."""
    x = torch.tensor([prompt + [mask_id] * gen_length])
    p = len(prompt)
    mask = block_mask(p, x.shape[1], block)[None]
    for b in range(gen_length // block):
        for _ in range(block):
            logits = model.logits(model(x, key_valid=mask)).float()
            x0 = logits.argmax(-1)
            conf = torch.softmax(logits, -1).gather(-1, x0[..., None]).squeeze(-1)
            inside = torch.zeros_like(conf, dtype=torch.bool)
            inside[:, p + b * block : p + (b + 1) * block] = True
            j = torch.where(inside & (x == mask_id), conf, -torch.inf).argmax(-1)
            x[0, j] = x0[0, j]
    return x[0, p:].tolist()


@pytest.fixture(scope="module")
def causal_model(tmp_path_factory):
    return load_model(make_model_dir(tmp_path_factory.mktemp("block-causal"), {"block_causal": True}), dtype="float32")


@pytest.fixture
def runner(causal_model):
    model, tok = causal_model
    return Runner(model, tok, KVCache(model.config, 4, 512, torch.float32, "cpu"))


def _seq(tok, text: str, **params) -> Sequence:
    return Sequence(text, prompt_ids(tok, text), DecodeParams(**{"early_stop": False, **params}), tok, CPU, block_causal=True)


@torch.inference_mode()
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_every_cache_matches_the_reference_token_for_token(causal_model, runner, cache):
    """The caches are exact for a block-causal model: one token a step gives the reference's reply."""
    model, tok = causal_model
    seq = _seq(tok, "tell me about your weekend", policy="vanilla", cache=cache, block_size=8, max_new_tokens=32)
    run_to_end(runner, [seq])
    assert seq.ids[seq.prompt_len :].tolist() == reference(model, seq.ids[: seq.prompt_len].tolist(), tok.special.mask, 32, 8)


@torch.inference_mode()
def test_cached_steps_never_compute_the_masked_suffix(causal_model, runner):
    """A block start runs the previous block and this one; the steps after it only the block."""
    model, tok = causal_model
    widths: list[tuple[int, int]] = []
    forward = model.forward
    model.forward = lambda ids, pos, key_valid, *a: widths.append((ids.shape[1], key_valid.shape[-1])) or forward(ids, pos, key_valid, *a)
    try:
        seq = _seq(tok, "hello there", policy="vanilla", cache="dual", block_size=4, max_new_tokens=16)
        run_to_end(runner, [seq])
    finally:
        model.forward = forward
    p = seq.prompt_len
    starts = [(p + 4, p + 4)] + [(8, p + 4 * b + 4) for b in range(1, 4)]
    assert widths == [w for b in range(4) for w in [starts[b]] + [(4, p + 4 * b + 4)] * 3]


@torch.inference_mode()
def test_batched_rows_equal_one_by_one(causal_model, runner):
    _, tok = causal_model
    cases = [
        ("what do you like to do?", dict(policy="vanilla", cache="none", block_size=8, max_new_tokens=24)),
        ("hi", dict(policy="threshold", cache="dual", threshold=0.2, block_size=4, max_new_tokens=32)),
        ("tell me a story about a dog", dict(policy="factor", cache="prefix", block_size=8, max_new_tokens=16)),
        ("good morning", dict(policy="threshold", cache="dual", block_size=8, max_new_tokens=32, temperature=0.8, seed=3)),
    ]
    alone = []
    for text, params in cases:
        s = _seq(tok, text, **params)
        run_to_end(runner, [s])
        alone.append(s.ids.tolist())
    together = [_seq(tok, text, **params) for text, params in cases]
    run_to_end(runner, together[::-1])
    assert [s.ids.tolist() for s in together] == alone


@torch.no_grad()
def test_training_scores_each_block_as_decoding_sees_it(causal_model):
    """denoise_hidden's states for a noisy block equal a plain forward over the prompt, the clean
    blocks before it and that block: the model is trained on exactly what a block start shows it."""
    model, tok = causal_model
    rows = [train.Row.compact(prompt_ids(tok, "hello there"), list(range(5, 17))), train.Row.compact(prompt_ids(tok, "hi"), list(range(20, 30)))]
    batch = train.collate(rows, tok.special.pad)
    gen = torch.Generator().manual_seed(0)
    masked = batch["region"] & (torch.rand(batch["ids"].shape, generator=gen) < 0.5)
    noisy = torch.where(masked, tok.special.mask, batch["ids"])
    block = 4
    hidden = train.denoise_hidden(model, noisy, batch, block)
    for i, row in enumerate(rows):
        p, region = len(row.prompt), len(row.region)
        for start in range(0, region, block):
            end = min(start + block, region)
            x = torch.cat([batch["ids"][i, : p + start], noisy[i, p + start : p + end]])[None]
            want = model(x, key_valid=block_mask(p, x.shape[1], block)[None])[0, p + start :]
            torch.testing.assert_close(hidden[i, p + start : p + end], want, atol=1e-5, rtol=1e-4)


def test_a_bidirectional_checkpoint_may_start_a_block_causal_run_but_not_resume_one(tiny_chat, tmp_path):
    from tests.test_train import _tiny_cfg

    def cfg(block_causal: bool, **kw) -> train.TrainConfig:
        model = dict(train.TINY_MODEL, block_causal=block_causal)
        return _tiny_cfg(tmp_path, data_dir=str(tiny_chat / "data"), out_dir=str(tmp_path / "run"), model=model, **kw)

    quiet = dict(progress=False, log=lambda *_: None)
    train.train(cfg(True, init_from=str(tiny_chat / "model"), max_steps=2), **quiet)
    with pytest.raises(ConfigError, match="block_causal: checkpoint True vs config False"):
        train.train(cfg(False, max_steps=4), resume=True, **quiet)


def test_a_tiny_block_causal_model_learns_and_answers_with_every_cache(tmp_path):
    """Trained block-causally (blocks of 4 and 8), exported and served: it answers a training
    prompt verbatim whether decoded from the whole canvas or from the cache."""
    model_dir = train.tiny_model(tmp_path, PAIRS, model=dict(train.TINY_MODEL, block_causal=True), block_sizes=[4, 8])
    engine = Engine.from_pretrained(model_dir, dtype="float32", max_batch=2)
    try:
        for cache in ("none", "dual"):
            params = DecodeParams(policy="threshold", cache=cache, block_size=4, max_new_tokens=32)
            text, out = asyncio.run(engine.generate([{"role": "user", "content": "do you like dogs?"}], params))
            assert (text.strip(), out.finish_reason) == ("Yes, dogs are great.", "stop")
    finally:
        engine.close()
