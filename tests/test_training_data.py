"""Data preparation: corpora cleaned into examples split by conversation, deterministically, and bad corpus files named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from training import data
from training.data import DataError


def _chitchat(n: int) -> dict:
    convs = {}
    for i in range(n):
        turns = [[{"text": f"Hey there number {i}", "sender": "a"}, {"text": "how are  you?", "sender": "a"}],
                 [{"text": "I am good thanks, and you?", "sender": "b"}],
                 [{"text": "Great! I went hiking today.", "sender": "a"}],
                 [{"text": "Tell me about your weekend.", "sender": "b"}],  # a quality prompt
                 [{"text": "see http://spam.example", "sender": "a"}],  # junk: cuts the conversation
                 [{"text": "Nice, where did you go?", "sender": "b"}],
                 [{"text": "Up in the hills with my dog.", "sender": "a"}]]
        convs[f"c{i}"] = {"messages": turns}
    return convs


def _corpora(tmp_path: Path, n: int = 40) -> tuple[Path, Path]:
    chit = tmp_path / "dataset.json"
    chit.write_text(json.dumps(_chitchat(n)))
    bot = tmp_path / "english"
    bot.mkdir()
    (bot / "greetings.yml").write_text(yaml.safe_dump({"categories": ["greetings"], "conversations": [["Hello", "Hi there!"], ["How are you?", "Fine, thanks."], "stray entry"]}))
    return chit, bot


def test_prepare_builds_examples_split_by_conversation(tmp_path):
    chit, bot = _corpora(tmp_path)
    stats = data.prepare(tmp_path / "out", holdout=0.2, seed=1, vocab_size=300, chitchat_path=chit, chatterbot_dir=bot, verbose=False)
    out = tmp_path / "out"
    train_ex = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    eval_ex = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert stats["conversations"] == 42 and stats["eval_conversations"] == round(42 * 0.2)
    assert stats["skipped_malformed_entries"] == ["greetings.yml:2"]
    ids = lambda exs: {m["content"].split("number ")[-1] for e in exs for m in e["messages"] if "number" in m["content"]}  # noqa: E731
    assert ids(train_ex) and ids(eval_ex) and not ids(train_ex) & ids(eval_ex)
    first = train_ex[0]
    assert first["messages"] == [{"role": "user", "content": "Hey there number " + first["messages"][0]["content"].split("number ")[1]}]
    assert first["messages"][0]["content"].endswith(". how are you?")  # utterances joined, whitespace cleaned
    for e in train_ex + eval_ex:
        roles = [m["role"] for m in e["messages"]]
        assert roles[0] == "user" and roles[-1] == "user" and all(a != b for a, b in zip(roles, roles[1:]))
        assert "http" not in e["reply"] and all("http" not in m["content"] for m in e["messages"])
        assert data.normalize_for_match(e["reply"]) not in {data.normalize_for_match(p) for p in data.QUALITY_PROMPTS}
        assert data.normalize_for_match(e["messages"][-1]["content"]) != "tell me about your weekend"
    assert stats["train_dropped_quality_prompts"] > 0
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (out / "tokenizer").iterdir()}
    assert "Tell me about your weekend." not in (out / "utterances.txt").read_text()


def test_prepare_tags_sources_and_writes_a_repeated_exchange_once(tmp_path):
    chit, bot = _corpora(tmp_path)
    (bot / "tech.yml").write_text(yaml.safe_dump({"conversations": [["My mouse is dead.", "Change its batteries."]] * 5}))
    stats = data.prepare(tmp_path / "out", holdout=0.2, seed=1, vocab_size=300, chitchat_path=chit, chatterbot_dir=bot, verbose=False)
    exs = [json.loads(x) for name in ("train", "eval") for x in (tmp_path / "out" / f"{name}.jsonl").read_text().splitlines()]
    tech = [e for e in exs if e["reply"] == "Change its batteries."]
    assert [e["source"] for e in tech] in (["chatterbot/tech"], ["chatterbot/tech"] * 2)  # once per split at most
    for name in ("train", "eval"):  # the made-up chats repeat their later exchanges too
        lines = (tmp_path / "out" / f"{name}.jsonl").read_text().splitlines()
        assert len(set(lines)) == len(lines) and stats[f"{name}_duplicates_dropped"] > 0
    assert {e["source"] for e in exs} == {"chitchat", "chatterbot/greetings", "chatterbot/tech"}


def test_prepare_is_deterministic(tmp_path):
    chit, bot = _corpora(tmp_path)
    for name in ("a", "b"):
        data.prepare(tmp_path / name, holdout=0.2, seed=3, vocab_size=300, chitchat_path=chit, chatterbot_dir=bot, verbose=False)
    for f in ("train.jsonl", "eval.jsonl", "utterances.txt", "tokenizer/tokenizer.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_quality_prompts_are_forty_distinct_spoken_prompts():
    assert len(data.QUALITY_PROMPTS) == 40
    assert len({data.normalize_for_match(p) for p in data.QUALITY_PROMPTS}) == 40


@pytest.mark.parametrize(
    "content, match",
    [("", r"dataset.json: corpus file is empty"),
     ("{not json", r"dataset.json: not valid JSON"),
     ('{"c1": {"msgs": []}}', r"dataset.json: conversation 'c1' is malformed")],
)
def test_bad_chitchat_file_is_named(tmp_path, content, match):
    chit, bot = _corpora(tmp_path)
    chit.write_text(content)
    with pytest.raises(DataError, match=match):
        data.prepare(tmp_path / "out", chitchat_path=chit, chatterbot_dir=bot, verbose=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, match",
    [("", r"greetings.yml: corpus file is empty"),
     ("conversations: [unclosed", r"greetings.yml: not valid YAML"),
     ("- just a list\n", r"greetings.yml: expected a mapping with a 'conversations' list")],
)
def test_bad_chatterbot_file_is_named(tmp_path, content, match):
    chit, bot = _corpora(tmp_path)
    (bot / "greetings.yml").write_text(content)
    with pytest.raises(DataError, match=match):
        data.prepare(tmp_path / "out", chitchat_path=chit, chatterbot_dir=bot, verbose=False)


def test_clean_rejects_junk_and_normalizes():
    assert data.clean("  Hi\u00a0there \u2019friend\u2019  ") == "Hi there 'friend'"
    for junk in ("", "   ", "12345 !!", "visit www.example.com", "```code```", "x" * 500, None, 42, "bad \ufffd text"):
        assert data.clean(junk) is None, junk
