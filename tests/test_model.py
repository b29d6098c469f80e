"""DiffusionLM maths: parity with an independent implementation, cache semantics, dtypes.

Two independent references are used:
- transformers' Llama (same layout as LLaDA), run with a non-causal attention mask;
- an explicit float64 re-implementation written here (RMSNorm, rotate-half RoPE, softmax
  attention with grouped KV heads, SwiGLU), which can also be fed stale keys/values the way a
  Fast-dLLM dual-cache step sees them.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dllm_engine.config import ConfigError
from dllm_engine.model import KVCache
from tests.helpers import random_model, tiny_config

VOCAB = 64


# --------------------------------------------------------------------------- explicit reference

def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """x (T, H, D): pair dimension i with i + D/2 and rotate by pos * theta^(-2i/D)."""
    d = x.shape[-1]
    half = d // 2
    inv = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / d)
    ang = pos.to(torch.float64)[:, None] * inv[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float64) for k, v in model.state_dict().items()}


def reference_forward(model, ids, pos=None, stale=None, key_valid=None):
    """One sequence, float64, layer by layer.

    ids, pos: (T,) query tokens and positions. Without `stale` the queries are the keys.
    With `stale` (a list over layers of (K, V), each (S, kv_heads, head_dim), K already rotated),
    each layer writes the queries' own K/V at `pos` into a copy and attends over all S entries
    (those with key_valid True). Returns (hidden (T, d), logits (T, vocab), [(K, V)] used per layer).
    """
    cfg = model.config
    p = _params(model)
    pre = "model.transformer."
    h, kvh, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    t = ids.shape[0]
    pos = torch.arange(t) if pos is None else pos
    x = p[pre + "wte.weight"][ids]
    used = []
    for i in range(cfg.n_layers):
        b = f"{pre}blocks.{i}."
        n1 = _rms(x, p[b + "attn_norm.weight"], cfg.rms_norm_eps)
        q = _rope((n1 @ p[b + "q_proj.weight"].T).view(t, h, hd), pos, cfg.rope_theta)
        k = _rope((n1 @ p[b + "k_proj.weight"].T).view(t, kvh, hd), pos, cfg.rope_theta)
        v = (n1 @ p[b + "v_proj.weight"].T).view(t, kvh, hd)
        if stale is None:
            keys, values = k, v
        else:
            keys, values = stale[i][0].to(torch.float64).clone(), stale[i][1].to(torch.float64).clone()
            keys[pos], values[pos] = k, v
        used.append((keys, values))
        group = h // kvh
        out = torch.empty(t, h, hd, dtype=torch.float64)
        for head in range(h):
            kv = head // group  # query head -> its KV head (repeat_kv / repeat_interleave order)
            scores = q[:, head] @ keys[:, kv].T / math.sqrt(hd)
            if key_valid is not None:
                scores = scores.masked_fill(~key_valid[None, :], -math.inf)
            out[:, head] = torch.softmax(scores, dim=-1) @ values[:, kv]
        x = x + out.reshape(t, -1) @ p[b + "attn_out.weight"].T
        n2 = _rms(x, p[b + "ff_norm.weight"], cfg.rms_norm_eps)
        gate, up = n2 @ p[b + "ff_proj.weight"].T, n2 @ p[b + "up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ p[b + "ff_out.weight"].T
    hidden = _rms(x, p[pre + "ln_f.weight"], cfg.rms_norm_eps)
    head_w = p[pre + "wte.weight"] if cfg.weight_tying else p[pre + "ff_out.weight"]
    return hidden, (hidden @ head_w.T)[:, : cfg.vocab_size], used


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> None:
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item()
    assert err <= atol, f"max abs difference {err:.3g} > {atol}"


def ids_for(seed: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def model(request):
    return random_model(tiny_config(n_kv_heads=request.param, vocab_size=VOCAB, rope_theta=500000.0), seed=1)


# --------------------------------------------------------------------------- explicit reference parity

@torch.inference_mode()
def test_forward_matches_explicit_reference(model):
    ids = ids_for(0, 2, 12)
    logits = model.logits(model(ids))
    assert logits.shape == (2, 12, VOCAB)
    for row in range(2):
        _, ref_logits, _ = reference_forward(model, ids[row])
        close(logits[row], ref_logits)


def test_fused_projections_keep_llada_names_and_join_in_place(model):
    """q/k/v and gate/up run fused, but a state dict has LLaDA's names both ways, and joining pops
    the parts (a loader joining its own dict holds the weights once)."""
    state = model.state_dict()
    assert not any("qkv_proj" in name or "ff_in" in name for name in state)
    prefix = "model.transformer.blocks.1."
    block = model.model.transformer["blocks"][1]
    parts = [state[f"{prefix}{name}.weight"] for name in ("q_proj", "k_proj", "v_proj")]
    assert [p.shape[0] for p in parts] == [model.config.d_model] + [model.config.n_kv_heads * model.config.head_dim] * 2
    block.join_fused(state, prefix)
    assert not any(f"{prefix}{name}.weight" in state for name in ("q_proj", "k_proj", "v_proj", "ff_proj", "up_proj"))
    assert torch.equal(state[f"{prefix}qkv_proj.weight"], torch.cat(parts))
    assert torch.equal(state[f"{prefix}qkv_proj.weight"], block.qkv_proj.weight)
    block.split_fused(state, prefix)
    assert set(state) == set(model.state_dict())


@torch.inference_mode()
def test_logits_are_cut_to_vocab_and_weight_tying_uses_embeddings():
    m = random_model(tiny_config(vocab_size=VOCAB, embedding_size=72, weight_tying=True), seed=2)
    assert "model.transformer.ff_out.weight" not in m.state_dict()
    ids = ids_for(1, 1, 9)
    logits = m.logits(m(ids))
    assert logits.shape == (1, 9, VOCAB)
    close(logits[0], reference_forward(m, ids[0])[1])


# --------------------------------------------------------------------------- transformers Llama parity

def _llama(model, causal: bool = False):
    import transformers  # a declared test dependency: missing, the test errors rather than skips
    cfg = model.config
    lcfg = transformers.LlamaConfig(
        vocab_size=cfg.embedding_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.mlp_hidden_size,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        max_position_embeddings=cfg.max_sequence_length,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        attn_implementation="eager",
    )
    llama = transformers.LlamaForCausalLM(lcfg).eval()
    src = {k.removeprefix("model.transformer."): v for k, v in model.state_dict().items()}
    state = {"model.embed_tokens.weight": src["wte.weight"], "model.norm.weight": src["ln_f.weight"], "lm_head.weight": src["ff_out.weight"]}
    names = {
        "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj", "self_attn.o_proj": "attn_out",
        "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out",
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm",
    }
    for i in range(cfg.n_layers):
        for theirs, ours in names.items():
            state[f"model.layers.{i}.{theirs}.weight"] = src[f"blocks.{i}.{ours}.weight"]
    llama.load_state_dict(state, strict=True)

    def run(ids: torch.Tensor, pos: torch.Tensor | None = None, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        n, t = ids.shape
        pos = torch.arange(t).expand(n, t) if pos is None else pos
        if causal:
            mask = None  # transformers builds its causal mask
        else:
            # A 4D float mask is used as-is (added to the scores): zeros = full bidirectional attention.
            mask = torch.zeros(n, 1, t, t)
            if key_valid is not None:
                mask = mask.masked_fill(~key_valid[:, None, None, :], torch.finfo(torch.float32).min)
        return llama(input_ids=ids, attention_mask=mask, position_ids=pos).logits[..., : cfg.vocab_size]

    return run


@torch.inference_mode()
def test_logits_match_bidirectional_llama(model):
    llama = _llama(model)
    ids = ids_for(3, 2, 12)
    ours = model.logits(model(ids))
    close(ours, llama(ids))
    # positions that do not start at zero (RoPE theta/layout must agree, not just relative shifts)
    pos = torch.arange(12).expand(2, 12) * 3 + 7
    close(model.logits(model(ids, pos)), llama(ids, pos))


@torch.inference_mode()
def test_attention_is_really_bidirectional_in_both(model):
    llama, causal_llama = _llama(model), _llama(model, causal=True)
    ids = ids_for(4, 1, 10)
    later = ids.clone()
    later[0, -1] = (later[0, -1] + 1) % VOCAB
    ours_a, ours_b = model.logits(model(ids)), model.logits(model(later))
    ref_a, ref_b = llama(ids), llama(later)
    assert (ours_a[0, 0] - ours_b[0, 0]).abs().max() > 1e-3, "changing the last token left position 0 unchanged"
    assert (ref_a[0, 0] - ref_b[0, 0]).abs().max() > 1e-3, "the Llama reference is still causal"
    close(ours_b, ref_b)
    # The comparison can tell the difference: causal Llama ignores the later token, and disagrees with us.
    assert (causal_llama(ids)[0, 0] - causal_llama(later)[0, 0]).abs().max() < 1e-6
    assert (causal_llama(ids) - ours_a).abs().max() > 1e-3


@torch.inference_mode()
def test_right_padding_equals_unpadded_rows(model):
    llama = _llama(model)
    lengths = [12, 7]
    ids = ids_for(5, 2, 12)
    ids[1, 7:] = 3  # arbitrary pad token
    key_valid = torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]
    padded = model.logits(model(ids, key_valid=key_valid))
    for row, n in enumerate(lengths):
        alone = model.logits(model(ids[row : row + 1, :n]))
        close(padded[row, :n], alone[0], atol=1e-5)
    close(padded[1, :7], llama(ids, key_valid=key_valid)[1, :7])
    # and the mask matters: without it the short row sees the pad tokens
    assert (model.logits(model(ids))[1, :7] - padded[1, :7]).abs().max() > 1e-3


# --------------------------------------------------------------------------- KV cache semantics

def _layer_kv(cache: KVCache, slot: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(cache.k[i][slot, :n].clone(), cache.v[i][slot, :n].clone()) for i in range(len(cache.k))]


@torch.inference_mode()
def test_cache_filling_forward_equals_plain_forward(model):
    t = 20
    ids = ids_for(6, 1, t)
    cache = KVCache(model.config, slots=3, max_len=32, dtype=torch.float32, device="cpu")
    hidden = model(ids, torch.arange(t)[None], torch.ones(1, t, dtype=torch.bool), cache, torch.tensor([1]))
    close(hidden, model(ids), atol=1e-5)
    # the cache holds the rotated keys and the values of every layer, in slot 1 only
    _, _, used = reference_forward(model, ids[0])
    for i, (k, v) in enumerate(used):
        close(cache.k[i][1, :t], k)
        close(cache.v[i][1, :t], v)
        assert not cache.k[i][[0, 2]].any() and not cache.k[i][1, t:].any()


@torch.inference_mode()
def test_dual_cache_step_attends_to_stale_keys(model):
    t, lo, hi = 32, 12, 20
    ids = ids_for(7, 1, t)
    new_block = ids_for(8, 1, hi - lo)
    cache = KVCache(model.config, slots=2, max_len=40, dtype=torch.float32, device="cpu")
    slot = torch.tensor([1])
    model(ids, torch.arange(t)[None], torch.ones(1, t, dtype=torch.bool), cache, slot)
    before = _layer_kv(cache, 1, t)

    pos = torch.arange(lo, hi)[None]
    logits = model.logits(model(new_block, pos, torch.ones(1, t, dtype=torch.bool), cache, slot))

    # Reference: the block's queries against the keys/values of the ORIGINAL sequence (stale,
    # computed with the old block tokens) except at the block's own positions.
    _, _, stale = reference_forward(model, ids[0])
    _, ref_logits, used = reference_forward(model, new_block[0], pos[0], stale=stale)
    close(logits[0], ref_logits)
    for i, (k, v) in enumerate(used):  # the step overwrote exactly the block's entries
        close(cache.k[i][1, :t], k)
        close(cache.v[i][1, :t], v)
        outside = torch.ones(t, dtype=torch.bool)
        outside[lo:hi] = False
        assert torch.equal(cache.k[i][1, :t][outside], before[i][0][outside])
        assert not torch.equal(cache.k[i][1, lo:hi], before[i][0][lo:hi])

    # Stale keys really matter: recomputing the whole edited sequence gives different logits.
    edited = ids.clone()
    edited[0, lo:hi] = new_block[0]
    fresh = model.logits(model(edited))[0, lo:hi]
    assert (fresh - logits[0]).abs().max() > 1e-3


@torch.inference_mode()
def test_cache_respects_key_valid_length_and_mask(model):
    """Keys beyond key_valid.shape[1] are never read; False entries inside it are ignored."""
    t = 16
    ids = ids_for(9, 1, t)
    cache = KVCache(model.config, slots=1, max_len=32, dtype=torch.float32, device="cpu")
    model(ids, torch.arange(t)[None], torch.ones(1, t, dtype=torch.bool), cache, torch.tensor([0]))
    for i in range(len(cache.k)):  # garbage after the first t entries must not be read
        cache.k[i][0, t:] = 1e3
        cache.v[i][0, t:] = 1e3
    q = ids[:, 4:8]
    pos = torch.arange(4, 8)[None]
    valid = torch.ones(1, t, dtype=torch.bool)
    valid[0, 10:] = False
    got = model.logits(model(q, pos, valid, cache, torch.tensor([0])))
    _, _, stale = reference_forward(model, ids[0])
    _, ref, _ = reference_forward(model, q[0], pos[0], stale=stale, key_valid=valid[0])
    close(got[0], ref)


@torch.inference_mode()
def test_batched_cache_with_gathered_slots_and_padding_equals_rows_alone(model):
    cfg = model.config
    lengths, slots = [20, 13], torch.tensor([3, 1])  # non-consecutive and descending: a gather
    t = max(lengths)
    ids = ids_for(10, 2, t)
    ids[1, lengths[1]:] = 5
    cache = KVCache(cfg, slots=5, max_len=24, dtype=torch.float32, device="cpu")
    key_valid = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    pos = torch.where(key_valid, torch.arange(t)[None, :], cache.scratch)
    hidden = model(ids, pos, key_valid, cache, slots)
    for row, n in enumerate(lengths):
        close(hidden[row, :n], model(ids[row : row + 1, :n])[0], atol=1e-5)
        for i in range(cfg.n_layers):  # pad queries went to scratch, not into the row's cache
            assert not cache.k[i][slots[row], n:cache.scratch].any()
    for i in range(cfg.n_layers):
        assert not cache.k[i][[0, 2, 4]].any(), "a slot outside the batch was written"

    # A batched block step: row 0 queries 4 positions, row 1 only 3 (one pad query to scratch).
    step_ids = ids_for(11, 2, 4)
    step_pos = torch.tensor([[8, 9, 10, 11], [4, 5, 6, cache.scratch]])
    got = model.logits(model(step_ids, step_pos, key_valid, cache, slots))
    for row, n in enumerate(lengths):
        m = 4 if row == 0 else 3
        alone = KVCache(cfg, slots=1, max_len=24, dtype=torch.float32, device="cpu")
        one = torch.tensor([0])
        model(ids[row : row + 1, :n], torch.arange(n)[None], torch.ones(1, n, dtype=torch.bool), alone, one)
        want = model.logits(model(step_ids[row : row + 1, :m], step_pos[row : row + 1, :m], torch.ones(1, n, dtype=torch.bool), alone, one))
        close(got[row, :m], want[0], atol=1e-5)
        for i in range(cfg.n_layers):
            close(cache.k[i][slots[row], :n], alone.k[i][0, :n], atol=1e-5)


# --------------------------------------------------------------------------- dtypes and devices

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@torch.inference_mode()
def test_low_precision_runs_and_stays_close_to_fp32(model, dtype, device):
    ids = ids_for(12, 2, 16)
    want = model.logits(model(ids))
    low = copy.deepcopy(model).to(device=device, dtype=dtype)
    got = low.logits(low(ids.to(device)))
    assert got.dtype == dtype and got.device.type == device
    got = got.float().cpu()
    assert torch.isfinite(got).all()
    rel = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item()
    assert rel < 0.05, f"relative logit error {rel:.3f} vs fp32"

    # the cached path in the same dtype agrees with the uncached one
    cache = KVCache(low.config, slots=2, max_len=24, dtype=dtype, device=device)
    valid = torch.ones(2, 16, dtype=torch.bool, device=device)
    cached = low.logits(low(ids.to(device), torch.arange(16, device=device).expand(2, 16), valid, cache, torch.tensor([0, 1], device=device)))
    rel_cached = ((cached.float().cpu() - got).norm(dim=-1) / got.norm(dim=-1)).max().item()
    assert rel_cached < 0.02


@torch.inference_mode()
def test_cache_in_another_dtype_than_the_model(model):
    """A bf16 cache under an fp32 model (and the reverse) must not trip SDPA's dtype check."""
    ids = ids_for(13, 1, 12)
    valid, pos, slot = torch.ones(1, 12, dtype=torch.bool), torch.arange(12)[None], torch.tensor([0])
    want = model.logits(model(ids))
    cache = KVCache(model.config, slots=1, max_len=16, dtype=torch.bfloat16, device="cpu")
    got = model.logits(model(ids, pos, valid, cache, slot))
    assert got.dtype == torch.float32 and cache.k[0].dtype == torch.bfloat16
    assert ((got - want).norm(dim=-1) / want.norm(dim=-1)).max() < 0.05
    step = model.logits(model(ids[:, 4:8], pos[:, 4:8], valid, cache, slot))  # reads the bf16 cache back
    close(step, got[:, 4:8], atol=0.1)

    low = copy.deepcopy(model).to(torch.bfloat16)
    cache32 = KVCache(model.config, slots=1, max_len=16, dtype=torch.float32, device="cpu")
    out = low.logits(low(ids, pos, valid, cache32, slot))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


@CUDA
@torch.inference_mode()
def test_cuda_graph_replays_give_the_eager_forwards_and_cache(model):
    """Each shape is captured once and replayed: same hidden states, same keys and values written,
    whatever slots and positions the call brings (they are inputs of the graph, not constants)."""
    eager = copy.deepcopy(model).to("cuda")
    graphed = copy.deepcopy(model).to("cuda")
    graphed.use_cuda_graphs(max_query_tokens=64)
    caches = [KVCache(model.config, slots=3, max_len=40, dtype=torch.float32, device="cuda") for _ in range(2)]
    ids = ids_for(14, 3, 40).cuda()
    full_pos = torch.arange(40, device="cuda").expand(3, 40)
    valid = torch.ones(3, 40, dtype=torch.bool, device="cuda")
    slots = torch.tensor([2, 0, 1], device="cuda")
    for m, cache in zip((eager, graphed), caches):
        m(ids, full_pos, valid, cache, slots)  # fills the caches: 120 query tokens, over the limit, eager in both
    for start, rows in ((8, [2, 0]), (24, [1, 2]), (16, [0, 1])):  # one shape, other slots and positions
        block = slice(start, start + 8)
        sel = torch.tensor(rows, device="cuda")
        want, got = (m(ids[sel, block].contiguous(), full_pos[sel, block].contiguous(), valid[sel], c, slots[sel]) for m, c in zip((eager, graphed), caches))
        close(got, want, atol=1e-5)
    assert len(graphed._layers.graphs) == 1
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        close(b, a, atol=1e-5)


def test_cuda_graphs_are_refused_off_a_gpu_and_with_compiled_layers(model):
    with pytest.raises(ConfigError, match="CUDA device"):
        copy.deepcopy(model).use_cuda_graphs()
    compiled = copy.deepcopy(model)
    compiled.compile_layers()
    with pytest.raises(ConfigError, match="one or the other"):
        compiled.use_cuda_graphs()
