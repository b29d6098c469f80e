"""The distillation teacher's batched sampler against transformers' own generate, one prompt at a time.

A tiny random Gemma 3 stands in for the real teacher (the 250 MB package is an optional extra)."""

from __future__ import annotations

import json

import pytest
import torch

from dllm_engine.cli import DEFAULT_MODEL_DIR
from dllm_engine.distill import Teacher, clean_reply, question_first, training_prompts

transformers = pytest.importorskip("transformers")

PREFIX = "A short chat.\nA: Hello!\nB: Hi, nice to meet you.\n"
PROMPTS = ["Yes.", "What do you like to eat for dinner on a Sunday evening?", "Do you like the rain?", "ok"]


@pytest.fixture(scope="module")
def tiny_gemma():
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(DEFAULT_MODEL_DIR / "tokenizer.json"), eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    cfg = transformers.Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=64, layer_types=["sliding_attention", "full_attention"],
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    return tok, transformers.Gemma3ForCausalLM(cfg).eval()


def reference(tok, model, prompt: str, stops: list[int], n: int) -> list[int]:
    """Greedy generate on prefix + turn alone (tokenized the way the teacher does)."""
    ids = torch.cat([tok(PREFIX, return_tensors="pt").input_ids, tok(f"A: {prompt}\nB:", add_special_tokens=False, return_tensors="pt").input_ids], 1)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return next((new[: i + 1] for i, t in enumerate(new) if t in stops), new)


def test_batched_shared_prefix_sampler_equals_generate_per_prompt(tiny_gemma):
    tok, model = tiny_gemma
    teacher = Teacher(tok, model, prefix=PREFIX, max_new_tokens=10, temperature=0)
    # A random model never writes a newline: call a token the first prompt gets a few steps in
    # "newline", so that row finishes early and leaves the batch while the others go on.
    first = reference(tok, model, PROMPTS[0], [tok.eos_token_id], 10)
    teacher.newline = next(t for i, t in enumerate(first) if i >= 2 and t not in first[:i])
    stops = [teacher.newline, tok.eos_token_id]
    want = [reference(tok, model, q, stops, 10) for q in PROMPTS]
    assert min(map(len, want)) < 10 == max(map(len, want))
    assert teacher.reply_tokens(PROMPTS) == want


def test_cut_down_output_layer_only_emits_kept_tokens(tiny_gemma):
    tok, model = tiny_gemma
    keep = torch.arange(100, 300)
    teacher = Teacher(tok, model, keep=keep, prefix=PREFIX, max_new_tokens=6, temperature=0.7)
    rows = teacher.reply_tokens(PROMPTS, torch.Generator().manual_seed(0))
    assert all(100 <= t < 300 for row in rows for t in row) and all(len(r) == 6 for r in rows)
    assert rows == teacher.reply_tokens(PROMPTS, torch.Generator().manual_seed(0))  # seeded: reproducible


def test_clean_reply_keeps_finished_short_lines_only():
    assert clean_reply("  I love   it! ", "Do you?") == "I love it!"
    assert clean_reply("I love it and", "Do you?") is None  # cut off
    assert clean_reply("", "Do you?") is None
    assert clean_reply("Sure. A: what about you?", "Do you?") is None  # wrote the other side's turn
    assert clean_reply("Do you?", "do you?") is None  # echo
    assert clean_reply(" ".join(["word"] * 40) + ".", "Do you?") is None


def test_prompts_come_from_the_training_split_questions_first(tmp_path):
    rows = [("hello there", "hi"), ("how are you?", "fine"), ("nice", "yes"), ("how are you?", "good"), ("line\nbreak", "x")]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}], "reply": r}) + "\n" for q, r in rows))
    prompts = training_prompts(tmp_path)
    assert sorted(prompts) == ["hello there", "how are you?", "nice"]  # distinct, one line each
    ordered = question_first(prompts, seed=1)
    assert ordered[0] == "how are you?" and sorted(ordered) == sorted(prompts)


def test_missing_or_malformed_training_data_is_a_clear_error(tmp_path):
    from dllm_engine.cli import main

    with pytest.raises(SystemExit, match=r"train.jsonl: not found \(run `dllm prepare-data` first\)"):
        main(["distill", "--data", str(tmp_path)])
    (tmp_path / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}], "reply": "yo"}\n{"messages": \n')
    with pytest.raises(SystemExit, match=r"train.jsonl:2: malformed JSON line"):
        main(["distill", "--data", str(tmp_path)])
    assert not (tmp_path / "distilled.jsonl").exists()
