"""Model directories: save/load round trips, sharding, tokenizer files, LLaDA configs, bad input."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from training.bpe import BOS, CHAT_TEMPLATE, EOS, EOT, MASK
from dllm_engine import loading
from dllm_engine.config import ConfigError, LLaDAConfig
from dllm_engine.loading import INDEX_FILE, load_model, on_own_thread, resolve_dtype, save_model
from dllm_engine.model import DiffusionLM, KVCache
from tests.helpers import edit_json, llada_8b_instruct_config, make_model_dir, random_model

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 61, 120]])


def logits_of(model: DiffusionLM, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.inference_mode():
        return model.logits(model(ids))


def same_weights(a: DiffusionLM, b: DiffusionLM) -> bool:
    """Bit for bit (their logits may differ in the last bit: the CPU's GEMM rounds by where the weights lie in memory)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def saved_names(directory: Path) -> set[str]:
    names: set[str] = set()
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            names.update(sf.keys())
    return names


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return make_model_dir(tmp_path / "m")


# --------------------------------------------------------------------------- round trips

def test_round_trip_is_exact_in_fp32(model_dir):
    cfg = LLaDAConfig.from_file(model_dir / "config.json")
    original = random_model(cfg, seed=0)  # what make_model_dir saved
    model, tok = load_model(model_dir, dtype="float32")
    assert model.config == dataclasses.replace(cfg, end_of_turn_token_id=tok.special.end_of_turn)  # as the tokenizer resolved it
    assert same_weights(model, original)
    torch.testing.assert_close(logits_of(model), logits_of(original))
    assert tok.vocab_size == cfg.vocab_size


def test_loaded_parameters_are_real_eval_and_frozen(model_dir):
    model, _ = load_model(model_dir, dtype="float32")
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and not any(t.is_meta for t in tensors)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert torch.isfinite(logits_of(model)).all()


def test_load_converts_dtype(tmp_path, monkeypatch):
    """Saved in bf16, loaded as fp32 (exact bf16 values) and as bf16."""
    d = make_model_dir(tmp_path / "m", dtype=torch.bfloat16)
    original = random_model(LLaDAConfig.from_file(d / "config.json"), seed=0)
    as_fp32, _ = load_model(d, dtype="float32")
    as_bf16, _ = load_model(d, dtype=torch.bfloat16)
    for name, p in original.state_dict().items():
        assert torch.equal(as_fp32.state_dict()[name], p.to(torch.bfloat16).float()), name
        assert as_bf16.state_dict()[name].dtype == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    for native_bf16, dtype in ((True, torch.bfloat16), (False, torch.float32)):  # each branch, whatever this CPU has
        monkeypatch.setattr(loading, "cpu_has_bf16", lambda: native_bf16)
        assert resolve_dtype("auto", torch.device("cpu")) == (dtype if torch.backends.mkldnn.is_available() else torch.float32)
    assert resolve_dtype("int8", torch.device("cpu")) == torch.float32  # int8 linear layers run in fp32 around them
    with pytest.raises(ValueError, match="unknown dtype 'float8'.*int8"):
        resolve_dtype("float8", torch.device("cpu"))


def test_sharded_save_writes_an_index_and_loads_identically(tmp_path):
    whole = make_model_dir(tmp_path / "whole")
    sharded = make_model_dir(tmp_path / "sharded", shard_bytes=40_000)
    index = json.loads((sharded / INDEX_FILE).read_text())
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2 and "model.safetensors" not in shards
    assert sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == saved_names(whole)
    for name, shard in index["weight_map"].items():
        assert name in load_file(str(sharded / shard))
    model_whole, _ = load_model(whole, dtype="float32")
    total = sum(p.numel() * p.element_size() for p in model_whole.state_dict().values())
    assert index["metadata"]["total_size"] == total
    model_sharded, _ = load_model(sharded, dtype="float32")
    assert same_weights(model_sharded, model_whole)
    torch.testing.assert_close(logits_of(model_sharded), logits_of(model_whole))

    # Saving unsharded over it removes the stale shards and index.
    save_model(model_whole, sharded, dtype=torch.float32)
    assert not (sharded / INDEX_FILE).exists()
    assert [p.name for p in sharded.glob("*.safetensors")] == ["model.safetensors"]
    resaved = load_model(sharded, dtype="float32")[0]
    assert same_weights(resaved, model_whole)
    torch.testing.assert_close(logits_of(resaved), logits_of(model_whole))


def test_weight_tied_model_saves_without_output_head(tmp_path):
    d = make_model_dir(tmp_path / "m", cfg_overrides={"weight_tying": True})
    assert json.loads((d / "config.json").read_text())["weight_tying"] is True
    names = saved_names(d)
    assert "model.transformer.wte.weight" in names
    assert not any(n.startswith("model.transformer.ff_out") for n in names)
    model, _ = load_model(d, dtype="float32")
    hidden = model(IDS)
    wte = model.model.transformer["wte"].weight
    torch.testing.assert_close(model.logits(hidden), hidden @ wte.T)


# --------------------------------------------------------------------------- tokenizer files

def test_chat_template_from_jinja_file_when_tokenizer_config_has_none(model_dir):
    edit_json(model_dir / "tokenizer_config.json", chat_template=...)
    _, tok = load_model(model_dir, dtype="float32")
    assert tok.chat_template is None
    with pytest.raises(ConfigError, match="no chat template"):
        tok.render_chat([{"role": "user", "content": "hi"}])

    jinja = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    (model_dir / "chat_template.jinja").write_text(jinja)
    _, tok = load_model(model_dir, dtype="float32")
    assert tok.chat_template == jinja
    assert tok.render_chat([{"role": "user", "content": "hello"}]) == "[user]hello[assistant]"


def test_chat_template_jinja_file_takes_priority_over_tokenizer_config(model_dir):
    jinja = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    (model_dir / "chat_template.jinja").write_text(jinja)
    _, tok = load_model(model_dir, dtype="float32")
    assert tok.chat_template == jinja != CHAT_TEMPLATE
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == "<hi>"


def test_project_chat_template_renders_llama3_headers(model_dir):
    _, tok = load_model(model_dir, dtype="float32")
    assert tok.chat_template == CHAT_TEMPLATE
    text = tok.render_chat([{"role": "user", "content": " hi "}])
    assert text == f"{BOS}<|start_header_id|>user<|end_header_id|>\n\nhi{EOT}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ids[0] == tok.token_to_id(BOS) and tok.token_to_id(EOT) in ids


def test_special_tokens_from_tokenizer_files(model_dir):
    _, tok = load_model(model_dir, dtype="float32")
    s = tok.special
    assert s.mask == tok.token_to_id(MASK)
    assert s.eos == tok.token_to_id(EOS)
    assert s.pad == s.eos
    assert s.bos == tok.token_to_id(BOS)
    assert s.end_of_turn == tok.token_to_id(EOT)
    assert s.stop == {s.eos, s.end_of_turn}
    assert len({s.mask, s.eos, s.bos, s.end_of_turn}) == 4


def test_special_tokens_from_config_take_precedence(tmp_path):
    ids = {"mask_token_id": 20, "eos_token_id": 21, "pad_token_id": 22, "bos_token_id": 23}
    d = make_model_dir(tmp_path / "m", cfg_overrides=ids)
    assert {k: json.loads((d / "config.json").read_text())[k] for k in ids} == ids
    _, tok = load_model(d, dtype="float32")
    s = tok.special
    assert (s.mask, s.eos, s.pad, s.bos) == (20, 21, 22, 23)
    assert s.end_of_turn == tok.token_to_id(EOT)  # no config field: always from the tokenizer
    assert s.stop == {21, s.end_of_turn}


def test_eos_token_id_list_makes_every_listed_id_a_stop_token(model_dir):
    _, tok = load_model(model_dir, dtype="float32")
    eos, eot = tok.token_to_id(EOS), tok.token_to_id(EOT)
    edit_json(model_dir / "config.json", eos_token_id=[eos, 30, 31])
    model, tok = load_model(model_dir, dtype="float32")
    s = tok.special
    assert (s.eos, s.pad, s.extra_eos) == (eos, eos, (30, 31))
    assert s.stop == {eos, eot, 30, 31}  # end-of-turn still honoured
    assert model.config.to_dict()["eos_token_id"] == [eos, 30, 31]

    edit_json(model_dir / "config.json", eos_token_id=[eos, 10**6])
    with pytest.raises(ConfigError, match="eos token id 1000000 is outside the vocabulary"):
        load_model(model_dir)
    edit_json(model_dir / "config.json", eos_token_id=[])
    with pytest.raises(ConfigError, match="eos_token_id"):
        load_model(model_dir)


def test_llada_8b_config_is_accepted():
    cfg = LLaDAConfig.from_dict(llada_8b_instruct_config())
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (4096, 32, 32, 32, 128)
    assert (cfg.mlp_hidden_size, cfg.vocab_size, cfg.embedding_size) == (12288, 126464, 126464)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.max_sequence_length) == (500000.0, 1e-5, 4096)
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id) == (126336, 126081, 126081)
    assert not cfg.weight_tying
    with torch.device("meta"):
        model = DiffusionLM(cfg)
    assert 8.0e9 < sum(p.numel() for p in model.parameters()) < 8.1e9
    assert {"model.transformer.blocks.31.attn_out.weight", "model.transformer.ff_out.weight"} <= set(model.state_dict())
    cache = KVCache(cfg, slots=1, max_len=1, dtype=torch.bfloat16, device="meta")
    assert cache.nbytes() // (cache.max_len + 1) == 512 * 1024  # KV cost per token in bf16


def test_shrunk_llada_8b_directory_loads(model_dir):
    """LLaDA-8B-Instruct's full config.json field set with tiny sizes loads with its own checkpoint."""
    _, tok = load_model(model_dir, dtype="float32")
    vocab = tok.vocab_size
    sizes = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=96, max_sequence_length=256, vocab_size=vocab, embedding_size=vocab + 7)
    special = dict(mask_token_id=tok.token_to_id(MASK), eos_token_id=tok.token_to_id(EOS), pad_token_id=tok.token_to_id(EOS))
    d = make_model_dir(model_dir.parent / "llada", cfg_overrides={k: v for k, v in sizes.items() if k != "max_sequence_length"})
    (d / "config.json").write_text(json.dumps(llada_8b_instruct_config(**sizes, **special), indent=2))
    model, tok = load_model(d, dtype="float32")
    cfg = model.config
    assert (cfg.d_model, cfg.n_layers, cfg.embedding_size, cfg.rope_theta) == (64, 2, vocab + 7, 500000.0)
    assert tok.special.mask == special["mask_token_id"]
    assert logits_of(model).shape == (1, IDS.shape[1], vocab)


# --------------------------------------------------------------------------- bad input

def test_missing_directory(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_the_cli_reports_a_missing_model_as_an_error_not_a_traceback(tmp_path):
    from cli.dllm import main

    with pytest.raises(SystemExit, match=r"^error: model directory .*nowhere does not exist"):
        main(["generate", "--model", str(tmp_path / "nowhere"), "hi"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device, reason", [("gpu", "Expected one of"), ("cuda", "CUDA is not available on this machine")])
def test_a_device_torch_cannot_use_is_named_before_anything_loads(model_dir, tmp_path, device, reason):
    with pytest.raises(ConfigError, match=rf"^device '{device}': .*{reason}"):
        load_model(model_dir, device=device)
    from cli.dllm import main  # every host of the engine says so, `dllm distill --student` too

    (tmp_path / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "hi?"}], "reply": "yo"}\n')
    (tmp_path / "utterances.txt").write_text("hi yo\n")
    with pytest.raises(SystemExit, match=rf"^error: device '{device}': .*{reason}"):
        main(["distill", "--data", str(tmp_path), "--student", str(model_dir), "--device", device])


def test_missing_config(model_dir):
    (model_dir / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config\.json not found"):
        load_model(model_dir)


def test_invalid_config_json(model_dir):
    (model_dir / "config.json").write_text('{"d_model": 64,')
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(model_dir)
    (model_dir / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_model(model_dir)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"alibi": True}, "alibi"),
        ({"layer_norm_type": "layer"}, "layer_norm_type"),
        ({"model_type": "dream"}, "model_type 'dream'"),
        ({"include_bias": True}, "bias"),
        ({"include_qkv_bias": True}, "bias"),
        ({"block_type": "sequential"}, "block_type"),
        ({"rope": False}, "rope"),
        ({"d_model": ...}, "lacks required field.*d_model"),
        ({"n_heads": 5}, "not divisible by n_heads"),
        ({"clip_qkv": 8.0}, "clip_qkv"),
    ],
)
def test_unsupported_config_values(model_dir, change, match):
    edit_json(model_dir / "config.json", **change)
    with pytest.raises(ConfigError, match=match):
        load_model(model_dir)


def test_null_clip_qkv_is_accepted(model_dir):
    """LLaDA's checkpoints write `clip_qkv: null` (no clamping): the same model as without the key."""
    without, _ = load_model(model_dir, dtype="float32")
    edit_json(model_dir / "config.json", clip_qkv=None)
    model, _ = load_model(model_dir, dtype="float32")
    assert model.config == without.config


def test_tokenizer_larger_than_embedding(model_dir):
    _, tok = load_model(model_dir, dtype="float32")
    n = tok.vocab_size
    edit_json(model_dir / "config.json", vocab_size=n - 8, embedding_size=n - 4)
    with pytest.raises(ConfigError, match=f"up to {n - 1} .*only {n - 4} rows"):
        load_model(model_dir)


def test_missing_weights_file(model_dir):
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"no \*\.safetensors"):
        load_model(model_dir)


def _rewrite_weights(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def test_missing_tensor(model_dir):
    _rewrite_weights(model_dir, lambda s: s.pop("model.transformer.blocks.1.up_proj.weight"))
    with pytest.raises(ConfigError, match=r"lacks weight.*blocks\.1\.up_proj\.weight"):
        load_model(model_dir)


def test_unexpected_tensor(model_dir):
    _rewrite_weights(model_dir, lambda s: s.update({"model.transformer.blocks.0.q_norm.weight": torch.ones(64)}))
    with pytest.raises(ConfigError, match=r"unexpected weight 'model\.transformer\.blocks\.0\.q_norm\.weight'"):
        load_model(model_dir)


def test_shape_mismatch(model_dir):
    edit_json(model_dir / "config.json", d_model=128)
    with pytest.raises(ConfigError, match=r"has shape .*config expects"):
        load_model(model_dir)


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupt_safetensors(model_dir, damage):
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 8 + data[8:])
    with pytest.raises(ConfigError, match=r"cannot read weights from .*model\.safetensors"):
        load_model(model_dir)


def test_index_naming_a_missing_shard(tmp_path):
    d = make_model_dir(tmp_path / "m", shard_bytes=40_000)
    gone = sorted(d.glob("*.safetensors"))[1]
    gone.unlink()
    with pytest.raises(ConfigError, match=f"missing: {gone.name}"):
        load_model(d)


def test_tensor_in_two_shards(tmp_path):
    d = make_model_dir(tmp_path / "m", shard_bytes=40_000)
    first, second = sorted(d.glob("*.safetensors"))[:2]
    name = next(iter(load_file(str(first))))
    state = load_file(str(second))
    state[name] = load_file(str(first))[name] + 1  # would silently win without the check
    save_file(state, str(second))
    with pytest.raises(ConfigError, match=f"{name}.*both {first.name} and {second.name}"):
        load_model(d)


def test_tokenizer_without_mask_token(model_dir):
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] != MASK]
    del tj["model"]["vocab"][MASK]
    (model_dir / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ConfigError, match="no mask token"):
        load_model(model_dir)
    edit_json(model_dir / "config.json", mask_token_id=9)  # naming one in config.json is enough
    _, tok = load_model(model_dir, dtype="float32")
    assert tok.token_to_id(MASK) is None and tok.special.mask == 9


def test_missing_tokenizer_and_out_of_vocab_special_ids(model_dir):
    edit_json(model_dir / "config.json", mask_token_id=126336)
    with pytest.raises(ConfigError, match="mask token id 126336 is outside the vocabulary"):
        load_model(model_dir)
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"cannot load tokenizer .*tokenizer\.json"):
        load_model(model_dir)


def test_corrupt_index(tmp_path):
    d = make_model_dir(tmp_path / "m", shard_bytes=40_000)
    (d / INDEX_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match=INDEX_FILE):
        load_model(d)


def test_corrupt_tokenizer_config(model_dir):
    (model_dir / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="tokenizer_config.json"):
        load_model(model_dir)


def test_on_own_thread_runs_elsewhere_and_returns_the_result(model_dir):
    where: list[threading.Thread] = []

    def load(path):
        where.append(threading.current_thread())
        return load_model(path, dtype="float32")

    model, tokenizer = on_own_thread(load, model_dir)
    assert where and where[0] is not threading.current_thread() and not where[0].is_alive()
    assert torch.equal(logits_of(model), logits_of(load_model(model_dir, dtype="float32")[0]))


def test_on_own_thread_raises_the_loaders_error_on_the_callers_thread(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        on_own_thread(load_model, tmp_path / "missing")


def test_a_bad_end_of_turn_id_or_turn_blocks_without_block_causal_are_refused(model_dir):
    edit_json(model_dir / "config.json", end_of_turn_token_id=10**6)
    with pytest.raises(ConfigError, match="end-of-turn token id 1000000 is outside the vocabulary"):
        load_model(model_dir)
    edit_json(model_dir / "config.json", end_of_turn_token_id=..., turn_blocks=True)
    with pytest.raises(ConfigError, match="turn_blocks needs block_causal"):
        load_model(model_dir)
