"""Compiled layers (torch.compile): the same forwards as eager, compiled at start-up and never again."""

from __future__ import annotations

import asyncio
import pytest
import torch
from torch._dynamo.utils import counters

from dllm_engine.decoding import DecodeParams
from dllm_engine.engine import Engine
from dllm_engine.loading import load_model
from dllm_engine.model import KVCache
from tests.helpers import make_model_dir

# Inductor builds its CPU kernels with the system's C++ compiler (.ci/run installs g++).
pytestmark = pytest.mark.needs_tool("g++", "clang++", why="torch.compile needs a C++ compiler on a CPU")


def forwards(model, cache: KVCache, lengths: list[int]) -> list[torch.Tensor]:
    """A full forward of rows of `lengths` (right-padded) that fills the cache, then a cached 8-token block."""
    n, t = len(lengths), max(lengths)
    gen = torch.Generator().manual_seed(len(lengths) * 100 + t)
    ids = torch.randint(3, model.config.vocab_size, (n, t), generator=gen)
    key_valid = torch.arange(t) < torch.tensor(lengths)[:, None]
    pos = torch.arange(t).expand(n, t).contiguous()
    slots = torch.arange(n)
    with torch.inference_mode():
        full = model(ids, pos, key_valid, cache, slots)
        block = model(ids[:, 8:16].contiguous(), pos[:, 8:16].contiguous(), key_valid, cache, slots)
    return [full, block, *cache.k, *cache.v]


@pytest.mark.parametrize("regional", [False, True])
def test_compiled_layers_give_the_eager_forwards(random_model_dir, regional):
    eager, _ = load_model(random_model_dir, dtype="float32")
    compiled, _ = load_model(random_model_dir, dtype="float32")
    compiled.compile_layers(regional=regional)
    for lengths in ([40], [40, 40], [40, 27]):  # one row; rows without and with key padding
        a = forwards(eager, KVCache(eager.config, 2, 64, torch.float32, "cpu"), lengths)
        b = forwards(compiled, KVCache(compiled.config, 2, 64, torch.float32, "cpu"), lengths)
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("block_causal", [False, True])
def test_a_compiled_engine_compiles_before_serving_and_never_again(random_model_dir, tmp_path, block_causal):
    """Block-causal models add a kind: block starts with a mask per query."""
    model, tok = load_model(make_model_dir(tmp_path, {"block_causal": True}) if block_causal else random_model_dir, dtype="float32")
    torch._dynamo.reset()  # earlier tests' compiles count against dynamo's recompile limit, past which it runs eager
    before = counters["stats"]["unique_graphs"]  # process-wide: earlier tests have raised it already
    engine = Engine(model, tok, max_batch=3, max_len=512, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    params = DecodeParams(cache="dual", threshold=0.3, block_size=8, max_new_tokens=24, early_stop=False)
    prompts = ["hi", "what do you like to do on a sunny weekend?", "good morning", "tell me a story"]

    async def main():
        alone = await engine.generate(prompts[0], params)
        together = await asyncio.gather(*(engine.generate(p, params) for p in prompts[1:]))
        return [alone, *together]

    try:
        replies = asyncio.run(main())
    finally:
        engine.close()
    assert graphs > before, "nothing was compiled before serving"
    assert counters["stats"]["unique_graphs"] == graphs
    for text, out in replies:
        assert out.finish_reason == "length" and out.stats.forwards > 0


def test_the_blocks_share_one_compiled_graph_whatever_the_depth(tmp_path):
    """Regional compilation (the default on a GPU): a deeper model (an 8B checkpoint has 32 blocks)
    compiles no more ops."""
    captured = []
    for n_layers in (1, 4):
        torch._dynamo.reset()
        before = counters["stats"]["calls_captured"]
        model, _ = load_model(make_model_dir(tmp_path / str(n_layers), {"n_layers": n_layers}), dtype="float32")
        model.compile_layers(regional=True)
        forwards(model, KVCache(model.config, 1, 64, torch.float32, "cpu"), [40])
        captured.append(counters["stats"]["calls_captured"] - before)
    assert captured[0] > 0 and captured[1] == captured[0]
