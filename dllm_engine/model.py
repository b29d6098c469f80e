"""A bidirectional transformer in the LLaDA layout, in plain PyTorch.

State-dict names are LLaDA's checkpoint names (`model.transformer.blocks.{i}.q_proj.weight`, ...),
so a checkpoint loads without renaming (a block's fused projections split and join on the way);
transformers' names (Llama, Qwen2, Qwen3 and the dLLMs built on them) are mapped to them on
loading (`hf_name`). The config's switches cover those families: q/k/v biases, per-head q/k
RMSNorm, grouped KV heads, an explicit head size, tied embeddings. Whether logits are shifted
(position i-1 predicting token i) is the decoder's business: the model returns every position's.
Attention is full (no causal mask): every position sees the whole canvas, which is what lets a
diffusion LM fill masked tokens anywhere. A block-causal model
(`LLaDAConfig.block_causal`) gets its mask from the caller, who knows where the blocks are.

The optional `KVCache` is a static per-slot buffer (gpt-fast style). A forward that is given a
cache first writes its own rotated keys and values at their positions, then attends over the
slot's first `key_valid.shape[1]` cached entries. With the whole sequence as the query this is
an ordinary forward that also fills the cache; with only a block as the query it is Fast-dLLM's
cached step against the (stale) keys and values of everything else.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict

import torch
import torch.fx.experimental._config as fx_config
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, LLaDAConfig

FEW_ROWS = 64  # up to this many positions, `DiffusionLM.logits` puts the weight on the left on a CPU in fp32


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 as LLaDA does; low-precision variance is visibly off at d=4096.
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return y * self.weight


def rotary(pos: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for positions `pos` (N, T), shaped (N, T, 1, head_dim), in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    freqs = pos.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE computed in fp32 (LLaDA's `rope_full_precision`)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class Int8Linear(nn.Module):
    """A linear layer with int8 weights, for decoding on a CPU (fbgemm's dynamically quantized GEMM).

    Why: a small model's decoding step multiplies a few rows by every weight, so it is bound by
    reading the weights; int8 weights are a quarter of fp32's. Weights are quantized per output
    channel. Activations are quantized per row: each row is scaled to an absolute maximum of 1 and
    a constant row [1, -1, 0, ...] pins the tensor's range to [-1, 1], so one outlier row (a prompt's
    first token) does not coarsen the others and a row's result does not depend on its batch.
    (Rounding to a grid still turns the last-bit differences of fp32 attention over more or fewer
    queries into a step's worth, so a verified reply is no longer bit for bit the one-token one.)
    fbgemm's activations are 7-bit (`reduce_range`): its 8-bit products overflow 16-bit sums.
    torchao, where quantization is maintained, has no fast int8 kernel for x86 CPUs without
    AVX-512, so this calls torch's own quantized ops, present in the pinned torch.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        zero = torch.zeros(len(w), dtype=torch.long)
        with warnings.catch_warnings():  # torch's quantized tensors are deprecated (see above)
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(w, scale.double(), zero, 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.pin = torch.zeros(1, w.shape[1])
        self.pin[0, :2] = torch.tensor([1.0, -1.0])
        self.out_features = len(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        peak = rows.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        y = torch.ops.quantized.linear_dynamic(torch.cat((rows / peak, self.pin)), self.packed, True)[:-1] * peak
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class KVCache:
    """Rotated keys and values per layer, laid out (slot, position, kv_head, head_dim).

    One extra position at index `max_len` is scratch: padded query rows write there, so a padded
    batch never overwrites real entries and never reads the scratch back.
    """

    def __init__(self, cfg: LLaDAConfig, slots: int, max_len: int, dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (slots, max_len + 1, cfg.n_kv_heads, cfg.head_dim)
        self.max_len = max_len
        self.slots = slots
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]

    @property
    def scratch(self) -> int:
        return self.max_len

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def save(self, slot: int, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of a slot's first `n` positions (every layer), to load into a later request."""
        return [k[slot, :n].clone() for k in self.k], [v[slot, :n].clone() for v in self.v]

    def load(self, slot: int, k: list[torch.Tensor], v: list[torch.Tensor], n: int) -> None:
        for dst, src in zip(self.k + self.v, k + v):
            dst[slot, :n] = src[:n]


class Block(nn.Module):
    """One transformer layer. LLaDA's q_proj, k_proj and v_proj run as one matmul (`qkv_proj`), and
    so do ff_proj (the SiLU gate) and up_proj (`ff_in`): a small model's step, and a large one's on
    a GPU at batch 1, is bound by how many kernels run, not by their size. The state dict keeps
    LLaDA's names (`FUSED`), so checkpoints load and save unchanged."""

    FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "ff_in": ("ff_proj", "up_proj")}

    def __init__(self, cfg: LLaDAConfig) -> None:
        super().__init__()
        d, q, kv = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.sizes = {"qkv_proj": [q, kv, kv], "ff_in": [cfg.mlp_hidden_size] * 2}
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qkv_proj = nn.Linear(d, q + 2 * kv, bias=cfg.include_qkv_bias)
        # Qwen3's per-head norms of queries and keys, before RoPE; identity elsewhere.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.attn_out = nn.Linear(q, d, bias=False)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_in = nn.Linear(d, 2 * cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, d, bias=False)
        self.register_state_dict_post_hook(lambda m, state, prefix, _: m.split_fused(state, prefix))
        self.register_load_state_dict_pre_hook(lambda m, state, prefix, *_: m.join_fused(state, prefix))

    def split_fused(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        """LLaDA's names in a state dict of this block (views of the fused weights and biases)."""
        for fused, parts in self.FUSED.items():
            for kind in ("weight", "bias"):
                if f"{prefix}{fused}.{kind}" in state:
                    for name, w in zip(parts, state.pop(f"{prefix}{fused}.{kind}").split(self.sizes[fused])):
                        state[f"{prefix}{name}.{kind}"] = w

    def join_fused(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        """The fused weights from LLaDA's, in place: the parts leave `state` as each joined weight
        enters it, so a loader that joins its own dict holds one copy of the weights, not two."""
        for fused, parts in self.FUSED.items():
            for kind in ("weight", "bias"):
                names = [f"{prefix}{name}.{kind}" for name in parts]
                if all(n in state for n in names):  # else load_state_dict names what is missing
                    state[f"{prefix}{fused}.{kind}"] = torch.cat([state.pop(n) for n in names])

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor, object, int] | None,
    ) -> torch.Tensor:
        n, t, _ = x.shape
        qkv = self.qkv_proj(self.attn_norm(x)).view(n, t, -1, self.head_dim)
        q, k, v = qkv.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2)
        q, k = apply_rotary(self.q_norm(q), cos, sin), apply_rotary(self.k_norm(k), cos, sin)
        if kv is not None:
            ck, cv, write_idx, rows, n_keys = kv
            ck[write_idx] = k.to(ck.dtype)
            cv[write_idx] = v.to(cv.dtype)
            # The cache may be stored in another dtype than the model runs in; SDPA needs one.
            k, v = ck[rows, :n_keys].to(q.dtype), cv[rows, :n_keys].to(q.dtype)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=attn_mask,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        x = x + self.attn_out(y.transpose(1, 2).reshape(n, t, -1))
        gate, up = self.ff_in(self.ff_norm(x)).chunk(2, dim=-1)
        return x + self.ff_out(F.silu(gate) * up)


class Transformer(nn.Module):
    def __init__(self, cfg: LLaDAConfig) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.embedding_size, cfg.d_model),
                blocks=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers)),
                ln_f=RMSNorm(cfg.d_model, cfg.rms_norm_eps),
            )
        )
        if not cfg.weight_tying:
            self.transformer["ff_out"] = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)


class DiffusionLM(nn.Module):
    """LLaDA-layout mask predictor: hidden states for every query position, logits on demand."""

    def __init__(self, cfg: LLaDAConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Transformer(cfg)
        self.compiled = False
        self.graphed = False
        self.head: Int8Linear | None = None  # the output head's int8 copy, once quantized
        self.n_params = sum(p.numel() for p in self.parameters())  # int8 weights are not torch parameters

    def forward(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (N, T, d) for query tokens `ids` (N, T) at positions `pos`.

        `key_valid` says which keys a query may attend: (N, S) the same for every query of a row
        (padding), or (N, T, S) per query (a block-causal model's blocks, see `LLaDAConfig`).
        Without a cache the queries are also the keys (S = T).
        With a cache, row i writes its keys/values into `cache` slot `slots[i]` at `pos[i]`
        (padding rows should point `pos` at `cache.scratch`) and attends over that slot's
        positions [0, S) where `key_valid` is True.
        """
        n, t = ids.shape
        if pos is None:
            pos = torch.arange(t, device=ids.device).expand(n, t)
        attn_mask = None
        if key_valid is not None and not bool(key_valid.all()):
            attn_mask = key_valid[:, None, None, :] if key_valid.dim() == 2 else key_valid[:, None]
        kv = None
        if cache is not None:
            assert slots is not None and key_valid is not None, "a cached forward needs slots and key_valid"
            write_idx, rows = _cache_index(slots, pos, views=not (self.compiled or self.graphed))
            kv = (cache.k, cache.v, write_idx, rows, key_valid.shape[-1])
        return self._layers(ids, pos, attn_mask, kv)

    def _layers(self, ids: torch.Tensor, pos: torch.Tensor, attn_mask: torch.Tensor | None, kv: tuple | None) -> torch.Tensor:
        """The tensor work of a forward, free of Python-level decisions: what `compile_layers` compiles."""
        cfg = self.config
        cos, sin = rotary(pos, cfg.head_dim, cfg.rope_theta)
        tr = self.model.transformer
        x = tr["wte"](ids)
        for i, block in enumerate(tr["blocks"]):
            x = block(x, cos, sin, attn_mask, None if kv is None else (kv[0][i], kv[1][i], *kv[2:]))
        return tr["ln_f"](x)

    def compile_layers(self, regional: bool | None = None) -> None:
        """Compile the forward's layers with torch.compile (inductor, dynamic shapes).

        Why: a small model's cached step is hundreds of short ops, a large one's on a GPU is
        launch-bound at batch 1; fused kernels cut both. `regional` (the default on a GPU) compiles
        the blocks one by one: they share one graph, with the weights as its inputs, so compiling
        costs one block's time whatever the depth (an 8B checkpoint has 32). Otherwise (the default
        on a CPU, where models are small) the whole stack is one graph: no guards to check between
        blocks and fusion across them (the default model's cached step in bf16 on an AMX Xeon:
        4.5 ms eager, 4.2 regional, 3.3 whole). Each kind of call (one row; several rows, key
        padding or not) compiles once, so callers warm up (see decoding.Runner.warm_up).
        """
        if self.compiled:
            return
        if self.int8:
            raise ConfigError("int8 weights run eager: not with compiled layers")
        if regional is None:
            regional = next(self.parameters()).device.type != "cpu"
        if regional:
            for block in self.model.transformer["blocks"]:
                block.compile(dynamic=True)
            compiled = self._layers
        else:
            compiled = torch.compile(self._layers, dynamic=True)

        def layers(*args: object) -> torch.Tensor:
            # Without duck sizing: sizes equal by chance at the first call (a full forward's queries
            # and keys, a batch of 8 in 8 cache slots) would be compiled in as equal, and every
            # later call where they differ would compile again.
            with fx_config.patch(use_duck_shape=False):
                return compiled(*args)

        self._layers = layers
        self.compiled = True

    def use_cuda_graphs(self, max_query_tokens: int = 1024) -> None:
        """Replay cached forwards of up to `max_query_tokens` query tokens from CUDA graphs.

        Why: at batch 1 a large model's decoding step is bound by the host launching its kernels
        (an 8B model: ~1,400 launches, 18 ms, for 7 ms of GPU work); a graph launches them all at
        once. One graph per shape, captured at its first call; larger forwards (prefills) stay eager.
        """
        if self.graphed:
            return
        if self.compiled:
            raise ConfigError("CUDA graphs and compiled layers are one or the other")
        if next(self.parameters()).device.type != "cuda":
            raise ConfigError("CUDA graphs need the model on a CUDA device (--device cuda)")
        self._layers = CudaGraphs(self._layers, max_query_tokens)
        self.graphed = True

    @property
    def int8(self) -> bool:
        return self.head is not None

    @property
    def weight_format(self) -> str:
        """What the weights are stored as, for reports: int8 or the parameters' dtype."""
        return "int8" if self.int8 else str(next(self.parameters()).dtype).removeprefix("torch.")

    def quantize_int8(self, calibration: list[torch.Tensor] = ()) -> None:
        """Int8 weights (Int8Linear) in every block's projections and in the output head, for
        decoding on a CPU. The embedding stays fp32 (a lookup reads one row); so do the norms.
        With `calibration` (rows of token ids), activation outliers are first moved into the
        weights (`smooth`), where per-channel scales absorb them."""
        if self.int8:
            return
        param = next(self.parameters())
        if param.device.type != "cpu" or param.dtype != torch.float32:
            raise ConfigError(f"int8 weights are for a model in float32 on a CPU, not {self.weight_format} on {param.device}")
        if self.compiled or self.graphed:
            raise ConfigError("int8 weights run eager: not with compiled layers or CUDA graphs")
        if len(calibration):
            self.smooth(calibration)
        for block in self.model.transformer["blocks"]:
            for name in ("qkv_proj", "attn_out", "ff_in", "ff_out"):
                linear = getattr(block, name)
                setattr(block, name, Int8Linear(linear.weight, linear.bias))
        tr = self.model.transformer
        self.head = Int8Linear(tr["wte"].weight if self.config.weight_tying else tr.pop("ff_out").weight, None)

    @torch.no_grad()
    def smooth(self, calibration: list[torch.Tensor], alpha: float = 0.5) -> None:
        """SmoothQuant's migration (Xiao et al., 2023), the same function in exact arithmetic: input
        channel j of `qkv_proj`, `ff_in` and `ff_out` is divided by s_j = max|x_j|^alpha /
        max|w_j|^(1 - alpha) (x from causal forwards over `calibration`) and its weight column
        multiplied by it; the division is folded into the RMSNorm gain before the first two and
        into `up_proj`'s rows before `ff_out`. Why: a few channels carry activations tens of times
        the rest, which a per-row activation scale must cover; weights take them per channel."""
        blocks = self.model.transformer["blocks"]
        peaks: dict[nn.Module, torch.Tensor] = {}

        def record(module: nn.Module, args: tuple, _: torch.Tensor) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).abs().amax(0)
            peaks[module] = torch.maximum(peaks[module], x) if module in peaks else x

        hooks = [getattr(b, name).register_forward_hook(record) for b in blocks for name in ("qkv_proj", "ff_in", "ff_out")]
        try:
            for ids in calibration:
                t = len(ids)
                self(ids[None], key_valid=torch.ones(1, t, t, dtype=torch.bool).tril())
        finally:
            for h in hooks:
                h.remove()

        def scale(linear: nn.Linear) -> torch.Tensor:
            s = (peaks[linear].clamp(min=1e-5) ** alpha / linear.weight.abs().amax(0).clamp(min=1e-5) ** (1 - alpha)).clamp(1e-2, 1e2)
            linear.weight.mul_(s)
            return s

        for b in blocks:
            b.attn_norm.weight.div_(scale(b.qkv_proj))
            b.ff_norm.weight.div_(scale(b.ff_in))
            b.ff_in.weight[b.sizes["ff_in"][0] :].div_(scale(b.ff_out)[:, None])  # the rows of up_proj

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.head is not None:
            return self.head(hidden)[..., : self.config.vocab_size]
        tr = self.model.transformer
        weight = tr["wte"].weight if self.config.weight_tying else tr["ff_out"].weight
        rows = hidden.reshape(-1, hidden.shape[-1])
        if rows.device.type == "cpu" and rows.dtype == torch.float32 and len(rows) <= FEW_ROWS:
            # MKL multiplies a few fp32 rows by a vocabulary-sized weight much faster with the weight on the left
            return (weight @ rows.T).T[:, : self.config.vocab_size].reshape(*hidden.shape[:-1], self.config.vocab_size)
        return F.linear(hidden, weight)[..., : self.config.vocab_size]


# transformers' weight names (model.layers.{i}.<theirs>) and LLaDA's (model.transformer.blocks.{i}.<ours>).
HF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm",
    "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj", "self_attn.o_proj": "attn_out",
    "self_attn.q_norm": "q_norm", "self_attn.k_norm": "k_norm",
    "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out",
}
HF_TOP_NAMES = {"model.embed_tokens": "wte", "model.norm": "ln_f", "lm_head": "ff_out"}


def hf_name(name: str) -> str | None:
    """LLaDA's name for a transformers weight name, None for buffers a checkpoint may carry (RoPE's)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    module, _, kind = name.rpartition(".")
    if module in HF_TOP_NAMES:
        return f"model.transformer.{HF_TOP_NAMES[module]}.{kind}"
    parts = module.split(".", 3)  # model, layers, i, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in HF_LAYER_NAMES:
        return f"model.transformer.blocks.{parts[2]}.{HF_LAYER_NAMES[parts[3]]}.{kind}"
    return name  # unknown: the loader names it as unexpected


def _cache_index(slots: torch.Tensor, pos: torch.Tensor, views: bool = True) -> tuple[tuple[torch.Tensor, torch.Tensor], object]:
    """Index for writing (slot, position) pairs, and the row selector for reading slots back.

    With `views`, consecutive slots read as a slice (a view, no copy); anything else gathers.
    Compiled layers always gather: a slice's bounds would be compiled in, once per first slot.
    """
    write = (slots[:, None].expand_as(pos), pos)
    if not views:
        return write, slots
    first = int(slots[0])
    if bool((slots == torch.arange(first, first + len(slots), device=slots.device)).all()):
        return write, slice(first, first + len(slots))
    return write, slots


class CudaGraphs:
    """`DiffusionLM._layers` replayed from one CUDA graph per input shape (and cache).

    A graph reads its inputs from static buffers and writes the KV cache in place, as the eager
    call does; each call copies its inputs in, replays, and returns a copy of the output. Shapes
    change with the prompt's length (the keys a step reads), so the least recently used graphs
    beyond `max_graphs` are dropped.
    """

    def __init__(self, layers, max_query_tokens: int, max_graphs: int = 64) -> None:
        self.layers, self.max_query_tokens, self.max_graphs = layers, max_query_tokens, max_graphs
        self.graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor, weakref.ref]] = OrderedDict()
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool: graphs replay one at a time

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, attn_mask: torch.Tensor | None, kv: tuple | None) -> torch.Tensor:
        if kv is None or ids.numel() > self.max_query_tokens:
            return self.layers(ids, pos, attn_mask, kv)
        ck, cv, (write_slots, _), rows, n_keys = kv  # the write positions are `pos` (_cache_index)
        inputs = [ids, pos, write_slots, rows] + ([] if attn_mask is None else [attn_mask])
        key = (tuple(tuple(t.shape) for t in inputs), n_keys, id(ck))
        # A graph writes into the cache it was captured with: replay it only while that cache lives.
        if key in self.graphs and self.graphs[key][3]() is ck[0]:
            self.graphs.move_to_end(key)
        else:
            self.graphs[key] = (*self._capture(inputs, ck, cv, n_keys), weakref.ref(ck[0]))
            self.graphs.move_to_end(key)
            if len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        graph, static, out, _ = self.graphs[key]
        for dst, src in zip(static, inputs):
            dst.copy_(src)
        graph.replay()
        return out.clone()

    def _capture(self, inputs: list[torch.Tensor], ck: list, cv: list, n_keys: int) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]:
        static = [t.clone() for t in inputs]  # contiguous: an expanded view cannot be copied into

        def run() -> torch.Tensor:
            ids, pos, slots, rows, *mask = static
            return self.layers(ids, pos, mask[0] if mask else None, (ck, cv, (slots, pos), rows, n_keys))

        # Warm up on a side stream (cuBLAS and SDPA pick their kernels), then capture. Both write
        # the same keys and values the call itself writes.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = run()
        return graph, static, out
