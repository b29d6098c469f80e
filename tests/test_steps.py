"""The per-step latency benchmark: real shapes, random weights made on the device, every step kind."""

from __future__ import annotations

import json

import pytest
import torch

from dllm_engine.config import LLaDAConfig
from benchmarks.steps import SHAPES, StepTimer, main, random_model
from tests.helpers import llada_8b_instruct_config, tiny_config


def test_the_8b_shape_is_llada_8b_instructs():
    real = LLaDAConfig.from_dict(llada_8b_instruct_config())
    shape = LLaDAConfig(**SHAPES["llada-8b"])
    assert shape == real


def test_random_weights_are_seeded_and_usable():
    cfg = tiny_config()
    a, b = (random_model(cfg, torch.device("cpu"), torch.bfloat16, seed=3) for _ in range(2))
    assert all(p.dtype == torch.bfloat16 for p in a.parameters())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.model.transformer["ln_f"].weight.eq(1).all()
    hidden = a(torch.randint(0, cfg.vocab_size, (2, 9)))
    assert torch.isfinite(a.logits(hidden)).all()


def test_a_dual_step_writes_only_its_blocks_keys():
    cfg = tiny_config(mask_token_id=1)
    timer = StepTimer(random_model(cfg, torch.device("cpu"), torch.float32), batch=2, prompt_len=12, canvas=16, block=8)
    timer.step(0, timer.length, 12)  # a full step fills the cache
    before = [k.clone() for k in timer.cache.k]
    timer.ids[:, 12:20] = 5  # the block's tokens change: only its keys may change
    timer.step(12, 20, 12)
    for old, new in zip(before, timer.cache.k):
        changed = (old != new).any(-1).any(-1)[:, : timer.length]
        assert changed[:, 12:20].any() and not changed[:, :12].any() and not changed[:, 20:].any()


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_the_report_has_every_step_kind_for_every_batch(random_model_dir, tmp_path, capsys, dtype):
    out = tmp_path / "steps.json"
    report = main(["--model", str(random_model_dir), "--batches", "1", "3", "--prompt-tokens", "20", "--canvas", "16",
                   "--block-size", "8", "--repeats", "1", "--dtype", dtype, "--json", str(out)])
    assert json.loads(out.read_text()) == report
    assert report["dtype"] == dtype
    assert [r["batch"] for r in report["runs"]] == [1, 3]
    assert all(r[k] > 0 for r in report["runs"] for k in ("full_ms", "prefix_ms", "dual_ms"))
    assert report["conditions"] == {"prompt_tokens": 20, "canvas": 16, "block_size": 8, "repeats": 1}
    assert "full ms" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--canvas", "20", "--block-size", "8"], ["--batches", "0"], ["--model", "x", "--shape", "llada-8b"], ["--shape", "llada-7b"], ["--dtype", "fp8"], ["--device", "gpu"], ["--threads", "-1"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert "error" in capsys.readouterr().err


def test_a_missing_model_directory_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "missing"), "--batches", "1"])
    assert "missing does not exist" in capsys.readouterr().err


def test_a_block_causal_step_reads_no_key_after_its_block():
    """The keys after the block are garbage here: a block-causal dual step must not see them."""
    cfg = tiny_config(mask_token_id=1, block_causal=True)
    timer = StepTimer(random_model(cfg, torch.device("cpu"), torch.float32), batch=1, prompt_len=12, canvas=16, block=8)
    timer.step(0, timer.length, 12)
    hidden = lambda: timer.model.logits(timer.model(timer.ids[:, 12:20], torch.arange(12, 20)[None], timer.keys(12, 20), timer.cache, timer.slots))  # noqa: E731
    before = hidden()
    for k in timer.cache.k + timer.cache.v:
        k[:, 20:] = torch.randn_like(k[:, 20:])
    torch.testing.assert_close(hidden(), before)
    assert set(timer.measure(1)) == {"full_ms", "block_start_ms", "prefix_ms", "dual_ms"}
