"""Block decoding semantics: the reference loop, commit policies, caches, streaming order."""

from __future__ import annotations

import pytest
import torch

from dllm_engine.decoding import GRAPH_KEYS_BUCKET, DecodeParams, Runner, Sequence, commit_counts
from dllm_engine.model import KVCache
from dllm_engine.tokenizer import IncrementalDetokenizer
from tests.helpers import prompt_ids, run_to_end


def llada_reference(model, prompt: list[int], mask_id: int, gen_length: int, block_length: int) -> list[int]:
    """LLaDA's reference generate() at temperature 0 with steps = gen_length: whole-canvas
    forward every step, commit the single most confident masked token of the current block."""
    x = torch.tensor([prompt + [mask_id] * gen_length])
    p = len(prompt)
    for b in range(gen_length // block_length):
        for _ in range(block_length):
            logits = model.logits(model(x)).float()
            x0 = logits.argmax(-1)
            conf = torch.softmax(logits, -1).gather(-1, x0[..., None]).squeeze(-1)
            conf[:, : p + b * block_length] = -torch.inf
            conf[:, p + (b + 1) * block_length :] = -torch.inf
            conf = torch.where(x == mask_id, conf, -torch.inf)
            j = conf.argmax(-1)
            x[0, j] = x0[0, j]
    return x[0, p:].tolist()


@pytest.fixture
def runner(random_model):
    model, tok = random_model
    cache = KVCache(model.config, 4, 512, torch.float32, "cpu")
    return Runner(model, tok, cache)


@torch.inference_mode()
def test_vanilla_matches_reference_loop_token_for_token(random_model, runner):
    model, tok = random_model
    prompt = prompt_ids(tok, "tell me about your weekend")
    expected = llada_reference(model, prompt, tok.special.mask, gen_length=64, block_length=16)
    seq = Sequence("a", prompt, DecodeParams(policy="vanilla", cache="none", block_size=16, max_new_tokens=64, early_stop=False), tok, torch.device("cpu"))
    final, = run_to_end(runner, [seq])
    assert seq.ids[len(prompt):].tolist() == expected
    assert final.stats.forwards == 64  # one token per step, the whole canvas
    assert final.finish_reason in ("length", "stop")


@pytest.mark.parametrize("policy,cache", [("vanilla", "dual"), ("threshold", "none"), ("threshold", "prefix"), ("threshold", "dual"), ("factor", "dual")])
def test_never_remasks_and_streams_in_order(random_model, runner, policy, cache):
    _, tok = random_model
    prompt = prompt_ids(tok, "hello there")
    params = DecodeParams(policy=policy, cache=cache, threshold=0.05, block_size=8, max_new_tokens=32, early_stop=False)
    seq = Sequence("a", prompt, params, tok, torch.device("cpu"))
    record: list = []
    run_to_end(runner, [seq], record)
    mask = tok.special.mask
    streamed: list[int] = []
    for before, after, out in record:
        was = before != mask
        assert torch.equal(after[was], before[was]), "a committed token changed"
        assert int((after != mask).sum()) > int(was.sum()), "a step committed nothing"
        streamed += out.token_ids
    canvas = seq.ids[len(prompt):].tolist()
    assert mask not in canvas
    stop = next((i for i, t in enumerate(canvas) if t in tok.special.stop), len(canvas))
    assert streamed == canvas[:stop]


def test_threshold_commits_several_tokens_per_step_when_confident(random_model, runner):
    """With tau low enough every masked position clears it: a block commits in one step."""
    _, tok = random_model
    params = DecodeParams(policy="threshold", cache="dual", threshold=1e-9, block_size=8, max_new_tokens=32, early_stop=False)
    seq = Sequence("a", prompt_ids(tok, "hi"), params, tok, torch.device("cpu"))
    final, = run_to_end(runner, [seq])
    assert final.stats.forwards == 4


def test_commit_counts_follow_each_policy():
    inf = float("inf")
    conf = torch.tensor([[0.99, 0.95, 0.7, 0.6, -inf], [0.5, 0.4, 0.3, -inf, -inf], [0.99, 0.8, 0.75, 0.1, -inf]])
    thr = torch.full((3,), 0.9)
    fac = torch.ones(3)
    vanilla = commit_counts(conf, torch.zeros(3, dtype=torch.long), thr, fac)
    threshold = commit_counts(conf, torch.ones(3, dtype=torch.long), thr, fac)
    factor = commit_counts(conf, torch.full((3,), 2), thr, fac)
    assert vanilla.tolist() == [1, 1, 1]
    assert threshold.tolist() == [2, 1, 1]  # never fewer than one
    # factor f=1: the n-th best (1-based) needs c >= 1 - 1/(n+1): n=2 -> 0.667, n=3 -> 0.75, n=4 -> 0.8
    assert factor.tolist() == [2, 1, 3]
    # Fast-dLLM's get_transfer_index drops only confidences below the threshold: one equal to it commits.
    tie = torch.tensor([[0.5, 0.5, 0.25]])
    assert commit_counts(tie, torch.ones(1, dtype=torch.long), torch.tensor([0.5]), fac[:1]).tolist() == [2]
    none_masked = torch.full((1, 4), -inf)
    assert commit_counts(none_masked, torch.ones(1, dtype=torch.long), thr[:1], fac[:1]).tolist() == [0]


def test_batched_rows_equal_one_by_one(random_model, runner):
    _, tok = random_model
    cases = [
        ("what do you like to do?", DecodeParams(policy="vanilla", cache="none", block_size=8, max_new_tokens=24, early_stop=False)),
        ("hi", DecodeParams(policy="threshold", cache="dual", threshold=0.2, block_size=8, max_new_tokens=32, early_stop=False)),
        ("tell me a story about a dog", DecodeParams(policy="factor", cache="prefix", block_size=8, max_new_tokens=16, early_stop=False)),
        ("good morning", DecodeParams(policy="threshold", cache="dual", block_size=16, max_new_tokens=32, temperature=0.8, seed=3, early_stop=False)),
    ]
    dev = torch.device("cpu")
    alone = []
    for text, params in cases:
        s = Sequence("x", prompt_ids(tok, text), params, tok, dev)
        run_to_end(runner, [s])
        alone.append(s.ids.tolist())
    together = [Sequence(str(i), prompt_ids(tok, t), p, tok, dev) for i, (t, p) in enumerate(cases)]
    run_to_end(runner, together[::-1])  # reversed: slots differ from the solo runs
    assert [s.ids.tolist() for s in together] == alone


def test_temperature_zero_is_deterministic_and_seeded_sampling_reproducible(random_model, runner):
    _, tok = random_model
    dev = torch.device("cpu")

    def run(**kw) -> list[int]:
        s = Sequence("x", prompt_ids(tok, "hello"), DecodeParams(block_size=8, max_new_tokens=16, early_stop=False, **kw), tok, dev)
        run_to_end(runner, [s])
        return s.ids.tolist()

    assert run() == run()
    assert run(temperature=1.0, seed=7) == run(temperature=1.0, seed=7)
    assert run(temperature=1.0, seed=7) != run(temperature=1.0, seed=8)


def test_early_stop_ends_at_end_of_turn(eot_model):
    """A model that always predicts end-of-turn: early stop ends after the first step."""
    model, tok = eot_model
    runner = Runner(model, tok, KVCache(model.config, 1, 512, torch.float32, "cpu"))
    dev = torch.device("cpu")
    stop = Sequence("a", prompt_ids(tok, "hi"), DecodeParams(policy="vanilla", cache="none", block_size=8, max_new_tokens=32), tok, dev)
    full = Sequence("b", prompt_ids(tok, "hi"), DecodeParams(policy="vanilla", cache="none", block_size=8, max_new_tokens=32, early_stop=False), tok, dev)
    out_stop, = run_to_end(runner, [stop])
    out_full, = run_to_end(runner, [full])
    assert out_stop.finish_reason == "stop" and out_stop.stats.forwards == 1
    assert out_full.stats.forwards == 32
    assert out_stop.stats.new_tokens == out_full.stats.new_tokens == 0


def test_incremental_detokenizer_never_splits_a_character(random_model):
    _, tok = random_model
    text = "héllo 😀 wörld — ok ✓"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push([i]) for i in ids]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_unknown_policy_and_cache_are_refused():
    with pytest.raises(ValueError, match="unknown policy 'greedy'"):
        DecodeParams(policy="greedy")
    with pytest.raises(ValueError, match="unknown cache 'full'"):
        DecodeParams(cache="full")
    with pytest.raises(ValueError, match="threshold"):
        DecodeParams(threshold=0)


@torch.inference_mode()
def test_the_padded_shapes_cuda_graphs_get_change_nothing(random_model, runner, monkeypatch):
    """Under CUDA graphs a step's queries are padded to a power of two and its keys to a multiple
    of GRAPH_KEYS_BUCKET (so that requests of other lengths share graphs); the padding is masked
    out. Exercised here without a GPU: the same replies, alone and batched, as unpadded."""
    model, tok = random_model
    cases = [
        ("what do you like to do?", DecodeParams(policy="vanilla", cache="none", block_size=8, max_new_tokens=24, early_stop=False)),
        ("hi", DecodeParams(policy="threshold", cache="dual", threshold=0.2, block_size=8, max_new_tokens=32, early_stop=False)),
        ("tell me a story about a dog", DecodeParams(policy="factor", cache="prefix", block_size=8, max_new_tokens=16, early_stop=False)),
    ]
    dev = torch.device("cpu")
    plain = [Sequence(str(i), prompt_ids(tok, t), p, tok, dev) for i, (t, p) in enumerate(cases)]
    run_to_end(runner, plain)
    widths: list[tuple[int, int]] = []
    forward = model.forward
    monkeypatch.setattr(model, "graphed", True)  # the flag alone: no graphs on a CPU
    monkeypatch.setattr(model, "forward", lambda ids, pos, key_valid, *a: widths.append((ids.shape[1], key_valid.shape[-1])) or forward(ids, pos, key_valid, *a))
    padded = [Sequence(str(i), prompt_ids(tok, t), p, tok, dev) for i, (t, p) in enumerate(cases)]
    run_to_end(runner, padded)
    assert [s.ids.tolist() for s in padded] == [s.ids.tolist() for s in plain]
    assert all(t & (t - 1) == 0 and keys % GRAPH_KEYS_BUCKET == 0 for t, keys in widths)
