"""Training an AR checkpoint converted by `dllm convert` into a block-diffusion model (the default
model's recipe, configs/smollm2.toml): the objective predicts each token from the state decoding
takes it from, LoRA adapters start as the checkpoint and merge into what they computed, and a run
checkpoints only its adapters, resumes, and exports a merged model with the adapters beside it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil

import pytest
import torch

from dllm_engine.config import ConfigError
from dllm_engine.decoding import DecodeParams
from dllm_engine.engine import Engine
from dllm_engine.default_model import SMOLLM_DEFAULT_SYSTEM, built_model
from dllm_engine.loading import load_model, merge_adapter, model_params
from tests.helpers import CHATML, reused_as_recomputed
from training.batches import Row, collate, encode_chat
from training.config import TrainConfig
from training.lora import LoRA
from training.loop import ADAPTER, export, train
from training.objective import denoise_hidden, diffusion_loss

SYSTEM = {"role": "system", "content": "answer briefly."}


def visible(prompt_len: int, length: int, block: int) -> torch.Tensor:
    """(length, length), by hand: each prompt token is a block of its own, then reply blocks."""
    def block_of(i: int) -> int:
        return i if i < prompt_len else prompt_len + (i - prompt_len) // block

    ids = [block_of(i) for i in range(length)]
    return torch.tensor([[ids[j] <= ids[i] for j in range(length)] for i in range(length)])


@torch.no_grad()
@pytest.mark.parametrize("block, drafting", [(1, False), (4, False), (4, True)])
def test_each_token_is_predicted_from_the_state_decoding_takes_it_from(converted, block, drafting):
    """For every reply token of two complementary noisy copies: a block's first token from the last
    clean state before the block (the AR prediction), any other from the noisy state before it
    in its block, each computed here by a plain forward over just what decoding has at that point.
    Drafting for self-speculation: what came before the block token-causal, as verify decodes it,
    and every reply token's causal prediction besides."""
    model, tok = load_model(converted, dtype="float32")
    rows = [Row.compact(tok.apply_chat_template([{"role": "user", "content": "tell me about dogs"}]), list(range(5, 16))),
            Row.compact(tok.apply_chat_template([{"role": "user", "content": "hi"}]), list(range(20, 27)))]
    batch = collate(rows, tok.special.pad)
    masked = batch["region"] & (torch.rand(batch["ids"].shape, generator=torch.Generator().manual_seed(0)) < 0.5)
    copies = [torch.where(m, tok.special.mask, batch["ids"]) for m in (masked, batch["region"] & ~masked)]
    got = denoise_hidden(model, copies, batch, block, drafting=drafting)
    assert len(got) == len(copies) + drafting
    for c, noisy in enumerate(copies):
        for i, row in enumerate(rows):
            p = len(row.prompt)
            for j in range(len(row.region)):
                start = j - j % block
                causal = p + start if drafting else p  # token-causal up to here
                if j == start:
                    x = batch["ids"][i, : p + j]
                else:
                    x = torch.cat([batch["ids"][i, : p + start], noisy[i, p + start : p + start + block].clone()[: len(row.region) - start]])
                want = model(x[None], key_valid=visible(causal, len(x), block)[None])[0, p + j - 1]
                torch.testing.assert_close(got[c][i, p + j], want, atol=1e-5, rtol=1e-4)
                if drafting and c == 0:  # the causal prediction, from the clean reply before the token
                    x = batch["ids"][i, : p + j]
                    want = model(x[None], key_valid=visible(len(x), len(x), 1)[None])[0, -1]
                    torch.testing.assert_close(got[-1][i, p + j], want, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_at_block_size_1_the_loss_is_the_ar_models_cross_entropy_and_drafting_adds_it(converted):
    model, tok = load_model(converted, dtype="float32")
    rows = [Row.compact(tok.apply_chat_template([{"role": "user", "content": "a cat"}]), list(range(5, 14)))]
    batch = collate(rows, tok.special.pad)
    ids = batch["ids"]
    states = model(ids, key_valid=torch.tril(torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool))[None])
    ce = torch.nn.functional.cross_entropy(model.logits(states[0, :-1]), ids[0, 1:], reduction="none")[batch["region"][0, 1:]]
    loss = lambda block, **kw: diffusion_loss(model, batch, tok.special.mask, 0.5, torch.Generator().manual_seed(1), block, tok.special.eos, "mean", **kw)  # noqa: E731
    # complementary copies score every reply token once: "mean" is the mean over all of them
    torch.testing.assert_close(loss(1, complementary=True), ce.mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss(4, ar_weight=0.5) - loss(4, ar_weight=0.0), 0.5 * ce.mean(), atol=1e-5, rtol=1e-5)


def test_a_model_trained_to_draft_speaks_its_reply_several_tokens_a_forward_exactly(converted, tmp_path):
    """The recipe with drafting, then self-speculation: the reply it learned, as the model decodes
    it one token per forward, in at least two tokens per forward."""
    from tests.helpers import stream_turn

    data = tmp_path / "data"
    data.mkdir()
    messages, reply = [SYSTEM, {"role": "user", "content": "hi"}], "hello there, how are you today?"
    for name in ("self.jsonl", "self-eval.jsonl"):
        (data / name).write_text(json.dumps({"messages": messages, "reply": reply}) + "\n")
    cfg = TrainConfig.from_dict(dict(
        data_dir=str(data), out_dir=str(tmp_path / "run"), init_from=str(converted), train_files=["self.jsonl"], eval_file="self-eval.jsonl",
        reply_len=16, pad_to_block=True, block_sizes=[4], complementary_masks=True, loss_weighting="mean", drafting_ar_weight=1.0,
        batch_tokens=512, max_steps=200, warmup_steps=1, lr=1e-2, eval_interval=200, log_interval=200, threads=0, autocast_bf16=False,
    ))
    train(cfg, progress=False, log=lambda *_: None)
    exported = export(tmp_path / "run", tmp_path / "model", which="last", dtype=torch.float32)
    model, tok = load_model(exported, dtype="float32")
    engine = Engine(model, tok, max_batch=2, max_len=256)
    verify = dataclasses.replace(model_params(exported), max_new_tokens=16)  # what it was trained for
    assert (verify.policy, verify.block_size) == ("verify", 4)

    async def main():
        ar = await stream_turn(engine, messages, DecodeParams(policy="vanilla", block_size=1, max_new_tokens=16))
        return ar, await stream_turn(engine, messages, verify), await stream_turn(engine, messages, dataclasses.replace(verify, early_stop=False))

    try:
        (ar, _), (verified, stats), (unstopped, unstopped_stats) = asyncio.run(main())
    finally:
        engine.close()
    assert tok.decode(verified).strip() == reply and verified == ar
    assert stats.tokens_per_forward >= 2 and stats.new_tokens < 16  # it stopped
    assert (unstopped, unstopped_stats.forwards) == (verified, stats.forwards)  # at the stop token, early stop or not


def test_prompts_assemble_as_a_template_with_a_default_system_turn_renders_them(converted):
    """SmolLM2's template adds a system turn to a conversation without one; rows with a system
    prompt of their own must not get it twice (the prompt is assembled message by message)."""
    _, tok = load_model(converted, dtype="float32")
    examples = [{"messages": [SYSTEM, {"role": "user", "content": q}], "reply": "yes."} for q in ("hi there", "do you like cats?")]
    rows, dropped = encode_chat(tok, examples, 32, 128, pad_to=4)
    padded = -(-(len(tok.encode("yes.")) + 1) // 4) * 4  # reply and end of turn, to the end of their block
    assert dropped == 0
    for ex, row in zip(examples, rows):
        assert list(row.prompt) == tok.apply_chat_template(ex["messages"])
        assert len(row.region) == padded < 32 and row.region[-1] == tok.special.eos


def test_lora_starts_as_the_model_and_merges_into_what_it_computes(converted, tmp_path):
    model, tok = load_model(converted, dtype="float32")
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "hello"}])])
    with torch.no_grad():
        base = model(ids)
        lora = LoRA(model, rank=4, alpha=8.0)
        torch.testing.assert_close(model(ids), base)  # B starts at zero
        for b in lora.b.values():
            b.normal_(0, 0.5)
        adapted = model(ids)
        assert not torch.allclose(adapted, base, atol=1e-3)
        lora.save(tmp_path / "lora.safetensors", torch.float32)
        lora.merge()
        torch.testing.assert_close(model(ids), adapted, atol=1e-4, rtol=1e-4)
        fresh, _ = load_model(converted, dtype="float32")
        merge_adapter(fresh, tmp_path / "lora.safetensors")
        torch.testing.assert_close(fresh(ids), adapted, atol=1e-4, rtol=1e-4)
        (tmp_path / "not-an-adapter.safetensors").write_bytes(b"{}")
        with pytest.raises(ConfigError, match="not a LoRA adapter file"):
            merge_adapter(fresh, tmp_path / "not-an-adapter.safetensors")
        with pytest.raises(ConfigError, match="does not fit"):
            other, _ = load_model(converted, dtype="float32")
            other.model.transformer["blocks"] = other.model.transformer["blocks"][:1]
            merge_adapter(other, tmp_path / "lora.safetensors")


def test_a_lora_run_checkpoints_adapters_resumes_and_exports_the_merged_model(converted, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    lines = [json.dumps({"messages": [SYSTEM, {"role": "user", "content": q}], "reply": r}) for q, r in [("hi", "hello."), ("cats?", "yes, cats."), ("dogs?", "dogs are fun.")]]
    for name in ("self.jsonl", "self-eval.jsonl"):
        (data / name).write_text("\n".join(lines) + "\n")
    cfg = TrainConfig.from_dict(dict(
        data_dir=str(data), out_dir=str(tmp_path / "run"), init_from=str(converted), train_files=["self.jsonl"], eval_file="self-eval.jsonl",
        reply_len=16, pad_to_block=True, block_sizes=[4], complementary_masks=True, loss_weighting="mean", lora_rank=4, lora_alpha=8.0,
        batch_tokens=256, max_steps=6, warmup_steps=1, lr=1e-2, eval_interval=3, log_interval=3, threads=0, autocast_bf16=False,
    ))
    quiet = dict(progress=False, log=lambda *_: None)
    straight = TrainConfig.from_dict({**dataclasses.asdict(cfg), "out_dir": str(tmp_path / "straight")})
    train(straight, **quiet)  # the same 6 steps in one go: a resumed run must end with the same adapters
    train(cfg, steps=3, **quiet)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert "model" not in ckpt and set(ckpt["lora"]) == {f"{ab}.{k}" for k in LoRA(load_model(converted, dtype="float32")[0], 4, 8.0).a for ab in "ab"}
    assert train(cfg, resume=True, **quiet)["step"] == 6
    resumed, whole = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False)["lora"] for d in ("run", "straight"))
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k])
    out = export(tmp_path / "run", tmp_path / "exported", which="last", dtype=torch.float32)
    merged, tok = load_model(out, dtype="float32")
    base, _ = load_model(converted, dtype="float32")
    merge_adapter(base, out / ADAPTER)
    ids = torch.tensor([tok.apply_chat_template([SYSTEM, {"role": "user", "content": "hi"}])])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), base(ids), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(merged(ids), load_model(converted, dtype="float32")[0](ids), atol=1e-3)  # it trained
    assert (out / "chat_template.jinja").read_text() == CHATML
    generation = json.loads((out / "generation_config.json").read_text())
    base_generation = json.loads((converted / "generation_config.json").read_text())
    # its stop ids kept; trained for blocks of 4, it no longer decodes one token per forward as converted
    assert base_generation["policy"] == "vanilla" and base_generation["block_size"] == 1
    assert generation == {**base_generation, "max_new_tokens": 16, "max_prompt_tokens": 192, "policy": "threshold", "block_size": 4}


def test_the_default_model_is_built_once_from_its_base_and_adapter(ar_checkpoint, converted, tmp_path):
    """`default_model.built_model`: the base converted, the adapter merged, the recipe's system
    prompt as the template's default system turn and its reply cap; a second call reuses the build."""
    base = tmp_path / "base"
    shutil.copytree(ar_checkpoint, base)
    (base / "chat_template.jinja").write_text(CHATML.replace("be kind", SMOLLM_DEFAULT_SYSTEM))
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    model, tok = load_model(converted, dtype="float32")
    lora = LoRA(model, rank=2, alpha=4.0)
    with torch.no_grad():
        for b in lora.b.values():
            b.normal_(0, 0.5)
    lora.save(recipe / "lora.safetensors", torch.float32)
    (recipe / "recipe.json").write_text(json.dumps({"name": "tiny", "mask_token": "<|mdm_mask|>", "system_prompt": "speak briefly.", "max_new_tokens": 12}))
    out = built_model(recipe, base=base, cache=tmp_path / "cache")
    built, built_tok = load_model(out, dtype="float32")
    lora.merge()
    ids = torch.tensor([tok.apply_chat_template([{"role": "system", "content": "speak briefly."}, {"role": "user", "content": "hi"}])])
    assert built_tok.apply_chat_template([{"role": "user", "content": "hi"}]) == ids[0].tolist()  # the default system turn
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))  # as written to disk
        torch.testing.assert_close(built(ids), model(ids), atol=1e-3, rtol=1e-3)
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 12
    stamp = (out / "config.json").stat().st_mtime_ns
    assert built_model(recipe, base=base, cache=tmp_path / "cache") == out and (out / "config.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("params, keeps_reply", [
    (DecodeParams(threshold=0.3, block_size=4, max_new_tokens=8), False),  # the reply in blocks of 4: other keys in a prompt
    (DecodeParams(policy="vanilla", block_size=1, max_new_tokens=8), True),  # one token a block: token-causal
    (DecodeParams(policy="verify", block_size=4, max_new_tokens=8), True),  # drafts verified token-causally
])
def test_a_converted_model_reuses_its_previous_prompt_exactly(converted, params, keeps_reply):
    """A token-causal prompt: each request of a conversation reuses the whole previous prompt, and
    its reply too where that was decoded token-causally; replies equal a full recompute's."""
    model, tok = load_model(converted, dtype="float32")
    engine = Engine(model, tok, max_batch=2, max_len=512)
    assert engine.exact_prefix_reuse

    async def main():
        messages = [SYSTEM]
        previous: list[int] = []
        for user in ["hello there", "tell me about your weekend.", "what do you like?"]:
            messages.append({"role": "user", "content": user})
            reused, stats = await reused_as_recomputed(engine, messages, params)
            prompt, kept = engine.encode_prompt(messages), engine._prefixes["kept"].ids
            assert kept[: len(prompt)] == prompt and kept[len(prompt) :] == reused[: len(kept) - len(prompt)]
            assert len(kept) > len(prompt) if keeps_reply else kept == prompt
            shared = next((i for i, (a, b) in enumerate(zip(previous, prompt)) if a != b), min(len(previous), len(prompt)))
            assert stats.reused_tokens == shared and (not previous or shared > 0)
            previous = kept
            messages.append({"role": "assistant", "content": tok.decode(reused).strip() or "ok."})
        # the same ids and more: every kept position is reused, and decodes as recomputed
        _, stats = await reused_as_recomputed(engine, kept + tok.encode(" and then?"), params)
        assert stats.reused_tokens == len(kept)

    try:
        asyncio.run(main())
    finally:
        engine.close()


def test_the_engine_bench_runs_a_converted_model_one_token_per_forward_beside_the_rest(converted):
    from benchmarks import engine as bench

    model, tok = load_model(converted, dtype="float32", config_overrides={"max_sequence_length": 1024})  # the bench's histories
    engine = Engine(model, tok, max_batch=2, max_len=1024)
    try:
        result = bench.run_bench(engine, batches=[1, 2], max_new_tokens=8, block_size=4, threshold=0.3, n_prompts=2)
    finally:
        engine.close()
    runs = result["runs"]
    assert [r["name"] for r in runs] == [n for _ in (1, 2) for n, *_ in [bench.AR, bench.VERIFY] + bench.CONFIGS]
    for r in runs:
        assert r["speedup_vs_ar"] > 0 and 0 <= r["agreement"] <= 1
        assert r["first_sentence_ms"] is None or 0 < r["first_sentence_ms"] <= r["total_ms"] + 1
    ar = [r for r in runs if r["name"] == bench.AR[0]]
    assert all(r["speedup_vs_ar"] == 1.0 and r["tokens_per_forward"] <= 1.0 and r["forwards"] >= r["new_tokens"] for r in ar)
    assert [r["replies"] for r in runs if r["name"] == bench.VERIFY[0]] == [r["replies"] for r in ar]  # the AR model's replies


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_the_question_set_is_scored_for_the_model_and_the_ar_model_on_the_same_prompts(converted, dtype):
    """`benchmarks.quality.questions`: the model's replies from its engine, the AR model's one token
    per forward in the same dtype; with the same weights, decoded one token per forward both ways,
    the same replies."""
    from benchmarks.quality import questions, questions_of_ar
    from training.data import answers_right, load_questions

    model, tok = load_model(converted, dtype=dtype)
    engine = Engine(model, tok, max_batch=1, max_len=256)
    params = DecodeParams(policy="vanilla", block_size=1, max_new_tokens=4)
    try:
        out = questions(engine, params, "answer briefly.")
    finally:
        engine.close()
    out |= questions_of_ar(out, converted, "cpu", dtype, params, "answer briefly.")
    qs = load_questions()
    assert len(qs) >= 50 and out["questions"] == len(qs)
    assert [r["reply"] for r in out["replies_model"]] == [r["reply"] for r in out["replies_ar"]]
    assert out["right_model"] == out["right_ar"] == sum(answers_right(r["reply"], q) for r, q in zip(out["replies_ar"], qs))


def test_an_answer_is_right_as_whole_words_of_any_accepted_answer():
    from training.data import Question, answers_right

    q = Question("What is the capital of France?", ("paris", "the city of light"))
    assert answers_right("It is Paris.", q) and answers_right("The City of Light!", q)
    assert not answers_right("Parisian food is nice.", q) and not answers_right("A city of lights.", q)
