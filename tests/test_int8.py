"""Int8 weights on a CPU (`dtype="int8"`): close to the float model row by row, whatever the other rows
hold, and a linear layer's result for a row the same in any batch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dllm_engine.config import ConfigError
from dllm_engine.loading import calibration_rows, load_model, save_model
from dllm_engine.model import Int8Linear


def test_every_row_is_close_to_float_beside_an_outlier_row():
    """An outlier row (a prompt's first token carries activations hundreds of times the rest) must not
    coarsen the others' quantization, as one scale for the whole tensor would."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    x = torch.randn(6, 96)
    x[0] *= 500
    exact = linear(x).detach()
    error = (Int8Linear(linear.weight, linear.bias)(x) - exact).norm(dim=1) / exact.norm(dim=1)
    assert error.max() < 0.03


def test_a_rows_result_does_not_depend_on_its_batch():
    torch.manual_seed(1)
    linear = nn.Linear(64, 32, bias=False)
    q = Int8Linear(linear.weight, None)
    x = torch.randn(2, 5, 64)
    x[1, 2] *= 50  # a row with a wider range than the rest
    batched = q(x)
    assert batched.shape == (2, 5, 32)
    assert torch.equal(batched, torch.cat([q(row[None]) for row in x.reshape(-1, 64)]).reshape(2, 5, 32))


def test_an_int8_model_predicts_as_its_float_model(converted):
    fp32, _ = load_model(converted, dtype="float32")
    int8, _ = load_model(converted, dtype="int8")
    assert (int8.weight_format, fp32.weight_format) == ("int8", "float32") and int8.n_params == fp32.n_params
    head = int8.head
    int8.quantize_int8()  # once only
    assert int8.head is head
    ids = torch.randint(0, fp32.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = fp32.logits(fp32(ids)), int8.logits(int8(ids))
    # A tiny model's rows are short (7-bit steps weigh more) and its logits flat: a loose bound, which a
    # wrong scale, weight or head exceeds many times over.
    assert ((a - b).norm(dim=-1) / a.norm(dim=-1)).max() < 0.15
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.85


def test_smoothing_keeps_the_function_and_moves_an_outlier_channel_into_the_weights(converted):
    """One channel of every norm's output made 100x the rest, the weights reading it scaled down to
    match (the same function, the outlier channels real models have): smoothing leaves the fp32
    logits as they were, and int8 logits come back near fp32's, which the outlier ruins without it."""
    ref, tok = load_model(converted, dtype="float32")
    with torch.no_grad():
        for b in ref.model.transformer["blocks"]:
            for norm, linear in ((b.attn_norm, b.qkv_proj), (b.ff_norm, b.ff_in)):
                norm.weight[0] *= 100
                linear.weight[:, 0] /= 100
    ids = torch.randint(0, ref.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    causal = torch.ones(1, 24, 24, dtype=torch.bool).tril()

    def logits(m):
        with torch.inference_mode():
            return m.logits(m(ids, key_valid=causal))

    def error(m):
        return ((logits(m) - logits(ref)).norm(dim=-1) / logits(ref).norm(dim=-1)).max()

    smoothed, plain, calibrated = copy.deepcopy(ref), copy.deepcopy(ref), copy.deepcopy(ref)
    smoothed.smooth(calibration_rows(tok))
    assert error(smoothed) < 1e-4
    plain.quantize_int8()
    calibrated.quantize_int8(calibration_rows(tok))
    assert error(calibrated) < 0.15 < error(plain)


def test_int8_is_refused_where_it_cannot_run(converted, tmp_path):
    bf16, _ = load_model(converted, dtype="bfloat16")
    with pytest.raises(ConfigError, match="float32 on a CPU"):
        bf16.quantize_int8()
    int8, _ = load_model(converted, dtype="int8")
    with pytest.raises(ConfigError, match="eager"):
        int8.compile_layers()
    with pytest.raises(ConfigError, match="decoding only"):
        save_model(int8, tmp_path / "out")
    assert not (tmp_path / "out").exists()
