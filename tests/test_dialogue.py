"""The agent's history budget: its own cap, and the prompt length the model was trained on."""

from __future__ import annotations

import shutil

import pytest

from agent.dialogue import Dialogue
from dllm_engine.engine import Engine

EXCHANGES = [("what did you do today?", "I went for a long walk by the river."), ("was it cold?", "A little, but the sun was out.")]


def talk(dialogue: Dialogue) -> list[int]:
    for user, assistant in EXCHANGES:
        dialogue.add("user", user)
        dialogue.add("assistant", assistant)
    dialogue.add("user", "what will you do tomorrow?")
    return dialogue.prompt()


def test_the_history_fits_the_prompt_length_the_model_was_trained_on(random_model_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(random_model_dir, d)
    engine = Engine.from_pretrained(d, dtype="float32", max_batch=1)  # no generation_config.json: the agent's cap alone
    try:
        alone = engine.tokenizer.apply_chat_template([{"role": "user", "content": "what will you do tomorrow?"}])
        assert len(talk(Dialogue.for_engine(engine, None, 512))) > len(alone) + 20  # both exchanges kept
        assert talk(Dialogue.for_engine(engine, None, len(alone))) == alone  # the agent's cap: the last turn
    finally:
        engine.close()
    (d / "generation_config.json").write_text(f'{{"max_prompt_tokens": {len(alone)}}}')
    engine = Engine.from_pretrained(d, dtype="float32", max_batch=1)
    try:
        assert talk(Dialogue.for_engine(engine, None, 512)) == alone  # the model's length wins over a larger cap
    finally:
        engine.close()



def test_past_the_budget_the_history_drops_to_half_so_the_next_turns_share_their_start(random_model_dir):
    engine = Engine.from_pretrained(random_model_dir, dtype="float32", max_batch=1)
    try:
        tok, budget = engine.tokenizer, 400
        dialogue = Dialogue.for_engine(engine, None, budget)
        prompts = []
        for i in range(12):
            dialogue.add("user", f"question number {i}, what do you think?")
            prompts.append(dialogue.prompt())
            dialogue.add("assistant", f"answer number {i}, I think so.")
        one = [{"role": "user", "content": "hi"}]
        header = len(tok.apply_chat_template(one)) - len(tok.apply_chat_template(one, add_generation_prompt=False))
    finally:
        engine.close()
    trims = 0
    for before, now in zip(prompts, prompts[1:]):
        assert len(now) <= budget
        if now[: len(before) - header] != before[:-header]:  # the oldest exchanges went
            trims += 1
            assert len(now) <= budget // 2  # down to half, not just under the budget
    assert 1 <= trims < len(prompts) // 3  # between trims each prompt extends the one before


def test_instructions_stay_at_the_head_and_within_their_share_of_the_budget(random_model_dir):
    engine = Engine.from_pretrained(random_model_dir, dtype="float32", max_batch=1)
    try:
        tok, budget = engine.tokenizer, 200
        dialogue = Dialogue.for_engine(engine, "You sell bicycles.", budget)
        for i in range(12):
            dialogue.add("user", f"question number {i}, what do you think?")
            prompt = dialogue.prompt()
            dialogue.add("assistant", f"answer number {i}, I think so.")
            assert len(prompt) <= budget and "You sell bicycles." in tok.decode(prompt[:40])
        with pytest.raises(ValueError, match="tokens"):
            dialogue.check_system_prompt("so many words " * 100)
        assert dialogue.check_system_prompt("  ") is None
        with pytest.raises(ValueError, match="string"):
            dialogue.check_system_prompt(["not", "text"])
    finally:
        engine.close()


def test_remove_takes_out_the_turn_it_was_given_and_keeps_the_dropped_ones_dropped(random_model):
    dialogue = Dialogue(random_model[1])
    first, _, again = dialogue.add("user", "yes"), dialogue.add("assistant", "Good."), dialogue.add("user", "yes")
    dialogue.dropped = 2  # the first exchange no longer fits
    dialogue.remove(again)  # by identity: the first "yes" stays
    assert dialogue.turns == [{"role": "user", "content": "yes"}, {"role": "assistant", "content": "Good."}] and dialogue.turns[0] is first
    dialogue.remove(first)
    dialogue.remove(None)  # nothing recorded: nothing to remove
    assert dialogue.turns == [{"role": "assistant", "content": "Good."}] and dialogue.dropped == 1
