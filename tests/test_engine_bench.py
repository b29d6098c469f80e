"""The engine benchmark on a random-weight model: the JSON the issue asks for, never how fast anything was."""

from __future__ import annotations

import pytest

from benchmarks import engine as bench
from dllm_engine.engine import Engine


def test_engine_bench_reports_every_configuration_and_prefix_reuse(random_model):
    model, tok = random_model
    engine = Engine(model, tok, max_batch=2, max_len=512)
    try:
        result = bench.run_bench(engine, batches=[1, 2], max_new_tokens=16, block_size=8, threshold=0.9, n_prompts=2, sweep=[0.9, 0.2])
    finally:
        engine.close()
    runs = result["runs"]
    assert [(r["batch"], r["policy"], r["cache"], r["early_stop"]) for r in runs] == [
        (b, policy, cache, early) for b in (1, 2) for _, policy, cache, early in bench.CONFIGS
    ]
    for r in runs:
        assert {"tokens_per_s", "tokens_per_forward", "first_block_ms", "agreement"} <= set(r)
        assert r["tokens_per_s"] > 0 and 0 <= r["agreement"] <= 1
        assert r["agreement"] == sum(a == b for a, b in zip(r["replies"], runs[0]["replies"])) / 2  # the replies it compared
    reference, early = runs[0], runs[1]
    assert reference["agreement"] == 1.0 and early["agreement"] == 1.0  # early stop never changes the text
    assert reference["forwards"] >= early["forwards"]
    assert result["conditions"]["prompts"] == 2 and result["conditions"]["max_new_tokens"] == 16
    machine = result["conditions"]["machine"]  # figures differ by CPU: bf16 is native on some, emulated on others
    assert machine["cpu"] and machine["cores"] >= 1 and isinstance(machine["cpu_bf16"], bool)
    same_tau, low_tau = result["threshold_sweep"]
    dual = runs[bench.CONFIGS.index(bench.SWEPT)]
    assert (same_tau["threshold"], same_tau["batch"], same_tau["policy"], same_tau["cache"]) == (0.9, 1, "threshold", "dual")
    assert (same_tau["agreement"], same_tau["forwards"]) == (dual["agreement"], dual["forwards"])  # the table's row again
    assert low_tau["threshold"] == 0.2 and 0 <= low_tau["agreement"] <= 1 and low_tau["speedup_vs_reference"] > 0
    for reuse in result["prefix_reuse"]:
        assert reuse["turns"] == 2 * 3  # every user turn after the first of each conversation
        assert 0 < reuse["reused_tokens_mean"] < reuse["prompt_tokens_mean"]
        assert 0 <= reuse["agreement"] <= 1 and reuse["reuse"]["total_ms"] > 0


@pytest.mark.parametrize("option, value", [
        ("--thresholds", "0.5,x"), ("--thresholds", "0.5,1.5"), ("--thresholds", "0"),
        ("--threshold", "1.5"), ("--threshold", "x"), ("--factor", "x"), ("--factor", "0"),
    ])
def test_dllm_bench_refuses_bad_decoding_values_before_loading_anything(option, value, capsys):
    from cli.dllm import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", option, value])
    assert exc.value.code == 2 and option in capsys.readouterr().err
