"""Training rows: replies fitted to the reply region, corpora weighted, histories drawn."""

from __future__ import annotations

import pytest

from dllm_engine.config import ConfigError
from tests.helpers import tiny_train_config
from training.batches import encode_chat, repeat_sources, with_history
from training.config import TrainConfig


def test_long_replies_are_cut_at_a_sentence_end_or_dropped(tiny_chat):
    from dllm_engine.tokenizer import Tokenizer

    cfg = tiny_train_config(tiny_chat)
    tok = Tokenizer(tiny_chat / "data" / "tokenizer", cfg.model_config(tiny_chat / "data" / "tokenizer"))
    short, long_ = "I am fine.", "I am fine. " + "dogs are great " * 20
    rows, dropped = encode_chat(tok, [{"messages": [{"role": "user", "content": "hi"}], "reply": long_}], 16, 64)
    region = rows[0].region.tolist()
    assert dropped == 0 and tok.decode(region) == short and len(region) == 16
    assert region[len(tok.encode(short))] == tok.special.end_of_turn
    assert set(region[len(tok.encode(short)) + 1 :]) == {tok.special.eos}
    rows, dropped = encode_chat(tok, [{"messages": [{"role": "user", "content": "hi"}], "reply": "dogs " * 40}], 16, 64)
    assert (rows, dropped) == ([], 1)


def test_source_repeats_weight_a_corpus_and_its_files():
    exs = [{"source": "chitchat"}, {"source": "chatterbot/food"}, {"source": "chatterbot/ai"}, {"reply": "no source"}]
    out = repeat_sources(exs, {"chatterbot": 3, "chatterbot/ai": 2})
    assert [e.get("source") for e in out] == ["chitchat"] + ["chatterbot/food"] * 3 + ["chatterbot/ai"] * 2 + [None]
    out = repeat_sources(exs, {"chitchat": 0, "chatterbot/ai": 0})
    assert [e.get("source") for e in out] == ["chatterbot/food", None]
    with pytest.raises(ConfigError, match="source_repeats"):
        TrainConfig.from_dict({"data_dir": "d", "out_dir": "o", "source_repeats": {"chatterbot": -1}})


def test_history_copies_answer_the_same_last_turn_after_drawn_exchanges():
    exs = [{"messages": [{"role": "user", "content": f"q{i}"}], "reply": f"a{i}", "source": "s"} for i in range(5)]
    out = with_history(exs, copies=3, turns=2, seed=1)
    assert out[:5] == exs and len(out) == 20
    lengths = set()
    for k, ex in enumerate(out[5:]):
        original = exs[k % 5]
        assert ex["reply"] == original["reply"] and ex["source"] == "s" and ex["messages"][-1] == original["messages"][-1]
        history = ex["messages"][:-1]
        lengths.add(len(history) // 2)
        assert [m["role"] for m in history] == ["user", "assistant"] * (len(history) // 2)
        assert all(f"a{u['content'][1:]}" == a["content"] for u, a in zip(history[::2], history[1::2]))  # real exchanges
    assert lengths == {1, 2}
    assert with_history(exs, 3, 2, seed=1) == out and with_history(exs, 3, 2, seed=2) != out
    assert with_history(exs, 0, 2, seed=1) == exs
