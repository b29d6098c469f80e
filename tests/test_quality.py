"""The quality benchmark: how much the prompt helps, its reply metrics, and its refusals before any decoding."""

from __future__ import annotations

import pytest

from tests.helpers import PAIRS


def test_held_out_loss_measures_how_much_the_prompt_helps(tiny_chat):
    """A model that memorized its pairs predicts each reply far better from its own question."""
    from benchmarks.quality import held_out_loss

    res = held_out_loss(tiny_chat / "model", tiny_chat / "data", reply_len=32, max_prompt_tokens=64, examples=len(PAIRS), ratios=[0.5])
    assert res["reply_loss@1_other_prompt"] > res["reply_loss@1"] + 1.0
    assert res["prompt_gain"] == pytest.approx(res["reply_loss@1_other_prompt"] - res["reply_loss@1"], abs=1e-3)
    assert {"loss@0.5", "reply_loss@0.5"} <= set(res)


def test_quality_report_refuses_a_missing_model_directory(tmp_path, capsys):
    from benchmarks.quality import main

    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "missing"), "--no-loss"])
    assert "missing does not exist" in capsys.readouterr().err


def test_the_report_decodes_as_its_flags_say(tiny_chat, tmp_path):
    """Any decoding can be scored (a threshold to choose for a model), on any device the engine takes."""
    import json

    from benchmarks.quality import main

    main(["--model", str(tiny_chat / "model"), "--data", str(tiny_chat / "data"), "--no-loss", "--threshold", "0.5", "--block-size", "8",
          "--max-new-tokens", "16", "--json", str(tmp_path / "q.json")])
    report = json.loads((tmp_path / "q.json").read_text())
    default = report["decoding"]["default"]
    assert (default["policy"], default["threshold"], default["block_size"], default["max_new_tokens"]) == ("threshold", 0.5, 8, 16)
    assert report["decoding"]["vanilla"]["policy"] == "vanilla" and report["decoding"]["vanilla"]["threshold"] == 0.5
    assert all(r["tokens"] <= 16 for r in report["replies"])
    with pytest.raises(SystemExit, match="threshold must be in"):
        main(["--model", str(tiny_chat / "model"), "--threshold", "0"])


def test_the_question_set_alone_is_scored_against_the_ar_model_in_the_models_dtype(converted, tmp_path):
    """--questions-only: the question set from the model and from the AR model, nothing else decoded.
    Verified decoding is the AR model's own (in fp32, bit for bit), so both score alike."""
    import json

    from benchmarks.quality import main

    main(["--model", str(converted), "--questions-only", "--ar-model", str(converted), "--policy", "verify", "--block-size", "4",
          "--max-new-tokens", "6", "--dtype", "float32", "--json", str(tmp_path / "q.json")])
    report = json.loads((tmp_path / "q.json").read_text())
    assert "replies" not in report and "held_out_loss" not in report
    q, s = report["questions"], report["summary"]
    assert [r["reply"] for r in q["replies_model"]] == [r["reply"] for r in q["replies_ar"]]
    assert s["questions_right"] == s["questions_right_ar"] == q["right_ar"] and s["tokens_per_s_questions_ar"] > 0
    assert s["tokens_per_forward_all"] == round(sum(r["tokens"] for r in q["replies_model"]) / sum(r["forwards"] for r in q["replies_model"]), 2)


def test_quality_report_refuses_a_missing_eval_file_before_decoding(tmp_path, capsys):
    from benchmarks.quality import main

    with pytest.raises(SystemExit):
        main(["--eval-file", "distilled-eval.jsonl"])
    assert "--eval-file needs --data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--data", str(tmp_path), "--eval-file", "distilled-eval.jsonl"])
    assert "distilled-eval.jsonl: not found" in capsys.readouterr().err


def test_reply_metrics_catch_loops_and_templates():
    from benchmarks.quality import distinct_2, repeats_a_word

    assert repeats_a_word("I like it, it, IT.") and not repeats_a_word("It is, it is.")
    assert not repeats_a_word("I'm sorry, I'm sorry. I'm sorry.") and repeats_a_word("I'm sorry, I'm sorry. I'm sorry.", longest=2)
    assert not repeats_a_word("It is, it is. It was.", longest=4)
    assert distinct_2(["a b a b"]) == 2 / 3  # bigrams (a b), (b a), (a b)
    assert distinct_2(["Yeah!", "yeah"]) == 0 and distinct_2(["a b", "a b"]) == 0.5
