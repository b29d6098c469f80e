"""The async engine: a request queue, continuous batching, streaming and cancellation.

Model work runs on one engine thread, never on the caller's event loop. Each loop iteration drops
cancelled requests and admits waiting ones into free KV-cache slots (scheduler.py), then runs one
denoising step for every running request together (see decoding.Runner). Requests therefore join
and leave between steps, at their own block boundaries, while sharing forwards with the others.

Requests that name a `conversation` reuse its cached prefix (prefix_cache.py): exact for a
`turn_blocks` model or a token-causal prompt's (`Engine.exact_prefix_reuse`), an approximation for
any other, so callers ask for it only when they accept that. Where it is exact, a conversation
also takes any other's prefix that shares more of its prompt (`share_prefixes`): every call's
first turn starts with the same system prompt.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from pathlib import Path
from typing import AsyncIterator, Union

import torch

from .decoding import DecodeParams, Output, Runner, Sequence, sequence_length
from .loading import GENERATION_LIMITS, generation_defaults, load_model, model_params, on_own_thread
from .model import DiffusionLM, KVCache
from .prefix_cache import Prefix, PrefixCache
from .scheduler import Scheduler
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

CLOSED = "the engine is closed"  # why a closed engine refuses and ends requests

# A prompt is raw text, token ids, or chat messages rendered with the model's chat template.
Prompt = Union[str, list[int], list[dict[str, str]]]


async def joined(outputs: AsyncIterator[Output]) -> tuple[str, Output]:
    """A stream's whole text and its final output (with stats): `generate` for any engine with `stream`."""
    text, last = [], None
    async for out in outputs:
        text.append(out.text)
        last = out
    assert last is not None
    return "".join(text), last


class RequestError(ValueError):
    """A request the engine refuses: it names the problem; other requests are unaffected."""


class _Request:
    """A submitted request: its decoding state, and the queue its outputs reach the caller's loop by."""

    def __init__(self, seq: Sequence, loop: asyncio.AbstractEventLoop, want_steps: bool, conversation: str | None) -> None:
        self.seq = seq
        self.loop = loop
        self.want_steps = want_steps
        self.conversation = conversation
        self.outputs: asyncio.Queue[Output] = asyncio.Queue()
        self.cancelled = False

    def post(self, out: Output) -> None:
        try:
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, out)
        except RuntimeError:  # the caller's event loop is gone: nobody will read this request again
            self.cancelled = True


class Engine:
    """In-process dLLM serving: `async for out in engine.stream(prompt, params): ...`."""

    def __init__(
        self, model: DiffusionLM, tokenizer: Tokenizer, max_batch: int = 8, max_len: int | None = None, max_conversations: int = 16,
        max_new_tokens: int | None = None, max_prompt_tokens: int | None = None, compile: bool = False, cuda_graphs: bool = False,
        default_params: DecodeParams | None = None, share_prefixes: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.default_params = default_params or DecodeParams()  # the decoding the model was made for: for requests that name none
        self.max_new_tokens = max_new_tokens  # the model's reply length, for params that leave it open
        # The longest prompt the model was trained on, for callers that can trim their history
        # (the agent's Dialogue); not enforced here: a longer prompt still decodes.
        self.max_prompt_tokens = max_prompt_tokens
        cfg = model.config
        self.max_len = min(max_len or cfg.max_sequence_length, cfg.max_sequence_length)
        param = next(model.parameters())
        self.device = param.device
        self.cache = KVCache(cfg, max_batch, self.max_len, param.dtype, self.device)
        self.runner = Runner(model, tokenizer, self.cache)
        if compile:
            self._compile()
        if cuda_graphs:  # captured per shape at its first step
            model.use_cuda_graphs()
        self.max_batch = max_batch
        self._ids = itertools.count()
        self._commands: queue.Queue = queue.Queue()
        self._scheduler: Scheduler[_Request] = Scheduler(max_batch)  # the engine thread's alone
        self._requests: dict[str, _Request] = {}  # every request not yet finished
        self._prefixes = PrefixCache(max_conversations)  # both under _lock
        self.share_prefixes = share_prefixes  # where reuse is exact, a conversation may load another's prefix
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="dllm-engine", daemon=True)
        self._stopped: str | None = None  # why it stopped serving (closed, or its thread failed); set once, under _lock
        self._thread.start()

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = "auto", **kwargs) -> "Engine":
        limits = generation_defaults(path)
        for key in GENERATION_LIMITS:
            kwargs.setdefault(key, limits.get(key))
        kwargs.setdefault("default_params", model_params(path))
        # Loaded and its cache zeroed off the caller's thread, so that the engine thread's OpenMP
        # team is the only one (see on_own_thread): a second team competes for the same cores.
        return on_own_thread(lambda: cls(*load_model(path, device=device, dtype=dtype), **kwargs))

    # ---- public API -------------------------------------------------------------------------

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt) and prompt:
            return self.tokenizer.apply_chat_template(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.model.config.vocab_size]
            if bad:
                raise RequestError(f"token id(s) {bad[:5]} outside the vocabulary of {self.model.config.vocab_size}")
            return list(prompt)
        raise RequestError("a prompt must be a string, a list of token ids, or a non-empty list of chat messages")

    async def stream(
        self,
        prompt: Prompt,
        params: DecodeParams | None = None,
        request_id: str | None = None,
        step_events: bool = False,
        conversation: str | None = None,
    ) -> AsyncIterator[Output]:
        """Stream a request's outputs; the last one has `finished=True` and its stats.

        Leaving the loop early (break, task cancellation) cancels the request. With `conversation`,
        the prefix this prompt shares with that conversation's previous request is not recomputed.
        """
        req = self._submit(prompt, params or self.default_params, request_id, step_events, conversation)
        finished = False
        try:
            while True:
                out = await req.outputs.get()
                finished = out.finished
                if out.error and out.finish_reason == "error":
                    raise RequestError(out.error)
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.cancel(req.seq.id)

    async def generate(
        self, prompt: Prompt, params: DecodeParams | None = None, request_id: str | None = None, conversation: str | None = None
    ) -> tuple[str, Output]:
        """Whole reply text and the final output (with stats)."""
        return await joined(self.stream(prompt, params, request_id, conversation=conversation))

    def cancel(self, request_id: str) -> bool:
        """Free a request at the next step (barge-in). False if it is not running."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is None:
                return False
            req.cancelled = True
        self._commands.put(None)  # wake the loop if it is idle
        return True

    def forget(self, conversation: str) -> None:
        """Drop a conversation's cached prefix (its session ended); its running requests keep none."""
        with self._lock:
            self._prefixes.forget(conversation)
            for req in self._requests.values():
                if req.conversation == conversation:
                    req.conversation = None

    @property
    def exact_prefix_reuse(self) -> bool:
        """Whether `conversation=` gives the same replies as recomputing every prompt (a turn-blocks
        model, or a token-causal prompt's)."""
        return self.model.config.turn_blocks or self.model.config.causal_prompt

    @property
    def active_requests(self) -> int:
        with self._lock:
            return len(self._requests)

    def close(self, timeout: float = 10.0) -> None:
        """Stop serving: requests still running end with an error. Waits up to `timeout` seconds for
        the engine thread, so that a forward that never returns cannot hang the caller too."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = CLOSED
        self._commands.put(None)
        self._thread.join(timeout=timeout)

    # ---- internals --------------------------------------------------------------------------

    def _compile(self) -> None:
        """Compile the model's layers and run each kind of forward once, before serving."""
        self.model.compile_layers()  # wraps the layers (or refuses: int8 weights); they compile at their first call
        log.info("compiling the model's layers (torch.compile): up to a minute per kind of forward the first time, less once inductor has them on disk")
        t0 = time.perf_counter()
        try:
            self.runner.warm_up()
        except Exception as e:  # inductor needs a C++ compiler on a CPU, Triton on a GPU
            raise RuntimeError(f"torch.compile failed ({type(e).__name__}: {e}); run without compiling") from e
        log.info("compiled in %.1f s", time.perf_counter() - t0)

    def _submit(self, prompt: Prompt, params: DecodeParams, request_id: str | None, step_events: bool, conversation: str | None) -> _Request:
        if not isinstance(params, DecodeParams):
            raise RequestError(f"params must be DecodeParams, got {type(params).__name__}")
        ids = self.encode_prompt(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        params = params.resolved(self.max_new_tokens)
        cfg = self.model.config
        request_id = request_id or f"req-{next(self._ids)}"
        try:
            total = sequence_length(len(ids), params, cfg.attention_block)
            if total > self.max_len:
                raise ValueError(f"prompt of {len(ids)} tokens + {total - len(ids)} new exceeds the context of {self.max_len} tokens")
            seq = Sequence.for_model(request_id, ids, params, self.tokenizer, self.device, cfg)
        except ValueError as e:  # a decoding window or policy the model does not allow, or too long
            raise RequestError(str(e)) from None
        req = _Request(seq, asyncio.get_running_loop(), step_events, conversation)
        with self._lock:
            if self._stopped:
                raise RequestError(self._stopped)
            if request_id in self._requests:
                raise RequestError(f"request id {request_id!r} is already running")
            self._requests[request_id] = req
        self._commands.put(req)
        return req

    def _loop(self) -> None:
        """The engine thread. However it ends, no request is left waiting for an output."""
        try:
            self._serve()
            reason = CLOSED
        except BaseException as e:  # a bug outside a step: every caller gets it, none hangs
            log.exception("the engine thread failed")
            reason = f"the engine stopped ({type(e).__name__}: {e})"
        with self._lock:
            self._stopped = self._stopped or reason
            pending = list(self._requests.values())
            self._requests.clear()
        for req in pending:
            req.post(Output(req.seq.id, finished=True, finish_reason="error", error=reason))

    def _serve(self) -> None:
        sched = self._scheduler
        while not self._stopped:
            try:
                cmd = self._commands.get(block=sched.idle)
                while True:
                    if cmd is not None:
                        sched.add(cmd)
                    cmd = self._commands.get_nowait()
            except queue.Empty:
                pass
            for req in sched.take_cancelled():
                self._finish(req, Output(req.seq.id, finished=True, finish_reason="cancelled", stats=req.seq.stats()))
            for req in sched.admit():
                self._load_prefix(req)
            if not sched.running:
                continue
            try:
                outs = self.runner.step([r.seq for r in sched.running], {r.seq.id for r in sched.running if r.want_steps})
            except Exception as e:  # fail this step's requests, keep serving
                log.exception("engine step failed")
                for req in sched.take_running():
                    self._finish(req, Output(req.seq.id, finished=True, finish_reason="error", error=f"engine step failed: {e}"))
                continue
            by_id = {r.seq.id: r for r in sched.running}
            for out in outs:
                req = by_id[out.request_id]
                if out.finished:
                    sched.remove(req)
                    self._finish(req, out)
                elif out.text or out.token_ids or out.step:
                    req.post(out)

    def _load_prefix(self, req: _Request) -> None:
        if req.conversation is None:
            return
        with self._lock:
            if self.share_prefixes and self.exact_prefix_reuse:
                prefix = self._prefixes.longest(req.seq.ids[: req.seq.prompt_len].tolist(), req.conversation)
            else:
                prefix = self._prefixes.get(req.conversation)
        if prefix is not None:
            prefix.load_into(req.seq, self.cache)

    def _save_prefix(self, req: _Request) -> None:
        cfg = self.model.config
        prefix = Prefix.of_sequence(req.seq, self.cache, self.tokenizer.special.end_of_turn if cfg.turn_blocks else None, prompt_only=cfg.causal_prompt)
        with self._lock:
            if req.conversation is not None:  # else forgotten meanwhile
                self._prefixes.put(req.conversation, prefix)

    def _finish(self, req: _Request, out: Output) -> None:
        """Deliver a removed request's last output, keeping its prefix first if it has a conversation."""
        if req.conversation and req.seq.slot is not None and req.seq.settled and out.finish_reason != "error":
            self._save_prefix(req)
        self._scheduler.free(req)
        with self._lock:
            self._requests.pop(req.seq.id, None)
        req.post(out)
