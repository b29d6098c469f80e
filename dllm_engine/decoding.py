"""Semi-autoregressive block decoding: what one denoising step does to a batch of sequences.

A sequence is its prompt followed by a canvas of MASK tokens, decoded in blocks left to right.
Each step runs the model over some query range, predicts every masked position of the current
block, and commits some of them for good (never remasked). Two choices make the variants:

* the commit policy (how many of the block's masked positions to commit this step):
  `vanilla` one per step in confidence order (LLaDA's reference with steps = new tokens),
  `threshold` all with confidence >= tau, at least one (Fast-dLLM), `factor` the largest n whose
  i-th confidence is >= 1 - f / (i + 1) (Fast-dLLM); `verify` is self-speculation instead
  (`Speculation`, below);
* the cache (what each step recomputes): `none` the whole sequence every step; `prefix` a full
  forward at each block start, then the block and everything after it against the frozen prefix;
  `dual` a full forward at each block start, then only the block against frozen prefix and suffix.

Sequences in one call may differ in length, policy, cache and progress: they are grouped into
full and partial forwards, right-padded, and key-masked, so each row computes exactly what it
would compute alone.

A block-causal model (`LLaDAConfig.block_causal`) attends only to its own block and the ones
before it (the prompt is the first block, or with `turn_blocks` one block per chat turn, or with
`causal_prompt` one block per token; with `attention_block` the blocks lie on absolute positions and
the decoding windows, which divide them, too), so both caches are exact and the same: a step runs
the attention block around its window (whose keys change) after whatever is not settled yet (at a
block start, the previous block with its final tokens) against the cached prefix. The masked suffix
is never computed, except by `none`.

Shifted logits (`LLaDAConfig.shift_logits`: Dream, Fast-dLLM v2, AR checkpoints): position j is
predicted from the state at j-1, so a step also runs the position before its window; for a
block-causal model that position's keys are final, and the forward that writes a finished block
also gives the next block's first prediction.

Self-speculation (`policy="verify"`, a model with shifted logits and a token-causal prompt: an AR
checkpoint from `dllm convert` and what is trained from it): the committed text is token-causal like
the prompt, and a step runs the previous step's drafts token-causally after it, then a block of
`block_size` masks after them. The drafts' own shifted predictions are the model's causal ones, so the
longest prefix of the drafts they agree with is committed, with the next causal prediction after it;
the reply is exactly the model's one-token-per-forward decoding (block size 1), and where every draft
held, the masks' predictions are the next drafts (TiDAR's scheme: diffusion drafts, causal verification,
in one forward). Greedy only; it has its own exact cache whatever `cache` says.

Cross-turn prefix reuse (`Sequence.reused`, filled in by the engine): the first positions' keys and
values come from an earlier request of the same conversation and are never recomputed, so even the
"full" forwards start after them. Exact for a `turn_blocks` model (the engine reuses whole earlier
turns only); otherwise an approximation (those keys saw the earlier turn's canvas or prompt, not
this one), which `dllm bench` measures.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from typing import Literal

import torch

from .config import LLaDAConfig
from .model import DiffusionLM, KVCache
from .tokenizer import IncrementalDetokenizer, SpecialTokens, Tokenizer

POLICIES = ("vanilla", "threshold", "factor", "verify")
CACHES = ("none", "prefix", "dual")
# With CUDA graphs (one per input shape, model.CudaGraphs) a step's keys are padded to a multiple of
# this, and its queries to a power of two, so that requests of other prompt lengths replay the same
# graphs instead of capturing their own (the padding is masked out).
GRAPH_KEYS_BUCKET = 128


@dataclasses.dataclass(frozen=True)
class DecodeParams:
    policy: Literal["vanilla", "threshold", "factor"] = "threshold"
    cache: Literal["none", "prefix", "dual"] = "dual"
    threshold: float = 0.9
    factor: float = 1.0
    block_size: int = 32
    # None: the model's own reply length (`max_new_tokens` in its generation_config.json: the canvas
    # it was trained to fill), else `fallback_max_new_tokens`. The engine resolves it at submit.
    max_new_tokens: int | None = None
    fallback_max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int | None = None
    early_stop: bool = True

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.cache not in CACHES:
            raise ValueError(f"unknown cache {self.cache!r}; choose one of {', '.join(CACHES)}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.factor <= 0:
            raise ValueError(f"factor must be > 0, got {self.factor}")
        if self.block_size < 1 or (self.max_new_tokens is not None and self.max_new_tokens < 1) or self.fallback_max_new_tokens < 1:
            raise ValueError("block_size and max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.policy == "verify" and self.temperature:
            raise ValueError("the verify policy decodes greedily: its reply is the model's greedy one-token-per-forward decoding")

    def resolved(self, model_max_new_tokens: int | None) -> "DecodeParams":
        """These params with max_new_tokens decided: as given, else the model's, else the fallback."""
        if self.max_new_tokens is not None:
            return self
        return dataclasses.replace(self, max_new_tokens=model_max_new_tokens or self.fallback_max_new_tokens)

    @property
    def canvas_len(self) -> int:
        """max_new_tokens rounded up to whole blocks."""
        if self.max_new_tokens is None:
            raise ValueError("max_new_tokens is not resolved yet (DecodeParams.resolved)")
        return -(-self.max_new_tokens // self.block_size) * self.block_size


# Spoken replies: short, and small blocks, because the shipped model is rarely confident (a block
# costs about one step per token, and the first words come after the first block); at most the
# model's own reply length, else 48 tokens. The voice agent decodes with these; the benchmarks
# measure them.
SPOKEN = DecodeParams(block_size=4, fallback_max_new_tokens=48)


@dataclasses.dataclass
class StepInfo:
    """One denoising step of one request, for visualization."""

    block: int
    step: int  # step within the block
    positions: list[int]  # canvas offsets committed this step
    tokens: list[int]
    masked_left: int  # masked positions still in the block


@dataclasses.dataclass
class Stats:
    prompt_tokens: int
    reused_tokens: int  # prompt positions whose keys/values came from the conversation's previous request
    new_tokens: int  # committed tokens up to (not including) the first EOS / end of turn
    forwards: int
    blocks: int
    first_text_ms: float | None
    first_block_ms: float | None
    total_ms: float

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / max(self.forwards, 1)


@dataclasses.dataclass
class Output:
    """What a request produced in one engine step. Text arrives strictly in canvas order."""

    request_id: str
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    step: StepInfo | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    stats: Stats | None = None
    error: str | None = None


class Sequence:
    """Decoding state of one request: its canvas, current block and what was streamed."""

    def __init__(
        self,
        request_id: str,
        prompt: list[int],
        params: DecodeParams,
        tokenizer: Tokenizer,
        device: torch.device,
        block_causal: bool = False,
        turn_blocks: bool = False,
        *,
        causal_prompt: bool = False,
        attention_block: int | None = None,
        shift: bool = False,
    ) -> None:
        self.id = request_id
        self.params = params
        self.block_causal = block_causal
        # Every position its own attention block (a token-causal prompt, then blocks of one token): a
        # settled position's keys are those any longer sequence repeating it computes, reply and all.
        self.token_causal = causal_prompt and params.block_size == 1 and not attention_block
        self.shift = int(shift)  # the window's predictions come from the positions one before it
        w = params.block_size
        self.prompt_len = n = len(prompt)
        self.length = sequence_length(n, params, attention_block)
        self.first_window = n // w * w if attention_block else n
        self.n_blocks = (self.length - self.first_window) // w
        mask = tokenizer.special.mask
        self.ids = torch.tensor(prompt + [mask] * (self.length - n), dtype=torch.long, device=device)
        # Each position's attention block (block-causal models only; see `attention_blocks`), and
        # the span of the attention block around each decoding window.
        turn_end = tokenizer.special.end_of_turn if turn_blocks else None
        self.blocks = attention_blocks(self.ids[:n], self.length - n, w, turn_end, causal_prompt, attention_block) if block_causal else None
        self.spans = _spans(self.blocks.tolist(), range(self.first_window, self.length, w)) if block_causal else None
        self.block = 0
        self.block_step = 0
        self.slot: int | None = None
        self.reused = 0  # positions [0, reused) keep keys/values loaded from an earlier request
        self.settled = 0  # positions [0, settled) have keys/values computed from their final tokens
        self.generator: torch.Generator | None = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        self.detok = IncrementalDetokenizer(tokenizer)
        self.streamed = 0  # canvas offsets [0, streamed) were emitted
        self.stopped = False  # a stop token was streamed: the reply is complete
        self.forwards = 0
        self.t_start = time.perf_counter()
        self.t_first_text: float | None = None
        self.t_first_block: float | None = None

    @staticmethod
    def for_model(request_id: str, prompt: list[int], params: DecodeParams, tokenizer: Tokenizer, device: torch.device, cfg: LLaDAConfig) -> "Sequence":
        """A sequence laid out as the model's config says (attention layout, shifted logits); a
        ValueError for a policy the model cannot decode with."""
        if params.policy == "verify":
            if not (cfg.block_causal and cfg.shift_logits and cfg.causal_prompt) or cfg.attention_block:
                raise ValueError("the verify policy needs a block-causal model with shifted logits and a token-causal prompt (an AR checkpoint from `dllm convert`)")
            return Speculation(request_id, prompt, params, tokenizer, device)
        return Sequence(request_id, prompt, params, tokenizer, device, cfg.block_causal, cfg.turn_blocks,
                        causal_prompt=cfg.causal_prompt, attention_block=cfg.attention_block, shift=cfg.shift_logits)

    @property
    def block_start(self) -> int:
        return self.first_window + self.block * self.params.block_size

    @property
    def block_end(self) -> int:
        return self.block_start + self.params.block_size

    @property
    def needs_full_forward(self) -> bool:
        """A forward that (re)computes keys before the block: the whole sequence, or for a
        block-causal model with a cache, the previous block and this one."""
        return self.params.cache == "none" or self.block_step == 0

    @property
    def key_end(self) -> int:
        """Keys this step may read: [0, key_end). A block-causal block sees nothing after it."""
        return self.spans[self.block][1] if self.block_causal and self.params.cache != "none" else self.length

    @property
    def settles(self) -> int:
        """Where a block-causal step's queries end their exact part: everything before the
        attention block around the window is final, so once computed its keys never change."""
        return self.spans[self.block][0]

    def query_range(self) -> tuple[int, int]:
        """The positions a step runs, with the one before the window when logits are shifted."""
        lo, hi = self._queries()
        return min(lo, self.block_start - self.shift), hi

    def _queries(self) -> tuple[int, int]:
        if self.params.cache == "none":
            return self.reused, self.length
        if self.block_causal:  # the attention block (its keys change), after whatever is not yet settled
            return min(max(self.reused, self.settled), self.settles), self.key_end
        if self.block_step == 0:
            return self.reused, self.length
        if self.params.cache == "prefix":
            return self.block_start, self.length
        return self.block_start, self.block_end

    def stats(self) -> Stats:
        now = time.perf_counter()
        ms = lambda t: None if t is None else (t - self.t_start) * 1e3  # noqa: E731
        return Stats(
            prompt_tokens=self.prompt_len,
            reused_tokens=self.reused,
            new_tokens=len(self.detok.ids),
            forwards=self.forwards,
            blocks=self.block + (self.block_step > 0),
            first_text_ms=ms(self.t_first_text),
            first_block_ms=ms(self.t_first_block),
            total_ms=(now - self.t_start) * 1e3,
        )


class Speculation(Sequence):
    """A request decoded by self-speculation (`policy="verify"`, module docstring). Positions
    [0, committed) are final, [committed, committed + drafts) hold the last step's drafts; every
    position is its own attention block but a step's masks, which share one after the drafts."""

    def __init__(self, request_id: str, prompt: list[int], params: DecodeParams, tokenizer: Tokenizer, device: torch.device) -> None:
        params = dataclasses.replace(params, early_stop=True)  # nothing after the stop token is ever computed
        super().__init__(request_id, prompt, params, tokenizer, device, block_causal=True, causal_prompt=True, shift=True)
        self.blocks = torch.arange(self.length, device=device)
        self.token_causal = True  # what it settles, it computed token-causally
        self.committed = self.prompt_len
        self.drafts = 0

    @property
    def block_start(self) -> int:
        return self.committed

    @property
    def window_end(self) -> int:
        """The end of this step's masks, which is where its keys end."""
        return self.committed + self.drafts + self.params.block_size

    @property
    def needs_full_forward(self) -> bool:
        return False

    @property
    def key_end(self) -> int:
        return self.window_end

    def query_range(self) -> tuple[int, int]:
        """From the first position whose keys are not final (the last committed one, at least: its
        state predicts the first draft) to the end of the masks."""
        return min(max(self.reused, self.settled), self.committed - 1), self.window_end

    def lay_out(self) -> None:
        """This step's attention blocks: the drafts token-causal, the masks one block after them."""
        start, masks = self.committed, self.committed + self.drafts
        self.blocks[start:] = torch.arange(start, self.length, device=self.blocks.device)
        self.blocks[masks : self.window_end] = masks

    def accept(self, predicted: list[int], mask: int) -> list[int]:
        """Commit the drafts the model's causal predictions agree with, then its next prediction;
        the masks' predictions become the next drafts if every draft held. `predicted[j]` is the
        prediction for position committed + j. Returns the committed tokens (within the reply cap)."""
        c, k = self.committed, self.drafts
        drafts = self.ids[c : c + k].tolist()
        held = next((j for j, (d, p) in enumerate(zip(drafts, predicted)) if d != p), k)
        room = self.prompt_len + self.params.max_new_tokens - c
        new = (drafts[:held] + [predicted[held]])[:room]
        following = predicted[k + 1 :] if held == k else []  # drafts for what comes after the new tokens
        following = following[: max(0, room - len(new))]
        self.ids[c:] = mask
        self.ids[c : c + len(new) + len(following)] = torch.tensor(new + following, device=self.ids.device)
        self.settled = c + held  # the accepted drafts' keys were computed causally from their final tokens
        self.committed, self.drafts = c + len(new), len(following)
        return new


def sequence_length(prompt_len: int, params: DecodeParams, attention_block: int | None = None) -> int:
    """Prompt and canvas. Decoding windows of `block_size` follow the prompt, or, for a model with
    fixed attention blocks, lie on absolute positions (as it was trained): the first window then
    also holds the prompt's last tokens, and a window must divide the attention block. Under the
    verify policy, room for a step's drafts and masks past the reply cap."""
    w = params.block_size
    if params.policy == "verify":
        return prompt_len + params.canvas_len + 2 * w
    if not attention_block:
        return prompt_len + params.canvas_len
    if attention_block % w:
        raise ValueError(f"block_size {w} does not divide the model's attention block of {attention_block} tokens")
    return -(-prompt_len // w) * w + params.canvas_len


def attention_blocks(
    prompt: torch.Tensor, canvas_len: int, block_size: int, turn_end: int | None = None, causal_prompt: bool = False, attention_block: int | None = None
) -> torch.Tensor:
    """The attention block of each position of a block-causal model's sequence: the prompt is
    block 0, or with `turn_end` (`LLaDAConfig.turn_blocks`) one block per chat turn, each ending at
    that token, or with `causal_prompt` one block per token; then the canvas's decoding blocks of
    `block_size`. With `attention_block`, blocks of that size on absolute positions instead."""
    n = len(prompt)
    if attention_block:
        return torch.arange(n + canvas_len, device=prompt.device) // attention_block
    if causal_prompt:
        in_prompt = torch.arange(n, device=prompt.device)
    elif turn_end is None:
        in_prompt = torch.zeros_like(prompt)
    else:
        ends = (prompt == turn_end).long()
        in_prompt = ends.cumsum(-1) - ends  # turn ends before each position
    first = int(in_prompt[-1]) + 1 if n else 0
    return torch.cat([in_prompt, first + torch.arange(canvas_len, device=prompt.device) // block_size])


def _spans(blocks: list[int], starts: range) -> list[tuple[int, int]]:
    """[start, end) of the attention block around each decoding window's first position."""
    return [(bisect.bisect_left(blocks, blocks[w]), bisect.bisect_right(blocks, blocks[w])) for w in starts]


def block_causal_keys(query_pos: torch.Tensor, blocks: torch.Tensor, n_keys: int) -> torch.Tensor:
    """(T, n_keys): which keys each query position may attend: those of its own block and earlier
    ones (`blocks` from `attention_blocks`). Positions past the sequence (a batch's padding) count
    as its last block; the caller's key mask hides those keys."""
    at = lambda p: blocks[p.clamp(max=len(blocks) - 1)]  # noqa: E731
    return at(torch.arange(n_keys, device=query_pos.device))[None, :] <= at(query_pos)[:, None]


def commit_counts(conf_sorted: torch.Tensor, policy: torch.Tensor, threshold: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """How many positions each row commits this step, from its confidences sorted descending.

    `conf_sorted` is (N, B) with -inf for positions that are not masked; `policy` holds indices
    into POLICIES. Every row with a masked position commits at least one.
    """
    n_masked = torch.isfinite(conf_sorted).sum(-1)
    rank = torch.arange(1, conf_sorted.shape[1] + 1, device=conf_sorted.device)
    above = (conf_sorted >= threshold[:, None]).sum(-1)
    ok = conf_sorted >= 1 - factor[:, None] / (rank + 1)
    ok[:, 0] = True
    by_factor = ok.long().cumprod(-1).sum(-1)
    count = torch.where(policy == 0, 1, torch.where(policy == 1, above, by_factor))
    return torch.minimum(count.clamp(min=1), n_masked)


def predict(
    logits: torch.Tensor, temperature: torch.Tensor, generators: list[torch.Generator | None], mask: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted tokens and their confidences (softmax probability under the unperturbed logits).

    Rows with temperature > 0 sample by the Gumbel-max trick as LLaDA does, with their own
    generator so a seeded request decodes the same alone or in a batch. The `mask` token is never
    predicted: committing it would leave its position masked (an AR checkpoint's mask is a
    reused token it may well predict).
    """
    logits = logits.float()
    norm = logits.logsumexp(-1)
    if mask is not None:
        logits = logits.index_fill(-1, torch.tensor([mask], device=logits.device), -torch.inf)
    if bool((temperature > 0).any()):
        scores = logits.clone()
        for i, gen in enumerate(generators):
            if gen is not None:
                u = torch.rand(logits.shape[1:], generator=gen, device=logits.device, dtype=torch.float64)
                scores[i] = (logits[i].double() / float(temperature[i]) - torch.log(-torch.log(u))).float()
        x0 = scores.argmax(-1)
        top = logits.gather(-1, x0[..., None]).squeeze(-1)
    else:
        top, x0 = logits.max(-1)
    conf = torch.exp(top - norm)  # softmax of the chosen token, without the whole softmax
    return x0, conf


class Runner:
    """Runs denoising steps for any mix of sequences against one model and one KV cache."""

    def __init__(self, model: DiffusionLM, tokenizer: Tokenizer, cache: KVCache) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.special: SpecialTokens = tokenizer.special
        self.cache = cache
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One forward of each kind a step makes (one row; two rows of equal and of unequal length;
        for a block-causal model also with a mask per query, as its block starts have).

        For compiled layers, which compile on their first call of each kind: tens of seconds that
        belong at start-up, not inside the first requests. Writes only slots 0-1, positions 0-7,
        which every request rewrites before reading.
        """
        kinds = [[8], [8, 8], [8, 6]] if self.cache.slots > 1 else [[8]]
        order = torch.arange(8, device=self.device)
        for lengths in kinds:
            n = len(lengths)
            key_valid = order < torch.tensor(lengths, device=self.device)[:, None]
            ids = torch.full((n, 8), self.special.pad, dtype=torch.long, device=self.device)
            pos = order.expand(n, 8).contiguous()
            masks = [key_valid] + ([key_valid[:, None, :] & (order[:, None] >= order)] if self.model.config.block_causal else [])
            for mask in masks:
                self.model(ids, pos, mask, self.cache, torch.arange(n, device=self.device))

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], want_steps: set[str] = frozenset()) -> list[Output]:
        """One denoising step for every sequence; returns one Output per sequence.

        Sequences that need a full forward and those that need a partial one (and any with a
        different block size), and self-speculating ones, run as separate batched forwards.
        """
        groups: dict[tuple[bool, bool, int], list[Sequence]] = {}
        for s in seqs:
            groups.setdefault((isinstance(s, Speculation), s.needs_full_forward, s.params.block_size), []).append(s)
        return [out for (verify, _, _), group in groups.items() for out in (self._verify_group if verify else self._step_group)(group, want_steps)]

    def _logits(self, seqs: list[Sequence], widths: list[int]) -> torch.Tensor:
        """One forward over each sequence's query range; the logits that predict the `widths[i]`
        positions from its block start, (N, max width, V) (a shorter row's tail is padding)."""
        dev, n = self.device, len(seqs)
        ranges = [s.query_range() for s in seqs]
        t = max(b - a for a, b in ranges)
        s_keys = max(s.key_end for s in seqs)
        if self.model.graphed:
            t = 1 << (t - 1).bit_length()
            s_keys = min(-(-s_keys // GRAPH_KEYS_BUCKET) * GRAPH_KEYS_BUCKET, self.cache.max_len)
        ids = torch.full((n, t), self.special.pad, dtype=torch.long, device=dev)
        pos = torch.full((n, t), self.cache.scratch, dtype=torch.long, device=dev)
        key_valid = torch.zeros((n, s_keys), dtype=torch.bool, device=dev)
        window = torch.empty((n, max(widths)), dtype=torch.long, device=dev)
        for i, (s, (a, b)) in enumerate(zip(seqs, ranges)):
            ids[i, : b - a] = s.ids[a:b]
            pos[i, : b - a] = torch.arange(a, b, device=dev)
            key_valid[i, : s.key_end] = True
            window[i] = torch.arange(window.shape[1], device=dev) + (s.block_start - a)
        if seqs[0].block_causal:  # queries of several blocks: each sees its own and earlier ones
            key_valid = torch.stack([block_causal_keys(p, s.blocks, s_keys) & kv for s, p, kv in zip(seqs, pos, key_valid)])
        slots = torch.tensor([s.slot for s in seqs], dtype=torch.long, device=dev)
        hidden = self.model(ids, pos, key_valid, self.cache, slots)
        # With shifted logits the window's predictions are the states one position before it.
        at = (window - seqs[0].shift).clamp(max=t - 1)
        return self.model.logits(hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1])))

    def _step_group(self, seqs: list[Sequence], want_steps: set[str]) -> list[Output]:
        dev = self.device
        full = seqs[0].needs_full_forward  # the same for the whole group
        logits = self._logits(seqs, [s.params.block_size for s in seqs])
        block_tokens = torch.stack([s.ids[s.block_start : s.block_end] for s in seqs])
        masked = block_tokens == self.special.mask
        temperature = torch.tensor([s.params.temperature for s in seqs], device=dev)
        x0, conf = predict(logits, temperature, [s.generator for s in seqs], self.special.mask)
        conf = torch.where(masked, conf, -torch.inf)
        conf_sorted, order = conf.sort(dim=-1, descending=True, stable=True)
        policy = torch.tensor([POLICIES.index(s.params.policy) for s in seqs], device=dev)
        threshold = torch.tensor([s.params.threshold for s in seqs], device=dev)
        factor = torch.tensor([s.params.factor for s in seqs], device=dev)
        count = commit_counts(conf_sorted, policy, threshold, factor)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=dev).expand_as(order))
        commit = masked & (rank < count[:, None])
        new_block = torch.where(commit, x0, block_tokens)

        new_block_cpu, commit_cpu = new_block.tolist(), commit.tolist()
        outputs = []
        for i, s in enumerate(seqs):
            bs = s.block_start
            s.ids[bs : bs + s.params.block_size] = new_block[i]
            s.forwards += 1
            if s.block_causal:  # what precedes the window's attention block was just written from its final tokens
                s.settled = s.settles
            elif full:  # everything before the block is final and was just recomputed from it
                s.settled = bs
            outputs.append(self._advance(s, new_block_cpu[i], commit_cpu[i], s.id in want_steps))
        return outputs

    def _verify_group(self, seqs: list[Speculation], want_steps: set[str]) -> list[Output]:
        """One self-speculation step (`Speculation`) for each sequence: verify, commit, draft."""
        for s in seqs:
            s.lay_out()
        widths = [s.drafts + s.params.block_size for s in seqs]
        x0, _ = predict(self._logits(seqs, widths), torch.zeros(len(seqs), device=self.device), [None] * len(seqs), self.special.mask)
        outputs = []
        for s, predicted, width in zip(seqs, x0.tolist(), widths):
            offset = s.committed - s.prompt_len
            new = s.accept(predicted[:width], self.special.mask)
            s.forwards += 1
            s.block += 1  # a window per step
            s.t_first_block = s.t_first_block or time.perf_counter()
            out = Output(request_id=s.id)
            if s.id in want_steps:
                out.step = StepInfo(s.block - 1, 0, list(range(offset, offset + len(new))), new, 0)
            self._emit(s, out, new, done=s.committed == s.prompt_len + s.params.max_new_tokens)
            outputs.append(out)
        return outputs

    def _advance(self, s: Sequence, block: list[int], committed: list[bool], want_step: bool) -> Output:
        """Book-keeping after a commit: stream the in-order prefix, move to the next block, stop."""
        out = Output(request_id=s.id)
        offset = s.block_start - s.prompt_len  # canvas offset of the block (< 0 where it holds prompt tokens)
        mask = self.special.mask
        if want_step:
            idx = [j for j, c in enumerate(committed) if c]
            out.step = StepInfo(s.block, s.block_step, [offset + j for j in idx], [block[j] for j in idx], sum(t == mask for t in block))
        s.block_step += 1
        # Stream the committed prefix: tokens after a still-masked position cannot be spoken yet.
        start = s.streamed - offset
        new: list[int] = []
        for tok in block[start:]:
            if tok == mask:
                break
            new.append(tok)
        s.streamed += len(new)
        if mask not in block:
            if s.t_first_block is None:
                s.t_first_block = time.perf_counter()
            s.block += 1
            s.block_step = 0
        self._emit(s, out, new, done=s.block == s.n_blocks)
        return out

    def _emit(self, s: Sequence, out: Output, new: list[int], done: bool) -> None:
        """Put newly final tokens into `out` up to the first stop token; finish the request at a
        stop (with early stop) or when `done` (its canvas is decoded)."""
        if not s.stopped and new:
            stop_at = next((j for j, tok in enumerate(new) if tok in self.special.stop), None)
            if stop_at is not None:
                new, s.stopped = new[:stop_at], True
            out.token_ids = new
            out.text = s.detok.push(new)
            if out.text and s.t_first_text is None:
                s.t_first_text = time.perf_counter()
        if (s.stopped and s.params.early_stop) or done:
            s.t_first_block = s.t_first_block or time.perf_counter()
            out.text += s.detok.flush()
            out.finished = True
            out.finish_reason = "stop" if s.stopped else "length"
            out.stats = s.stats()
