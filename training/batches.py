"""Training rows: chat examples and utterances read, encoded and batched.

A training row is the chat-template prompt (history ending with the assistant header), never
masked, followed by a reply region of `reply_len` tokens: the reply, <|eot_id|>, then
<|endoftext|> padding; a pretraining row is BOS, then an utterance + EOS as the region. Rows are
bucketed by length, right-padded within a batch, and padded keys are masked with `key_valid`.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from dllm_engine.config import ConfigError
from dllm_engine.tokenizer import Tokenizer

from .data import DataError


@dataclasses.dataclass
class Row:
    prompt: Sequence[int]  # never masked
    region: Sequence[int]  # maskable: reply + eot + EOS padding (or an utterance + EOS)

    @classmethod
    def compact(cls, prompt: list[int], region: list[int]) -> "Row":
        """Stored as int32 arrays: 125k rows of Python int lists would take gigabytes."""
        return cls(np.asarray(prompt, dtype=np.int32), np.asarray(region, dtype=np.int32))

    def __len__(self) -> int:
        return len(self.prompt) + len(self.region)


def read_jsonl(path: Path) -> list[dict]:
    """Chat examples; an empty file or a malformed line is a DataError naming file and line."""
    if not path.exists():
        raise DataError(f"{path}: not found (run `dllm prepare-data` first)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: malformed JSON line: {e}") from None
            msgs = ex.get("messages") if isinstance(ex, dict) else None
            if (
                not isinstance(msgs, list)
                or not msgs
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)
                or not isinstance(ex.get("reply"), str)
            ):
                raise DataError(f"{path}:{n}: expected {{\"messages\": [{{\"role\": str, \"content\": str}}, ...], \"reply\": str}}")
            rows.append(ex)
    if not rows:
        raise DataError(f"{path}: no examples (the file is empty)")
    return rows


def repeat_sources(examples: list[dict], repeats: dict[str, int]) -> list[dict]:
    """Each example as many times as `repeats` says for its source (or a parent of it; 0: left out), else once."""
    def times(source: str) -> int:
        parts = source.split("/")
        return next((repeats[p] for p in ("/".join(parts[:k]) for k in range(len(parts), 0, -1)) if p in repeats), 1)

    return [ex for ex in examples for _ in range(times(ex.get("source", "")))]


def with_history(examples: list[dict], copies: int, turns: int, seed: int) -> list[dict]:
    """The examples, then `copies` more of each whose messages start with 1..`turns` exchanges
    (a user turn and its reply) drawn from the examples' own last turns: the model learns to answer
    the last turn after a history, as a voice call gives it. Deterministic in `seed`."""
    if not copies:
        return examples
    rng = random.Random(seed)
    exchanges = [(ex["messages"][-1]["content"], ex["reply"]) for ex in examples if ex["messages"][-1]["role"] == "user"]
    out = list(examples)
    for _ in range(copies):
        for ex in examples:
            history = [{"role": role, "content": text} for pair in rng.choices(exchanges, k=rng.randint(1, turns)) for role, text in zip(("user", "assistant"), pair)]
            out.append({**ex, "messages": history + ex["messages"]})
    return out


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def fit_reply(tok: Tokenizer, reply: str, budget: int) -> list[int] | None:
    """Reply token ids within `budget` tokens: whole, else cut after its last fitting sentence."""
    ids = tok.encode(reply)
    if len(ids) <= budget:
        return ids
    sentences = _SENTENCE_END.split(reply)
    for k in range(len(sentences) - 1, 0, -1):
        ids = tok.encode(" ".join(sentences[:k]))
        if len(ids) <= budget:
            return ids
    return None


def encode_chat(tok: Tokenizer, examples: list[dict], reply_len: int, max_prompt_tokens: int, pad_to: int | None = None) -> tuple[list[Row], int]:
    """Rows for chat examples, and how many were dropped (reply or last user turn too long).
    The region is padded with EOS to `reply_len`, or with `pad_to` to the end of the `pad_to`-token
    block that holds the end of turn (TrainConfig.pad_to_block).

    Prompts over `max_prompt_tokens` lose their oldest user/assistant pairs. For speed each distinct
    message is tokenized once and prompts are assembled from the pieces; `_piece_ids` checks on a
    sample that this equals tokenizing the whole rendered template.
    """
    eot, eos = tok.special.end_of_turn, tok.special.eos
    if eot is None:
        raise ConfigError("the tokenizer has no end-of-turn token (<|eot_id|>)")
    piece, head, tail = _piece_ids(tok, examples)
    texts = list(dict.fromkeys(ex["reply"] for ex in examples))  # repeated sources: fit each reply once
    fitted = {text: ids if len(ids) <= reply_len - 1 else fit_reply(tok, text, reply_len - 1) for text, ids in zip(texts, _encode_batch(tok, texts))}
    rows, dropped = [], 0
    for ex in examples:
        reply = fitted[ex["reply"]]
        msgs = [piece[(m["role"], m["content"])] for m in ex["messages"]]
        while len(head) + sum(map(len, msgs)) + len(tail) > max_prompt_tokens and len(msgs) > 2:
            msgs = msgs[2:]  # drop the oldest user/assistant pair; the history still starts with the user
        prompt = head + [t for m in msgs for t in m] + tail
        if reply is None or len(prompt) > max_prompt_tokens:
            dropped += 1
            continue
        length = reply_len if pad_to is None else min(reply_len, -(-(len(reply) + 1) // pad_to) * pad_to)
        region = reply + [eot] + [eos] * (length - 1 - len(reply))
        rows.append(Row.compact(prompt, region))
    return rows, dropped


def _piece_ids(tok: Tokenizer, examples: list[dict]) -> tuple[dict[tuple[str, str], list[int]], list[int], list[int]]:
    """Token ids of each distinct (role, content) message as the chat template renders it, and of
    what the template puts before the first message (BOS, or a default system turn) and after the
    last (assistant header)."""
    one = tok.render_chat([{"role": "user", "content": "x"}], add_generation_prompt=False)
    both = tok.render_chat([{"role": "user", "content": "x"}], add_generation_prompt=True)
    # Each message as rendered after a system turn: a template that puts a default system turn
    # before a conversation that has none (SmolLM2's) would otherwise add it to every piece.
    anchor = [{"role": "system", "content": "x"}] if tok.has_system_role else []
    before = tok.render_chat(anchor, add_generation_prompt=False) if anchor else ""
    keys = list(dict.fromkeys((m["role"], m["content"]) for ex in examples for m in ex["messages"]))
    texts = [tok.render_chat(anchor + [{"role": r, "content": c}], add_generation_prompt=False)[len(before) :] for r, c in keys]
    if not anchor and tok.bos_token and one.startswith(tok.bos_token):
        texts = [t[len(tok.bos_token) :] for t in texts]
    first = tok.render_chat(examples[0]["messages"][:1], add_generation_prompt=False)
    head_text = first[: len(first) - len(texts[0])] if first.endswith(texts[0]) else ""
    head, tail = tok.encode(head_text), tok.encode(both[len(one) :])
    piece = dict(zip(keys, _encode_batch(tok, texts)))
    for ex in examples[:: max(1, len(examples) // 50)]:  # the assembly must equal the real template
        whole = tok.apply_chat_template(ex["messages"])
        if whole != head + [t for m in ex["messages"] for t in piece[(m["role"], m["content"])]] + tail:
            raise ConfigError("the chat template does not tokenize message by message; cannot assemble prompts")
    return piece, head, tail


def _encode_batch(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """`tok.encode` for many texts at once (the Rust tokenizer encodes them in parallel)."""
    return [e.ids for e in tok._tok.encode_batch(texts, add_special_tokens=False)]


def read_utterances(path: Path) -> list[str]:
    """utterances.txt's non-empty lines; a missing or empty file is a DataError."""
    if not path.exists():
        raise DataError(f"{path}: not found (run `dllm prepare-data` first)")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"{path}: no utterances (the file is empty)")
    return lines


def encode_utterances(tok: Tokenizer, path: Path, max_tokens: int) -> list[Row]:
    lines = read_utterances(path)
    bos = [tok.special.bos] if tok.special.bos is not None else []
    rows = []
    for ids in _encode_batch(tok, lines):
        rows.append(Row.compact(bos, ids[: max_tokens - 1] + [tok.special.eos]))
    return rows


class Batches:
    """Length-bucketed batches over `rows`, reshuffled every epoch from (seed, epoch) alone.

    Its position (epoch, index) is all that a checkpoint needs to continue the same sequence.
    """

    def __init__(self, rows: list[Row], batch_tokens: int, max_batch: int, bucket_step: int, seed: int) -> None:
        self.rows, self.seed = rows, seed
        self.batch_tokens, self.max_batch, self.bucket_step = batch_tokens, max_batch, bucket_step
        self.epoch, self.index = 0, 0
        self._plan: list[list[int]] | None = None

    def plan(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        buckets: dict[int, list[int]] = {}
        for i, r in enumerate(self.rows):
            buckets.setdefault(-(-len(r) // self.bucket_step) * self.bucket_step, []).append(i)
        batches = []
        for length, idx in sorted(buckets.items()):
            rng.shuffle(idx)
            size = max(1, min(self.max_batch, self.batch_tokens // length))
            batches += [idx[i : i + size] for i in range(0, len(idx), size)]
        rng.shuffle(batches)
        return batches

    def __next__(self) -> list[Row]:
        if self._plan is None:
            self._plan = self.plan(self.epoch)
        if self.index >= len(self._plan):
            self.epoch, self.index = self.epoch + 1, 0
            self._plan = self.plan(self.epoch)
        batch = self._plan[self.index]
        self.index += 1
        return [self.rows[i] for i in batch]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index, self._plan = state["epoch"], state["index"], None


def collate(rows: list[Row], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """ids (N, T) right-padded; region (N, T) marks maskable tokens; key_valid (N, T) real tokens."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    region = torch.zeros((len(rows), t), dtype=torch.bool)
    key_valid = torch.zeros((len(rows), t), dtype=torch.bool)
    for i, r in enumerate(rows):
        p, n = len(r.prompt), len(r)
        ids[i, :n] = torch.from_numpy(np.concatenate([r.prompt, r.region]).astype(np.int64))
        region[i, p:n] = True
        key_valid[i, :n] = True
    return {"ids": ids.to(device), "region": region.to(device), "key_valid": key_valid.to(device)}


def iter_batches(rows: list[Row], size: int, pad_id: int, device: torch.device | str = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    """Fixed-order batches (for evaluation)."""
    for i in range(0, len(rows), size):
        yield collate(rows[i : i + size], pad_id, device)
