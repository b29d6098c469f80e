"""Data preparation and training: a tiny model really learns, resumes exactly, and bad input fails
clearly without overwriting anything. Everything runs on tiny synthetic data in seconds."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml


from dllm_engine import data, train
from tests.helpers import PAIRS
from dllm_engine.config import ConfigError
from dllm_engine.data import DataError
from dllm_engine.decoding import DecodeParams
from dllm_engine.engine import Engine
from dllm_engine.loading import load_model



def _generate(model_dir: Path, prompt: str) -> tuple[str, str]:
    engine = Engine.from_pretrained(model_dir, dtype="float32", max_batch=1)
    try:
        text, out = asyncio.run(engine.generate([{"role": "user", "content": prompt}], DecodeParams(max_new_tokens=32, block_size=32)))
    finally:
        engine.close()
    return text, out.finish_reason


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tiny_cfg(tmp: Path, **overrides) -> train.TrainConfig:
    """A config over the tiny corpus `trained` wrote (its data dir), in a fresh out_dir."""
    raw = dict(
        data_dir=str(tmp / "data"),
        out_dir=str(tmp / "run2"),
        model=dict(train.TINY_MODEL),
        reply_len=32,
        batch_tokens=512,
        max_batch_size=4,
        lr=3e-3,
        warmup_steps=5,
        max_steps=20,
        eval_interval=10,
        log_interval=5,
        threads=0,
        autocast_bf16=False,
    )
    raw.update(overrides)
    return train.TrainConfig.from_dict(raw)


@pytest.fixture(scope="module")
def trained(tiny_chat) -> Path:
    return tiny_chat


# ---- training really learns -----------------------------------------------------------------------


def test_tiny_model_answers_a_training_prompt_and_stops(trained):
    text, reason = _generate(trained / "model", "do you like dogs?")
    assert text.strip() == "Yes, dogs are great."
    assert reason == "stop"  # the reply ended with <|eot_id|>, not by running out of canvas


def test_tiny_model_mostly_memorizes_its_corpus(trained):
    results = [_generate(trained / "model", q) for q, _ in PAIRS]
    exact = sum(text.strip() == a for (_, a), (text, _) in zip(PAIRS, results))
    assert exact >= 5, results
    assert all(reason == "stop" for _, reason in results), results


def test_loss_decreases_and_eval_is_logged(trained):
    records = [json.loads(line) for line in (trained / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval"] for r in records if "eval" in r]
    assert losses[-1] < losses[0] / 4
    assert evals and evals[-1]["loss"] < evals[0]["loss"]
    assert {"loss@0.25", "loss@0.5", "loss@0.75", "reply_loss@0.5", "prompt_gain"} <= set(evals[-1])
    assert evals[-1]["prompt_gain"] > 1.0  # the tiny model answers from its question
    assert (trained / "run" / "best.pt").exists()


def test_held_out_loss_measures_how_much_the_prompt_helps(trained):
    """A model that memorized its pairs predicts each reply far better from its own question."""
    from dllm_engine.quality import held_out_loss

    res = held_out_loss(trained / "model", trained / "data", reply_len=32, max_prompt_tokens=64, examples=len(PAIRS), ratios=[0.5])
    assert res["reply_loss@1_other_prompt"] > res["reply_loss@1"] + 1.0
    assert res["prompt_gain"] == pytest.approx(res["reply_loss@1_other_prompt"] - res["reply_loss@1"], abs=1e-3)
    assert {"loss@0.5", "reply_loss@0.5"} <= set(res)


def test_prompt_gain_reuses_the_fully_masked_loss_of_the_eval(trained):
    """The training eval hands prompt_gain its own ratio-1.0 loss: it must be the value prompt_gain computes."""
    from dllm_engine.loading import load_model

    model, tok = load_model(trained / "model", dtype="float32")
    rows, _ = train.encode_chat(tok, train.read_jsonl(trained / "data" / "eval.jsonl"), 32, 64)
    rows = sorted(rows, key=len)
    assert len(rows) > 1
    sp = tok.special
    ev = train.eval_loss(model, list(train.iter_batches(rows, 32, sp.pad)), sp.mask, [0.5, 1.0], sp.eos)
    fresh = train.prompt_gain(model, rows, sp.mask, sp.eos, sp.pad)
    assert fresh == train.prompt_gain(model, rows, sp.mask, sp.eos, sp.pad, own=ev["reply_loss@1"])


def test_export_is_a_loadable_hf_layout_dir(trained, tmp_path):
    out = train.export(trained / "run", tmp_path / "exported")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    model, tok = load_model(out, dtype="float32")
    assert model.config.mask_token_id == tok.special.mask and model.config.vocab_size == tok.vocab_size
    assert json.loads((out / "config.json").read_text())["model_type"] == "llada"
    trained_on = train.load_checkpoint(trained / "run" / train.CHECKPOINT)["train_config"]
    limits = {"max_new_tokens": trained_on["reply_len"], "max_prompt_tokens": trained_on["max_prompt_tokens"]}
    assert json.loads((out / "generation_config.json").read_text()) == limits


# ---- the objective ----------------------------------------------------------------------------------


def test_loss_never_masks_the_prompt_and_weights_by_one_over_t():
    """With a model whose logits are uniform, CE = log V per masked token, so the loss is
    E[sum_masked log V / t / L] = log V per row: masks outside the region would change nothing but
    masks inside must all be counted. We check the masked positions directly instead."""
    from dllm_engine.config import LLaDAConfig
    from dllm_engine.model import DiffusionLM

    cfg = LLaDAConfig(d_model=16, n_layers=1, n_heads=2, mlp_hidden_size=32, vocab_size=40)
    model = DiffusionLM(cfg)
    seen = {}

    def spy(ids, key_valid=None):
        seen["ids"] = ids.clone()
        return torch.zeros(*ids.shape, cfg.d_model)

    model.forward = spy  # logits of a zero hidden state are uniform: CE = log V everywhere
    rows = [train.Row([1, 5, 6, 7], [8, 9, 3, 0, 0]), train.Row([1, 5], [10, 3, 0])]
    batch = train.collate(rows, pad_id=0)
    gen = torch.Generator().manual_seed(0)
    loss = train.diffusion_loss(model, batch, mask_id=2, eps=1e-3, gen=gen)
    masked = seen["ids"] == 2
    assert not (masked & ~batch["region"]).any()  # prompt and padding are never masked
    # Recompute t from the same generator: loss = mean over rows of (#masked * log V / t / L).
    gen = torch.Generator().manual_seed(0)
    t = 1e-3 + (1 - 1e-3) * torch.rand(2, 1, generator=gen)
    expected = (masked.sum(1) * torch.log(torch.tensor(40.0)) / t[:, 0] / batch["region"].sum(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_mean_weighting_averages_ce_over_masked_tokens_only():
    """weighting="mean": no 1/t factor, every masked token counts once, whatever its row's t."""
    from dllm_engine.config import LLaDAConfig
    from dllm_engine.model import DiffusionLM

    cfg = LLaDAConfig(d_model=16, n_layers=1, n_heads=2, mlp_hidden_size=32, vocab_size=40)
    model = DiffusionLM(cfg)
    torch.manual_seed(0)
    proj = torch.randn(cfg.d_model, cfg.d_model)
    seen = {}

    def spy(ids, key_valid=None):
        seen["ids"] = ids.clone()
        return torch.nn.functional.embedding(ids, proj)  # logits differ per input token

    model.forward = spy
    rows = [train.Row([1, 5, 6, 7], [8, 9, 3, 0, 0]), train.Row([1, 5], [10, 3, 0, 11, 12, 13])]
    batch = train.collate(rows, pad_id=0)
    loss = train.diffusion_loss(model, batch, mask_id=2, eps=0.2, gen=torch.Generator().manual_seed(1), weighting="mean")
    masked = seen["ids"] == 2
    assert masked.any() and not (masked & ~batch["region"]).any()
    logits = model.logits(torch.nn.functional.embedding(seen["ids"], proj))
    expected = torch.nn.functional.cross_entropy(logits[masked], batch["ids"][masked])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_certainty_adds_the_entropy_of_right_predictions_only():
    """certainty > 0: + weight x entropy where the argmax is the target, nothing where it is wrong."""
    from dllm_engine.config import LLaDAConfig
    from dllm_engine.model import DiffusionLM

    cfg = LLaDAConfig(d_model=16, n_layers=1, n_heads=2, mlp_hidden_size=32, vocab_size=40)
    model = DiffusionLM(cfg)
    rows = [train.Row([1, 5], [8, 9, 3, 0]), train.Row([1, 5], [10, 3, 0, 0])]
    batch = train.collate(rows, pad_id=0)
    hidden = torch.randn(*batch["ids"].shape, cfg.d_model, generator=torch.Generator().manual_seed(0))
    head = model.model.transformer["ff_out"].weight
    hidden[0] += 3 * head[batch["ids"][0]]  # row 0 leans towards its targets, row 1 is random
    logits = model.logits(hidden)
    right = logits.argmax(-1) == batch["ids"]
    assert right[batch["region"]].any() and not right[batch["region"]].all()  # both kinds are scored
    model.forward = lambda ids, key_valid=None: hidden
    loss = lambda c: train.diffusion_loss(model, batch, mask_id=2, eps=0.999, gen=torch.Generator().manual_seed(1), weighting="mean", certainty=c)
    logp = logits[batch["region"]].log_softmax(-1)  # t ~ U(0.999, 1): every region token is masked
    entropy = -(logp.exp() * logp).sum(-1) * right[batch["region"]]
    assert (loss(0.5) - loss(0.0)).item() == pytest.approx(0.5 * entropy.mean().item(), rel=1e-4)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("loss_weighting", "sqrt", "loss_weighting"), ("device", "gpu", "device 'gpu'"), ("train_files", [], "train_files"), ("eval_file", "", "eval_file"),
        ("certainty_weight", -1.0, "certainty_weight"), ("history_copies", -1, "history_copies"), ("history_turns", 0, "history_turns"),
    ],
)
def test_bad_training_settings_are_refused(key, value, match):
    with pytest.raises(ConfigError, match=match):
        train.TrainConfig.from_dict({"data_dir": "d", "out_dir": "o", key: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_gpu_config_parses_anywhere_but_trains_only_where_cuda_is(tmp_path):
    cfg = train.TrainConfig.from_dict({"data_dir": str(tmp_path / "d"), "out_dir": str(tmp_path / "o"), "device": "cuda"})
    with pytest.raises(ConfigError, match="CUDA is not available"):
        train.train(cfg)
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_block_masking_matches_semi_autoregressive_decoding():
    """Clean before the drawn block, fully masked after it, partly masked inside; never past the first EOS block."""
    from dllm_engine.config import LLaDAConfig
    from dllm_engine.model import DiffusionLM

    cfg = LLaDAConfig(d_model=16, n_layers=1, n_heads=2, mlp_hidden_size=32, vocab_size=40)
    model = DiffusionLM(cfg)
    seen = []
    model.forward = lambda ids, key_valid=None: seen.append(ids.clone()) or torch.zeros(*ids.shape, cfg.d_model)
    eos = 3
    region = [10, 11, 12, 13, 14, 15, eos, eos, eos, eos, eos, eos]  # first EOS at 6: blocks of 4 -> start 0 or 4
    batch = train.collate([train.Row([1, 5], region)], pad_id=0)
    starts = set()
    for seed in range(40):
        train.diffusion_loss(model, batch, mask_id=2, eps=1e-3, gen=torch.Generator().manual_seed(seed), block_size=4, eos_id=eos)
        m = (seen[-1][0, 2:] == 2).tolist()
        start = next(b for b in (0, 4, 8) if all(m[b + 4 :]) and not any(m[:b]))
        starts.add(start)
    assert starts == {0, 4}


def test_long_replies_are_cut_at_a_sentence_end_or_dropped(trained):
    from dllm_engine.tokenizer import Tokenizer

    cfg = _tiny_cfg(trained)
    tok = Tokenizer(trained / "data" / "tokenizer", cfg.model_config(trained / "data" / "tokenizer"))
    short, long_ = "I am fine.", "I am fine. " + "dogs are great " * 20
    rows, dropped = train.encode_chat(tok, [{"messages": [{"role": "user", "content": "hi"}], "reply": long_}], 16, 64)
    region = rows[0].region.tolist()
    assert dropped == 0 and tok.decode(region) == short and len(region) == 16
    assert region[len(tok.encode(short))] == tok.special.end_of_turn
    assert set(region[len(tok.encode(short)) + 1 :]) == {tok.special.eos}
    rows, dropped = train.encode_chat(tok, [{"messages": [{"role": "user", "content": "hi"}], "reply": "dogs " * 40}], 16, 64)
    assert (rows, dropped) == ([], 1)


# ---- checkpoints and resume -------------------------------------------------------------------------


def test_resume_continues_exactly_from_the_saved_step(trained, tmp_path):
    straight = _tiny_cfg(trained, out_dir=str(tmp_path / "straight"))
    train.train(straight, progress=False, log=lambda m: None)
    split = _tiny_cfg(trained, out_dir=str(tmp_path / "split"))
    first = train.train(split, steps=8, progress=False, log=lambda m: None)
    assert first["step"] == 8 and first["reason"] == "steps"
    assert train.load_checkpoint(tmp_path / "split" / train.CHECKPOINT)["step"] == 8
    logs: list[str] = []
    second = train.train(split, resume=True, progress=False, log=logs.append)
    assert any("resumed" in m and "step 8" in m for m in logs)
    assert second["step"] == 20
    a = train.load_checkpoint(tmp_path / "straight" / train.CHECKPOINT)["model"]
    b = train.load_checkpoint(tmp_path / "split" / train.CHECKPOINT)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    assert (tmp_path / "split" / "model" / "config.json").exists()  # exported when max_steps was reached


def test_existing_checkpoint_without_resume_is_refused(trained):
    ckpt = trained / "run" / train.CHECKPOINT
    before = _digest(ckpt)
    cfg = _tiny_cfg(trained, out_dir=str(trained / "run"))
    with pytest.raises(ConfigError, match="exists: pass --resume"):
        train.train(cfg, progress=False, log=lambda m: None)
    assert _digest(ckpt) == before


def test_resume_with_another_shape_is_a_clear_error_and_touches_nothing(trained):
    run = trained / "run"
    before = {p.name: (_digest(p), p.stat().st_mtime_ns) for p in run.iterdir() if p.is_file()}
    cfg = _tiny_cfg(trained, out_dir=str(run), model={**train.TINY_MODEL, "d_model": 32, "n_layers": 3})
    with pytest.raises(ConfigError, match=r"different model shape.*d_model: checkpoint 64 vs config 32"):
        train.train(cfg, resume=True, progress=False, log=lambda m: None)
    after = {p.name: (_digest(p), p.stat().st_mtime_ns) for p in run.iterdir() if p.is_file()}
    assert after == before


def test_init_from_starts_a_new_run_from_another_runs_weights(trained, tmp_path):
    src = trained / "run" / "checkpoint.pt"
    cfg = _tiny_cfg(trained, out_dir=str(tmp_path / "ft"), init_from=str(src), max_steps=1, lr=1e-9, warmup_steps=1)
    train.train(cfg, progress=False, log=lambda m: None)
    before = torch.load(src, weights_only=False)["model"]
    after = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)  # lr ~0: the weights carried over
    bad = _tiny_cfg(trained, out_dir=str(tmp_path / "ft2"), init_from=str(src), model={**train.TINY_MODEL, "d_model": 32})
    with pytest.raises(ConfigError, match="d_model"):
        train.train(bad, progress=False, log=lambda m: None)


def test_init_from_a_model_directory_starts_from_its_weights(trained, tmp_path):
    """A HF-layout directory (an export, the shipped model) works as init_from, as a .pt does."""
    from dllm_engine.loading import load_model

    cfg = _tiny_cfg(trained, out_dir=str(tmp_path / "ft"), init_from=str(trained / "model"), max_steps=1, lr=1e-9, warmup_steps=1)
    logs: list[str] = []
    train.train(cfg, progress=False, log=logs.append)
    assert any("initialized from" in m and "exported model" in m for m in logs)
    before = load_model(trained / "model", dtype="float32")[0].state_dict()
    after = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    bad = _tiny_cfg(trained, out_dir=str(tmp_path / "ft2"), init_from=str(trained / "model"), model={**train.TINY_MODEL, "d_model": 32})
    with pytest.raises(ConfigError, match="d_model"):
        train.train(bad, progress=False, log=lambda m: None)


def test_checkpoint_writes_are_atomic(tmp_path):
    path = tmp_path / "c.pt"
    train.atomic_save({"x": 1}, path)
    assert torch.load(path)["x"] == 1 and not list(tmp_path.glob("*.tmp"))


# ---- configuration ----------------------------------------------------------------------------------


def test_unknown_config_keys_are_named(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('data_dir = "d"\nout_dir = "o"\nlearning_rate = 1.0\nbogus = 2\n')
    with pytest.raises(ConfigError, match=r"c.toml.*unknown config key\(s\): bogus, learning_rate"):
        train.TrainConfig.load(path)
    path.write_text('data_dir = "d"\nout_dir = "o"\n[model]\nhidden_size = 64\n')
    with pytest.raises(ConfigError, match=r"unknown \[model\] key\(s\): hidden_size"):
        train.TrainConfig.load(path)
    path.write_text('data_dir = "d"\nout_dir = "o"\nlr = \n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        train.TrainConfig.load(path)


def test_shipped_configs_parse_and_paths_are_relative_to_the_file():
    root = Path(__file__).resolve().parents[1]
    cfg = train.TrainConfig.load(root / "configs" / "default.toml")
    assert cfg.reply_len == 32 and cfg.model["d_model"] % cfg.model["n_heads"] == 0
    assert Path(cfg.out_dir) == root / "runs" / "default"  # ../runs/ from configs/: the repo's ignored runs/
    tiny = train.TrainConfig.load(root / "configs" / "tiny.toml")
    assert Path(tiny.data_dir).is_absolute()
    for path in (root / "configs").glob("*.toml"):  # each parses, and writes under the ignored runs/
        assert Path(train.TrainConfig.load(path).out_dir).is_relative_to(root / "runs"), path


def test_a_config_extends_another_and_states_only_what_it_changes(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "a.toml").write_text(
        'data_dir = "data"\nout_dir = "/runs/a"\nlr = 1e-3\nseed = 1\n'
        "[model]\nd_model = 64\nn_heads = 4\n[source_repeats]\nchatterbot = 2\n"
    )
    (tmp_path / "b.toml").write_text(
        'extends = "base/a.toml"\nout_dir = "runs/b"\nlr = 3e-4\n[model]\nn_layers = 3\n[source_repeats]\nchitchat = 0\n'
    )
    cfg = train.TrainConfig.load(tmp_path / "b.toml")
    assert (cfg.lr, cfg.seed) == (3e-4, 1)
    assert cfg.model == {"d_model": 64, "n_heads": 4, "n_layers": 3}  # tables merge key by key
    assert cfg.source_repeats == {"chatterbot": 2, "chitchat": 0}
    assert cfg.data_dir == str(tmp_path / "base" / "data")  # relative to the file that sets it
    assert cfg.out_dir == str(tmp_path / "runs" / "b")


def test_extends_errors_name_the_file(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\ndata_dir = "d"\nout_dir = "o"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(ConfigError, match="extends a.toml in a cycle"):
        train.TrainConfig.load(tmp_path / "a.toml")
    (tmp_path / "b.toml").write_text('extends = "missing.toml"\n')
    with pytest.raises(ConfigError, match="missing.toml not found"):
        train.TrainConfig.load(tmp_path / "a.toml")
    (tmp_path / "b.toml").write_text("extends = 3\n")
    with pytest.raises(ConfigError, match="extends must name a config file"):
        train.TrainConfig.load(tmp_path / "b.toml")


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = train.TrainConfig(data_dir="d", out_dir="o", lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    lrs = [train.lr_at(s, cfg) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)


# ---- bad training data ------------------------------------------------------------------------------


def _data_copy(trained: Path, tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    for name in ("train.jsonl", "eval.jsonl", "utterances.txt"):
        (d / name).write_bytes((trained / "data" / name).read_bytes())
    (d / "tokenizer").mkdir()
    for name in train.TOKENIZER_FILES:
        (d / "tokenizer" / name).write_bytes((trained / "data" / "tokenizer" / name).read_bytes())
    return d


def test_empty_training_file_is_a_clear_error(trained, tmp_path):
    d = _data_copy(trained, tmp_path)
    (d / "train.jsonl").write_text("\n")
    cfg = _tiny_cfg(trained, data_dir=str(d), out_dir=str(tmp_path / "run"))
    with pytest.raises(DataError, match=r"train.jsonl: no examples \(the file is empty\)"):
        train.train(cfg, progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_every_listed_training_file_is_read(trained, tmp_path):
    d = _data_copy(trained, tmp_path)
    cfg = _tiny_cfg(trained, data_dir=str(d), out_dir=str(tmp_path / "run"), train_files=["train.jsonl", "distilled.jsonl"])
    with pytest.raises(DataError, match=r"distilled.jsonl: not found"):
        train.train(cfg, progress=False, log=lambda m: None)
    (d / "distilled.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}], "reply": 7}\n')
    with pytest.raises(DataError, match=r"distilled.jsonl:1: expected"):
        train.train(cfg, progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_the_eval_file_is_the_one_configured(trained, tmp_path):
    """Held-out teacher replies (`dllm distill --split eval`) can judge a model trained on teacher replies."""
    d = _data_copy(trained, tmp_path)
    cfg = _tiny_cfg(trained, data_dir=str(d), out_dir=str(tmp_path / "run"), eval_file="distilled-eval.jsonl", max_steps=1)
    with pytest.raises(DataError, match=r"distilled-eval.jsonl: not found"):
        train.train(cfg, progress=False, log=lambda m: None)
    rows = (d / "eval.jsonl").read_text().splitlines()[:3]
    (d / "distilled-eval.jsonl").write_text("\n".join(rows) + "\n")
    lines: list[str] = []
    train.train(cfg, progress=False, log=lines.append)
    assert any(", 3 eval rows," in m for m in lines), lines


@pytest.mark.parametrize(
    "line, match",
    [('{"messages": [{"role": "user", "content": "hi"}], "reply": "yo"', r"eval.jsonl:2: malformed JSON line"),
     ('{"messages": "hi", "reply": "yo"}', r"eval.jsonl:2: expected")],
)
def test_malformed_jsonl_line_is_named(trained, tmp_path, line, match):
    d = _data_copy(trained, tmp_path)
    first = (d / "eval.jsonl").read_text().splitlines()[0]
    (d / "eval.jsonl").write_text(first + "\n" + line + "\n")
    cfg = _tiny_cfg(trained, data_dir=str(d), out_dir=str(tmp_path / "run"))
    with pytest.raises(DataError, match=match):
        train.train(cfg, progress=False, log=lambda m: None)


# ---- data preparation -------------------------------------------------------------------------------


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


def test_source_repeats_weight_a_corpus_and_its_files():
    exs = [{"source": "chitchat"}, {"source": "chatterbot/food"}, {"source": "chatterbot/ai"}, {"reply": "no source"}]
    out = train.repeat_sources(exs, {"chatterbot": 3, "chatterbot/ai": 2})
    assert [e.get("source") for e in out] == ["chitchat"] + ["chatterbot/food"] * 3 + ["chatterbot/ai"] * 2 + [None]
    out = train.repeat_sources(exs, {"chitchat": 0, "chatterbot/ai": 0})
    assert [e.get("source") for e in out] == ["chatterbot/food", None]
    with pytest.raises(ConfigError, match="source_repeats"):
        train.TrainConfig.from_dict({"data_dir": "d", "out_dir": "o", "source_repeats": {"chatterbot": -1}})


def test_history_copies_answer_the_same_last_turn_after_drawn_exchanges():
    exs = [{"messages": [{"role": "user", "content": f"q{i}"}], "reply": f"a{i}", "source": "s"} for i in range(5)]
    out = train.with_history(exs, copies=3, turns=2, seed=1)
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
    assert train.with_history(exs, 3, 2, seed=1) == out and train.with_history(exs, 3, 2, seed=2) != out
    assert train.with_history(exs, 0, 2, seed=1) == exs


def test_prepare_is_deterministic(tmp_path):
    chit, bot = _corpora(tmp_path)
    for name in ("a", "b"):
        data.prepare(tmp_path / name, holdout=0.2, seed=3, vocab_size=300, chitchat_path=chit, chatterbot_dir=bot, verbose=False)
    for f in ("train.jsonl", "eval.jsonl", "utterances.txt", "tokenizer/tokenizer.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_quality_prompts_are_forty_distinct_spoken_prompts():
    assert len(data.QUALITY_PROMPTS) == 40
    assert len({data.normalize_for_match(p) for p in data.QUALITY_PROMPTS}) == 40


def test_quality_report_refuses_a_missing_model_directory(tmp_path, capsys):
    from dllm_engine.quality import main

    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "missing"), "--no-loss"])
    assert "missing does not exist" in capsys.readouterr().err


def test_quality_report_refuses_a_missing_eval_file_before_decoding(tmp_path, capsys):
    from dllm_engine.quality import main

    with pytest.raises(SystemExit):
        main(["--eval-file", "distilled-eval.jsonl"])
    assert "--eval-file needs --data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--data", str(tmp_path), "--eval-file", "distilled-eval.jsonl"])
    assert "distilled-eval.jsonl: not found" in capsys.readouterr().err


def test_reply_metrics_catch_loops_and_templates():
    from dllm_engine.quality import distinct_2, repeats_a_word

    assert repeats_a_word("I like it, it, IT.") and not repeats_a_word("It is, it is.")
    assert not repeats_a_word("I'm sorry, I'm sorry. I'm sorry.") and repeats_a_word("I'm sorry, I'm sorry. I'm sorry.", longest=2)
    assert not repeats_a_word("It is, it is. It was.", longest=4)
    assert distinct_2(["a b a b"]) == 2 / 3  # bigrams (a b), (b a), (a b)
    assert distinct_2(["Yeah!", "yeah"]) == 0 and distinct_2(["a b", "a b"]) == 0.5


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
