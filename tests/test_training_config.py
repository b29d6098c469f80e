"""Training configs: a TOML file (and the one it extends) read into a TrainConfig, and every bad setting refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from dllm_engine.config import ConfigError
from training.config import TrainConfig


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("loss_weighting", "sqrt", "loss_weighting"), ("device", "gpu", "device 'gpu'"), ("train_files", [], "train_files"), ("eval_file", "", "eval_file"),
        ("certainty_weight", -1.0, "certainty_weight"), ("history_copies", -1, "history_copies"), ("history_turns", 0, "history_turns"),
        ("lora_rank", 8, "adapters need weights to adapt"), ("lora_rank", -1, "lora_rank must be >= 0"),
        ("pad_to_block", True, "pad_to_block pads to the largest of block_sizes"), ("certainty_from_step", -1, "certainty_from_step"),
        ("drafting_ar_weight", -0.5, "drafting_ar_weight must be a number >= 0"), ("drafting_ar_weight", "yes", "drafting_ar_weight must be a number >= 0"),
    ],
)
def test_bad_training_settings_are_refused(key, value, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict({"data_dir": "d", "out_dir": "o", key: value})


def test_unknown_config_keys_are_named(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('data_dir = "d"\nout_dir = "o"\nlearning_rate = 1.0\nbogus = 2\n')
    with pytest.raises(ConfigError, match=r"c.toml.*unknown config key\(s\): bogus, learning_rate"):
        TrainConfig.load(path)
    path.write_text('data_dir = "d"\nout_dir = "o"\n[model]\nhidden_size = 64\n')
    with pytest.raises(ConfigError, match=r"unknown \[model\] key\(s\): hidden_size"):
        TrainConfig.load(path)
    path.write_text('data_dir = "d"\nout_dir = "o"\nlr = \n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        TrainConfig.load(path)


def test_shipped_configs_parse_and_paths_are_relative_to_the_file():
    root = Path(__file__).resolve().parents[1]
    cfg = TrainConfig.load(root / "configs" / "default.toml")
    assert cfg.reply_len == 32 and cfg.model["d_model"] % cfg.model["n_heads"] == 0
    assert Path(cfg.out_dir) == root / "runs" / "default"  # ../runs/ from configs/: the repo's ignored runs/
    tiny = TrainConfig.load(root / "configs" / "tiny.toml")
    assert Path(tiny.data_dir).is_absolute()
    for path in (root / "configs").glob("*.toml"):  # each parses, and writes under the ignored runs/
        assert Path(TrainConfig.load(path).out_dir).is_relative_to(root / "runs"), path


def test_a_config_extends_another_and_states_only_what_it_changes(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "a.toml").write_text(
        'data_dir = "data"\nout_dir = "/runs/a"\nlr = 1e-3\nseed = 1\n'
        "[model]\nd_model = 64\nn_heads = 4\n[source_repeats]\nchatterbot = 2\n"
    )
    (tmp_path / "b.toml").write_text(
        'extends = "base/a.toml"\nout_dir = "runs/b"\nlr = 3e-4\n[model]\nn_layers = 3\n[source_repeats]\nchitchat = 0\n'
    )
    cfg = TrainConfig.load(tmp_path / "b.toml")
    assert (cfg.lr, cfg.seed) == (3e-4, 1)
    assert cfg.model == {"d_model": 64, "n_heads": 4, "n_layers": 3}  # tables merge key by key
    assert cfg.source_repeats == {"chatterbot": 2, "chitchat": 0}
    assert cfg.data_dir == str(tmp_path / "base" / "data")  # relative to the file that sets it
    assert cfg.out_dir == str(tmp_path / "runs" / "b")


def test_extends_errors_name_the_file(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\ndata_dir = "d"\nout_dir = "o"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(ConfigError, match="extends a.toml in a cycle"):
        TrainConfig.load(tmp_path / "a.toml")
    (tmp_path / "b.toml").write_text('extends = "missing.toml"\n')
    with pytest.raises(ConfigError, match="missing.toml not found"):
        TrainConfig.load(tmp_path / "a.toml")
    (tmp_path / "b.toml").write_text("extends = 3\n")
    with pytest.raises(ConfigError, match="extends must name a config file"):
        TrainConfig.load(tmp_path / "b.toml")
