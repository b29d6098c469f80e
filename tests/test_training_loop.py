"""The training loop: a tiny model really learns, resumes exactly, exports, and bad input fails
clearly without overwriting anything. Everything runs on tiny synthetic data in seconds."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest
import torch

from dllm_engine.config import ConfigError
from dllm_engine.decoding import DecodeParams
from dllm_engine.engine import Engine
from dllm_engine.loading import load_model
from tests.helpers import PAIRS, TINY_MODEL, tiny_train_config
from training.config import TrainConfig
from training.data import DataError
from training.loop import CHECKPOINT, TOKENIZER_FILES, atomic_save, export, load_checkpoint, lr_at, train


def _generate(model_dir: Path, prompt: str) -> tuple[str, str]:
    engine = Engine.from_pretrained(model_dir, dtype="float32", max_batch=1)
    try:
        text, out = asyncio.run(engine.generate([{"role": "user", "content": prompt}], DecodeParams(max_new_tokens=32, block_size=32)))
    finally:
        engine.close()
    return text, out.finish_reason


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_model_answers_a_training_prompt_and_stops(tiny_chat):
    text, reason = _generate(tiny_chat / "model", "do you like dogs?")
    assert text.strip() == "Yes, dogs are great."
    assert reason == "stop"  # the reply ended with <|eot_id|>, not by running out of canvas


def test_tiny_model_mostly_memorizes_its_corpus(tiny_chat):
    results = [_generate(tiny_chat / "model", q) for q, _ in PAIRS]
    exact = sum(text.strip() == a for (_, a), (text, _) in zip(PAIRS, results))
    assert exact >= 5, results
    assert all(reason == "stop" for _, reason in results), results


def test_loss_decreases_and_eval_is_logged(tiny_chat):
    records = [json.loads(line) for line in (tiny_chat / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval"] for r in records if "eval" in r]
    assert losses[-1] < losses[0] / 4
    assert evals and evals[-1]["loss"] < evals[0]["loss"]
    assert {"loss@0.25", "loss@0.5", "loss@0.75", "reply_loss@0.5", "prompt_gain"} <= set(evals[-1])
    assert evals[-1]["prompt_gain"] > 1.0  # the tiny model answers from its question
    assert (tiny_chat / "run" / "best.pt").exists()


def test_export_is_a_loadable_hf_layout_dir(tiny_chat, tmp_path):
    out = export(tiny_chat / "run", tmp_path / "exported")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    model, tok = load_model(out, dtype="float32")
    assert model.config.mask_token_id == tok.special.mask and model.config.vocab_size == tok.vocab_size
    assert json.loads((out / "config.json").read_text())["model_type"] == "llada"
    trained_on = load_checkpoint(tiny_chat / "run" / CHECKPOINT)["train_config"]
    limits = {"max_new_tokens": trained_on["reply_len"], "max_prompt_tokens": trained_on["max_prompt_tokens"]}
    assert json.loads((out / "generation_config.json").read_text()) == limits


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_gpu_config_parses_anywhere_but_trains_only_where_cuda_is(tmp_path):
    cfg = TrainConfig.from_dict({"data_dir": str(tmp_path / "d"), "out_dir": str(tmp_path / "o"), "device": "cuda"})
    with pytest.raises(ConfigError, match="CUDA is not available"):
        train(cfg)
    assert not (tmp_path / "o").exists()  # refused before anything is written
    from cli.dllm import main

    config = tmp_path / "cpu.toml"
    config.write_text(f'data_dir = "{tmp_path / "d"}"\nout_dir = "{tmp_path / "o"}"\ndevice = "cpu"\n')
    with pytest.raises(SystemExit, match="^error: device 'cuda': CUDA is not available"):  # --device overrides the config's
        main(["train", "--config", str(config), "--device", "cuda"])
    assert not (tmp_path / "o").exists()


def test_resume_continues_exactly_from_the_saved_step(tiny_chat, tmp_path):
    straight = tiny_train_config(tiny_chat, out_dir=str(tmp_path / "straight"))
    train(straight, progress=False, log=lambda m: None)
    split = tiny_train_config(tiny_chat, out_dir=str(tmp_path / "split"))
    first = train(split, steps=8, progress=False, log=lambda m: None)
    assert first["step"] == 8 and first["reason"] == "steps"
    assert load_checkpoint(tmp_path / "split" / CHECKPOINT)["step"] == 8
    logs: list[str] = []
    second = train(split, resume=True, progress=False, log=logs.append)
    assert any("resumed" in m and "step 8" in m for m in logs)
    assert second["step"] == 20
    a = load_checkpoint(tmp_path / "straight" / CHECKPOINT)["model"]
    b = load_checkpoint(tmp_path / "split" / CHECKPOINT)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    assert (tmp_path / "split" / "model" / "config.json").exists()  # exported when max_steps was reached


def test_certainty_forcing_starts_at_its_step(tiny_chat, tmp_path):
    """Before `certainty_from_step` the run is the plain objective's, bit for bit; from it, it is not."""
    def weights(name: str, **overrides) -> dict:
        cfg = tiny_train_config(tiny_chat, out_dir=str(tmp_path / name), max_steps=6, **overrides)
        train(cfg, progress=False, log=lambda m: None)
        return load_checkpoint(tmp_path / name / CHECKPOINT)["model"]

    plain = weights("plain")
    late = weights("late", certainty_weight=5.0, certainty_from_step=6)
    early = weights("early", certainty_weight=5.0, certainty_from_step=3)
    assert all(torch.equal(plain[n], late[n]) for n in plain)
    assert not all(torch.equal(plain[n], early[n]) for n in plain)


def test_existing_checkpoint_without_resume_is_refused(tiny_chat):
    ckpt = tiny_chat / "run" / CHECKPOINT
    before = _digest(ckpt)
    cfg = tiny_train_config(tiny_chat, out_dir=str(tiny_chat / "run"))
    with pytest.raises(ConfigError, match="exists: pass --resume"):
        train(cfg, progress=False, log=lambda m: None)
    assert _digest(ckpt) == before


def test_resume_with_another_shape_is_a_clear_error_and_touches_nothing(tiny_chat):
    run = tiny_chat / "run"
    before = {p.name: (_digest(p), p.stat().st_mtime_ns) for p in run.iterdir() if p.is_file()}
    cfg = tiny_train_config(tiny_chat, out_dir=str(run), model={**TINY_MODEL, "d_model": 32, "n_layers": 3})
    with pytest.raises(ConfigError, match=r"different model shape.*d_model: checkpoint 64 vs config 32"):
        train(cfg, resume=True, progress=False, log=lambda m: None)
    after = {p.name: (_digest(p), p.stat().st_mtime_ns) for p in run.iterdir() if p.is_file()}
    assert after == before


def test_init_from_starts_a_new_run_from_another_runs_weights(tiny_chat, tmp_path):
    src = tiny_chat / "run" / "checkpoint.pt"
    cfg = tiny_train_config(tiny_chat, out_dir=str(tmp_path / "ft"), init_from=str(src), max_steps=1, lr=1e-9, warmup_steps=1)
    train(cfg, progress=False, log=lambda m: None)
    before = torch.load(src, weights_only=False)["model"]
    after = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)  # lr ~0: the weights carried over
    bad = tiny_train_config(tiny_chat, out_dir=str(tmp_path / "ft2"), init_from=str(src), model={**TINY_MODEL, "d_model": 32})
    with pytest.raises(ConfigError, match="d_model"):
        train(bad, progress=False, log=lambda m: None)


def test_init_from_a_model_directory_starts_from_its_weights(tiny_chat, tmp_path):
    """A HF-layout directory (an export, the shipped model) works as init_from, as a .pt does."""
    cfg = tiny_train_config(tiny_chat, out_dir=str(tmp_path / "ft"), init_from=str(tiny_chat / "model"), max_steps=1, lr=1e-9, warmup_steps=1)
    logs: list[str] = []
    train(cfg, progress=False, log=logs.append)
    assert any("initialized from" in m and "exported model" in m for m in logs)
    before = load_model(tiny_chat / "model", dtype="float32")[0].state_dict()
    after = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    bad = tiny_train_config(tiny_chat, out_dir=str(tmp_path / "ft2"), init_from=str(tiny_chat / "model"), model={**TINY_MODEL, "d_model": 32})
    with pytest.raises(ConfigError, match="d_model"):
        train(bad, progress=False, log=lambda m: None)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    """A save that dies half-way (a full disk, a kill) leaves the previous checkpoint whole."""
    path = tmp_path / "c.pt"
    atomic_save({"x": 1}, path)
    assert torch.load(path)["x"] == 1 and not list(tmp_path.glob("*.tmp"))
    real_save = torch.save

    def dies_half_way(obj, f):
        real_save(obj, f)
        with open(f, "r+b") as out:
            out.truncate(10)
        raise OSError("no space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError):
        atomic_save({"x": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["x"] == 1


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(data_dir="d", out_dir="o", lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)


def _data_copy(tiny_chat: Path, tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    for name in ("train.jsonl", "eval.jsonl", "utterances.txt"):
        (d / name).write_bytes((tiny_chat / "data" / name).read_bytes())
    (d / "tokenizer").mkdir()
    for src in (tiny_chat / "data" / "tokenizer" / name for name in TOKENIZER_FILES):
        if src.exists():
            (d / "tokenizer" / src.name).write_bytes(src.read_bytes())
    return d


def test_empty_training_file_is_a_clear_error(tiny_chat, tmp_path):
    d = _data_copy(tiny_chat, tmp_path)
    (d / "train.jsonl").write_text("\n")
    cfg = tiny_train_config(tiny_chat, data_dir=str(d), out_dir=str(tmp_path / "run"))
    with pytest.raises(DataError, match=r"train.jsonl: no examples \(the file is empty\)"):
        train(cfg, progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_every_listed_training_file_is_read(tiny_chat, tmp_path):
    d = _data_copy(tiny_chat, tmp_path)
    cfg = tiny_train_config(tiny_chat, data_dir=str(d), out_dir=str(tmp_path / "run"), train_files=["train.jsonl", "distilled.jsonl"])
    with pytest.raises(DataError, match=r"distilled.jsonl: not found"):
        train(cfg, progress=False, log=lambda m: None)
    (d / "distilled.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}], "reply": 7}\n')
    with pytest.raises(DataError, match=r"distilled.jsonl:1: expected"):
        train(cfg, progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_the_eval_file_is_the_one_configured(tiny_chat, tmp_path):
    """Held-out teacher replies (`dllm distill --split eval`) can judge a model tiny_chat on teacher replies."""
    d = _data_copy(tiny_chat, tmp_path)
    cfg = tiny_train_config(tiny_chat, data_dir=str(d), out_dir=str(tmp_path / "run"), eval_file="distilled-eval.jsonl", max_steps=1)
    with pytest.raises(DataError, match=r"distilled-eval.jsonl: not found"):
        train(cfg, progress=False, log=lambda m: None)
    rows = (d / "eval.jsonl").read_text().splitlines()[:3]
    (d / "distilled-eval.jsonl").write_text("\n".join(rows) + "\n")
    lines: list[str] = []
    train(cfg, progress=False, log=lines.append)
    assert any(", 3 eval rows," in m for m in lines), lines


@pytest.mark.parametrize(
    "line, match",
    [('{"messages": [{"role": "user", "content": "hi"}], "reply": "yo"', r"eval.jsonl:2: malformed JSON line"),
     ('{"messages": "hi", "reply": "yo"}', r"eval.jsonl:2: expected")],
)
def test_malformed_jsonl_line_is_named(tiny_chat, tmp_path, line, match):
    d = _data_copy(tiny_chat, tmp_path)
    first = (d / "eval.jsonl").read_text().splitlines()[0]
    (d / "eval.jsonl").write_text(first + "\n" + line + "\n")
    cfg = tiny_train_config(tiny_chat, data_dir=str(d), out_dir=str(tmp_path / "run"))
    with pytest.raises(DataError, match=match):
        train(cfg, progress=False, log=lambda m: None)
