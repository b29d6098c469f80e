"""Self-speculation (`policy="verify"`): the drafts a step's masks predict are committed only as far as
the model's own causal predictions agree, so the reply is its one-token-per-forward decoding."""

from __future__ import annotations

import asyncio

import pytest
import torch

from dllm_engine.decoding import DecodeParams
from dllm_engine.engine import Engine, RequestError
from dllm_engine.loading import load_model
from tests.helpers import make_model_dir, reused_as_recomputed, stream_turn

PROMPTS = ["hello there", "tell me about your weekend.", "what do you like?"]


def engine_of(model_dir) -> Engine:
    model, tok = load_model(model_dir, dtype="float32")
    return Engine(model, tok, max_batch=8, max_len=256)


@pytest.mark.parametrize("block", [2, 4])
def test_the_reply_is_the_models_one_token_per_forward_decoding_in_any_batch(converted, block):
    """A random model's drafts are mostly wrong, which verification must never let through: the same
    token ids as block size 1, with other requests' block decoding in the same forwards."""
    engine = engine_of(converted)
    ar = DecodeParams(policy="vanilla", block_size=1, max_new_tokens=12)
    verify = DecodeParams(policy="verify", block_size=block, max_new_tokens=12)
    other = DecodeParams(threshold=0.3, block_size=4, max_new_tokens=12)

    async def main():
        return await asyncio.gather(*(stream_turn(engine, [{"role": "user", "content": q}], p) for p in (ar, verify, other) for q in PROMPTS))

    try:
        results = asyncio.run(main())
    finally:
        engine.close()
    by_ar, by_verify = results[: len(PROMPTS)], results[len(PROMPTS) : 2 * len(PROMPTS)]
    assert [ids for ids, _ in by_verify] == [ids for ids, _ in by_ar]
    assert any(len(ids) >= 4 for ids, _ in by_ar)  # replies long enough to draft in
    for (ids, stats), (_, ar_stats) in zip(by_verify, by_ar):
        assert stats.new_tokens == len(ids) and 1 <= stats.forwards <= ar_stats.forwards


def test_drafts_the_model_agrees_with_commit_a_block_per_forward(converted):
    """A model whose every prediction is one token (its final norm zeroed: all logits 0, so the first
    token wins): after the first step, each step's drafts all hold and it commits `block_size`
    tokens, up to the reply cap; streamed steps name every position once, in order."""
    model, tok = load_model(converted, dtype="float32")
    model.model.transformer["ln_f"].weight.data.zero_()
    engine = Engine(model, tok, max_batch=2, max_len=256)
    params = DecodeParams(policy="verify", block_size=4, max_new_tokens=13)

    async def main():
        return [o async for o in engine.stream([{"role": "user", "content": "hi"}], params, step_events=True)]

    try:
        outs = asyncio.run(main())
    finally:
        engine.close()
    ids = [t for o in outs for t in o.token_ids]
    stats, steps = outs[-1].stats, [o.step for o in outs if o.step]
    assert ids == [0] * 13 and outs[-1].finish_reason == "length"
    assert stats.forwards == 4 and [len(s.tokens) for s in steps] == [1, 4, 4, 4]  # 1, then a block per forward
    assert [p for s in steps for p in s.positions] == list(range(13))


def test_a_steps_drafts_are_token_causal_and_its_masks_one_block_after_them(converted):
    """What the masks see: every draft (as the model was trained to see clean text), and each other."""
    from dllm_engine.decoding import Sequence, block_causal_keys

    model, tok = load_model(converted, dtype="float32")
    s = Sequence.for_model("s", [5, 6, 7], DecodeParams(policy="verify", block_size=4, max_new_tokens=8), tok, torch.device("cpu"), model.config)
    s.committed, s.drafts = 5, 2
    s.lay_out()
    keys = block_causal_keys(torch.arange(4, s.window_end), s.blocks, s.window_end).int()
    assert keys.tolist() == [  # queries 4..10 (the last committed token, 2 drafts, 4 masks) over keys 0..10
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
        *[[1] * 11] * 4,
    ]


def test_a_conversation_reuses_its_prompt_exactly(converted):
    engine = engine_of(converted)
    params = DecodeParams(policy="verify", block_size=4, max_new_tokens=8)

    async def main():
        messages = []
        for user in PROMPTS:
            messages.append({"role": "user", "content": user})
            ids, stats = await reused_as_recomputed(engine, messages, params)
            assert len(messages) == 1 or stats.reused_tokens > 0
            messages.append({"role": "assistant", "content": engine.tokenizer.decode(ids).strip() or "ok."})

    try:
        asyncio.run(main())
    finally:
        engine.close()


def test_a_model_it_cannot_verify_with_and_sampling_are_refused(tmp_path):
    with pytest.raises(ValueError, match="decodes greedily"):
        DecodeParams(policy="verify", temperature=0.7)
    engine = engine_of(make_model_dir(tmp_path / "llada"))  # bidirectional, unshifted logits

    async def main():
        with pytest.raises(RequestError, match="needs a block-causal model with shifted logits"):
            await engine.generate("hi", DecodeParams(policy="verify", block_size=4))
        _, last = await engine.generate("hi", DecodeParams(block_size=4, max_new_tokens=4))  # it keeps serving
        assert last.finished

    try:
        asyncio.run(main())
    finally:
        engine.close()
