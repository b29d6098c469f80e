"""Training data for the default model: `dllm prepare-data --out DIR`.

Sources (both from PyPI, no network at run time):
  * chitchat-dataset: 7,168 human-human English chats (`chitchat_dataset/dataset.json`, MIT);
  * chatterbot-corpus: short English Q/A conversations (`chatterbot_corpus/data/english/*.yml`, BSD-3).

Every conversation becomes a list of cleaned turns with alternating speakers. Each turn after the
first is one example: the last few turns before it are the history, and roles are assigned from the
replier's view (the reply is `assistant`, the turn before it `user`, and so on backwards; the history
always starts with a `user` turn). Conversations, not examples, are split into train/eval with a
fixed seed, and examples that touch one of QUALITY_PROMPTS or of the question set (`load_questions`)
are left out of both, so the quality benchmark asks questions the model never saw verbatim.

Output in DIR:
  train.jsonl, eval.jsonl   one example a line: {"messages": [{"role", "content"}, ...], "reply": str,
                            "source": corpus}; exact duplicates are written once
  utterances.txt            every cleaned turn of the training conversations, one a line
                            (for the optional pretraining phase)
  tokenizer/                the byte-level BPE (tokenizer.json, tokenizer_config.json), trained on
                            training text only
  stats.json                the counts printed at the end
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

# Everyday spoken prompts for the quality benchmark (benchmarks.quality imports this list).
# Kept out of training and eval data: an example whose reply or last user turn equals one of these
# (after normalize_for_match) is dropped.
QUALITY_PROMPTS: list[str] = [
    "Hi, how are you?",
    "Hello there!",
    "Good morning!",
    "How is your day going?",
    "What's up?",
    "How have you been lately?",
    "What do you like to do?",
    "What do you like to do for fun?",
    "Tell me about your weekend.",
    "What are you doing this weekend?",
    "Do you have any plans for tonight?",
    "What did you have for breakfast?",
    "What is your favorite food?",
    "Do you like to cook?",
    "What kind of music do you like?",
    "Have you seen any good movies lately?",
    "What is your favorite movie?",
    "Do you read books?",
    "Do you have any pets?",
    "Do you like dogs or cats better?",
    "Where are you from?",
    "Where would you like to travel?",
    "What's the weather like today?",
    "Do you like the summer?",
    "What do you do for work?",
    "Do you like your job?",
    "Are you a student?",
    "Do you play any sports?",
    "What are your hobbies?",
    "Tell me something interesting.",
    "Tell me a joke.",
    "What makes you happy?",
    "I had a really long day today.",
    "I'm feeling a little tired.",
    "I just got back from the gym.",
    "Can you recommend a good book?",
    "What should I cook for dinner?",
    "Do you have any brothers or sisters?",
    "Thank you, that was nice talking to you.",
    "Goodbye, see you later!",
]



@dataclass(frozen=True)
class Question:
    text: str
    answers: tuple[str, ...]  # any of them in a reply (as whole words, `words`) makes it right


def load_questions(path: Path = Path(__file__).with_name("questions.json")) -> list[Question]:
    """The quality benchmark's factual and everyday questions with accepted answers, written before
    any model was trained on data from here; held out of training like QUALITY_PROMPTS."""
    return [Question(q["q"], tuple(q["a"])) for q in json.loads(path.read_text())["questions"]]


def answers_right(reply: str, question: Question) -> bool:
    """Whether `reply` holds one of the question's accepted answers, compared word by word."""
    said = f" {normalize_for_match(reply)} "
    return any(f" {normalize_for_match(a)} " in said for a in question.answers)


MAX_HISTORY_TURNS = 5  # turns of history kept before a reply (odd: history starts with the user)
MAX_TURN_CHARS = 400  # longer turns are junk for a spoken chit-chat model (lists, pasted text)

_URL = re.compile(r"https?://|www\.|\.com/|@\w+\.\w+")
_CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\ufeff]")
_TRANSLATE = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": " - ", "\u2026": "...", "\u00a0": " "})


class DataError(ValueError):
    """A corpus file is missing, empty or malformed; the message names the file."""


def clean(text: object) -> str | None:
    """One turn's text with normalized whitespace and punctuation, or None if it is junk.

    Junk: not a string, empty, no letters, mojibake (U+FFFD), URLs/e-mails, code, or overly long.
    """
    if not isinstance(text, str):
        return None
    text = unicodedata.normalize("NFKC", text).translate(_TRANSLATE)
    text = _CTRL.sub(" ", text)
    text = " ".join(text.split())
    if not text or "\ufffd" in text or "```" in text or _URL.search(text):
        return None
    if len(text) > MAX_TURN_CHARS or not re.search(r"[A-Za-z]", text):
        return None
    if sum(c.isascii() for c in text) < 0.9 * len(text):  # mostly non-English or emoji soup
        return None
    return text


def join_utterances(parts: Iterable[str]) -> str:
    """Consecutive messages of one speaker as one turn; a bare message end becomes a full stop."""
    out = ""
    for p in parts:
        if out and out[-1] not in ".!?,;:-":
            out += "."
        out = f"{out} {p}" if out else p
    return out


def words(text: str) -> list[str]:
    """Lowercased words of letters, digits and apostrophes ("i'm"): what texts are compared by."""
    return re.findall(r"[a-z0-9']+", text.lower().replace("\u2019", "'"))


def normalize_for_match(text: str) -> str:
    """How quality prompts are matched: their words, one space apart."""
    return " ".join(words(text))


def repeats_a_word(text: str, longest: int = 1) -> bool:
    """A word (or a phrase of up to `longest` words) three times in a row: a loop, in a reply."""
    w = words(text)
    return any(w[i : i + n] == w[i + n : i + 2 * n] == w[i + 2 * n : i + 3 * n] for n in range(1, longest + 1) for i in range(len(w) - 3 * n + 1))


@dataclass
class Conversation:
    id: str
    turns: list[str | None]  # None marks a junk turn: no example spans it


def load_chitchat(path: str | Path | None = None) -> list[Conversation]:
    if path is None:
        import chitchat_dataset

        path = Path(chitchat_dataset.__file__).parent / "dataset.json"
    path = Path(path)
    raw = _read_json(path)
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: expected a non-empty JSON object of conversations")
    convs = []
    for cid, conv in raw.items():
        try:
            messages = conv["messages"]
            turns = []
            for group in messages:
                parts = [clean(m["text"]) for m in group]
                turns.append(None if not parts or None in parts else join_utterances(parts))
        except (KeyError, TypeError) as e:
            raise DataError(f"{path}: conversation {cid!r} is malformed ({type(e).__name__}: {e}); expected messages: [[{{'text': ...}}, ...], ...]") from None
        convs.append(Conversation(f"chitchat/{cid}", turns))
    return convs


def load_chatterbot(directory: str | Path | None = None, skipped: list[str] | None = None) -> list[Conversation]:
    """Conversations of every *.yml file; a stray non-list entry (trivia.yml has one) is skipped
    and named in `skipped`; a file that is empty or not a corpus at all is an error."""
    import yaml

    if directory is None:
        import chatterbot_corpus

        directory = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    directory = Path(directory)
    files = sorted(directory.glob("*.yml"))
    if not files:
        raise DataError(f"{directory}: no *.yml corpus files")
    convs = []
    for path in files:
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not valid YAML: {e}") from None
        if not raw:
            raise DataError(f"{path}: corpus file is empty")
        if not isinstance(raw, dict) or not isinstance(raw.get("conversations"), list):
            raise DataError(f"{path}: expected a mapping with a 'conversations' list")
        for i, conv in enumerate(raw["conversations"]):
            if not isinstance(conv, list):
                if skipped is not None:
                    skipped.append(f"{path.name}:{i}")
                continue
            convs.append(Conversation(f"chatterbot/{path.stem}/{i}", [clean(t) for t in conv]))
    return convs


def _read_json(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: corpus file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8: {e}") from None
    if not text.strip():
        raise DataError(f"{path}: corpus file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None


def segments(turns: list[str | None]) -> Iterator[list[str]]:
    """Runs of consecutive good turns (junk turns cut a conversation)."""
    run: list[str] = []
    for t in turns:
        if t is None:
            if run:
                yield run
            run = []
        else:
            run.append(t)
    if run:
        yield run


def examples(conv: Conversation, max_history: int = MAX_HISTORY_TURNS) -> Iterator[dict]:
    """history -> next speaker's reply, for every turn that has a turn before it, tagged with its
    corpus (`chitchat`, `chatterbot/greetings`, ...) so that training can weight the sources."""
    source = conv.id.rsplit("/", 1)[0]
    for seg in segments(conv.turns):
        for i in range(1, len(seg)):
            start = max(0, i - max_history)
            if (i - start) % 2 == 0:  # the history must start with the user's turn
                start += 1
            history = seg[start:i]
            roles = ["user" if (i - j) % 2 else "assistant" for j in range(start, i)]
            yield {"messages": [{"role": r, "content": c} for r, c in zip(roles, history)], "reply": seg[i], "source": source}


def split_conversations(convs: list[Conversation], holdout: float, seed: int) -> tuple[list[Conversation], list[Conversation]]:
    """Fixed-seed split by conversation id (independent of load order)."""
    ids = sorted(c.id for c in convs)
    random.Random(seed).shuffle(ids)
    n_eval = round(len(ids) * holdout)
    eval_ids = set(ids[:n_eval])
    return [c for c in convs if c.id not in eval_ids], [c for c in convs if c.id in eval_ids]


def touches_quality_prompt(ex: dict, banned: set[str]) -> bool:
    return normalize_for_match(ex["reply"]) in banned or normalize_for_match(ex["messages"][-1]["content"]) in banned


def prepare(
    out_dir: str | Path,
    holdout: float = 0.05,
    seed: int = 0,
    vocab_size: int = 4096,
    chitchat_path: str | Path | None = None,
    chatterbot_dir: str | Path | None = None,
    max_history: int = MAX_HISTORY_TURNS,
    verbose: bool = True,
) -> dict:
    """Build train/eval examples, utterances and the tokenizer in `out_dir`; returns the counts."""
    from .bpe import train_tokenizer

    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    out = Path(out_dir)
    skipped: list[str] = []
    convs = load_chitchat(chitchat_path) + load_chatterbot(chatterbot_dir, skipped)
    if not convs:
        raise DataError("the corpora hold no conversations")
    train_convs, eval_convs = split_conversations(convs, holdout, seed)
    banned = {normalize_for_match(p) for p in QUALITY_PROMPTS + [q.text for q in load_questions()]}
    stats: dict = {"conversations": len(convs), "train_conversations": len(train_convs), "eval_conversations": len(eval_convs)}
    stats["turns"] = sum(len(c.turns) for c in convs)
    stats["junk_turns"] = sum(t is None for c in convs for t in c.turns)
    stats["skipped_malformed_entries"] = skipped
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train_convs), ("eval", eval_convs)):
        kept = dropped = duplicates = 0
        seen: set[str] = set()  # chatterbot's tech_support repeats each of its 10 exchanges ~100 times
        with open(out / f"{name}.jsonl.tmp", "w", encoding="utf-8") as f:
            for conv in part:
                for ex in examples(conv, max_history):
                    if touches_quality_prompt(ex, banned):
                        dropped += 1
                        continue
                    line = json.dumps(ex, ensure_ascii=False)
                    key = json.dumps([ex["messages"], ex["reply"]], ensure_ascii=False)
                    if key in seen:
                        duplicates += 1
                        continue
                    seen.add(key)
                    f.write(line + "\n")
                    kept += 1
        (out / f"{name}.jsonl.tmp").replace(out / f"{name}.jsonl")
        stats[f"{name}_examples"] = kept
        stats[f"{name}_dropped_quality_prompts"] = dropped
        stats[f"{name}_duplicates_dropped"] = duplicates
    utterances = [t for c in train_convs for seg in segments(c.turns) for t in seg if normalize_for_match(t) not in banned]
    (out / "utterances.txt").write_text("\n".join(utterances) + "\n", encoding="utf-8")
    stats["utterances"] = len(utterances)
    stats["utterance_words"] = sum(len(u.split()) for u in utterances)
    tok = train_tokenizer(utterances, vocab_size, out / "tokenizer")
    stats["vocab_size"] = tok.get_vocab_size()
    stats["utterance_tokens"] = sum(len(e.ids) for e in tok.encode_batch(utterances, add_special_tokens=False))
    stats["seed"], stats["holdout"] = seed, holdout
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    if verbose:
        for k, v in stats.items():
            print(f"{k:>32}: {v}")
    return stats
