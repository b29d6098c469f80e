"""Block-causal models (`LLaDAConfig.block_causal`): exact caches, and training that sees what
decoding sees. The reference here builds its attention mask by hand, independently of the engine."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from dllm_engine.config import ConfigError
from dllm_engine.decoding import DecodeParams, Runner, Sequence, attention_blocks
from dllm_engine.engine import Engine
from dllm_engine.loading import load_model
from dllm_engine.model import KVCache
from tests.helpers import PAIRS, TINY_MODEL, make_model_dir, prompt_ids, reused_as_recomputed, run_to_end, tiny_config, tiny_model, tiny_train_config
from training.batches import Row, collate
from training.config import TrainConfig
from training.loop import train
from training.objective import denoise_hidden

CPU = torch.device("cpu")


def block_mask(prompt_len: int, length: int, block: int, turn_ends: list[int] = ()) -> torch.Tensor:
    """(length, length): query i may see key j iff j's block is not after i's. The prompt is block 0,
    or with `turn_ends` (positions after each end-of-turn token) one block per turn."""
    def block_of(i: int) -> int:
        if i < prompt_len:
            return sum(e <= i for e in turn_ends)
        return 1 + sum(e < prompt_len for e in turn_ends) + (i - prompt_len) // block

    ids = [block_of(i) for i in range(length)]
    return torch.tensor([[ids[j] <= ids[i] for j in range(length)] for i in range(length)])


def turn_ends(tok, ids: list[int]) -> list[int]:
    return [i + 1 for i, t in enumerate(ids) if t == tok.special.end_of_turn]


CHAT = [
    {"role": "user", "content": "hello there, how are you today?"},
    {"role": "assistant", "content": "good morning, the weather is nice."},
    {"role": "user", "content": "tell me about your weekend."},
]


def reference(model, prompt: list[int], mask_id: int, gen_length: int, block: int, ends: list[int] = ()) -> list[int]:
    """LLaDA's reference loop (whole canvas every step, one token per step) under the block mask."""
    x = torch.tensor([prompt + [mask_id] * gen_length])
    p = len(prompt)
    mask = block_mask(p, x.shape[1], block, ends)[None]
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


@pytest.fixture(scope="module")
def turn_model(tmp_path_factory):
    return load_model(make_model_dir(tmp_path_factory.mktemp("turn-blocks"), {"block_causal": True, "turn_blocks": True}), dtype="float32")


@pytest.fixture
def runner(causal_model):
    model, tok = causal_model
    return Runner(model, tok, KVCache(model.config, 4, 512, torch.float32, "cpu"))


def _seq(tok, text: str, **params) -> Sequence:
    return Sequence(text, prompt_ids(tok, text), DecodeParams(**{"early_stop": False, **params}), tok, CPU, block_causal=True)


def test_attention_blocks_give_each_turn_its_own_block():
    prompt = torch.tensor([0, 5, 9, 6, 9, 7])  # 9 ends a turn
    assert attention_blocks(prompt, 6, 4).tolist() == [0] * 6 + [1] * 4 + [2] * 2
    assert attention_blocks(prompt, 6, 4, turn_end=9).tolist() == [0, 0, 0, 1, 1, 2] + [3] * 4 + [4] * 2


@torch.inference_mode()
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_every_cache_matches_the_reference_token_for_token(causal_model, runner, cache):
    """The caches are exact for a block-causal model: one token a step gives the reference's reply."""
    model, tok = causal_model
    seq = _seq(tok, "tell me about your weekend", policy="vanilla", cache=cache, block_size=8, max_new_tokens=32)
    run_to_end(runner, [seq])
    assert seq.ids[seq.prompt_len :].tolist() == reference(model, seq.ids[: seq.prompt_len].tolist(), tok.special.mask, 32, 8)


@torch.inference_mode()
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_a_turn_blocks_model_matches_the_reference_with_one_block_per_turn(turn_model, cache):
    model, tok = turn_model
    prompt = tok.apply_chat_template(CHAT)
    ends = turn_ends(tok, prompt)
    assert len(ends) == 3  # three turns end, then the assistant header is a block of its own
    seq = Sequence("t", prompt, DecodeParams(policy="vanilla", cache=cache, block_size=8, max_new_tokens=24, early_stop=False), tok, CPU, True, True)
    run_to_end(Runner(model, tok, KVCache(model.config, 1, 256, torch.float32, "cpu")), [seq])
    want = reference(model, prompt, tok.special.mask, 24, 8, ends)
    assert seq.ids[len(prompt) :].tolist() == want
    assert want != reference(model, prompt, tok.special.mask, 24, 8)  # the turn blocks change the maths


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
@pytest.mark.parametrize("turns", [False, True])
def test_training_scores_each_block_as_decoding_sees_it(causal_model, turn_model, turns):
    """denoise_hidden's states for a noisy block equal a plain forward over the prompt, the clean
    blocks before it and that block: the model is trained on exactly what a block start shows it."""
    model, tok = turn_model if turns else causal_model
    rows = [Row.compact(tok.apply_chat_template(CHAT), list(range(5, 17))), Row.compact(prompt_ids(tok, "hi"), list(range(20, 30)))]
    batch = collate(rows, tok.special.pad)
    gen = torch.Generator().manual_seed(0)
    masked = batch["region"] & (torch.rand(batch["ids"].shape, generator=gen) < 0.5)
    noisy = torch.where(masked, tok.special.mask, batch["ids"])
    block = 4
    hidden = denoise_hidden(model, noisy, batch, block)
    for i, row in enumerate(rows):
        p, region = len(row.prompt), len(row.region)
        for start in range(0, region, block):
            end = min(start + block, region)
            x = torch.cat([batch["ids"][i, : p + start], noisy[i, p + start : p + end]])[None]
            ends = turn_ends(tok, list(row.prompt)) if turns else []
            want = model(x, key_valid=block_mask(p, x.shape[1], block, ends)[None])[0, p + start :]
            torch.testing.assert_close(hidden[i, p + start : p + end], want, atol=1e-5, rtol=1e-4)


def test_a_bidirectional_checkpoint_may_start_a_block_causal_run_but_not_resume_one(tiny_chat, tmp_path):
    def cfg(block_causal: bool, **kw) -> TrainConfig:
        model = dict(TINY_MODEL, block_causal=block_causal)
        return tiny_train_config(tmp_path, data_dir=str(tiny_chat / "data"), out_dir=str(tmp_path / "run"), model=model, **kw)

    quiet = dict(progress=False, log=lambda *_: None)
    train(cfg(True, init_from=str(tiny_chat / "model"), max_steps=2), **quiet)
    with pytest.raises(ConfigError, match="block_causal: checkpoint True vs config False"):
        train(cfg(False, max_steps=4), resume=True, **quiet)


def test_a_tiny_block_causal_model_learns_and_answers_with_every_cache(tmp_path):
    """Trained block-causally (blocks of 4 and 8), exported and served: it answers a training
    prompt verbatim whether decoded from the whole canvas or from the cache."""
    model_dir = tiny_model(tmp_path, PAIRS, model=dict(TINY_MODEL, block_causal=True), block_sizes=[4, 8])
    engine = Engine.from_pretrained(model_dir, dtype="float32", max_batch=2)
    try:
        for cache in ("none", "dual"):
            params = DecodeParams(policy="threshold", cache=cache, block_size=4, max_new_tokens=32)
            text, out = asyncio.run(engine.generate([{"role": "user", "content": "do you like dogs?"}], params))
            assert (text.strip(), out.finish_reason) == ("Yes, dogs are great.", "stop")
    finally:
        engine.close()


def test_a_turn_blocks_model_reuses_earlier_turns_exactly_across_a_conversation(turn_model):
    """Turn by turn with `conversation=`: each prompt reuses the previous prompt's whole turns (up to
    a turn end), and every reply and every cached key equals what a full recompute gives."""
    model, tok = turn_model
    engine = Engine(model, tok, max_batch=2, max_len=512)
    params = DecodeParams(threshold=0.3, block_size=8, max_new_tokens=16)
    assert engine.exact_prefix_reuse

    async def main():
        messages: list[dict[str, str]] = []
        for i, user in enumerate(["hello there, how are you today?", "tell me about your weekend.", "what do you like to do?"]):
            messages.append({"role": "user", "content": user})
            reused_ids, stats = await reused_as_recomputed(engine, messages, params)
            prompt = engine.encode_prompt(messages)
            ends = turn_ends(tok, prompt)
            # Up to the previous user turn: the reply after it was decoded in the canvas's blocks, not as a turn.
            assert stats.reused_tokens == (0 if i == 0 else ends[-3])
            kept, fresh = engine._prefixes["kept"], engine._prefixes["fresh"]
            assert kept.ids == fresh.ids == prompt[: ends[-1]]
            for a, b in zip(kept.k + kept.v, fresh.k + fresh.v):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            messages.append({"role": "assistant", "content": tok.decode(reused_ids).strip() or "ok."})
        # A history that differs inside its first turn (an interrupted reply is kept as far as it was
        # spoken) shares tokens but no whole turn: the keys of that turn saw its old end.
        edited = [{"role": "user", "content": "hello there, how is it going?"}] + messages[1:]
        kept, prompt = engine._prefixes["kept"].ids, engine.encode_prompt(edited)
        assert prompt[:5] == kept[:5]
        _, stats = await reused_as_recomputed(engine, edited, params)
        assert stats.reused_tokens == 0

    try:
        asyncio.run(main())
    finally:
        engine.close()


def test_a_token_causal_prompt_keeps_only_its_prompt_and_reuses_it_exactly(tmp_path):
    """A converted AR model's prompt is token-causal: its keys never see the reply, so a conversation
    keeps the prompt's (not the reply's, which saw the blocks) and the next turn reuses them exactly."""
    model, tok = load_model(make_model_dir(tmp_path, {"block_causal": True, "causal_prompt": True}), dtype="float32")
    engine = Engine(model, tok, max_batch=2, max_len=512)
    params = DecodeParams(threshold=0.3, block_size=8, max_new_tokens=16)
    assert engine.exact_prefix_reuse

    async def main():
        messages: list[dict[str, str]] = []
        for i, user in enumerate(["hello there, how are you today?", "tell me about your weekend."]):
            messages.append({"role": "user", "content": user})
            reused_ids, stats = await reused_as_recomputed(engine, messages, params)
            prompt = engine.encode_prompt(messages)
            assert engine._prefixes["kept"].ids == prompt
            assert (stats.reused_tokens > 0) == (i > 0)
            messages.append({"role": "assistant", "content": tok.decode(reused_ids).strip() or "ok."})

    try:
        asyncio.run(main())
    finally:
        engine.close()


@pytest.mark.parametrize("layout", [{"turn_blocks": True}, {"causal_prompt": True}])
def test_a_new_conversation_starts_from_the_system_prompt_another_left(tmp_path, layout):
    """Where reuse is exact, a conversation's first request takes the keys another conversation left
    for the same leading tokens (every call's system prompt), and decodes as if it had recomputed them."""
    model, tok = load_model(make_model_dir(tmp_path, {"block_causal": True, **layout}), dtype="float32")
    engine = Engine(model, tok, max_batch=2, max_len=512)
    params = DecodeParams(threshold=0.3, block_size=8, max_new_tokens=16)
    system = {"role": "system", "content": "You are a kind assistant who answers in one short sentence."}
    second = [system, {"role": "user", "content": "what do you like to do?"}]
    prompt = engine.encode_prompt(second)

    async def main():
        await engine.generate([system, {"role": "user", "content": "hello there"}], params, conversation="a")
        shared = engine._prefixes["a"].reusable(prompt)
        assert shared > len(tok.encode(system["content"]))  # the system turn at least
        _, out = await engine.generate(second, params, conversation="b")
        assert out.stats.reused_tokens == shared
        assert engine._prefixes["b"].ids[:shared] == prompt[:shared]
        kept = engine._prefixes["b"]
        engine.share_prefixes = False  # the same first request, recomputed from nothing
        engine.forget("b")
        _, alone = await engine.generate(second, params, conversation="b")
        assert alone.stats.reused_tokens == 0
        assert engine._prefixes["b"].ids == kept.ids
        for a, b in zip(kept.k + kept.v, engine._prefixes["b"].k + engine._prefixes["b"].v):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    try:
        asyncio.run(main())
    finally:
        engine.close()


class Mute:
    """The agent's ASR and TTS where only its engine matters: nothing heard, nothing said."""

    def transcribe(self, audio) -> str:  # noqa: ANN001
        return ""

    def synthesize(self, text: str):  # noqa: ANN201
        return iter(())


def test_the_agents_warm_up_leaves_its_system_prompt_to_the_first_caller(tmp_path):
    from agent.dialogue import Dialogue
    from agent.voice_agent import WARM_UP, Agent, AgentConfig

    model, tok = load_model(make_model_dir(tmp_path, {"block_causal": True, "causal_prompt": True}), dtype="float32")
    config = AgentConfig(system_prompt="You are a kind assistant who answers in one short sentence.", decode=DecodeParams(threshold=0.3, block_size=8, max_new_tokens=8))
    agent = Agent(config, Engine(model, tok, max_batch=2, max_len=512), Mute(), Mute(), None)
    try:
        agent.warm_up()
        first_turn = Dialogue.for_engine(agent.engine, config.system_prompt, config.max_history_tokens).prompt([{"role": "user", "content": "What time is it?"}])
        shared = agent.engine._prefixes[WARM_UP].reusable(first_turn)
        assert shared > len(tok.encode(config.system_prompt))
        _, out = asyncio.run(agent.engine.generate(first_turn, agent.config.decode, conversation="call-1"))
        assert out.stats.reused_tokens == shared
        agent.config = dataclasses.replace(config, system_prompt="Be brief. " * 400)  # every session would refuse it
        with pytest.raises(ConfigError, match=r"^system prompt: instructions must fit in \d+ tokens"):
            agent.warm_up()
    finally:
        agent.close()


def test_turn_blocks_need_a_block_causal_model():
    with pytest.raises(ConfigError, match="turn_blocks needs block_causal"):
        tiny_config(turn_blocks=True)
